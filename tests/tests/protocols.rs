//! Protocols beyond HTTP/1.1 and WebSocket, each with a real, independent client where the OS
//! has one: h2c (prior knowledge and Upgrade) with curl, nghttp and h2load; gRPC over h2c
//! with a client and server built here on hyper; server-sent events; CONNECT with `curl -p
//! -x`; raw TCP by listener (client- and server-speaks-first); TLS passthrough by SNI with
//! `openssl s_server`/`s_client`; PROXY protocol v1/v2 in and out; WebSocket over HTTP/2
//! (RFC 8441). Every path is also given bad input.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;
use trimtab_tests::harness::{DataPlaneProc, eventually, metric, scratch_dir};
use trimtab_tests::upstream::{read_some, spawn_echo};

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Run a blocking client command off the async runtime.
async fn run_async(mut cmd: Command) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || run(&mut cmd))
        .await
        .expect("join")
}

/// The data plane's profile log lines that `keep` selects, once there are `at_least` of them
/// (within 5 s).
async fn profiles(
    dp: &DataPlaneProc,
    at_least: usize,
    keep: impl Fn(&serde_json::Value) -> bool,
) -> Option<Vec<serde_json::Value>> {
    let keep = &keep;
    eventually(Duration::from_secs(5), || async move {
        let rows: Vec<_> = dp
            .closed_connections()
            .into_iter()
            .filter(|r| keep(r))
            .collect();
        (rows.len() >= at_least).then_some(rows)
    })
    .await
}

fn base(echo: SocketAddr, extra: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
dataplane_id = "protocols"
[services.echo]
upstreams = ["{echo}"]
routes = [{{ path_prefix = "/" }}]
{extra}
"#
    )
}

#[tokio::test]
async fn h2c_by_prior_knowledge_and_by_upgrade_with_curl_nghttp_and_h2load() {
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&base(echo, ""));
    let url = format!("http://{}/h2-test", dp.proxy);
    let curl = |args: &[&str]| {
        let mut c = Command::new("curl");
        c.args(["-s", "-w", "\n%{http_version} %{http_code}"])
            .args(args)
            .arg(&url);
        c
    };
    // Prior knowledge: the connection starts with the HTTP/2 preface.
    let (ok, out, err) = run_async(curl(&["--http2-prior-knowledge", "-d", "hello h2"])).await;
    assert!(ok, "{err}");
    assert_eq!(out, "hello h2\n2 200", "{err}");
    // Upgrade: h2c on a request without a body is answered on stream 1 in HTTP/2.
    let (ok, out, err) = run_async(curl(&["--http2", "-H", "x-probe: 1"])).await;
    assert!(ok, "{err}");
    assert!(out.ends_with("\n2 200"), "{out}");
    // With a body the upgrade is declined (RFC 7540 allows it) and HTTP/1.1 answers.
    let (ok, out, _) = run_async(curl(&["--http2", "-d", "with body"])).await;
    assert!(ok);
    assert_eq!(out, "with body\n1.1 200");
    // nghttp both ways; -u upgrades.
    for upgrade in [false, true] {
        let mut c = Command::new("nghttp");
        c.arg("-v");
        if upgrade {
            c.arg("-u");
        }
        let (ok, out, err) = run_async({
            c.arg(format!("http://{}/sse", dp.proxy));
            c
        })
        .await;
        assert!(ok, "nghttp upgrade={upgrade}: {out}{err}");
        assert!(out.contains("data: event 2"), "{out}");
        assert!(out.contains(":status: 200"), "{out}");
        if upgrade {
            assert!(out.contains("HTTP Upgrade success"), "{out}");
        }
    }
    // h2load: streams multiplexed on few connections, every one answered.
    let (ok, out, err) = run_async({
        let mut c = Command::new("h2load");
        c.args(["-n", "400", "-c", "4", "-m", "16", "-d", "/etc/hostname"])
            .arg(&url);
        c
    })
    .await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("400 succeeded, 0 failed, 0 errored"), "{out}");
    assert!(out.contains("status codes: 400 2xx"), "{out}");
    assert_eq!(
        metric(dp.admin, "trimtab_dataplane_h2c_upgrades_total").await,
        Some(2.0)
    );
    let h2 = metric(
        dp.admin,
        "trimtab_dataplane_detected_total{protocol=\"h2\"}",
    )
    .await
    .unwrap_or(0.0);
    assert!(h2 >= 6.0, "h2 connections detected: {h2}");
    // Bad input: a broken preface and a garbage frame get a GOAWAY or a close, never a hang.
    let mut s = TcpStream::connect(dp.proxy).await.expect("connect");
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x04\x09\x00\x00\x00\x00\x01garb")
        .await
        .expect("write");
    let got = read_some(&mut s, 1 << 16, Duration::from_secs(5)).await;
    assert!(frame_types(&got).contains(&0x7), "no GOAWAY: {got:?}");
    // An h2c upgrade followed by something that is not HTTP/2: closed, nothing else.
    let mut s = TcpStream::connect(dp.proxy).await.expect("connect");
    s.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\nHELLO, NOT A PREFACE AT ALL\r\n")
        .await
        .expect("write");
    let got = read_some(&mut s, 1 << 16, Duration::from_secs(5)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    // The process is still serving.
    let (ok, out, _) = run_async(curl(&["--http2-prior-knowledge", "-d", "still"])).await;
    assert!(ok && out.starts_with("still"), "{out}");
}

/// The types of the HTTP/2 frames in a server's byte stream.
fn frame_types(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while b.len() >= 9 {
        let len = (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]);
        out.push(b[3]);
        b = &b[(9 + len).min(b.len())..];
    }
    out
}

// ---------------------------------------------------------------------------------------------
// gRPC: a server and a client built here on hyper's HTTP/2, length-prefixed messages,
// status in trailers.

type GrpcBody = UnsyncBoxBody<Bytes, std::convert::Infallible>;

fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = vec![0u8];
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    Bytes::from(b)
}

fn grpc_messages(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while b.len() >= 5 {
        let n = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        out.push(b[5..5 + n].to_vec());
        b = &b[5 + n..];
    }
    out
}

fn trailers(status: &str, message: Option<&str>) -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    t.insert("grpc-status", status.parse().expect("hv"));
    if let Some(m) = message {
        t.insert("grpc-message", m.parse().expect("hv"));
    }
    t.insert("x-served-by", "grpc-test-server".parse().expect("hv"));
    t
}

async fn grpc_handle(
    req: Request<Incoming>,
) -> Result<Response<GrpcBody>, std::convert::Infallible> {
    let path = req.uri().path().to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let msgs = grpc_messages(&body);
    let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = match path.as_str() {
        "/test.Echo/Unary" => vec![
            Ok(Frame::data(grpc_frame(
                &[b"echo: ".as_slice(), &msgs[0]].concat(),
            ))),
            Ok(Frame::trailers(trailers("0", None))),
        ],
        "/test.Echo/Stream" => (0..3)
            .map(|i| Ok(Frame::data(grpc_frame(format!("part {i}").as_bytes()))))
            .chain([Ok(Frame::trailers(trailers("0", None)))])
            .collect(),
        _ => vec![Ok(Frame::trailers(trailers("12", Some("unknown method"))))],
    };
    let mut r = Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync());
    r.headers_mut()
        .insert("content-type", "application/grpc".parse().expect("hv"));
    Ok(r)
}

async fn spawn_grpc_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), service_fn(grpc_handle))
                    .await;
            });
        }
    });
    a
}

async fn grpc_call(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    proxy: SocketAddr,
    method: &str,
    msg: &[u8],
) -> (http::response::Parts, Vec<Vec<u8>>, Option<http::HeaderMap>) {
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{proxy}/test.Echo/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(grpc_frame(msg)))
        .expect("request");
    let resp = sender.send_request(req).await.expect("grpc call");
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    (parts, grpc_messages(&collected.to_bytes()), trailers)
}

#[tokio::test]
async fn grpc_over_h2c_keeps_messages_and_trailers() {
    let grpc = spawn_grpc_server().await;
    let dp = DataPlaneProc::start(&format!(
        r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[services.grpc]
upstreams = ["{grpc}"]
routes = [{{ path_prefix = "/test.Echo" }}]
upstream_protocol = "h2c"
"#
    ));
    let tcp = TcpStream::connect(dp.proxy).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let (parts, msgs, t) = grpc_call(&mut sender, dp.proxy, "Unary", b"ping").await;
    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.headers["content-type"], "application/grpc");
    assert_eq!(msgs, vec![b"echo: ping".to_vec()]);
    let t = t.expect("trailers reach the client");
    assert_eq!(t["grpc-status"], "0");
    assert_eq!(t["x-served-by"], "grpc-test-server");
    let (_, msgs, t) = grpc_call(&mut sender, dp.proxy, "Stream", b"").await;
    assert_eq!(
        msgs,
        vec![b"part 0".to_vec(), b"part 1".to_vec(), b"part 2".to_vec()]
    );
    assert_eq!(t.expect("trailers")["grpc-status"], "0");
    let (_, msgs, t) = grpc_call(&mut sender, dp.proxy, "Nope", b"x").await;
    assert!(msgs.is_empty());
    let t = t.expect("trailers");
    assert_eq!(t["grpc-status"], "12");
    assert_eq!(t["grpc-message"], "unknown method");
    // Many concurrent calls share one upstream connection.
    let calls = (0..50).map(|i| {
        let mut s = sender.clone();
        let proxy = dp.proxy;
        async move {
            let m = format!("m{i}");
            let (_, msgs, t) = grpc_call(&mut s, proxy, "Unary", m.as_bytes()).await;
            assert_eq!(msgs, vec![format!("echo: m{i}").into_bytes()]);
            assert_eq!(t.expect("trailers")["grpc-status"], "0");
        }
    });
    futures_util::future::join_all(calls).await;
    let new = metric(
        dp.admin,
        "trimtab_dataplane_pool_requests_total{connection=\"new\"}",
    )
    .await;
    assert_eq!(
        new,
        Some(1.0),
        "one HTTP/2 upstream connection for 53 calls"
    );
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn server_sent_events_stream_unbuffered_with_keepalive_comments_and_idle_end() {
    // An upstream that sends one event, then nothing (for a minute).
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|_req: Request<Incoming>| async {
                    let stream = futures_util::stream::unfold(0u32, |i| async move {
                        match i {
                            0 => Some((
                                Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(
                                    b"data: first\n\n",
                                ))),
                                1,
                            )),
                            1 => {
                                tokio::time::sleep(Duration::from_millis(300)).await;
                                Some((Ok(Frame::data(Bytes::from_static(b"data: second\n\n"))), 2))
                            }
                            _ => {
                                tokio::time::sleep(Duration::from_secs(60)).await;
                                None
                            }
                        }
                    });
                    let mut r = Response::new(StreamBody::new(stream));
                    r.headers_mut()
                        .insert("content-type", "text/event-stream".parse().expect("hv"));
                    Ok::<_, std::convert::Infallible>(r)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    let dp = DataPlaneProc::start(&format!(
        r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[services.events]
upstreams = ["{up}"]
routes = [{{ path_prefix = "/events" }}]
settings = {{ ping_interval = "15s", idle_timeout = "30s" }}
"#
    ));
    let tcp = TcpStream::connect(dp.proxy).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let t0 = Instant::now();
    let req = Request::builder()
        .uri("/events")
        .header("host", "x")
        .body(Empty::<Bytes>::new())
        .expect("req");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got: Vec<(Duration, String)> = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(45), async {
        while let Some(f) = body.frame().await {
            let f = f.expect("frame");
            if let Some(d) = f.data_ref() {
                got.push((t0.elapsed(), String::from_utf8_lossy(d).into_owned()));
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream did not end: {got:?}");
    let at = |needle: &str| {
        got.iter()
            .find(|(_, d)| d.contains(needle))
            .map(|(t, _)| *t)
            .unwrap_or_else(|| panic!("no {needle:?} in {got:?}"))
    };
    // Unbuffered: the first event arrives long before the second was even sent.
    assert!(at("first") < Duration::from_millis(250), "{got:?}");
    assert!(at("second") >= Duration::from_millis(290), "{got:?}");
    // Keep-alive comments at the ping interval after the last event, only whole ones.
    let pings: Vec<Duration> = got
        .iter()
        .filter(|(_, d)| d == ":\n\n")
        .map(|(t, _)| *t)
        .collect();
    assert!(!pings.is_empty(), "no keep-alive comment: {got:?}");
    assert!(
        pings[0] >= Duration::from_secs(14) && pings[0] < Duration::from_secs(25),
        "{pings:?}"
    );
    // The idle timeout counts from the last upstream byte (comments do not reset it).
    let end = t0.elapsed();
    assert!(
        end >= Duration::from_secs(30) && end < Duration::from_secs(42),
        "ended at {end:?}"
    );
    assert_eq!(
        metric(dp.admin, "trimtab_dataplane_sse_idle_closes_total").await,
        Some(1.0)
    );
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn connect_tunnels_only_to_allowed_destinations() {
    let echo = spawn_echo().await;
    let other = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let other_addr = other.local_addr().expect("addr");
    let dp = DataPlaneProc::start(&base(
        echo,
        &format!(
            "[connect]\nallow = [\"127.0.0.1:{}\", \"*.example.invalid:443\"]",
            echo.port()
        ),
    ));
    let proxy = format!("http://{}", dp.proxy);
    let (ok, out, err) = run_async({
        let mut c = Command::new("curl");
        c.args([
            "-s",
            "-p",
            "-x",
            &proxy,
            "-d",
            "through the tunnel",
            "-w",
            "\n%{http_connect} %{http_code}",
        ])
        .arg(format!("http://127.0.0.1:{}/anything", echo.port()));
        c
    })
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, "through the tunnel\n200 200");
    // Not on the list: 403, and nothing connects to it.
    let (ok, out, _) = run_async({
        let mut c = Command::new("curl");
        c.args(["-s", "-p", "-x", &proxy, "-w", "%{http_connect}"])
            .arg(format!("http://{other_addr}/"));
        c
    })
    .await;
    assert!(!ok);
    assert_eq!(out, "403");
    let accepted = tokio::time::timeout(Duration::from_millis(300), other.accept()).await;
    assert!(
        accepted.is_err(),
        "a refused CONNECT reached its destination"
    );
    // Bad input: no port.
    let mut s = TcpStream::connect(dp.proxy).await.expect("connect");
    s.write_all(b"CONNECT example.invalid HTTP/1.1\r\nHost: example.invalid\r\n\r\n")
        .await
        .expect("write");
    let got = String::from_utf8_lossy(&read_some(&mut s, 4096, Duration::from_secs(3)).await)
        .into_owned();
    assert!(
        got.starts_with("HTTP/1.1 400") || got.starts_with("HTTP/1.1 403"),
        "{got}"
    );
    assert_eq!(
        metric(
            dp.admin,
            "trimtab_dataplane_refused_total{reason=\"connect_not_allowed\"}"
        )
        .await,
        Some(1.0)
    );
    // The tunnel was profiled as a raw TCP connection of the pseudo-service `connect`.
    let rows = profiles(&dp, 1, |_| true).await.expect("a profile");
    assert_eq!(rows[0]["service"], "connect");
    assert_eq!(rows[0]["protocol"], "tcp");
    assert!(rows[0]["c2u_bytes"].as_u64().unwrap_or(0) > 18);
}

// ---------------------------------------------------------------------------------------------

/// A server-speaks-first upstream: a banner on connect, then an echo.
async fn spawn_banner() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"220 banner ready\r\n").await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    a
}

/// An upstream that reads a PROXY header (either version), answers with the client it names,
/// then echoes.
async fn spawn_proxy_reader() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 512];
                let header = loop {
                    match dataplane::proxy_protocol::parse(&buf) {
                        dataplane::proxy_protocol::Parsed::Header(h) => break h,
                        dataplane::proxy_protocol::Parsed::Incomplete => {}
                        dataplane::proxy_protocol::Parsed::NotProxy if buf.is_empty() => {}
                        other => {
                            let _ = s.write_all(format!("bad {other:?}\n").as_bytes()).await;
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let v = if buf[0] == b'P' { 1 } else { 2 };
                let line = format!("v{v} from {:?}\n", header.source);
                let _ = s.write_all(line.as_bytes()).await;
                let _ = s.write_all(&buf[header.len..]).await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    a
}

#[tokio::test]
async fn raw_tcp_by_listener_with_server_first_protocols_and_http_on_the_same_port() {
    let echo = spawn_echo().await;
    let banner = spawn_banner().await;
    let dp = DataPlaneProc::start(&base(
        echo,
        &format!(
            r#"
[services.banner]
upstreams = ["{banner}"]
[[listeners]]
name = "mixed"
listen = "127.0.0.1:0"
detect_timeout = "300ms"
tcp_service = "banner"
[[listeners]]
name = "tcponly"
listen = "127.0.0.1:0"
http = false
tcp_service = "banner"
"#
        ),
    ));
    let mixed = dp.listeners["mixed"];
    // Server speaks first: the client says nothing; the banner arrives after the detection
    // timeout, not the HTTP head timeout.
    let t0 = Instant::now();
    let mut s = TcpStream::connect(mixed).await.expect("connect");
    let got = read_some(&mut s, 18, Duration::from_secs(5)).await;
    assert_eq!(got, b"220 banner ready\r\n");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(290) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    s.write_all(b"after the banner").await.expect("write");
    assert_eq!(
        read_some(&mut s, 16, Duration::from_secs(3)).await,
        b"after the banner"
    );
    drop(s);
    // A listener that only serves TCP does not wait at all.
    let t0 = Instant::now();
    let mut s = TcpStream::connect(dp.listeners["tcponly"])
        .await
        .expect("connect");
    assert_eq!(
        read_some(&mut s, 18, Duration::from_secs(5)).await,
        b"220 banner ready\r\n"
    );
    assert!(
        t0.elapsed() < Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );
    drop(s);
    // Client speaks first with bytes that are no HTTP: straight to the TCP service.
    let mut s = TcpStream::connect(mixed).await.expect("connect");
    s.write_all(b"*1\r\n$4\r\nPING\r\n").await.expect("write");
    let got = read_some(&mut s, 18 + 14, Duration::from_secs(3)).await;
    assert_eq!(got, b"220 banner ready\r\n*1\r\n$4\r\nPING\r\n");
    drop(s);
    // HTTP on the same port still reaches the HTTP services.
    let (ok, out, err) = run_async({
        let mut c = Command::new("curl");
        c.args(["-s", "-d", "http here"])
            .arg(format!("http://{mixed}/x"));
        c
    })
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, "http here");
    // Profiles: raw TCP, routed by listener name.
    let rows = profiles(&dp, 3, |r| r["service"] == "banner")
        .await
        .expect("three banner profiles");
    assert!(
        rows.iter()
            .all(|r| r["protocol"] == "tcp" && r["mode"] == "zero_copy")
    );
    assert!(rows.iter().any(|r| r["route"] == "tcponly"));
    assert!(rows.iter().any(|r| r["route"] == "mixed"));
    assert_eq!(
        metric(
            dp.admin,
            "trimtab_dataplane_detected_total{protocol=\"tcp\"}"
        )
        .await,
        Some(3.0)
    );
}

// ---------------------------------------------------------------------------------------------

struct TlsServer {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

async fn tls_server(dir: &Path, cn: &str) -> TlsServer {
    let (key, crt) = (dir.join(format!("{cn}.key")), dir.join(format!("{cn}.crt")));
    let (ok, _, err) = run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "ed25519", "-nodes", "-days", "2", "-subj",
        ])
        .arg(format!("/CN={cn}"))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt));
    assert!(ok, "openssl req: {err}");
    let port = free_port();
    let child = Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept"])
        .arg(port.to_string())
        .arg("-cert")
        .arg(&crt)
        .arg("-key")
        .arg(&key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let up = eventually(Duration::from_secs(10), || async {
        TcpStream::connect(addr).await.ok().map(|_| ())
    })
    .await;
    assert!(up.is_some(), "s_server did not start");
    TlsServer { child, addr }
}

async fn s_client(target: SocketAddr, name: &str) -> String {
    let (_, out, err) = run_async({
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!(
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 10 openssl s_client -brief -connect {target} -servername {name} -alpn h2,http/1.1 2>&1"
        ));
        c
    })
    .await;
    out + &err
}

/// Forward one client to `to`, splitting the client's first bytes (the ClientHello) into
/// three TCP segments 50 ms apart.
async fn spawn_splitting_relay(to: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut u = TcpStream::connect(to).await.expect("connect proxy");
                u.set_nodelay(true).expect("nodelay");
                let mut buf = vec![0u8; 16384];
                let n = c.read(&mut buf).await.unwrap_or(0);
                let cuts = [0, 3, n / 2, n];
                for w in cuts.windows(2) {
                    u.write_all(&buf[w[0]..w[1]]).await.expect("write");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
            });
        }
    });
    a
}

#[tokio::test]
async fn tls_passthrough_routes_by_sni_without_terminating() {
    let dir = scratch_dir("tls");
    let a = tls_server(&dir, "a.example").await;
    let b = tls_server(&dir, "b.example").await;
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&base(
        echo,
        &format!(
            r#"
[services.a]
upstreams = ["{}"]
sni = ["a.example"]
[services.b]
upstreams = ["{}"]
sni = ["*.b.example"]
"#,
            a.addr, b.addr
        ),
    ));
    // The client sees each upstream's own certificate: the proxy does not terminate TLS.
    let out = s_client(dp.proxy, "a.example").await;
    assert!(out.contains("CONNECTION ESTABLISHED"), "{out}");
    assert!(out.contains("Peer certificate: CN = a.example"), "{out}");
    let out = s_client(dp.proxy, "api.b.example").await;
    assert!(out.contains("Peer certificate: CN = b.example"), "{out}");
    // A ClientHello split across three segments still routes.
    let relay = spawn_splitting_relay(dp.proxy).await;
    let out = s_client(relay, "a.example").await;
    assert!(
        out.contains("Peer certificate: CN = a.example"),
        "split hello: {out}"
    );
    // An unknown name gets a TLS alert, not a hang or a certificate.
    let out = s_client(dp.proxy, "c.example").await;
    assert!(!out.contains("CONNECTION ESTABLISHED"), "{out}");
    assert!(out.to_lowercase().contains("unrecognized name"), "{out}");
    // A malformed hello: a decode_error alert.
    let mut s = TcpStream::connect(dp.proxy).await.expect("connect");
    s.write_all(b"\x16\x03\x01\x00\x06\x01\x00\x00\x02\x03\x03")
        .await
        .expect("write");
    let got = read_some(&mut s, 7, Duration::from_secs(3)).await;
    assert_eq!(got, dataplane::tls::ALERT_DECODE_ERROR);
    // HTTP on the same port is untouched.
    let (ok, out, _) = run_async({
        let mut c = Command::new("curl");
        c.args(["-s", "-d", "plain"])
            .arg(format!("http://{}/x", dp.proxy));
        c
    })
    .await;
    assert!(ok && out == "plain", "{out}");
    let rows = profiles(&dp, 3, |r| r["protocol"] == "tcp")
        .await
        .expect("tls profiles");
    assert!(
        rows.iter()
            .any(|r| r["service"] == "b" && r["route"] == "*.b.example")
    );
    assert!(
        rows.iter().all(|r| r["subprotocol"] == "h2"),
        "ALPN in the profile: {rows:?}"
    );
    assert_eq!(
        metric(
            dp.admin,
            "trimtab_dataplane_detect_refused_total{reason=\"unknown_sni\"}"
        )
        .await,
        Some(1.0)
    );
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn proxy_protocol_from_trusted_sources_in_and_to_upstreams_out() {
    let echo = spawn_echo().await;
    let reader = spawn_proxy_reader().await;
    let dp = DataPlaneProc::start(&base(
        echo,
        &format!(
            r#"
[services.behind]
upstreams = ["{reader}"]
send_proxy_protocol = "v2"
[[listeners]]
name = "lb"
listen = "127.0.0.1:0"
tcp_service = "behind"
proxy_protocol_from = ["127.0.0.0/8"]
"#
        ),
    ));
    let lb = dp.listeners["lb"];
    // v1 in, raw TCP, v2 out naming the original client.
    let mut s = TcpStream::connect(lb).await.expect("connect");
    s.write_all(b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 443\r\nhello behind\n")
        .await
        .expect("write");
    let want = "v2 from Some(203.0.113.7:51000)\nhello behind\n";
    let got = read_some(&mut s, want.len(), Duration::from_secs(3)).await;
    assert_eq!(String::from_utf8_lossy(&got), want, "{}", dp.log_text());
    drop(s);
    // v2 in, then HTTP: the upstream sees the original client in X-Forwarded-For.
    let header = dataplane::proxy_protocol::encode(
        dataplane::config::ProxyVersion::V2,
        "[2001:db8::9]:40000".parse().expect("addr"),
        lb,
    );
    let mut s = TcpStream::connect(lb).await.expect("connect");
    s.write_all(&header).await.expect("write");
    s.write_all(b"GET /headers HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let got = String::from_utf8_lossy(&read_some(&mut s, 1 << 16, Duration::from_secs(3)).await)
        .into_owned();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.contains("2001:db8::9"), "X-Forwarded-For: {got}");
    // The profile of the TCP connection carries the client from the header.
    let rows = profiles(&dp, 1, |r| r["service"] == "behind")
        .await
        .expect("profile");
    assert_eq!(rows[0]["client"], "203.0.113.7");
    // From an untrusted source (the main listener trusts nobody) a header is refused.
    let mut s = TcpStream::connect(dp.proxy).await.expect("connect");
    s.write_all(b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 443\r\nGET / HTTP/1.1\r\n\r\n")
        .await
        .expect("write");
    let got = read_some(&mut s, 1024, Duration::from_secs(3)).await;
    assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
    // A malformed header from a trusted source is refused too.
    let mut s = TcpStream::connect(lb).await.expect("connect");
    s.write_all(b"PROXY TCP4 nonsense\r\n")
        .await
        .expect("write");
    assert!(
        read_some(&mut s, 1024, Duration::from_secs(3))
            .await
            .is_empty()
    );
    assert_eq!(
        metric(
            dp.admin,
            "trimtab_dataplane_detect_refused_total{reason=\"untrusted_proxy\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(
            dp.admin,
            "trimtab_dataplane_detect_refused_total{reason=\"bad_proxy\"}"
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(dp.admin, "trimtab_dataplane_proxy_protocol_headers_total").await,
        Some(2.0)
    );
}

// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn websocket_over_http2_extended_connect() {
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&base(echo, ""));
    let tcp = TcpStream::connect(dp.proxy).await.expect("connect");
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let connect = |path: &str, protocol: &'static str| {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("http://{}{path}", dp.proxy))
            .header("sec-websocket-version", "13")
            .header("sec-websocket-protocol", "echo.v1")
            .body(Empty::<Bytes>::new())
            .expect("request");
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static(protocol));
        req
    };
    // The server's SETTINGS (with ENABLE_CONNECT_PROTOCOL) must arrive before the request:
    // the answer to an ordinary request on the same connection comes after them.
    let plain = Request::builder()
        .uri(format!("http://{}/x", dp.proxy))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let answer = sender.send_request(plain).await.expect("plain request");
    assert_eq!(answer.status(), StatusCode::OK);
    let mut resp = sender
        .send_request(connect("/ws", "websocket"))
        .await
        .expect("extended CONNECT accepted");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["sec-websocket-protocol"], "echo.v1");
    let stream = hyper::upgrade::on(&mut resp)
        .await
        .expect("upgraded stream");
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(stream), Role::Client, None).await;
    for i in 0..20 {
        let m = format!("over h2 {i}");
        ws.send(Message::text(m.clone())).await.expect("send");
        let got = ws.next().await.expect("reply").expect("frame");
        assert_eq!(got, Message::text(m));
    }
    ws.close(None).await.expect("close");
    while ws.next().await.is_some() {}
    // A second WebSocket on the same HTTP/2 connection.
    let mut resp = sender
        .send_request(connect("/ws", "websocket"))
        .await
        .expect("second");
    let stream = hyper::upgrade::on(&mut resp).await.expect("upgraded");
    let mut ws2 = WebSocketStream::from_raw_socket(TokioIo::new(stream), Role::Client, None).await;
    ws2.send(Message::binary(vec![7u8; 100_000]))
        .await
        .expect("send");
    assert_eq!(
        ws2.next().await.expect("reply").expect("frame").len(),
        100_000
    );
    drop(ws2);
    // Another :protocol is refused clearly.
    let resp = sender
        .send_request(connect("/ws", "not-websocket"))
        .await
        .expect("answer");
    assert_eq!(resp.status(), StatusCode::NOT_IMPLEMENTED);
    let rows = profiles(&dp, 2, |r| r["protocol"] == "websocket")
        .await
        .expect("profiles");
    assert!(rows.iter().all(|r| r["mode"] == "frame_aware"), "{rows:?}");
    assert!(
        rows.iter()
            .any(|r| r["c2u_messages"].as_u64() >= Some(20) && r["closed_by"] == "client"),
        "{rows:?}"
    );
}
