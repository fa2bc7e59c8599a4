//! The upstream leg of an upgrade, spoken by the proxy itself: write the request head, read
//! the answer's head, and when the upstream refuses, its body.
//!
//! hyper's client did this before, with a connection object, a task to drive it, a request
//! channel and 8 KiB buffers for every WebSocket handshake: about 15 KiB of memory per
//! handshake in flight that the allocator kept after a burst, and two task hand-offs on the
//! way. An upgrade is one request and one response head on a fresh connection, which the
//! proxy parses with `httparse` as it does the client's.

use std::io;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Largest response head accepted from an upstream.
pub const MAX_HEAD: usize = 64 << 10;
/// Largest body of a refusal (any answer but 101) relayed to the client.
pub const MAX_REFUSAL_BODY: usize = 1 << 20;
/// Most header fields in a response head.
const MAX_HEADERS: usize = 128;

/// Why the upstream's answer could not be used.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the socket failed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The upstream closed before its answer was complete.
    #[error("upstream closed before its answer was complete")]
    Closed,
    /// The head is not HTTP/1.x.
    #[error("malformed response: {0}")]
    Malformed(String),
    /// The head or the refusal's body is larger than the proxy relays.
    #[error("{0} larger than {1} bytes")]
    TooLarge(&'static str, usize),
}

/// A final answer's head (any interim 1xx but 101 skipped), and the bytes read after it.
#[derive(Debug)]
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its header fields.
    pub headers: HeaderMap,
    /// Bytes that came after the head (the first tunnel bytes after a 101; body bytes
    /// otherwise).
    pub rest: Vec<u8>,
}

/// Write the request head: `GET {path} HTTP/1.1`, then `headers` as they are.
pub async fn send_request(tcp: &mut TcpStream, path: &str, headers: &HeaderMap) -> io::Result<()> {
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(b"GET ");
    head.extend_from_slice(path.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    tcp.write_all(&head).await
}

/// Read the upstream's answer head. Interim answers (100 Continue, 103 Early Hints) are
/// skipped; 101 and every final status are returned.
pub async fn read_answer(tcp: &mut TcpStream) -> Result<Answer, Error> {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    loop {
        let (status, headers, used) = loop {
            if let Some(parsed) = parse_head(&buf)? {
                break parsed;
            }
            if buf.len() >= MAX_HEAD {
                return Err(Error::TooLarge("response head", MAX_HEAD));
            }
            if read_more(tcp, &mut buf, MAX_HEAD).await? == 0 {
                return Err(Error::Closed);
            }
        };
        buf.drain(..used);
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            continue;
        }
        buf.shrink_to_fit();
        return Ok(Answer {
            status,
            headers,
            rest: buf,
        });
    }
}

/// The body of a refusal, by its framing: `Content-Length`, chunked, or up to the close.
/// `rest` are the bytes read after the head (the start of the body).
pub async fn read_body(
    tcp: &mut TcpStream,
    status: StatusCode,
    headers: &HeaderMap,
    rest: Vec<u8>,
) -> Result<Bytes, Error> {
    let mut buf = rest;
    if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Bytes::new());
    }
    let chunked = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            match dechunk(&buf[at..], &mut out)? {
                Dechunk::Done => return Ok(out.into()),
                Dechunk::Used(n) => at += n,
            }
            if out.len() > MAX_REFUSAL_BODY {
                return Err(Error::TooLarge("refusal body", MAX_REFUSAL_BODY));
            }
            if read_more(tcp, &mut buf, usize::MAX).await? == 0 {
                return Err(Error::Closed);
            }
        }
    }
    let length = match headers.get(http::header::CONTENT_LENGTH) {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| Error::Malformed("invalid Content-Length".into()))?,
        ),
        None => None,
    };
    if let Some(n) = length
        && n > MAX_REFUSAL_BODY
    {
        return Err(Error::TooLarge("refusal body", MAX_REFUSAL_BODY));
    }
    let want = length.unwrap_or(MAX_REFUSAL_BODY + 1);
    while buf.len() < want {
        if read_more(tcp, &mut buf, want).await? == 0 {
            if length.is_some() {
                return Err(Error::Closed);
            }
            break;
        }
    }
    if length.is_none() && buf.len() > MAX_REFUSAL_BODY {
        return Err(Error::TooLarge("refusal body", MAX_REFUSAL_BODY));
    }
    buf.truncate(want);
    Ok(buf.into())
}

/// Read what the socket has into `buf` (4 KiB at a time: a head is rarely longer than one),
/// at most up to `limit` bytes in all; 0 at the close.
async fn read_more(tcp: &mut TcpStream, buf: &mut Vec<u8>, limit: usize) -> io::Result<usize> {
    let room = (limit.saturating_sub(buf.len())).clamp(1, 4 << 10);
    let start = buf.len();
    buf.resize(start + room, 0);
    let n = tcp.read(&mut buf[start..]).await;
    buf.truncate(start + *n.as_ref().unwrap_or(&0));
    n
}

type Head = (StatusCode, HeaderMap, usize);

/// A complete response head at the start of `buf`: (status, fields, bytes used).
fn parse_head(buf: &[u8]) -> Result<Option<Head>, Error> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut fields);
    let used = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Error::Malformed(e.to_string())),
    };
    let status = r
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| Error::Malformed("invalid status".into()))?;
    let mut headers = HeaderMap::with_capacity(r.headers.len());
    for h in r.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Error::Malformed(format!("invalid header name {:?}", h.name)))?;
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| Error::Malformed(format!("invalid value of {}", h.name)))?;
        headers.append(name, value);
    }
    Ok(Some((status, headers, used)))
}

enum Dechunk {
    /// The last chunk and the trailers are complete.
    Done,
    /// This many bytes were whole chunks, decoded into `out`; more are needed.
    Used(usize),
}

/// Decode the complete chunks at the start of `buf` into `out`.
fn dechunk(buf: &[u8], out: &mut Vec<u8>) -> Result<Dechunk, Error> {
    let bad = |what: &str| Error::Malformed(format!("chunked body: {what}"));
    let mut at = 0;
    loop {
        let Some(eol) = find_crlf(&buf[at..]) else {
            return Ok(Dechunk::Used(at));
        };
        let line = &buf[at..at + eol];
        let size_text = line.split(|b| *b == b';').next().unwrap_or_default();
        let size_text = std::str::from_utf8(size_text).map_err(|_| bad("size line"))?;
        let size = usize::from_str_radix(size_text.trim(), 16).map_err(|_| bad("chunk size"))?;
        if size > MAX_REFUSAL_BODY {
            return Err(Error::TooLarge("refusal body", MAX_REFUSAL_BODY));
        }
        let data = at + eol + 2;
        if size == 0 {
            // Trailer fields, then an empty line.
            let mut t = data;
            loop {
                let Some(e) = find_crlf(&buf[t..]) else {
                    return Ok(Dechunk::Used(at));
                };
                if e == 0 {
                    return Ok(Dechunk::Done);
                }
                t += e + 2;
            }
        }
        if buf.len() < data + size + 2 {
            return Ok(Dechunk::Used(at));
        }
        if &buf[data + size..data + size + 2] != b"\r\n" {
            return Err(bad("no CRLF after a chunk"));
        }
        out.extend_from_slice(&buf[data..data + size]);
        at = data + size + 2;
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A socket pair: (the proxy's end, the upstream's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn a_101_split_across_writes_after_a_100_keeps_the_bytes_after_it() {
        let (mut proxy, mut up) = pair().await;
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("example"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        send_request(&mut proxy, "/chat?x=1", &h).await.unwrap();
        let mut got = vec![0u8; 256];
        let n = up.read(&mut got).await.unwrap();
        assert_eq!(
            &got[..n],
            b"GET /chat?x=1 HTTP/1.1\r\nhost: example\r\nupgrade: websocket\r\n\r\n"
        );
        let answer = tokio::spawn(async move { read_answer(&mut proxy).await.map(|a| (a, proxy)) });
        for part in [
            &b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 101 Switching"[..],
            b" Protocols\r\nUpgrade: websocket\r\nX-A: 1\r\nX-A: 2\r\n",
            b"\r\n\x81\x02hi",
        ] {
            up.write_all(part).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let (a, _proxy) = answer.await.unwrap().unwrap();
        assert_eq!(a.status, StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(a.headers.get_all("x-a").iter().count(), 2);
        assert_eq!(a.rest, b"\x81\x02hi");
    }

    #[tokio::test]
    async fn refusals_are_read_by_their_framing() {
        for (wire, body) in [
            (
                &b"HTTP/1.1 403 Forbidden\r\nContent-Length: 5\r\n\r\nno wa"[..],
                &b"no wa"[..],
            ),
            (
                b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n",
                b"abcde",
            ),
            (b"HTTP/1.0 404 Not Found\r\n\r\nuntil the close", b"until the close"),
            (b"HTTP/1.1 204 No Content\r\n\r\n", b""),
        ] {
            let (mut proxy, mut up) = pair().await;
            let wire = wire.to_vec();
            tokio::spawn(async move {
                for b in wire.chunks(7) {
                    up.write_all(b).await.unwrap();
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
                // Closing ends the body without a length.
            });
            let a = read_answer(&mut proxy).await.unwrap();
            assert!(a.status.is_client_error() || a.status == StatusCode::NO_CONTENT);
            let got = read_body(&mut proxy, a.status, &a.headers, a.rest)
                .await
                .unwrap();
            assert_eq!(&got[..], body);
        }
    }

    #[tokio::test]
    async fn bad_answers_are_errors_that_say_why() {
        for (wire, want) in [
            (&b"SSH-2.0-OpenSSH\r\n\r\n"[..], "malformed response"),
            (b"HTTP/1.1 101 Switching Protocols\r\nUpgr", "closed before"),
            (
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 99999999\r\n\r\n",
                "larger than",
            ),
            (
                b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                "chunk size",
            ),
        ] {
            let (mut proxy, mut up) = pair().await;
            up.write_all(wire).await.unwrap();
            drop(up);
            let r = match read_answer(&mut proxy).await {
                Ok(a) => read_body(&mut proxy, a.status, &a.headers, a.rest)
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            };
            let e = r.expect_err("an error").to_string();
            assert!(e.contains(want), "{e:?} does not say {want:?}");
        }
        // A head that never ends is refused at MAX_HEAD.
        let (mut proxy, mut up) = pair().await;
        tokio::spawn(async move {
            let _ = up.write_all(b"HTTP/1.1 101 OK\r\n").await;
            let line =
                b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
            while up.write_all(line).await.is_ok() {}
        });
        let e = read_answer(&mut proxy).await.expect_err("too large");
        assert!(
            matches!(
                e,
                Error::TooLarge("response head", MAX_HEAD) | Error::Malformed(_)
            ),
            "{e}"
        );
    }
}
