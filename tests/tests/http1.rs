//! The plain HTTP/1.1 path (`dataplane::h1`) against an upstream that writes its responses
//! byte for byte: every framing a response can have, interim responses, pipelining, a large
//! body, a keep-alive connection the upstream dropped, and hyper taking a connection over
//! when an upgrade comes.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trimtab_tests::harness::{DataPlaneProc, eventually, metric};
use trimtab_tests::upstream::spawn_echo;

/// Read one request head and its Content-Length body; `None` at EOF.
async fn read_request(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<(String, Vec<u8>)> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while buf.len() < end + 4 + len {
                let mut b = [0u8; 65536];
                let n = s.read(&mut b).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&b[..n]);
            }
            let body = buf[end + 4..end + 4 + len].to_vec();
            buf.drain(..end + 4 + len);
            return Some((head, body));
        }
        let mut b = [0u8; 65536];
        let n = s.read(&mut b).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&b[..n]);
    }
}

/// An upstream whose answers are written by hand, by request line.
async fn scripted_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                // Set by /stale: the next request on this connection is read and the
                // connection closed without an answer.
                let mut drop_next = false;
                while let Some((head, body)) = read_request(&mut s, &mut buf).await {
                    if drop_next {
                        return;
                    }
                    let line = head.lines().next().unwrap_or_default().to_string();
                    let reply: Vec<u8> = match line.split(' ').take(2).collect::<Vec<_>>()[..] {
                        ["GET", "/len"] => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello".to_vec(),
                        ["GET", "/chunked"] => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-t\r\n\r\n5\r\nhello\r\n6;e=1\r\n world\r\n0\r\nx-t: done\r\n\r\n".to_vec(),
                        ["HEAD", "/len"] => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n".to_vec(),
                        ["GET", "/nocontent"] => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
                        ["GET", "/hints"] => b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
                        ["POST", "/upload"] => {
                            let sum: u64 = body.iter().map(|b| u64::from(*b)).sum();
                            let text = format!("{} {sum}", body.len());
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}", text.len()).into_bytes()
                        }
                        ["GET", "/close"] => {
                            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the close").await;
                            return;
                        }
                        ["GET", "/big"] => {
                            // 64 MiB, more than the sockets between can hold.
                            let _ = s.write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 64 << 20).as_bytes()).await;
                            let chunk = vec![b'x'; 1 << 20];
                            for _ in 0..64 {
                                if s.write_all(&chunk).await.is_err() {
                                    return;
                                }
                            }
                            continue;
                        }
                        ["GET", "/stale"] => {
                            // Answered; the next request on this connection then meets the
                            // close of a keep-alive timeout that ran out as it arrived.
                            drop_next = true;
                            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale".to_vec()
                        }
                        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
                    };
                    if s.write_all(&reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Read until the bytes received end with `suffix`; gives them all.
async fn read_bytes_to(s: &mut TcpStream, got: &mut Vec<u8>, suffix: &[u8]) -> Vec<u8> {
    let mut b = [0u8; 65536];
    while !got.ends_with(suffix) {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b))
            .await
            .unwrap_or_else(|_| panic!("no {suffix:?} in {:?}", String::from_utf8_lossy(got)))
            .expect("read");
        assert!(
            n > 0,
            "closed before {suffix:?}: {:?}",
            String::from_utf8_lossy(got)
        );
        got.extend_from_slice(&b[..n]);
    }
    std::mem::take(got)
}

/// As [`read_bytes_to`], as text.
async fn read_to(s: &mut TcpStream, got: &mut Vec<u8>, suffix: &[u8]) -> String {
    String::from_utf8_lossy(&read_bytes_to(s, got, suffix).await).to_string()
}

#[tokio::test]
async fn plain_http1_passes_every_response_framing_through_on_one_connection() {
    let up = scripted_upstream().await;
    let dp = DataPlaneProc::start(&format!(
        r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
dataplane_id = "h1"
workers = 1
[services.s]
upstreams = ["{up}"]
routes = [{{ path_prefix = "/" }}]
"#
    ));
    let mut c = TcpStream::connect(dp.proxy).await.expect("connect");
    let mut got = Vec::new();

    // Two requests in one write: both answered, in order; the chunked body keeps its chunk
    // extension and trailer.
    c.write_all(b"GET /len HTTP/1.1\r\nHost: a\r\n\r\nGET /chunked HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let r = read_to(&mut c, &mut got, b"x-t: done\r\n\r\n").await;
    let (first, second) = r.split_at(r.find("HTTP/1.1 200 OK\r\nTransfer").expect("second"));
    assert!(
        first.starts_with("HTTP/1.1 200 OK\r\n") && first.ends_with("\r\n\r\nhello"),
        "{first:?}"
    );
    assert!(first.contains("via: 1.1 trimtab-h1\r\n"), "{first:?}");
    assert!(
        second.ends_with("\r\n\r\n5\r\nhello\r\n6;e=1\r\n world\r\n0\r\nx-t: done\r\n\r\n"),
        "{second:?}"
    );

    // HEAD: the length is announced, no body follows, the connection goes on.
    c.write_all(b"HEAD /len HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let r = read_to(&mut c, &mut got, b"\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("Content-Length: 5"),
        "{r:?}"
    );
    c.write_all(b"GET /nocontent HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let r = read_to(&mut c, &mut got, b"\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 204"), "{r:?}");

    // An interim 103 reaches the client ahead of the answer.
    c.write_all(b"GET /hints HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let r = read_to(&mut c, &mut got, b"\r\n\r\nok").await;
    assert!(
        r.starts_with("HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n"),
        "{r:?}"
    );
    assert!(r.contains("HTTP/1.1 200 OK\r\n"), "{r:?}");

    // A 3 MiB body, sent in pieces, arrives whole.
    let body: Vec<u8> = (0..3 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    let sum: u64 = body.iter().map(|b| u64::from(*b)).sum();
    c.write_all(
        format!(
            "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    for part in body.chunks(100_000) {
        c.write_all(part).await.expect("write");
    }
    let want = format!("{} {sum}", body.len());
    let r = read_to(&mut c, &mut got, want.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r:?}");

    // The next GET, sent on the pooled connection /stale left, meets the upstream's close
    // before any answer and is sent again on a new one.
    c.write_all(b"GET /stale HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    read_to(&mut c, &mut got, b"stale").await;
    c.write_all(b"GET /len HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let r = read_to(&mut c, &mut got, b"hello").await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r:?}");
    assert_eq!(
        metric(dp.admin, "trimtab_dataplane_retries_total").await,
        Some(1.0)
    );

    // A body delimited by the upstream's close: the client is told, and closed after it.
    c.write_all(b"GET /close HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("read");
    let r = String::from_utf8_lossy(&rest);
    assert!(
        r.starts_with("HTTP/1.1 200") && r.ends_with("\r\n\r\nuntil the close"),
        "{r:?}"
    );
    assert!(r.contains("connection: close\r\n"), "{r:?}");
}

#[tokio::test]
async fn plain_http1_hands_a_connection_to_hyper_when_an_upgrade_follows() {
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&format!(
        r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[services.echo]
upstreams = ["{echo}"]
routes = [{{ path_prefix = "/" }}]
"#
    ));
    let mut c = TcpStream::connect(dp.proxy).await.expect("connect");
    let mut got = Vec::new();
    c.write_all(b"GET /plain HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .expect("write");
    let r = read_to(&mut c, &mut got, b"\r\n\r\n").await;
    assert!(
        r.starts_with("HTTP/1.1 200") && r.contains("x-echo-method: GET"),
        "{r:?}"
    );
    // The same connection now upgrades: hyper serves it, from the bytes already read.
    c.write_all(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .expect("write");
    let r = read_to(&mut c, &mut got, b"\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 101"), "{r:?}");
    assert!(r.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{r:?}");
    // A masked text frame "hi" comes back (unmasked) from the echo upstream.
    c.write_all(&[0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2])
        .await
        .expect("write");
    let r = read_bytes_to(&mut c, &mut got, b"hi").await;
    assert_eq!(r, [0x81, 2, b'h', b'i']);
    assert_eq!(
        metric(dp.admin, "trimtab_dataplane_http1_handoffs_total").await,
        Some(1.0)
    );
}

/// The data plane's `n`th stall close comes within 10 s; then what the sockets held arrives
/// and the connection ends. Returns the bytes that arrived.
async fn given_up(dp: &DataPlaneProc, c: &mut TcpStream, n: usize) -> usize {
    let closed = eventually(Duration::from_secs(10), || async {
        (metric(dp.admin, "trimtab_dataplane_stalled_closes_total").await == Some(n as f64))
            .then_some(())
    })
    .await;
    assert!(closed.is_some(), "no stall close number {n} within 10 s");
    let mut got = 0usize;
    let mut b = vec![0u8; 1 << 16];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match c.read(&mut b).await {
                Ok(0) | Err(_) => break,
                Ok(k) => got += k,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the proxy kept connection {n} open");
    got
}

#[tokio::test]
async fn a_client_that_stops_reading_is_given_up_at_the_stall_limit_on_every_path() {
    let up = scripted_upstream().await;
    let dp = DataPlaneProc::start(&format!(
        r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[limits]
stall_timeout = "1s"
[services.s]
upstreams = ["{up}"]
routes = [{{ path_prefix = "/" }}]
"#
    ));
    // The plain path, then hyper's (`TE: trailers` is one of the things the plain path hands on).
    for (i, extra) in ["", "TE: trailers\r\n"].into_iter().enumerate() {
        let mut c = TcpStream::connect(dp.proxy).await.expect("connect");
        c.write_all(format!("GET /big HTTP/1.1\r\nHost: a\r\n{extra}\r\n").as_bytes())
            .await
            .expect("write");
        // The client reads nothing; the proxy's writes stop, and a second later it gives up.
        let got = given_up(&dp, &mut c, i + 1).await;
        assert!(
            got < 64 << 20,
            "the whole body arrived ({got} bytes, {extra:?})"
        );
    }
    assert_eq!(
        metric(dp.admin, "trimtab_dataplane_http1_handoffs_total").await,
        Some(1.0)
    );
    // HTTP/2 (prior knowledge), a client that opens its flow-control windows wide (browsers
    // open several MiB) and then reads nothing: the proxy may send more than the sockets hold.
    // Raw frames, so that nothing on the client side reads the socket.
    let mut c = TcpStream::connect(dp.proxy).await.expect("connect");
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let max = 0x7fff_ffffu32;
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE = 2^31 - 1, and the connection window as wide.
    let mut settings = 4u16.to_be_bytes().to_vec();
    settings.extend(max.to_be_bytes());
    out.extend(frame(0x4, 0, 0, &settings));
    out.extend(frame(0x8, 0, 0, &(max - 65_535).to_be_bytes()));
    // HEADERS (END_STREAM | END_HEADERS): GET http://a/big in HPACK (static-table indexes).
    let mut block = vec![0x82, 0x86, 0x44, 4];
    block.extend_from_slice(b"/big");
    block.extend([0x41, 1, b'a']);
    out.extend(frame(0x1, 0x5, 1, &block));
    c.write_all(&out).await.expect("write");
    let got = given_up(&dp, &mut c, 3).await;
    assert!(got > 1 << 20 && got < 64 << 20, "{got} bytes");
}
