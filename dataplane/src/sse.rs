//! Server-sent events: a `text/event-stream` response passes through unbuffered, frame by
//! frame, with no overall time limit. The service's settings apply to it as to a WebSocket:
//! `idle_timeout` ends a stream on which the upstream sent nothing for that long (a clean end
//! that `EventSource` clients reconnect after), and `ping_interval` sends a comment line
//! (`:\n\n`, ignored by every SSE client) between events when the stream has been quiet that
//! long, so that idle-closing middleboxes between the proxy and the client leave it open.
//! Comments are only ever inserted at an event boundary, never inside an event.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::proxy::RespBody;
use crate::telemetry::METRICS;

/// Whether a response is an event stream.
pub fn is_event_stream(h: &http::HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_event_stream_type)
}

/// Whether a `Content-Type` value names an event stream.
pub fn is_event_stream_type(v: &str) -> bool {
    v.split(';')
        .next()
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
}

/// The comment a quiet stream gets.
pub const PING: &[u8] = b":\n\n";

/// What a quiet stream needs now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    /// Nothing before this instant (`None`: nothing ever, until data comes).
    Wait(Option<Instant>),
    /// A comment ([`PING`]).
    Ping,
    /// The end: idle for `idle_timeout`.
    End,
}

/// The keep-alive and idle clock of one event stream, shared by the hyper body
/// ([`SseBody`]) and the plain HTTP/1.1 path ([`crate::h1`]).
#[derive(Debug)]
pub struct Keeper {
    ping: Option<Duration>,
    idle: Option<Duration>,
    last_data: Instant,
    last_ping: Instant,
    tail: [u8; 4],
}

impl Keeper {
    /// A stream that starts now; a zero interval or timeout is off.
    pub fn new(ping_interval: Duration, idle_timeout: Duration) -> Keeper {
        let now = Instant::now();
        Keeper {
            ping: (!ping_interval.is_zero()).then_some(ping_interval),
            idle: (!idle_timeout.is_zero()).then_some(idle_timeout),
            last_data: now,
            last_ping: now,
            tail: *b"\n\n\n\n",
        }
    }

    /// Between two events: the bytes so far end in a blank line.
    fn at_boundary(&self) -> bool {
        self.tail.ends_with(b"\n\n") || self.tail.ends_with(b"\r\r") || self.tail == *b"\r\n\r\n"
    }

    /// The upstream sent `d`.
    pub fn data(&mut self, d: &[u8]) {
        if d.is_empty() {
            return;
        }
        let mut t = self.tail.to_vec();
        t.extend_from_slice(&d[d.len().saturating_sub(4)..]);
        self.tail.copy_from_slice(&t[t.len() - 4..]);
        self.last_data = Instant::now();
        self.last_ping = self.last_data;
    }

    /// What is due at `now`; a ping or the end is counted as given.
    pub fn due(&mut self, now: Instant) -> Due {
        if let Some(idle) = self.idle
            && now >= self.last_data + idle
        {
            METRICS.sse_idle_closes.fetch_add(1, Ordering::Relaxed);
            return Due::End;
        }
        let ping_due = self
            .ping
            .filter(|_| self.at_boundary())
            .map(|p| self.last_ping + p);
        if let Some(due) = ping_due
            && now >= due
        {
            self.last_ping = now;
            METRICS.sse_pings.fetch_add(1, Ordering::Relaxed);
            return Due::Ping;
        }
        Due::Wait(
            [self.idle.map(|i| self.last_data + i), ping_due]
                .into_iter()
                .flatten()
                .min(),
        )
    }
}

/// An event-stream response body with keep-alive comments and an idle end.
#[derive(Debug)]
pub struct SseBody {
    inner: RespBody,
    keeper: Keeper,
    timer: Pin<Box<Sleep>>,
}

impl SseBody {
    /// Wrap `inner`; a zero interval or timeout is off.
    pub fn new(inner: RespBody, ping_interval: Duration, idle_timeout: Duration) -> SseBody {
        SseBody {
            inner,
            keeper: Keeper::new(ping_interval, idle_timeout),
            timer: Box::pin(tokio::time::sleep_until(Instant::now())),
        }
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => {
                    if let Some(d) = f.data_ref() {
                        this.keeper.data(d);
                    }
                    return Poll::Ready(Some(Ok(f)));
                }
                Poll::Ready(other) => return Poll::Ready(other),
                Poll::Pending => {}
            }
            match this.keeper.due(Instant::now()) {
                Due::End => return Poll::Ready(None),
                Due::Ping => return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(PING))))),
                Due::Wait(None) => return Poll::Pending,
                Due::Wait(Some(next)) => {
                    this.timer.as_mut().reset(next);
                    if this.timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
