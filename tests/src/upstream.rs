//! Real upstream servers for tests and the demo, on real sockets.
//!
//! - [`serve_echo`]: one port, three behaviours chosen by the request —
//!   WebSocket upgrade → an RFC 6455 echo (tokio-tungstenite; subprotocol `echo.v1` selected
//!   when offered; a first message `head` arrives right after the 101 when the path ends in
//!   `/greet`); `Upgrade: x-echo` → a byte echo tunnel; plain HTTP → `/sse` streams events,
//!   `/headers` returns the request headers as JSON, anything else echoes the body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

type Body = UnsyncBoxBody<Bytes, Infallible>;

fn text(status: StatusCode, s: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(s.into()).boxed_unsync());
    *r.status_mut() = status;
    r
}

/// Serve the echo upstream on an already-bound listener, forever.
pub async fn serve_echo(listener: TcpListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let svc = service_fn(handle);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}

/// Bind 127.0.0.1:0, serve the echo upstream in the background, return its address.
pub async fn spawn_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let a = l.local_addr().expect("addr");
    tokio::spawn(serve_echo(l));
    a
}

async fn handle(mut req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let upgrade = req
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.to_ascii_lowercase());
    match upgrade.as_deref() {
        Some("websocket") => {
            let Some(key) = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned() else {
                return Ok(text(StatusCode::BAD_REQUEST, "no key"));
            };
            let offered: Vec<String> = req
                .headers()
                .get_all(header::SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(',').map(|s| s.trim().to_string()))
                .collect();
            let greet = req.uri().path().ends_with("/greet");
            // `?push=RATE&size=BYTES`: the server pushes RATE messages a second (a market feed,
            // a dashboard) while still echoing what the client sends.
            let push = push_params(req.uri().query());
            if req.uri().path().ends_with("/refuse") {
                return Ok(text(StatusCode::FORBIDDEN, "refused by upstream"));
            }
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = on.await else { return };
                let parts = up.downcast::<TokioIo<TcpStream>>().expect("tcp stream");
                let mut io = parts.io.into_inner();
                if greet {
                    // A first frame in the same write as nothing else: right after the 101.
                    let _ = io.write_all(&[0x81, 4, b'h', b'e', b'a', b'd']).await;
                }
                let ws = WebSocketStream::from_partially_read(
                    io,
                    parts.read_buf.to_vec(),
                    Role::Server,
                    None,
                )
                .await;
                match push {
                    Some((rate, size)) => push_ws(ws, rate, size).await,
                    None => echo_ws(ws).await,
                }
            });
            let mut r = text(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
            let h = r.headers_mut();
            h.insert(header::CONNECTION, "upgrade".parse().expect("hv"));
            h.insert(header::UPGRADE, "websocket".parse().expect("hv"));
            h.insert(
                header::SEC_WEBSOCKET_ACCEPT,
                derive_accept_key(key.as_bytes()).parse().expect("hv"),
            );
            if offered.iter().any(|p| p == "echo.v1") {
                h.insert(
                    header::SEC_WEBSOCKET_PROTOCOL,
                    "echo.v1".parse().expect("hv"),
                );
            }
            h.insert("x-upstream", "echo".parse().expect("hv"));
            Ok(r)
        }
        Some("x-echo") => {
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let Ok(up) = on.await else { return };
                let parts = up.downcast::<TokioIo<TcpStream>>().expect("tcp stream");
                let mut io = parts.io.into_inner();
                let _ = io.write_all(&parts.read_buf).await;
                let (mut r, mut w) = io.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
            let mut r = text(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
            r.headers_mut()
                .insert(header::CONNECTION, "upgrade".parse().expect("hv"));
            r.headers_mut()
                .insert(header::UPGRADE, "x-echo".parse().expect("hv"));
            Ok(r)
        }
        Some(_) => Ok(text(StatusCode::BAD_REQUEST, "unknown upgrade")),
        None => Ok(http(req).await),
    }
}

fn push_params(q: Option<&str>) -> Option<(u32, usize)> {
    let mut rate = None;
    let mut size = 64;
    for kv in q?.split('&') {
        match kv.split_once('=') {
            Some(("push", v)) => rate = v.parse().ok(),
            Some(("size", v)) => size = v.parse().unwrap_or(64),
            _ => {}
        }
    }
    rate.filter(|r| *r > 0 && *r <= 1000)
        .map(|r| (r, size.clamp(1, 1 << 20)))
}

/// Push `rate` JSON-like messages of about `size` bytes a second, and echo the client.
async fn push_ws(ws: WebSocketStream<TcpStream>, rate: u32, size: usize) {
    let (mut tx, mut rx) = ws.split();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                seq += 1;
                // (`at`: when it was sent, µs since the epoch: the workload's push latency)
                let at = crate::workload::unix_us();
                let mut m = format!("{{\"seq\":{seq},\"at\":{at},\"symbol\":\"TRMT\",\"bid\":101.25,\"ask\":101.5,\"pad\":\"");
                while m.len() + 2 < size {
                    m.push_str("abcabc");
                }
                m.push_str("\"}");
                if tx.send(Message::text(m)).await.is_err() {
                    return;
                }
            }
            m = rx.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if tx.send(Message::Text(t)).await.is_err() { return; }
                }
                Some(Ok(Message::Binary(b))) => {
                    if tx.send(Message::Binary(b)).await.is_err() { return; }
                }
                Some(Ok(Message::Close(_))) => {
                    let _ = tx.close().await;
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return,
            }
        }
    }
}

async fn echo_ws(mut ws: WebSocketStream<TcpStream>) {
    while let Some(m) = ws.next().await {
        match m {
            Ok(Message::Text(t)) => {
                if t.as_str() == "close-me" {
                    let _ = ws
                        .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                            code: 4000u16.into(),
                            reason: "upstream says bye".into(),
                        }))
                        .await;
                    continue;
                }
                if ws.send(Message::Text(t)).await.is_err() {
                    break;
                }
            }
            Ok(Message::Binary(b)) => {
                if ws.send(Message::Binary(b)).await.is_err() {
                    break;
                }
            }
            Ok(Message::Close(_)) => {}
            Ok(_) => {}
            Err(_) => break,
        }
    }
}

async fn http(req: Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        p if p.ends_with("/headers") => {
            let mut m = serde_json::Map::new();
            for (k, v) in req.headers() {
                let e = m
                    .entry(k.as_str().to_string())
                    .or_insert_with(|| serde_json::Value::Array(vec![]));
                if let serde_json::Value::Array(a) = e {
                    a.push(serde_json::Value::String(
                        v.to_str().unwrap_or("").to_string(),
                    ));
                }
            }
            let mut r = text(StatusCode::OK, serde_json::Value::Object(m).to_string());
            r.headers_mut()
                .insert(header::CONNECTION, "x-hop".parse().expect("hv"));
            r.headers_mut().insert("x-hop", "1".parse().expect("hv"));
            r
        }
        p if p.ends_with("/trailers") => {
            // A chunked body followed by a trailer field.
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"body with trailers"))),
                Ok(Frame::trailers({
                    let mut t = http::HeaderMap::new();
                    t.insert("x-checksum", "abc123".parse().expect("hv"));
                    t
                })),
            ];
            let mut r =
                Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync());
            r.headers_mut()
                .insert(header::TRAILER, "x-checksum".parse().expect("hv"));
            r
        }
        p if p.ends_with("/sse") => {
            // Three events, 200 ms apart: a buffering proxy would deliver them together.
            let stream = futures_util::stream::unfold(0u32, |i| async move {
                if i >= 3 {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                let ev = Bytes::from(format!("data: event {i}\n\n"));
                Some((Ok::<_, Infallible>(Frame::data(ev)), i + 1))
            });
            let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                "text/event-stream".parse().expect("hv"),
            );
            r
        }
        _ => {
            let method = req.method().to_string();
            let body = req
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let mut r = text(StatusCode::OK, body);
            r.headers_mut()
                .insert("x-echo-method", method.parse().expect("hv"));
            r
        }
    }
}

/// Read until the peer closes or `max` bytes; for byte-tunnel tests.
pub async fn read_some(s: &mut TcpStream, want: usize, within: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(within, async {
        while out.len() < want {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    out
}
