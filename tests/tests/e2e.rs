//! End-to-end tests: the real `dataplane` binary, real upstreams, real clients, real sockets,
//! and the real PostgreSQL schema. One test binary for the whole workspace's end-to-end suite.

mod decisions;
mod http1;
mod learning;
mod observability;
mod profiles;
mod protocols;
mod rollouts;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use trimtab_tests::harness::{DataPlaneProc, eventually};
use trimtab_tests::upstream::{read_some, spawn_echo};

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

fn config(echo: SocketAddr, mode: &str, extra_settings: &str, extra: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
dataplane_id = "test"
{extra}
[services.echo]
upstreams = ["{echo}"]
routes = [{{ path_prefix = "/" }}]
settings = {{ mode = "{mode}" {extra_settings} }}
"#
    )
}

async fn ws_connect(
    proxy: SocketAddr,
    path: &str,
    protocols: Option<&str>,
) -> (Ws, http::Response<Option<Vec<u8>>>) {
    let tcp = TcpStream::connect(proxy).await.expect("connect proxy");
    let mut req = format!("ws://{proxy}{path}")
        .into_client_request()
        .expect("request");
    if let Some(p) = protocols {
        req.headers_mut()
            .insert("sec-websocket-protocol", p.parse().expect("hv"));
    }
    tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("ws handshake through proxy")
}

async fn echo_round_trips(ws: &mut Ws) {
    for i in 0..50 {
        let t = format!("message {i}");
        ws.send(Message::text(t.clone())).await.expect("send");
        assert_eq!(
            ws.next().await.expect("reply").expect("ok"),
            Message::text(t)
        );
    }
    let big = vec![7u8; 300_000];
    ws.send(Message::binary(big.clone()))
        .await
        .expect("send big");
    assert_eq!(
        ws.next().await.expect("reply").expect("ok"),
        Message::binary(big)
    );
}

async fn websocket_echo_in(mode: &str) {
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&config(echo, mode, "", ""));
    let (mut ws, resp) = ws_connect(dp.proxy, "/chat", Some("other, echo.v1")).await;
    assert_eq!(resp.headers()["sec-websocket-protocol"], "echo.v1");
    assert_eq!(resp.headers()["x-upstream"], "echo");
    echo_round_trips(&mut ws).await;
    ws.close(None).await.expect("close");
    while ws.next().await.is_some() {}
    let line = eventually(Duration::from_secs(5), || async {
        dp.closed_connections().into_iter().next()
    })
    .await
    .expect("a profile log line");
    assert_eq!(line["mode"], mode);
    assert_eq!(line["c2u_messages"], 51);
    assert_eq!(line["u2c_messages"], 51);
    assert_eq!(line["closed_by"], "client");
    assert_eq!(line["close_code"], 1005);
}

#[tokio::test]
async fn websocket_echo_through_zero_copy() {
    websocket_echo_in("zero_copy").await;
}

#[tokio::test]
async fn websocket_echo_through_frame_aware() {
    websocket_echo_in("frame_aware").await;
}

/// The first-frame bug: a client frame in the same packet as the request head, and an upstream
/// frame in the same packet as its 101, must both arrive, first and in order.
async fn head_data_in(mode: &str) {
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&config(echo, mode, "", ""));
    let mut s = TcpStream::connect(dp.proxy).await.expect("connect");
    let mut req = format!(
        "GET /greet HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        dp.proxy
    )
    .into_bytes();
    // A masked text frame "early" right behind the head, in the same write.
    let key = [1u8, 2, 3, 4];
    req.extend_from_slice(&[0x81, 0x80 | 5]);
    req.extend_from_slice(&key);
    req.extend(b"early".iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    s.write_all(&req).await.expect("write");
    let got = read_some(&mut s, 4096, Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&got);
    let head_end = text.find("\r\n\r\n").expect("a response head") + 4;
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(
        text.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        "accept key: {text}"
    );
    // Upstream's greeting first, then the echo of our early frame.
    let frames = &got[head_end..];
    assert_eq!(
        &frames[..6],
        &[0x81, 4, b'h', b'e', b'a', b'd'],
        "{frames:?}"
    );
    assert_eq!(
        &frames[6..13],
        &[0x81, 5, b'e', b'a', b'r', b'l', b'y'],
        "{frames:?}"
    );
}

#[tokio::test]
async fn websocket_first_frames_sent_with_handshakes_are_not_lost_in_zero_copy() {
    head_data_in("zero_copy").await;
}

#[tokio::test]
async fn websocket_first_frames_sent_with_handshakes_are_not_lost_in_frame_aware() {
    head_data_in("frame_aware").await;
}

#[tokio::test]
async fn python_websockets_client_echoes_through_both_modes() {
    let Some(py) = std::env::var_os("TRIMTAB_PYTHON") else {
        panic!("TRIMTAB_PYTHON is not set: run the suite with ./dev test");
    };
    for mode in ["zero_copy", "frame_aware"] {
        let echo = spawn_echo().await;
        let dp = DataPlaneProc::start(&config(echo, mode, "", ""));
        let script = format!(
            r#"
import asyncio, websockets
async def main():
    async with websockets.connect("ws://{}/py", subprotocols=["echo.v1"]) as c:
        assert c.subprotocol == "echo.v1", c.subprotocol
        for i in range(20):
            await c.send(f"hello {{i}}")
            assert await c.recv() == f"hello {{i}}"
        await c.send(b"\x00" * 100000)
        assert await c.recv() == b"\x00" * 100000
    print("ok")
asyncio.run(main())
"#,
            dp.proxy
        );
        let out = tokio::process::Command::new(&py)
            .arg("-c")
            .arg(&script)
            .output()
            .await
            .expect("run python");
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
            "{mode}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `frame_aware` over two sockets pings both legs every `ping_interval` through the real
/// binary: Python's client and the echo upstream answer, each leg's round trip reaches the
/// metrics, and messages keep flowing around the pings.
#[tokio::test]
async fn frame_aware_pings_both_legs_and_measures_their_round_trips() {
    let Some(py) = std::env::var_os("TRIMTAB_PYTHON") else {
        panic!("TRIMTAB_PYTHON is not set: run the suite with ./dev test");
    };
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&config(
        echo,
        "frame_aware",
        r#", ping_interval = "15s", idle_timeout = "60s""#,
        "",
    ));
    let script = format!(
        r#"
import asyncio, websockets
async def main():
    async with websockets.connect("ws://{}/pings", ping_interval=None, compression=None) as c:
        await c.send("before")
        assert await c.recv() == "before"
        await asyncio.sleep(16.5)
        await c.send("after")
        assert await c.recv() == "after"
    print("ok")
asyncio.run(main())
"#,
        dp.proxy
    );
    let out = tokio::process::Command::new(&py)
        .arg("-c")
        .arg(&script)
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let count = |body: &str, leg: &str| -> f64 {
        body.lines()
            .filter(|l| {
                l.starts_with("trimtab_dataplane_ping_rtt_seconds_count{")
                    && l.contains(&format!("leg=\"{leg}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let body = eventually(Duration::from_secs(5), || async {
        let body = reqwest_metrics(dp.admin).await;
        (count(&body, "client") >= 1.0 && count(&body, "upstream") >= 1.0).then_some(body)
    })
    .await
    .unwrap_or_else(|| panic!("no ping round trips in the metrics\n{}", dp.log_text()));
    assert_eq!(
        count(&body, "client"),
        1.0,
        "one connection's median, client leg"
    );
    assert_eq!(
        count(&body, "upstream"),
        1.0,
        "one connection's median, upstream leg"
    );
}

#[tokio::test]
async fn upstream_close_code_and_reason_reach_the_client_in_both_modes() {
    for mode in ["zero_copy", "frame_aware"] {
        let echo = spawn_echo().await;
        let dp = DataPlaneProc::start(&config(echo, mode, "", ""));
        let (mut ws, _) = ws_connect(dp.proxy, "/c", None).await;
        ws.send(Message::text("close-me")).await.expect("send");
        match ws.next().await {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(f.code, CloseCode::from(4000), "{mode}");
                assert_eq!(f.reason.as_str(), "upstream says bye", "{mode}");
            }
            other => panic!("{mode}: expected a close frame, got {other:?}"),
        }
        // Reading on sends tungstenite's close reply and sees the end of the stream.
        while ws.next().await.is_some() {}
        let line = eventually(Duration::from_secs(5), || async {
            dp.closed_connections().into_iter().next()
        })
        .await
        .expect("profile line");
        assert_eq!(line["closed_by"], "upstream", "{mode}");
        assert_eq!(line["close_code"], 4000, "{mode}");
    }
}

#[tokio::test]
async fn idle_timeout_closes_with_1001_in_zero_copy() {
    idle_timeout_in("zero_copy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_with_1001_in_frame_aware() {
    idle_timeout_in("frame_aware").await;
}

async fn idle_timeout_in(mode: &str) {
    {
        let echo = spawn_echo().await;
        let dp = DataPlaneProc::start(&config(
            echo,
            mode,
            r#", idle_timeout = "30s", ping_interval = "off""#,
            "",
        ));
        let (mut ws, _) = ws_connect(dp.proxy, "/idle", None).await;
        ws.send(Message::text("x")).await.expect("send");
        assert_eq!(
            ws.next().await.expect("echo").expect("ok"),
            Message::text("x")
        );
        let t = std::time::Instant::now();
        let msg = tokio::time::timeout(Duration::from_secs(40), ws.next())
            .await
            .expect("closed within the idle timeout");
        match msg {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(f.code, CloseCode::Away, "{mode}");
                assert_eq!(f.reason.as_str(), "idle timeout", "{mode}");
            }
            other => panic!("{mode}: expected close 1001, got {other:?}"),
        }
        assert!(
            t.elapsed() >= Duration::from_secs(29),
            "{mode}: closed too early"
        );
        // Reading on sends the client's close reply, as real clients do.
        while ws.next().await.is_some() {}
        let line = eventually(Duration::from_secs(5), || async {
            dp.closed_connections().into_iter().next()
        })
        .await
        .unwrap_or_else(|| panic!("{mode}: no profile line:\n{}", dp.log_text()));
        assert_eq!(line["closed_by"], "proxy", "{mode}");
        assert_eq!(line["close_code"], 1001, "{mode}");
    }
}

#[tokio::test]
async fn generic_upgrade_is_tunnelled_as_bytes_with_head_data() {
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&config(echo, "zero_copy", "", ""));
    let mut s = TcpStream::connect(dp.proxy).await.expect("connect");
    let req = "GET /tunnel HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: x-echo\r\n\r\nfirst-bytes";
    s.write_all(req.as_bytes()).await.expect("write");
    let got = read_some(&mut s, 4096, Duration::from_millis(800)).await;
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.ends_with("\r\n\r\nfirst-bytes"), "{text}");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let p2 = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&p2).await.expect("write");
        w.shutdown().await.expect("half-close");
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut back))
        .await
        .expect("tunnel finished")
        .expect("read");
    writer.await.expect("writer");
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "bytes differ");
}

/// An upstream that refuses the upgrade is answered as it answered (status, fields, body), in
/// both modes; the proxy reads that answer itself (no HTTP client library on the upgrade path).
#[tokio::test]
async fn an_upstream_refusing_the_upgrade_is_relayed_with_its_body() {
    let echo = spawn_echo().await;
    for mode in ["zero_copy", "frame_aware"] {
        let dp = DataPlaneProc::start(&config(echo, mode, "", ""));
        let req = "GET /refuse HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
        let text = http_get(dp.proxy, req).await;
        assert!(text.starts_with("HTTP/1.1 403"), "{mode}: {text}");
        assert!(
            text.to_ascii_lowercase().contains("\r\nvia: "),
            "{mode}: {text}"
        );
        assert!(
            text.ends_with("\r\n\r\nrefused by upstream"),
            "{mode}: {text}"
        );
        // And the next upgrade on a new connection works.
        let (mut ws, _) = ws_connect(dp.proxy, "/after", None).await;
        echo_round_trips(&mut ws).await;
    }
}

async fn http_get(proxy: SocketAddr, raw: &str) -> String {
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.write_all(raw.as_bytes()).await.expect("write");
    let got = read_some(&mut s, 1 << 20, Duration::from_secs(3)).await;
    String::from_utf8_lossy(&got).to_string()
}

#[tokio::test]
async fn http_hop_by_hop_headers_are_stripped_and_forwarding_headers_added() {
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&config(echo, "zero_copy", "", ""));
    let resp = http_get(
        dp.proxy,
        "GET /headers HTTP/1.1\r\nHost: app.example\r\nConnection: close, X-Private\r\n\
         connection: x-other\r\nX-Private: secret\r\nX-OTHER: 2\r\nKeep-Alive: timeout=5\r\n\
         TE: deflate\r\nX-Forwarded-For: 10.1.1.1\r\nX-Keep: yes\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let body = &resp[resp.find("\r\n\r\n").expect("head") + 4..];
    let h: serde_json::Value = serde_json::from_str(body.trim()).expect("json");
    for gone in ["x-private", "x-other", "keep-alive", "te"] {
        assert!(h.get(gone).is_none(), "{gone} was forwarded: {h}");
    }
    assert_eq!(h["x-keep"][0], "yes");
    assert_eq!(h["x-forwarded-for"][0], "10.1.1.1, 127.0.0.1");
    assert_eq!(h["x-forwarded-host"][0], "app.example");
    assert_eq!(h["x-forwarded-proto"][0], "http");
    assert_eq!(
        h["forwarded"][0],
        "for=127.0.0.1;proto=http;host=app.example"
    );
    assert_eq!(h["via"][0], "1.1 trimtab-test");
    // The upstream's Connection-named response header is stripped too.
    let head = &resp[..resp.find("\r\n\r\n").expect("head")].to_ascii_lowercase();
    assert!(!head.contains("x-hop"), "{head}");
    assert!(head.contains("via: 1.1 trimtab-test"), "{head}");
}

#[tokio::test]
async fn http_smuggling_shapes_are_refused_with_400_and_not_forwarded() {
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&config(echo, "zero_copy", "", ""));
    for raw in [
        "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        "POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ] {
        let resp = http_get(dp.proxy, raw).await;
        assert!(
            resp.starts_with("HTTP/1.1 400"),
            "expected 400 for {raw:?}, got {resp:?}"
        );
        assert!(!resp.contains("x-echo-method"), "forwarded: {resp}");
    }
    // Pipelined behind a good request: the good one is answered, the bad one refused.
    let resp = http_get(
        dp.proxy,
        "GET /ok HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp:?}");
    assert!(resp.contains("HTTP/1.1 400"), "{resp:?}");
    assert_eq!(resp.matches("x-echo-method: GET").count(), 1, "{resp:?}");
    assert!(!resp.contains("x-echo-method: POST"), "{resp:?}");
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let resp = http_get(dp.proxy, &huge).await;
    assert!(
        resp.starts_with("HTTP/1.1 431") || resp.starts_with("HTTP/1.1 400"),
        "{resp:?}"
    );
}

#[tokio::test]
async fn http_bodies_stream_both_ways_and_pool_reuses_connections() {
    let echo = spawn_echo().await;
    // One worker: both client connections draw on the same worker's idle upstream connections
    // (with more, each worker opens its own first; `pool::tests` covers that).
    let dp = DataPlaneProc::start(&config(echo, "zero_copy", "", "workers = 1"));
    // Keep-alive requests on one client connection (the plain HTTP/1.1 path), reusing one
    // upstream connection.
    let mut s = TcpStream::connect(dp.proxy).await.expect("connect");
    for i in 0..5 {
        let body = format!("req {i}");
        let req = format!(
            "POST /e HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).ends_with(&body) {
            let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
                .await
                .expect("response in time")
                .expect("read");
            assert!(n > 0, "closed early");
            got.extend_from_slice(&buf[..n]);
        }
    }
    // A chunked request body, echoed back: hyper serves it, on the upstream connection the
    // plain path left idle.
    let resp = http_get(
        dp.proxy,
        "POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.ends_with("hello world"), "{resp}");
    let metrics = reqwest_metrics(dp.admin).await;
    assert!(
        metrics.contains("trimtab_dataplane_pool_requests_total{connection=\"reused\"} 5")
            && metrics.contains("trimtab_dataplane_pool_requests_total{connection=\"new\"} 1"),
        "{metrics}"
    );
}

async fn reqwest_metrics(admin: SocketAddr) -> String {
    http_get(
        admin,
        "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await
}

#[tokio::test]
async fn http_response_trailers_reach_a_client_that_accepts_them() {
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&config(echo, "zero_copy", "", ""));
    let resp = http_get(
        dp.proxy,
        "GET /trailers HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.contains("body with trailers"), "{resp}");
    assert!(resp.contains("\r\n0\r\nx-checksum: abc123\r\n"), "{resp}");
}

#[tokio::test]
async fn server_sent_events_pass_through_unbuffered() {
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&config(echo, "zero_copy", "", ""));
    let mut s = TcpStream::connect(dp.proxy).await.expect("connect");
    s.write_all(b"GET /sse HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    let t = std::time::Instant::now();
    let mut first_at = None;
    while !got.contains("event 2") {
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .expect("event in time")
            .expect("read");
        assert!(n > 0);
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
        if first_at.is_none() && got.contains("event 0") {
            first_at = Some(t.elapsed());
        }
    }
    let first = first_at.expect("first event");
    // The first event arrives well before the last one is produced (400 ms later).
    assert!(
        t.elapsed() - first >= Duration::from_millis(300),
        "buffered: first {first:?}, all {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn connection_limit_is_refused_with_503_and_retry_after() {
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&config(
        echo,
        "zero_copy",
        "",
        "[limits]\nmax_connections = 1",
    ));
    let (_ws, _) = ws_connect(dp.proxy, "/hold", None).await;
    let resp = http_get(dp.proxy, "GET / HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(
        resp.to_ascii_lowercase().contains("retry-after: 1"),
        "{resp}"
    );
}

#[tokio::test]
async fn graceful_shutdown_sends_1001_and_exits() {
    for mode in ["zero_copy", "frame_aware"] {
        let echo = spawn_echo().await;
        let mut dp =
            DataPlaneProc::start(&config(echo, mode, "", "[limits]\ndrain_timeout = \"2s\""));
        let (mut ws, _) = ws_connect(dp.proxy, "/drain", None).await;
        ws.send(Message::text("x")).await.expect("send");
        assert_eq!(
            ws.next().await.expect("echo").expect("ok"),
            Message::text("x")
        );
        dp.signal("TERM");
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => assert_eq!(f.code, CloseCode::Away, "{mode}"),
            other => panic!("{mode}: expected close 1001, got {other:?}"),
        }
        let _ = ws.close(None).await;
        let status = tokio::task::spawn_blocking(move || {
            let s = dp.wait_exit(Duration::from_secs(10));
            (s, dp)
        })
        .await
        .expect("join");
        assert!(
            status.0.is_some_and(|s| s.success()),
            "{mode}: exit {:?}\n{}",
            status.0,
            status.1.log_text()
        );
    }
}

#[tokio::test]
async fn sighup_reloads_routes_and_keeps_live_websockets() {
    let echo = spawn_echo().await;
    let cfg = config(echo, "frame_aware", "", "");
    let dp = DataPlaneProc::start(&cfg);
    let (mut ws, _) = ws_connect(dp.proxy, "/live", None).await;
    ws.send(Message::text("before")).await.expect("send");
    assert_eq!(
        ws.next().await.expect("echo").expect("ok"),
        Message::text("before")
    );
    let get_new = "GET /new/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    assert!(
        http_get(dp.proxy, get_new)
            .await
            .starts_with("HTTP/1.1 200")
    );
    // The new service's upstream is a closed port: once routed there, /new answers 502.
    let new_cfg = format!(
        "{cfg}\n[services.added]\nupstreams = [\"127.0.0.1:1\"]\nroutes = [{{ path_prefix = \"/new\" }}]\n"
    );
    std::fs::write(&dp.config_path, new_cfg).expect("rewrite config");
    dp.signal("HUP");
    assert!(
        dp.wait_log("configuration reloaded", Duration::from_secs(5))
            .await
            .is_some(),
        "{}",
        dp.log_text()
    );
    let resp = http_get(dp.proxy, get_new).await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    // the live connection still works
    ws.send(Message::text("after")).await.expect("send");
    assert_eq!(
        ws.next().await.expect("echo").expect("ok"),
        Message::text("after")
    );
    // and a bad file is refused without touching the running config
    std::fs::write(&dp.config_path, "listen = 5").expect("rewrite");
    dp.signal("HUP");
    assert!(
        dp.wait_log("reload refused", Duration::from_secs(5))
            .await
            .is_some()
    );
    ws.send(Message::text("still")).await.expect("send");
    assert_eq!(
        ws.next().await.expect("echo").expect("ok"),
        Message::text("still")
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_keeps_proxy_memory_bounded_and_loses_nothing() {
    for mode in ["zero_copy", "frame_aware"] {
        let echo = spawn_echo().await;
        let dp = DataPlaneProc::start(&config(echo, mode, "", ""));
        let pid = dp.pid();
        let rss0 = trimtab_tests::load::rss_kib(pid);
        let (ws, _) = ws_connect(dp.proxy, "/slow", None).await;
        let (mut tx, mut rx) = ws.split();
        let msg = vec![0xabu8; 64 * 1024];
        let total: u32 = 512; // 32 MiB echoed back through a client that is not reading
        let sender = tokio::spawn(async move {
            for i in 0..total {
                let mut m = msg.clone();
                m[..4].copy_from_slice(&i.to_be_bytes());
                if tx.send(Message::binary(m)).await.is_err() {
                    return false;
                }
            }
            true
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        let grown = trimtab_tests::load::rss_kib(pid).saturating_sub(rss0);
        assert!(
            grown < 24 * 1024,
            "{mode}: proxy RSS grew {grown} KiB while the client was not reading"
        );
        let mut next = 0u32;
        while next < total {
            let m = tokio::time::timeout(Duration::from_secs(10), rx.next())
                .await
                .expect("data keeps flowing")
                .expect("message")
                .expect("ok");
            let data = m.into_data();
            assert_eq!(data.len(), 64 * 1024);
            assert_eq!(
                u32::from_be_bytes([data[0], data[1], data[2], data[3]]),
                next,
                "{mode}: order"
            );
            next += 1;
        }
        assert!(sender.await.expect("sender"), "{mode}: sender failed");
    }
}

#[tokio::test]
async fn bad_config_is_refused_naming_key_and_value() {
    let dir = trimtab_tests::harness::scratch_dir("badcfg");
    let p = dir.join("bad.toml");
    std::fs::write(
        &p,
        "listen = \"nowhere\"\n[services.a]\nupstreams = [\"x\"]\nsettings = { buffer_size = 1000 }\n",
    )
    .expect("write");
    let out = std::process::Command::new(trimtab_tests::harness::bin_dir().join("dataplane"))
        .arg("--config")
        .arg(&p)
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "listen = \"nowhere\"",
        "services.a.upstreams: \"x\" is not host:port",
        "services.a.settings.buffer_size = 1000",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in {err}");
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn migrations_create_every_table(pool: sqlx::PgPool) {
    let tables: Vec<String> = sqlx::query_scalar(
        "select table_name::text from information_schema.tables where table_schema = 'public' order by 1",
    )
    .fetch_all(&pool)
    .await
    .expect("tables");
    for t in [
        "audit_log",
        "kill_switch",
        "model_state",
        "models",
        "overrides",
        "profiles",
        "profiles_default",
        "rollouts",
    ] {
        assert!(
            tables.iter().any(|x| x == t),
            "missing table {t}: {tables:?}"
        );
    }
    let made: i32 = sqlx::query_scalar("select trimtab_ensure_profile_partitions(current_date, 3)")
        .fetch_one(&pool)
        .await
        .expect("partitions");
    assert_eq!(made, 3);
    let again: i32 =
        sqlx::query_scalar("select trimtab_ensure_profile_partitions(current_date, 3)")
            .fetch_one(&pool)
            .await
            .expect("partitions");
    assert_eq!(again, 0, "idempotent");
    // one active model at most
    sqlx::query("insert into models (version, onnx, metadata, status) values ('a', '\\x00', '{}', 'active')")
        .execute(&pool)
        .await
        .expect("first active");
    let second = sqlx::query("insert into models (version, onnx, metadata, status) values ('b', '\\x00', '{}', 'active')")
        .execute(&pool)
        .await;
    assert!(second.is_err(), "two active models were accepted");
}

/// Autobahn TestSuite (sections 1–10 by default; `TRIMTAB_AUTOBAHN_CASES` widens it, as
/// `./dev conformance` does) through both modes: every case that passes against the echo
/// upstream directly passes through trimtab with the same verdicts. Prints the counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autobahn_cases_pass_through_both_modes_as_they_do_directly() {
    let Some(py) = std::env::var_os("TRIMTAB_PYTHON") else {
        panic!("TRIMTAB_PYTHON is not set: run the suite with ./dev test");
    };
    let cases = std::env::var("TRIMTAB_AUTOBAHN_CASES")
        .unwrap_or_else(|_| "1.*,2.*,3.*,4.*,5.*,6.*,7.*,9.*,10.*".into());
    // Sections 12-13 (permessage-deflate): a subset here, all of them in ./dev conformance.
    let compression_cases = std::env::var("TRIMTAB_AUTOBAHN_DEFLATE_CASES").unwrap_or_else(|_| {
        "12.1.1,12.1.2,12.1.3,12.2.1,12.3.1,12.4.1,12.5.1,13.1.1,13.2.1,13.3.1,13.4.1,13.5.1,13.6.1,13.7.1".into()
    });
    let echo = spawn_echo().await;
    let zc = DataPlaneProc::start(&config(echo, "zero_copy", "", ""));
    let fa = DataPlaneProc::start(&config(echo, "frame_aware", "", ""));
    let fz = DataPlaneProc::start(&config(echo, "frame_aware", ", compression = true", ""));
    let script = tuning::checkout_path("tests/conformance/autobahn.py");
    let out = tokio::process::Command::new(&py)
        .arg(&script)
        .arg("--direct")
        .arg(echo.to_string())
        .arg("--through")
        .arg(format!("zero_copy={}", zc.proxy))
        .arg("--through")
        .arg(format!("frame_aware={}", fa.proxy))
        .arg("--cases")
        .arg(&cases)
        .output()
        .await
        .expect("run the Autobahn cases");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("direct"), "{stdout}");
    let out = tokio::process::Command::new(&py)
        .arg(&script)
        .arg("--compressed")
        .arg(format!("frame_aware+deflate={}", fz.proxy))
        .arg("--cases")
        .arg(&compression_cases)
        .output()
        .await
        .expect("run the Autobahn compression cases");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "{}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn compression_toward_the_client_works_with_an_uncompressed_upstream() {
    let Some(py) = std::env::var_os("TRIMTAB_PYTHON") else {
        panic!("TRIMTAB_PYTHON is not set: run the suite with ./dev test");
    };
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&config(echo, "frame_aware", ", compression = true", ""));
    // Python's websockets offers permessage-deflate by default.
    let script = format!(
        r#"
import asyncio, websockets
async def main():
    async with websockets.connect("ws://{}/z") as c:
        ext = c.response.headers.get("Sec-WebSocket-Extensions", "")
        assert ext.startswith("permessage-deflate"), ext
        text = "chat message with a lot of repetition " * 2000
        for i in range(10):
            await c.send(f"{{i}} {{text}}")
            assert await c.recv() == f"{{i}} {{text}}"
        await c.send(b"\x01" * 70000)
        assert await c.recv() == b"\x01" * 70000
    async with websockets.connect("ws://{}/plain", compression=None) as c:
        assert "Sec-WebSocket-Extensions" not in c.response.headers
        await c.send("no compression offered")
        assert await c.recv() == "no compression offered"
    print("ok")
asyncio.run(main())
"#,
        dp.proxy, dp.proxy
    );
    let out = tokio::process::Command::new(&py)
        .arg("-c")
        .arg(&script)
        .output()
        .await
        .expect("run python");
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == "ok",
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The profile records what was applied: compression on for the first, off for the second.
    let lines = eventually(Duration::from_secs(5), || async {
        let l = dp.closed_connections();
        (l.len() >= 2).then_some(l)
    })
    .await
    .expect("two profile lines");
    assert_eq!(lines[0]["compression"], true, "{lines:?}");
    assert_eq!(lines[1]["compression"], false, "{lines:?}");
}

#[tokio::test]
async fn a_stalled_client_is_closed_after_the_stall_limit_and_counted() {
    for mode in ["zero_copy", "frame_aware"] {
        let echo = spawn_echo().await;
        let dp = DataPlaneProc::start(&config(echo, mode, "", "[limits]\nstall_timeout = \"1s\""));
        let (ws, _) = ws_connect(dp.proxy, "/stall", None).await;
        let (mut tx, _rx) = ws.split();
        // Send until the proxy gives up on us; we never read the echoes.
        let sender = tokio::spawn(async move {
            let msg = vec![7u8; 64 * 1024];
            for _ in 0..2048 {
                if tx.send(Message::binary(msg.clone())).await.is_err() {
                    return true;
                }
            }
            false
        });
        let line = eventually(Duration::from_secs(20), || async {
            dp.closed_connections().into_iter().next()
        })
        .await
        .unwrap_or_else(|| panic!("{mode}: no profile line\n{}", dp.log_text()));
        assert_eq!(line["error"], "client_stalled", "{mode}: {line}");
        assert_eq!(line["closed_by"], "proxy", "{mode}: {line}");
        let counted =
            trimtab_tests::harness::metric(dp.admin, "trimtab_dataplane_stalled_closes_total")
                .await;
        assert_eq!(counted, Some(1.0), "{mode}");
        let _ = tokio::time::timeout(Duration::from_secs(10), sender).await;
    }
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_head_is_cut_off_at_the_handshake_timeout() {
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&config(
        echo,
        "zero_copy",
        "",
        "[limits]\nhandshake_timeout = \"1s\"",
    ));
    let mut s = TcpStream::connect(dp.proxy).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\n")
        .await
        .expect("partial head");
    let t = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("still open after 5 s"),
        }
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

/// A vanishing IoT device of the workload goes silent with its socket open: no close frame,
/// no FIN, no pong. A stand-in proxy that pings a quiet connection tells the live devices (they
/// answer, then close normally at the end of their session) from the vanished ones. A vanished
/// one answers the stand-in's close neither with a close frame nor with a FIN for 3 s (a data
/// plane's close grace), and its session ends soon after (the run does not wait for its
/// deadline).
#[tokio::test]
async fn a_vanished_device_goes_silent_with_its_socket_open() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use std::sync::{Arc, Mutex};
    use tokio_tungstenite::tungstenite::Message;
    use trimtab_tests::workload::{Archetype, Workload, run};
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum End {
        Closed,
        Fin,
        Silent,
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let ends = Arc::new(Mutex::new(Vec::new()));
    let record = ends.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(s).await.unwrap();
                let end = loop {
                    let quiet = Duration::from_millis(1500);
                    match tokio::time::timeout(quiet, ws.next()).await {
                        Ok(Some(Ok(Message::Close(_)))) => break End::Closed,
                        Ok(Some(Ok(m @ Message::Text(_)))) => ws.send(m).await.unwrap(),
                        Ok(Some(Ok(_))) => {}
                        Ok(None | Some(Err(_))) => break End::Fin,
                        // Quiet: a live device answers a ping (it reads during its gaps).
                        Err(_) => {
                            ws.send(Message::Ping(vec![1].into())).await.unwrap();
                            let pong = tokio::time::timeout(Duration::from_secs(1), async {
                                loop {
                                    match ws.next().await {
                                        Some(Ok(Message::Pong(_))) => return Some(End::Closed),
                                        Some(Ok(Message::Close(_))) => return None,
                                        Some(Ok(_)) => {}
                                        _ => return Some(End::Fin),
                                    }
                                }
                            })
                            .await;
                            match pong {
                                Ok(Some(End::Closed)) => {}
                                Ok(None) => break End::Closed,
                                Ok(Some(_)) => break End::Fin,
                                Err(_) => {
                                    // Close it as a proxy closes a dead peer, a close
                                    // frame and a FIN: no answer.
                                    let _ = ws.send(Message::Close(None)).await;
                                    let _ = tokio::io::AsyncWriteExt::shutdown(ws.get_mut()).await;
                                    let grace = Duration::from_secs(3);
                                    match tokio::time::timeout(grace, ws.next()).await {
                                        Err(_) => break End::Silent,
                                        Ok(_) => break End::Fin,
                                    }
                                }
                            }
                        }
                    }
                };
                record.lock().unwrap().push(end);
                // Dropped: the stand-in proxy closes the connection.
            });
        }
    });
    let t0 = std::time::Instant::now();
    let stats = run(Workload {
        proxy: addr,
        concurrency: 12,
        total: 12,
        duration: Duration::from_secs(40),
        // IoT sessions of 3 s, reporting every 1 to 3 s
        session: Duration::from_millis(300),
        mix: vec![Archetype::Iot],
        seed: 7,
        paired: None,
    })
    .await;
    let took = t0.elapsed();
    let ends = ends.lock().unwrap().clone();
    assert_eq!(ends.len(), 12, "{ends:?} {stats:?}");
    let count = |e| ends.iter().filter(|x| **x == e).count();
    assert_eq!(count(End::Fin), 0, "{ends:?}");
    assert!(count(End::Silent) >= 1, "{ends:?}");
    assert!(count(End::Closed) >= 1, "{ends:?}");
    assert_eq!(stats.failures.load(std::sync::atomic::Ordering::Relaxed), 0);
    assert!(took < Duration::from_secs(25), "{took:?}");
}

/// The workload generator drives every archetype through a real data plane; each becomes
/// profiles of its own service, and their traffic differs the way the archetypes say.
#[sqlx::test(migrations = "../migrations")]
async fn the_workload_generator_drives_every_archetype_into_profiles(pool: sqlx::PgPool) {
    use trimtab_tests::workload::{Archetype, Workload, run};
    let url = trimtab_tests::harness::database_url_of(&pool).await;
    let echo = spawn_echo().await;
    let mut services = String::new();
    for a in Archetype::ALL {
        let name = a.route().trim_start_matches('/');
        services.push_str(&format!(
            "[services.{name}]\nupstreams = [\"{echo}\"]\nroutes = [{{ path_prefix = \"{}\" }}]\n",
            a.route()
        ));
        if a == Archetype::Dashboard {
            // Browsers offer permessage-deflate; here the proxy takes them up on it.
            services.push_str("settings = { mode = \"frame_aware\", compression = true }\n");
        }
    }
    let dp = DataPlaneProc::start(&format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nclient_key_header = \"x-client-id\"\n\
         [profiles]\ndatabase_url = \"{url}\"\nspool_dir = \"{}\"\nbatch_interval = \"100ms\"\n{services}",
        trimtab_tests::harness::scratch_dir("spool").display()
    ));
    let stats = run(Workload {
        proxy: dp.proxy,
        concurrency: 6,
        total: 36,
        duration: Duration::from_secs(20),
        // IoT sessions of 10 s
        session: Duration::from_secs(1),
        mix: Archetype::ALL.to_vec(),
        seed: 7,
        paired: None,
    })
    .await;
    let done = stats.connections.load(std::sync::atomic::Ordering::Relaxed);
    assert!(done >= 30, "{stats:?}");
    // The clients measured every archetype's message latency (a push carries its send time),
    // and nothing took a second on loopback.
    let latency = stats.latency.take();
    for a in Archetype::ALL {
        let svc = a.route().trim_start_matches('/');
        let v: Vec<u64> = latency
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{svc}-")))
            .flat_map(|(_, v)| v.iter().copied())
            .collect();
        assert!(!v.is_empty(), "{svc}: no latency measured");
        assert!(v.iter().all(|us| *us < 1_000_000), "{svc}: {v:?}");
    }
    type Row = (String, i64, i64, i64);
    let rows: Vec<Row> = eventually(Duration::from_secs(10), || async {
        let r: Vec<Row> = sqlx::query_as(
            "select service, count(*), max(c2u_bytes + u2c_bytes), max(u2c_messages) from profiles group by service order by service",
        )
        .fetch_all(&pool)
        .await
        .expect("rows");
        (r.len() == 6).then_some(r)
    })
    .await
    .expect("profiles of all six archetypes");
    let by = |s: &str| rows.iter().find(|r| r.0 == s).expect(s).clone();
    assert!(by("bulk").2 > 1 << 20, "bulk moves megabytes: {rows:?}");
    assert!(
        by("feed").3 > by("chat").3,
        "the feed pushes more messages than chat: {rows:?}"
    );
    let deflate: Vec<(String, bool, bool)> = sqlx::query_as(
        "select distinct service, offers_deflate, compression from profiles order by service",
    )
    .fetch_all(&pool)
    .await
    .expect("deflate");
    for (service, offered, compressed) in &deflate {
        let browserish = ["chat", "dashboard", "feed"].contains(&service.as_str());
        assert_eq!(*offered, browserish, "{deflate:?}");
        assert_eq!(*compressed, service == "dashboard", "{deflate:?}");
    }
    let classes: Vec<(String, String)> =
        sqlx::query_as("select distinct service, client_class from profiles order by service")
            .fetch_all(&pool)
            .await
            .expect("classes");
    assert!(
        classes.contains(&("iot".into(), "device".into())),
        "{classes:?}"
    );
    assert!(
        classes.contains(&("chat".into(), "browser".into())),
        "{classes:?}"
    );
    assert!(
        classes.contains(&("terminal".into(), "server".into())),
        "{classes:?}"
    );
}
