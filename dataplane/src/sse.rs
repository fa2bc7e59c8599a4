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
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("text/event-stream"))
        })
}

/// An event stream's body with idle and keep-alive handling.
#[derive(Debug)]
pub struct SseBody {
    inner: RespBody,
    ping: Option<Duration>,
    idle: Option<Duration>,
    timer: Pin<Box<Sleep>>,
    last_data: Instant,
    last_ping: Instant,
    tail: [u8; 4],
}

impl SseBody {
    /// Wrap `inner`; a zero duration turns that handling off.
    pub fn new(inner: RespBody, ping_interval: Duration, idle_timeout: Duration) -> SseBody {
        let now = Instant::now();
        SseBody {
            inner,
            ping: (!ping_interval.is_zero()).then_some(ping_interval),
            idle: (!idle_timeout.is_zero()).then_some(idle_timeout),
            timer: Box::pin(tokio::time::sleep_until(now)),
            last_data: now,
            last_ping: now,
            tail: *b"\n\n\n\n",
        }
    }

    fn at_boundary(&self) -> bool {
        self.tail.ends_with(b"\n\n") || self.tail.ends_with(b"\r\r") || self.tail == *b"\r\n\r\n"
    }

    fn saw(&mut self, d: &[u8]) {
        let mut t = self.tail.to_vec();
        t.extend_from_slice(&d[d.len().saturating_sub(4)..]);
        self.tail.copy_from_slice(&t[t.len() - 4..]);
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
                    if let Some(d) = f.data_ref()
                        && !d.is_empty()
                    {
                        let d = d.clone();
                        this.saw(&d);
                        this.last_data = Instant::now();
                        this.last_ping = this.last_data;
                    }
                    return Poll::Ready(Some(Ok(f)));
                }
                Poll::Ready(other) => return Poll::Ready(other),
                Poll::Pending => {}
            }
            let now = Instant::now();
            if let Some(idle) = this.idle
                && now >= this.last_data + idle
            {
                METRICS.sse_idle_closes.fetch_add(1, Ordering::Relaxed);
                return Poll::Ready(None);
            }
            let ping_due = this
                .ping
                .filter(|_| this.at_boundary())
                .map(|p| this.last_ping + p);
            if let Some(due) = ping_due
                && now >= due
            {
                this.last_ping = now;
                METRICS.sse_pings.fetch_add(1, Ordering::Relaxed);
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b":\n\n")))));
            }
            let next = [this.idle.map(|i| this.last_data + i), ping_due]
                .into_iter()
                .flatten()
                .min();
            let Some(next) = next else {
                return Poll::Pending;
            };
            this.timer.as_mut().reset(next);
            if this.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
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
