//! HTTP/2 over cleartext: prior knowledge (the connection starts with the HTTP/2 preface) and
//! the HTTP/1.1 `Upgrade: h2c` handshake (RFC 7540 §3.2).
//!
//! After an upgrade, the request that carried `Upgrade: h2c` is answered on stream 1 of the new
//! HTTP/2 connection. hyper's HTTP/2 server has no entry for that, so the upgraded stream is
//! handed to it as if the client had sent that request itself: the client's preface and first
//! SETTINGS frame pass through, then a HEADERS frame for stream 1 (the original request,
//! HPACK-encoded without touching the dynamic table, END_STREAM set), then everything else the
//! client sends. hyper then answers stream 1 like any other, with its own flow control.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::header::{self, HeaderMap};
use tokio::io::{AsyncRead, ReadBuf};

/// The client connection preface.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The default (and smallest) SETTINGS_MAX_FRAME_SIZE.
const MAX_FRAME: usize = 16384;

/// Whether the connection may be HTTP/2 prior knowledge: `b` is a prefix of the preface or
/// starts with it.
pub fn could_be_preface(b: &[u8]) -> bool {
    let n = b.len().min(PREFACE.len());
    b[..n] == PREFACE[..n]
}

fn hpack_int(out: &mut Vec<u8>, first: u8, prefix_bits: u8, mut n: usize) {
    let max = (1usize << prefix_bits) - 1;
    if n < max {
        out.push(first | n as u8);
        return;
    }
    out.push(first | max as u8);
    n -= max;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
}

fn hpack_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    // Literal Header Field without Indexing, new name (RFC 7541 §6.2.2); no Huffman.
    out.push(0x00);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name);
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// The HEADERS frame (stream 1, END_STREAM | END_HEADERS) that stands for the upgrade request.
/// Errors when the request does not fit one frame.
pub fn upgrade_request_frame(
    method: &http::Method,
    path: &str,
    authority: &str,
    headers: &HeaderMap,
) -> Result<Vec<u8>, &'static str> {
    let mut block = Vec::new();
    hpack_literal(&mut block, b":method", method.as_str().as_bytes());
    hpack_literal(&mut block, b":scheme", b"http");
    hpack_literal(&mut block, b":authority", authority.as_bytes());
    hpack_literal(&mut block, b":path", path.as_bytes());
    let listed: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    for (name, value) in headers {
        let n = name.as_str();
        let connection_specific = matches!(
            n,
            "connection"
                | "upgrade"
                | "http2-settings"
                | "keep-alive"
                | "proxy-connection"
                | "transfer-encoding"
                | "host"
        ) || listed.iter().any(|l| l == n)
            || (n == "te" && value.as_bytes() != b"trailers");
        if !connection_specific {
            hpack_literal(&mut block, n.as_bytes(), value.as_bytes());
        }
    }
    if block.len() > MAX_FRAME {
        return Err("request head too large for one HTTP/2 frame");
    }
    let mut frame = Vec::with_capacity(9 + block.len());
    frame.extend_from_slice(&(block.len() as u32).to_be_bytes()[1..]);
    frame.push(0x1); // HEADERS
    frame.push(0x1 | 0x4); // END_STREAM | END_HEADERS
    frame.extend_from_slice(&1u32.to_be_bytes());
    frame.extend_from_slice(&block);
    Ok(frame)
}

/// The upgraded client stream with the stream-1 request placed after the client's first
/// SETTINGS frame.
#[derive(Debug)]
pub struct Upgraded<S> {
    inner: S,
    /// Bytes read while looking for the end of the first SETTINGS frame.
    gathered: Vec<u8>,
    /// The stream-1 frame, until it is placed.
    inject: Option<Vec<u8>>,
    /// Bytes ready to hand out, and how far they were handed out.
    out: Vec<u8>,
    at: usize,
}

impl<S> Upgraded<S> {
    /// Wrap the upgraded stream; `frame` from [`upgrade_request_frame`].
    pub fn new(inner: S, frame: Vec<u8>) -> Upgraded<S> {
        Upgraded {
            inner,
            gathered: Vec::new(),
            inject: Some(frame),
            out: Vec::new(),
            at: 0,
        }
    }

    /// Once the preface and the first frame are in, line up the bytes to hand out.
    fn place(&mut self) -> io::Result<bool> {
        let g = &self.gathered;
        let n = g.len().min(PREFACE.len());
        if g[..n] != PREFACE[..n] {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "h2c upgrade: the client did not send the HTTP/2 preface",
            ));
        }
        if g.len() < PREFACE.len() + 9 {
            return Ok(false);
        }
        let h = &g[PREFACE.len()..];
        if h[3] != 0x4 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "h2c upgrade: the preface is not followed by SETTINGS",
            ));
        }
        let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        let end = PREFACE.len() + 9 + len;
        if g.len() < end {
            return Ok(false);
        }
        let mut out = std::mem::take(&mut self.gathered);
        let rest = out.split_off(end);
        out.extend_from_slice(&self.inject.take().unwrap_or_default());
        out.extend_from_slice(&rest);
        self.out = out;
        self.at = 0;
        Ok(true)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Upgraded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.inject.is_some() {
            let mut tmp = [0u8; 1024];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => {
                    this.gathered.extend_from_slice(rb.filled());
                    if this.gathered.len() > 64 << 10 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "h2c upgrade: first SETTINGS frame too large",
                        )));
                    }
                    if let Err(e) = this.place() {
                        return Poll::Ready(Err(e));
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if this.at < this.out.len() {
            let n = (this.out.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.out[this.at..this.at + n]);
            this.at += n;
            if this.at == this.out.len() {
                this.out = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

crate::prefixed::delegate_async_write!(Upgraded);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[test]
    fn hpack_integers() {
        let mut v = Vec::new();
        hpack_int(&mut v, 0, 7, 10);
        assert_eq!(v, [10]);
        v.clear();
        hpack_int(&mut v, 0, 5, 1337);
        assert_eq!(v, [31, 154, 10]); // RFC 7541 C.1.2
    }

    #[tokio::test]
    async fn the_request_frame_follows_the_first_settings_frame() {
        let mut h = HeaderMap::new();
        h.insert("accept", "*/*".parse().unwrap());
        h.insert("connection", "Upgrade, HTTP2-Settings".parse().unwrap());
        h.insert("http2-settings", "AAMAAABkAAQAAP__".parse().unwrap());
        let frame = upgrade_request_frame(&http::Method::GET, "/x", "a:1", &h).unwrap();
        assert!(!frame.windows(14).any(|w| w == b"http2-settings"));
        let mut client = PREFACE.to_vec();
        client.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]);
        client.extend_from_slice(b"NEXT");
        // Delivered one byte at a time, as a slow client would.
        let (mut a, b) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for byte in client {
                a.write_all(&[byte]).await.unwrap();
            }
        });
        let mut up = Upgraded::new(b, frame.clone());
        let mut got = Vec::new();
        up.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap();
        let settings_end = PREFACE.len() + 15;
        assert_eq!(&got[settings_end..settings_end + frame.len()], &frame[..]);
        assert!(got.ends_with(b"NEXT"));
    }
}
