//! Forwarding an upgraded connection in one of the two modes, and what both modes share: the
//! buffer pool, close requests, and the outcome recorded in the profile.

pub mod frame_aware;
pub mod frame_tcp;
pub mod zero_copy;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Poll;
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tuning::{ClosedBy, DirectionStats, PingStats};

/// `frame_aware`: one message in this many (the first, the 17th, …), besides the early ones of
/// [`samples`], is deflated to measure compressibility.
pub const SAMPLE_EVERY: u64 = 16;
/// At most this many bytes of a sampled message are deflated.
const SAMPLE_MAX: usize = 16 << 10;
/// Every one of a direction's first [`EARLY_SAMPLES`] reads or messages is sampled until this
/// many bytes were: a small first message (a greeting, the echo of a client's ack) then does
/// not decide a connection's compressibility alone.
const SAMPLE_MIN_BYTES: u64 = 1 << 10;
/// See [`SAMPLE_MIN_BYTES`].
const EARLY_SAMPLES: u64 = 16;

/// Whether the `count`-th read or message (counted from 1) of the direction toward the client
/// is sampled, `sampled_in` bytes having been so far: one in `every`, and each early one until
/// [`SAMPLE_MIN_BYTES`] were.
pub(crate) fn samples(count: u64, every: u64, sampled_in: u64) -> bool {
    count % every == 1 || (count <= EARLY_SAMPLES && sampled_in < SAMPLE_MIN_BYTES)
}

thread_local! {
    /// Each worker thread's compressor for sampling, reset between samples: a deflate state is
    /// about 256 KiB (window and hash tables), which made afresh per sample cost the time to
    /// set it up and, under many connections sampling at once (every connection samples its
    /// first message), heap holes that stayed in the process's resident memory.
    static SAMPLER: std::cell::RefCell<(flate2::Compress, Vec<u8>)> = std::cell::RefCell::new((
        flate2::Compress::new(flate2::Compression::fast(), false),
        Vec::new(),
    ));
}

/// Deflate (fast level, raw) up to [`SAMPLE_MAX`] bytes: (bytes in, bytes out).
pub(crate) fn deflated_size(payload: &[u8]) -> (u64, u64) {
    let p = &payload[..payload.len().min(SAMPLE_MAX)];
    SAMPLER.with(|s| {
        let Ok(mut s) = s.try_borrow_mut() else {
            return (0, 0);
        };
        let (c, out) = &mut *s;
        c.reset();
        out.clear();
        out.reserve(p.len() + 64);
        // `compress_vec` writes into the spare capacity only; a stream that does not finish
        // in it gets more room (a few rounds at most for incompressible bytes).
        for _ in 0..8 {
            let fed = c.total_in() as usize;
            match c.compress_vec(&p[fed..], out, flate2::FlushCompress::Finish) {
                Ok(flate2::Status::StreamEnd) => return (p.len() as u64, out.len() as u64),
                Ok(_) => out.reserve(out.capacity().max(4096)),
                Err(_) => break,
            }
        }
        (0, 0)
    })
}

/// `zero_copy`: one read in this many of the upstream → client direction (the one compression
/// would apply to) is deflated after it was forwarded; frame headers are in it, which is within
/// a few per cent for all but the smallest messages. Payloads that take the splice path are not
/// seen by the proxy and not sampled.
pub const ZERO_COPY_SAMPLE_EVERY: u64 = 64;

/// Time a direction waited for its destination to accept bytes (16 bytes: every live
/// connection holds one per direction).
#[derive(Debug, Default, Clone, Copy)]
pub struct Paused {
    /// All waits so far, in nanoseconds.
    nanos: u64,
    /// A wait runs; still set when the direction was stopped waiting.
    waiting: bool,
}

impl Paused {
    /// A wait begins.
    pub fn begin(&mut self) -> std::time::Instant {
        self.waiting = true;
        std::time::Instant::now()
    }

    /// The wait that began at `t` ended.
    pub fn end(&mut self, t: std::time::Instant) {
        self.nanos = self.nanos.saturating_add(t.elapsed().as_nanos() as u64);
        self.waiting = false;
    }

    /// All waits so far.
    pub fn total(&self) -> Duration {
        Duration::from_nanos(self.nanos)
    }

    /// Whether a wait runs (or ran when the direction stopped).
    pub fn waiting(&self) -> bool {
        self.waiting
    }
}

/// A wake-up for one waiter: set, then wake it (an atomic and an `AtomicWaker`, no lock).
#[derive(Debug, Default)]
pub(crate) struct Signal {
    set: AtomicBool,
    waker: AtomicWaker,
}

impl Signal {
    pub(crate) fn raise(&self) {
        self.set.store(true, Ordering::Release);
        self.waker.wake();
    }

    pub(crate) async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.set.swap(false, Ordering::AcqRel) {
                return Poll::Ready(());
            }
            self.waker.register(cx.waker());
            if self.set.swap(false, Ordering::AcqRel) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// How one leg of a `frame_aware` connection failed (both forwarders).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Its stream ended without a close frame ("eof") or failed ("io").
    Abnormal(&'static str),
    /// It sent a message over the limit.
    TooBig,
    /// It broke the protocol.
    Protocol,
    /// It sent a text message (or close reason) that is not UTF-8.
    InvalidUtf8,
    /// Writing to it failed: "stalled" or "io".
    Write(&'static str),
}

/// What the proxy does about a failed leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// The profile's error class.
    pub class: &'static str,
    /// (code to the client, reason, code to the upstream, reason); code 0 sends nothing.
    pub close: (u16, &'static str, u16, &'static str),
    /// The client's close waits until the upstream has closed, so that every message the
    /// upstream already sent reaches the client first.
    pub defer_client: bool,
    /// The close to record as the connection's, when the failure is one.
    pub record: Option<(ClosedBy, u16, &'static str)>,
}

impl Verdict {
    /// Record the failure (its error class unless one is already set, its close through
    /// `record`) and give the closes to send.
    pub fn apply(
        self,
        error_class: &mut Option<&'static str>,
        record: impl FnOnce(ClosedBy, u16, &'static str),
    ) -> (u16, &'static str, u16, &'static str) {
        if let Some((by, code, reason)) = self.record {
            record(by, code, reason);
        }
        error_class.get_or_insert(self.class);
        self.close
    }
}

/// The one table of `frame_aware`'s answers to a failed leg (`client`: the failed leg is the
/// client's).
pub(crate) fn verdict(client: bool, f: Failure) -> Verdict {
    let v = |class, close, defer_client, record| Verdict {
        class,
        close,
        defer_client,
        record,
    };
    match (client, f) {
        (true, Failure::Abnormal(why)) => v(
            if why == "io" {
                "client_io"
            } else {
                "client_gone"
            },
            (0, "", 1001, "client went away"),
            false,
            Some((ClosedBy::Client, 1006, "")),
        ),
        (true, Failure::TooBig) => v(
            "client_message_too_big",
            (
                1009,
                "message too big",
                1001,
                "client sent a message too big",
            ),
            true,
            None,
        ),
        (true, Failure::Protocol) => v(
            "client_protocol",
            (1002, "protocol error", 1001, "client protocol error"),
            true,
            None,
        ),
        (true, Failure::InvalidUtf8) => v(
            "client_invalid_utf8",
            (1007, "invalid UTF-8", 1001, "client sent invalid UTF-8"),
            true,
            None,
        ),
        (true, Failure::Write(why)) => v(
            if why == "stalled" {
                "client_stalled"
            } else {
                "client_io"
            },
            (0, "", 1001, "client not reading"),
            false,
            (why == "stalled").then_some((ClosedBy::Proxy, 1008, "client stalled")),
        ),
        (false, Failure::Abnormal(why)) => v(
            if why == "io" {
                "upstream_io"
            } else {
                "upstream_gone"
            },
            (1011, "upstream went away", 0, ""),
            false,
            Some((ClosedBy::Upstream, 1006, "")),
        ),
        (false, Failure::TooBig) => v(
            "upstream_message_too_big",
            (
                1011,
                "upstream sent a message too big",
                1009,
                "message too big",
            ),
            false,
            None,
        ),
        (false, Failure::Protocol) => v(
            "upstream_protocol",
            (1011, "upstream protocol error", 1002, "protocol error"),
            false,
            None,
        ),
        (false, Failure::InvalidUtf8) => v(
            "upstream_invalid_utf8",
            (1011, "upstream sent invalid UTF-8", 1007, "invalid UTF-8"),
            false,
            None,
        ),
        (false, Failure::Write(why)) => v(
            if why == "stalled" {
                "upstream_stalled"
            } else {
                "upstream_io"
            },
            (1011, "upstream not reading", 0, ""),
            false,
            (why == "stalled").then_some((ClosedBy::Proxy, 1008, "upstream stalled")),
        ),
    }
}

/// Why the proxy itself asks a connection to close.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseRequest {
    /// No traffic for `idle_timeout` (close 1001 "idle timeout").
    Idle,
    /// The data plane is shutting down (close 1001 "going away").
    Shutdown,
    /// The client missed its pongs (`zero_copy`'s pings; the other modes decide this in their
    /// own loops): 1001 "ping timeout" to it, 1001 "client not responding" to the upstream.
    DeadClient,
    /// The upstream missed its pongs: 1011 "upstream not responding" to the client, 1001
    /// "ping timeout" to the upstream.
    DeadUpstream,
}

impl CloseRequest {
    /// The WebSocket close code and reason sent to the client for it (the upstream gets the
    /// same for an idle timeout or a shutdown; see [`CloseRequest::toward`]).
    pub fn code_reason(self) -> (u16, &'static str) {
        self.toward(false)
    }

    /// The close code and reason sent toward the upstream (`true`) or the client.
    pub fn toward(self, to_upstream: bool) -> (u16, &'static str) {
        match (self, to_upstream) {
            (CloseRequest::Idle, _) => (1001, "idle timeout"),
            (CloseRequest::Shutdown, _) => (1001, "proxy shutting down"),
            (CloseRequest::DeadClient, false) | (CloseRequest::DeadUpstream, true) => {
                (1001, "ping timeout")
            }
            (CloseRequest::DeadClient, true) => (1001, "client not responding"),
            (CloseRequest::DeadUpstream, false) => (1011, "upstream not responding"),
        }
    }
}

/// Per-connection limits the forwarders need.
#[derive(Debug, Clone, Copy)]
pub struct ForwardLimits {
    /// A peer that accepts no bytes for this long is closed.
    pub stall_timeout: Duration,
    /// Largest message in `frame_aware`.
    pub max_message_bytes: usize,
    /// How long to wait for the peers' close replies after the proxy closed.
    pub close_grace: Duration,
}

/// How a forwarded connection ended, for the profile.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// Client → upstream statistics.
    pub c2u: DirectionStats,
    /// Upstream → client statistics.
    pub u2c: DirectionStats,
    /// Pings toward the client.
    pub ping_client: PingStats,
    /// Pings toward the upstream.
    pub ping_upstream: PingStats,
    /// Who ended it.
    pub closed_by: Option<ClosedBy>,
    /// The close code (from whichever side closed first).
    pub close_code: Option<u16>,
    /// The close reason.
    pub close_reason: Option<String>,
    /// Error class, when it ended with an error.
    pub error_class: Option<&'static str>,
    /// A peer stopped answering pings (or TCP keepalive probes), or a WebSocket client never
    /// answered the idle close.
    pub dead_peer: bool,
    /// The idle timeout fired.
    pub idle_timeout_fired: bool,
    /// Total time reads were paused because the other side was not accepting bytes.
    pub paused: Duration,
    /// Most bytes held for this connection at once.
    pub peak_buffered: u64,
}

/// A pool of read buffers per size class, so that an idle connection holds none: a buffer is
/// taken when a socket is readable and given back as soon as its bytes are written.
#[derive(Debug)]
pub struct BufPool {
    classes: [Mutex<Vec<Box<[u8]>>>; 4],
    keep: usize,
}

impl BufPool {
    /// A pool that keeps at most `keep` spare buffers per size class.
    pub const fn new(keep: usize) -> BufPool {
        BufPool {
            classes: [
                Mutex::new(Vec::new()),
                Mutex::new(Vec::new()),
                Mutex::new(Vec::new()),
                Mutex::new(Vec::new()),
            ],
            keep,
        }
    }

    fn class(size: usize) -> usize {
        tuning::settings::BUFFER_SIZES
            .iter()
            .position(|s| *s as usize >= size)
            .unwrap_or(3)
    }

    /// A buffer of at least `size` bytes.
    pub fn get(&self, size: usize) -> Box<[u8]> {
        let c = Self::class(size);
        let cap = (tuning::settings::BUFFER_SIZES[c] as usize).max(size);
        if let Some(b) = self.classes[c].lock().expect("pool lock").pop()
            && b.len() >= size
        {
            return b;
        }
        vec![0u8; cap].into_boxed_slice()
    }

    /// Give a buffer back.
    pub fn put(&self, b: Box<[u8]>) {
        let c = Self::class(b.len());
        let mut v = self.classes[c].lock().expect("pool lock");
        if v.len() < self.keep {
            v.push(b);
        }
    }
}

/// The process-wide buffer pool.
pub static BUFFERS: BufPool = BufPool::new(512);

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A WebSocket peer on `io` in `role` that answers pings (tungstenite does, while it
    /// reads) until the stream ends; returns the close frame it got.
    pub(crate) fn ws_peer<S>(
        io: S,
        role: tokio_tungstenite::tungstenite::protocol::Role,
    ) -> tokio::task::JoinHandle<Option<(u16, String)>>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        use futures_util::StreamExt as _;
        use tokio_tungstenite::tungstenite::Message;
        tokio::spawn(async move {
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(io, role, None).await;
            let mut close = None;
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Close(Some(f)) = m {
                    close = Some((u16::from(f.code), f.reason.to_string()));
                }
            }
            close
        })
    }

    /// The reused compressor measures what a fresh deflate stream of the same level does,
    /// sample after sample, for compressible and incompressible bytes alike.
    #[test]
    fn sampling_reuses_one_compressor_and_measures_like_a_fresh_one() {
        use std::io::Write as _;
        let fresh = |p: &[u8]| {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(p).unwrap();
            e.finish().unwrap().len() as u64
        };
        let text = br#"{"symbol":"ABC","price":101.25,"size":300}"#.repeat(200);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..20_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for _ in 0..3 {
            let (raw, out) = deflated_size(&text);
            assert_eq!(raw, text.len() as u64);
            // The streaming writer may end with one more empty block: within a few bytes.
            assert!(out.abs_diff(fresh(&text)) <= 8, "{out} vs {}", fresh(&text));
            assert!(out * 10 < raw, "{out} of {raw}");
            // Over SAMPLE_MAX: only the first SAMPLE_MAX bytes are measured.
            let (raw, out) = deflated_size(&noise);
            assert_eq!(raw, SAMPLE_MAX as u64);
            let f = fresh(&noise[..SAMPLE_MAX]);
            assert!(out.abs_diff(f) <= 8, "{out} vs {f}");
            assert!(out >= raw, "random bytes do not compress");
        }
    }
}
