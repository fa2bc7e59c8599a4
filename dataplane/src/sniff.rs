//! A request-framing watcher under hyper, for what hyper accepts but a proxy must refuse.
//!
//! hyper follows RFC 9112 §6.1 for a request carrying both `Content-Length` and
//! `Transfer-Encoding`: it decodes the body as chunked, drops the `Content-Length` header and
//! closes the connection afterwards. The handler therefore never sees that the request had both,
//! yet such a request is the classic smuggling vector and trimtab refuses it with 400 without
//! forwarding anything. [`Sniff`] passes every byte through untouched while following HTTP/1.1
//! framing (heads, content-length and chunked bodies) just enough to mark each request head
//! that has both headers; the handler takes one mark per request, in order.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Longest head line the watcher keeps (hyper refuses longer heads anyway).
const MAX_LINE: usize = 16 << 10;

#[derive(Debug)]
enum State {
    /// Reading head lines; `first` until the request line has passed.
    Head { first: bool },
    /// Skipping a content-length body.
    Body(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Skipping chunk data, then its CRLF.
    ChunkData(u64),
    /// Reading trailer lines until the empty one.
    Trailers,
    /// After an upgrade (or anything not understood): stop watching.
    Done,
}

/// The marks: one per request head, true when it had both Content-Length and Transfer-Encoding.
#[derive(Debug, Default, Clone)]
pub struct Marks(Arc<Mutex<VecDeque<bool>>>);

impl Marks {
    /// Take the mark of the next request (false when the watcher has none).
    pub fn next_request_is_smuggling(&self) -> bool {
        self.0.lock().expect("marks").pop_front().unwrap_or(false)
    }
}

/// The client stream, watched.
#[derive(Debug)]
pub struct Sniff<S> {
    inner: S,
    marks: Marks,
    state: State,
    line: Vec<u8>,
    has_cl: bool,
    has_te: bool,
    chunked: bool,
    cl: Option<u64>,
    upgrade: bool,
}

impl<S> Sniff<S> {
    /// Watch a client stream.
    pub fn new(inner: S) -> (Sniff<S>, Marks) {
        let marks = Marks::default();
        (
            Sniff {
                inner,
                marks: marks.clone(),
                state: State::Head { first: true },
                line: Vec::new(),
                has_cl: false,
                has_te: false,
                chunked: false,
                cl: None,
                upgrade: false,
            },
            marks,
        )
    }

    /// The watched stream.
    pub fn into_inner(self) -> S {
        self.inner
    }

    fn head_line(&mut self, first: bool) {
        let line = std::mem::take(&mut self.line);
        let l = trim_crlf(&line);
        if first {
            if l.is_empty() {
                return; // stray CRLF before a request line is tolerated
            }
            self.state = State::Head { first: false };
            if l.starts_with(b"CONNECT ") {
                self.upgrade = true;
            }
            return;
        }
        if l.is_empty() {
            self.end_of_head();
            return;
        }
        let Some(colon) = l.iter().position(|b| *b == b':') else {
            return;
        };
        let name = l[..colon].to_ascii_lowercase();
        let value = String::from_utf8_lossy(&l[colon + 1..])
            .trim()
            .to_ascii_lowercase();
        match name.as_slice() {
            b"content-length" => {
                self.has_cl = true;
                self.cl = value.split(',').next().and_then(|v| v.trim().parse().ok());
            }
            b"transfer-encoding" => {
                self.has_te = true;
                self.chunked = value
                    .rsplit(',')
                    .next()
                    .is_some_and(|v| v.trim() == "chunked");
            }
            b"upgrade" => self.upgrade = true,
            _ => {}
        }
    }

    fn end_of_head(&mut self) {
        self.marks
            .0
            .lock()
            .expect("marks")
            .push_back(self.has_cl && self.has_te);
        self.state = if self.upgrade || (self.has_te && !self.chunked) {
            State::Done
        } else if self.has_te {
            State::ChunkSize
        } else {
            match self.cl {
                Some(n) if n > 0 => State::Body(n),
                _ => State::Head { first: true },
            }
        };
        self.has_cl = false;
        self.has_te = false;
        self.chunked = false;
        self.cl = None;
        self.upgrade = false;
    }

    fn watch(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Done => return,
                State::Body(n) | State::ChunkData(n) => {
                    let take = (n as usize).min(data.len());
                    data = &data[take..];
                    let left = n - take as u64;
                    self.state = match (&self.state, left) {
                        (State::Body(_), 0) => State::Head { first: true },
                        (State::Body(_), l) => State::Body(l),
                        (_, 0) => {
                            // chunk data done; its CRLF is read as an (empty) size line
                            self.line.clear();
                            State::ChunkSize
                        }
                        (_, l) => State::ChunkData(l),
                    };
                }
                State::Head { .. } | State::ChunkSize | State::Trailers => {
                    let end = data.iter().position(|b| *b == b'\n');
                    let take = end.map_or(data.len(), |e| e + 1);
                    if self.line.len() + take > MAX_LINE {
                        self.state = State::Done;
                        return;
                    }
                    self.line.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if end.is_none() {
                        continue;
                    }
                    match self.state {
                        State::Head { first } => self.head_line(first),
                        State::ChunkSize => {
                            let line = std::mem::take(&mut self.line);
                            let l = trim_crlf(&line);
                            if l.is_empty() {
                                continue; // the CRLF after chunk data
                            }
                            let hex = l.split(|b| *b == b';').next().unwrap_or(b"");
                            match std::str::from_utf8(hex)
                                .ok()
                                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
                            {
                                Some(0) => self.state = State::Trailers,
                                Some(n) => self.state = State::ChunkData(n),
                                None => self.state = State::Done, // hyper refuses it
                            }
                        }
                        _ => {
                            let line = std::mem::take(&mut self.line);
                            if trim_crlf(&line).is_empty() {
                                self.state = State::Head { first: true };
                            }
                        }
                    }
                }
            }
        }
    }
}

fn trim_crlf(l: &[u8]) -> &[u8] {
    let l = l.strip_suffix(b"\n").unwrap_or(l);
    l.strip_suffix(b"\r").unwrap_or(l)
}

impl<S: AsyncRead + Unpin> AsyncRead for Sniff<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r
            && !matches!(self.state, State::Done)
        {
            self.watch(&buf.filled()[before..]);
        }
        r
    }
}

crate::prefixed::delegate_async_write!(Sniff);

#[cfg(test)]
mod tests {
    use super::*;

    fn marks_of(stream: &[u8], chunk: usize) -> Vec<bool> {
        let (mut s, m) = Sniff::new(());
        for c in stream.chunks(chunk) {
            s.watch(c);
        }
        m.0.lock().unwrap().iter().copied().collect()
    }

    #[test]
    fn marks_each_request_in_order_through_bodies() {
        let stream = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
4;ext=1\r\nwxyz\r\n0\r\nX-Trailer: 1\r\n\r\n\
POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
GET /d HTTP/1.1\r\n\r\n";
        for chunk in [1, 2, 7, 1000] {
            assert_eq!(
                marks_of(stream, chunk),
                vec![false, true, false, false],
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn body_bytes_that_look_like_headers_are_not_heads() {
        let body = "Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let stream = format!(
            "POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}GET / HTTP/1.1\r\n\r\n",
            body.len()
        );
        assert_eq!(marks_of(stream.as_bytes(), 5), vec![false, false]);
    }

    #[test]
    fn stops_after_an_upgrade() {
        let stream = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n\
Content-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(marks_of(stream, 3), vec![false]);
    }
}
