//! `zero_copy` mode: bytes are forwarded unmodified in both directions.
//!
//! Each direction waits for readability holding nothing; when bytes are there it reads up to
//! `Settings.buffer_size` of them into its worker thread's buffer and writes them to the other
//! side at once, so an idle connection holds no buffer; only bytes the destination could not
//! take wait, in a buffer from the shared pool. Reads of one direction
//! stop while its destination does not accept bytes (backpressure: at most one buffer in flight
//! per direction, never a queue). WebSocket frame headers are tracked as the bytes pass, for
//! message counts and sizes; payloads are never copied anywhere else. The proxy can close at a
//! frame boundary with a real close frame (masked toward the upstream), so an idle timeout or a
//! shutdown ends the connection the way RFC 6455 wants rather than with a reset.
//!
//! On Linux, large payloads (and opaque tunnels) move through splice(2) with pipes from a
//! shared pool, held only while bytes are in flight and always drained before they go back;
//! headers and small frames take the copy path, where two syscalls move many frames at once.

use std::io;
use std::net::Shutdown;
use std::pin::pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::watch;
use tuning::{ClosedBy, Settings};

use super::frame_aware::Pings;
use super::{BUFFERS, CloseRequest, ForwardLimits, Outcome, Paused};
use crate::frames::{FrameEvent, FrameTracker};
use crate::stats::DirStats;

/// Whether the forwarded bytes are WebSocket frames (tracked) or an opaque tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// RFC 6455 frames: tracked, and the proxy can insert close frames.
    WebSocket,
    /// Opaque bytes (any other Upgrade token, raw TCP).
    Opaque,
}

#[derive(Debug)]
struct Dir {
    stats: DirStats,
    tracker: Option<FrameTracker>,
    paused: Paused,
    /// The destination is the upstream: frames we insert must be masked.
    to_upstream: bool,
    closed_by_proxy: bool,
    /// After the proxy closed, the source sent nothing more: no close reply, no FIN within
    /// the grace (a client that did not answer an idle close had gone silent: a dead peer).
    silent: bool,
    /// Reads forwarded on the copy path (for compressibility sampling).
    reads: u64,
}

#[derive(Debug)]
enum End {
    /// The source finished sending (FIN); the destination was half-closed.
    Eof,
    /// The proxy closed this direction (close frame sent or tunnel shut down).
    ProxyClosed,
    /// The destination accepted no bytes for the stall timeout.
    Stalled,
    /// Reading the source failed.
    ReadError(io::Error),
    /// Writing the destination failed.
    WriteError(io::Error),
}

fn close_frame(code: u16, reason: &str, masked: bool) -> ([u8; 131], usize) {
    let reason = &reason.as_bytes()[..reason.len().min(123)];
    let mut payload = [0u8; 125];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + reason.len()].copy_from_slice(reason);
    control_frame(0x8, &payload[..2 + reason.len()], masked)
}

/// One control frame (`opcode`, a payload of at most 125 bytes), masked toward the upstream.
fn control_frame(opcode: u8, payload: &[u8], masked: bool) -> ([u8; 131], usize) {
    let mut f = [0u8; 131];
    let plen = payload.len().min(125);
    f[0] = 0x80 | opcode;
    f[1] = plen as u8 | if masked { 0x80 } else { 0 };
    let mut at = 2;
    let key = if masked {
        let u = uuid::Uuid::new_v4();
        let b = u.as_bytes();
        let k = [b[0], b[1], b[2], b[3]];
        f[2..6].copy_from_slice(&k);
        at = 6;
        k
    } else {
        [0; 4]
    };
    for i in 0..plen {
        f[at + i] = payload[i] ^ key[i % 4];
    }
    (f, at + plen)
}

/// Write all of `data`, waiting for the destination when it is full; a destination that
/// accepts nothing for `stall` is an error of kind `TimedOut` (the plain HTTP/1.1 path,
/// [`crate::h1`], writes with it too).
pub(crate) async fn write_all(
    dst: &TcpStream,
    mut data: &[u8],
    stall: Duration,
    paused: &mut Paused,
) -> io::Result<()> {
    while !data.is_empty() {
        match dst.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let t = paused.begin();
                let r = tokio::time::timeout(stall, dst.writable()).await;
                paused.end(t);
                match r {
                    Ok(r) => r?,
                    Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "stalled")),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `try_read`, plus what tokio's own `poll_read` does: a read shorter than the buffer has
/// emptied the socket's receive queue, so its readiness is cleared and the next wait goes
/// straight to the reactor instead of costing one more read that can only say EAGAIN (a third
/// of the syscalls of a small-message round trip). Clearing is race-free: tokio clears only
/// the readiness observed before the read, never an event the reactor recorded after it.
fn read_draining(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read as _;
    let len = buf.len();
    let mut read = None;
    let r = src.try_io(tokio::io::Interest::READABLE, || {
        let n = (&*socket2::SockRef::from(src)).read(buf)?;
        read = Some(n);
        if 0 < n && n < len {
            // Not an error: the signal for `try_io` to clear the readiness; `read` holds n.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match (r, read) {
        (_, Some(n)) => Ok(n),
        (r, None) => r,
    }
}

/// What one read into a pooled buffer found.
pub(super) enum Pooled {
    /// This many bytes, in a buffer taken from [`BUFFERS`] (the caller gives it back).
    Bytes(Box<[u8]>, usize),
    /// The source finished (FIN).
    Eof,
    /// Nothing after all (readiness cleared).
    Nothing,
}

/// Read what `src` has into a pooled buffer of `size` bytes ([`read_draining`]); the buffer
/// goes back to the pool at once unless bytes came.
pub(super) fn read_pooled(src: &TcpStream, size: usize) -> io::Result<Pooled> {
    let mut buf = BUFFERS.get(size);
    let r = read_draining(src, &mut buf[..size]);
    match r {
        Ok(n) if n > 0 => Ok(Pooled::Bytes(buf, n)),
        r => {
            BUFFERS.put(buf);
            match r {
                Ok(_) => Ok(Pooled::Eof),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Pooled::Nothing),
                Err(e) => Err(e),
            }
        }
    }
}

/// What forwarded bytes carried.
#[derive(Debug, Clone, Copy)]
struct Tracked {
    /// A close frame.
    close: bool,
    /// Nothing but whole pongs while the proxy pings: an answer, not traffic, so the idle
    /// clock does not move (as in `frame_aware`, where the proxy takes pongs out).
    only_pongs: bool,
}

/// Account for forwarded bytes: message statistics, and a pong answers the proxy's ping of
/// the leg they came from.
fn track(dir: &mut Dir, data: &[u8], now: Instant, sh: &Shared) -> Tracked {
    dir.stats.on_read(data.len());
    let (mut close, mut pongs, mut other) = (false, 0u32, false);
    if let Some(t) = dir.tracker.as_mut() {
        let stats = &mut dir.stats;
        t.feed(data, |e| match e {
            FrameEvent::Message(n) => {
                other = true;
                stats.on_message(n, now, sh.origin);
            }
            FrameEvent::Close => close = true,
            FrameEvent::Ping => other = true,
            FrameEvent::Pong => pongs += 1,
        });
        if pongs > 0
            && let Some(p) = sh.pings.as_deref()
        {
            // The source of the client → upstream direction is the client.
            let from = if dir.to_upstream { CLIENT } else { UPSTREAM };
            p.lock().expect("pings").legs[from].answered_now();
            let only = !other && !close && t.at_frame_boundary();
            return Tracked {
                close,
                only_pongs: only,
            };
        }
    }
    Tracked {
        close,
        only_pongs: false,
    }
}

/// The legs, as indices of [`ZcPings::legs`].
const CLIENT: usize = 0;
const UPSTREAM: usize = 1;

/// The proxy's own WebSocket pings of both legs: a ping frame written at a frame boundary of
/// the bytes going to that peer every `ping_interval`, answered by any pong the peer sends
/// back (the pong passes on to the other peer, as RFC 6455 §5.5.3 allows an unsolicited pong).
#[derive(Debug)]
struct ZcPings {
    every: Duration,
    /// When the next pings are due.
    next: Instant,
    /// `[client, upstream]`.
    legs: [Pings; 2],
}

/// Which close frames have been forwarded completely: bit 1 client→upstream, bit 2
/// upstream→client; and which came first.
#[derive(Debug, Default)]
struct Closes {
    forwarded: AtomicU8,
    first: AtomicU8,
}

impl Closes {
    fn forwarded(&self, bit: u8) {
        self.forwarded.fetch_or(bit, Ordering::Relaxed);
        let _ = self
            .first
            .compare_exchange(0, bit, Ordering::Relaxed, Ordering::Relaxed);
    }

    fn handshake_done(&self) -> bool {
        self.forwarded.load(Ordering::Relaxed) == 3
    }
}

/// What both directions of one connection share (borrowed by both pumps).
#[derive(Debug)]
struct Shared {
    buffer_size: u32,
    limits: ForwardLimits,
    /// The moment of the upgrade; `activity` counts from it.
    origin: Instant,
    /// Nanoseconds from `origin` to the last forwarded bytes.
    activity: AtomicU64,
    closes: Closes,
    /// The proxy's close request: 0 none, 1 idle timeout, 2 shutdown, 3 dead client, 4 dead
    /// upstream.
    close: AtomicU8,
    /// Pings waiting to be written: bit 1 toward the upstream, bit 2 toward the client (set
    /// when they are due, taken by the direction that writes to that peer).
    ping_due: AtomicU8,
    /// The proxy's pings, when it pings (`ping_interval` > 0 on a WebSocket); boxed, so that
    /// a connection without them carries 8 bytes.
    pings: Option<Box<Mutex<ZcPings>>>,
}

impl Shared {
    fn touch(&self) {
        self.touch_at(Instant::now());
    }

    fn touch_at(&self, now: Instant) {
        self.activity.store(
            now.saturating_duration_since(self.origin).as_nanos() as u64,
            Ordering::Relaxed,
        );
    }

    /// Ask both directions to close. They see it the next time they are polled, which `run`
    /// does right after asking (both are polled by the same task), so no waker is needed.
    fn request_close(&self, r: CloseRequest) {
        let v = match r {
            CloseRequest::Idle => 1,
            CloseRequest::Shutdown => 2,
            CloseRequest::DeadClient => 3,
            CloseRequest::DeadUpstream => 4,
        };
        self.close.store(v, Ordering::Relaxed);
    }

    fn close_requested(&self) -> Option<CloseRequest> {
        match self.close.load(Ordering::Relaxed) {
            1 => Some(CloseRequest::Idle),
            2 => Some(CloseRequest::Shutdown),
            3 => Some(CloseRequest::DeadClient),
            4 => Some(CloseRequest::DeadUpstream),
            _ => None,
        }
    }

    /// Whether a ping toward this direction's destination (`bit`) is due; takes it.
    fn take_ping(&self, bit: u8) -> bool {
        self.ping_due.load(Ordering::Relaxed) & bit != 0
            && self.ping_due.fetch_and(!bit, Ordering::Relaxed) & bit != 0
    }

    /// The pings' clock at `now`: when they are due, each leg's outstanding ping is missed
    /// (a dead peer after three in a row: the close to request) and a new one is handed to the
    /// direction that writes it. Returns when the clock is next due.
    fn ping_clock(&self, now: Instant) -> Result<Option<Instant>, CloseRequest> {
        let Some(p) = self.pings.as_deref() else {
            return Ok(None);
        };
        let mut p = p.lock().expect("pings");
        if now >= p.next {
            for (leg, bit, dead) in [
                (CLIENT, 2, CloseRequest::DeadClient),
                (UPSTREAM, 1, CloseRequest::DeadUpstream),
            ] {
                if p.legs[leg].tick().is_none() {
                    return Err(dead);
                }
                self.ping_due.fetch_or(bit, Ordering::Relaxed);
            }
            p.next = now + p.every;
        }
        Ok(Some(p.next))
    }
}

/// Write the ping due toward this direction's destination (its id as payload, masked toward
/// the upstream).
async fn write_ping(dir: &mut Dir, dst: &TcpStream, sh: &Shared) -> io::Result<()> {
    let leg = if dir.to_upstream { UPSTREAM } else { CLIENT };
    let id = sh
        .pings
        .as_deref()
        .and_then(|p| p.lock().expect("pings").legs[leg].outstanding_id());
    let Some(id) = id else { return Ok(()) };
    let (f, n) = control_frame(0x9, &id.to_be_bytes(), dir.to_upstream);
    write_all(dst, &f[..n], sh.limits.stall_timeout, &mut dir.paused).await
}

/// What woke a direction.
enum Wake {
    /// The source is readable (or failed).
    Readable(io::Result<()>),
    /// The proxy asked to close.
    Close(CloseRequest),
    /// A ping toward the destination is due.
    Ping,
}

/// One direction: forward what `src` sends to `dst` until it ends. While idle its whole state
/// is a few references: the wait for readability is a `poll_read_ready` (the waker lives in
/// the socket's registration), and the bytes-moving and closing paths are boxed, so they exist
/// only while bytes are in flight or the connection closes.
async fn pump(dir: &mut Dir, src: &TcpStream, dst: &TcpStream, head: &[u8], sh: &Shared) -> End {
    let bit = if dir.to_upstream { 1 } else { 2 };
    if !head.is_empty() {
        let close = track(dir, head, Instant::now(), sh).close;
        let w = Box::pin(write_all(
            dst,
            head,
            sh.limits.stall_timeout,
            &mut dir.paused,
        ))
        .await;
        if let Err(e) = w {
            return write_end(e);
        }
        if close {
            sh.closes.forwarded(bit);
        }
        sh.touch();
    }
    let mut closing: Option<(CloseRequest, Instant)> = None;
    loop {
        if let Some((req, since)) = closing {
            let at_boundary = dir.tracker.as_ref().is_none_or(|t| t.at_frame_boundary());
            if at_boundary || since.elapsed() > sh.limits.close_grace {
                return Box::pin(close_direction(dir, src, dst, req, at_boundary, sh)).await;
            }
        }
        let waiting_for_close = closing.is_none();
        // A due ping goes in between two frames (a control frame may, even inside a
        // fragmented message); inside one it waits for the frame's end.
        let can_ping =
            waiting_for_close && dir.tracker.as_ref().is_some_and(|t| t.at_frame_boundary());
        let ping = {
            let ready = std::future::poll_fn(move |cx| {
                if waiting_for_close {
                    if let Some(req) = sh.close_requested() {
                        return Poll::Ready(Wake::Close(req));
                    }
                    if can_ping && sh.take_ping(bit) {
                        return Poll::Ready(Wake::Ping);
                    }
                }
                src.poll_read_ready(cx).map(Wake::Readable)
            })
            .await;
            match ready {
                Wake::Close(req) => {
                    closing = Some((req, Instant::now()));
                    continue;
                }
                Wake::Ping => true,
                Wake::Readable(Err(e)) => return End::ReadError(e),
                Wake::Readable(Ok(())) => false,
            }
        };
        if ping {
            if let Err(e) = Box::pin(write_ping(dir, dst, sh)).await {
                return write_end(e);
            }
            continue;
        }
        // The common case costs no allocation and no await: what the source has is read into
        // the worker thread's scratch buffer and written to the destination at once. Only a
        // payload for splice or a destination that cannot take everything goes the boxed way.
        let slow = match copy_ready(dir, src, dst, sh) {
            Copied::Done => continue,
            Copied::End(end) => return end,
            Copied::Splice => None,
            Copied::Blocked(rest) => Some(rest),
        };
        if let Some(end) = Box::pin(transfer(dir, src, dst, sh, slow)).await {
            return end;
        }
    }
}

/// What [`copy_ready`] did.
enum Copied {
    /// Forwarded everything there was (or there was nothing): wait for more.
    Done,
    /// This direction ended.
    End(End),
    /// The next bytes are a payload for splice: [`transfer`] moves them.
    Splice,
    /// The destination took only part: the rest, in a pooled buffer, for [`transfer`] to write.
    Blocked(Rest),
}

/// Bytes read but not yet written (the destination was full), and whether they end with a
/// close frame.
struct Rest {
    buf: Box<[u8]>,
    len: usize,
    close: bool,
}

thread_local! {
    /// Each worker thread's read buffer for [`copy_ready`], grown to the largest
    /// `buffer_size` it has served; it is never held across an await.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Without waiting: read what `src` has (up to the connection's buffer size) and write it to
/// `dst`. One read and one write per batch of frames, one clock reading.
fn copy_ready(dir: &mut Dir, src: &TcpStream, dst: &TcpStream, sh: &Shared) -> Copied {
    #[cfg(target_os = "linux")]
    if splice::enabled() && splice_left(dir).is_some() {
        return Copied::Splice;
    }
    let size = sh.buffer_size as usize;
    SCRATCH.with_borrow_mut(|scratch| {
        if scratch.len() < size {
            scratch.resize(size, 0);
        }
        let buf = &mut scratch[..size];
        let n = match read_draining(src, buf) {
            Ok(0) => {
                let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
                return Copied::End(End::Eof);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Copied::Done,
            Err(e) => return Copied::End(End::ReadError(e)),
        };
        let now = Instant::now();
        let Tracked { close, only_pongs } = track(dir, &buf[..n], now, sh);
        if !only_pongs {
            sh.touch_at(now);
        }
        let mut at = 0;
        while at < n {
            match dst.try_write(&buf[at..n]) {
                Ok(w) => at += w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Copied::End(write_end(e)),
            }
        }
        sample(dir, &buf[..n]);
        if at < n {
            let len = n - at;
            let mut rest = BUFFERS.get(len);
            rest[..len].copy_from_slice(&buf[at..n]);
            return Copied::Blocked(Rest {
                buf: rest,
                len,
                close,
            });
        }
        if close {
            sh.closes.forwarded(if dir.to_upstream { 1 } else { 2 });
        }
        Copied::Done
    })
}

/// Compressibility sampling of what went toward the client, after it was written, so the
/// bytes never wait for it.
fn sample(dir: &mut Dir, data: &[u8]) {
    if !dir.to_upstream {
        dir.reads += 1;
        if super::samples(
            dir.reads,
            super::ZERO_COPY_SAMPLE_EVERY,
            dir.stats.sampled_in(),
        ) {
            let (raw, out) = super::deflated_size(data);
            dir.stats.on_sample(raw, out);
        }
    }
}

/// How many of the next bytes may move through splice, if they do: the rest of a large enough
/// payload, or anything in an opaque tunnel.
#[cfg(target_os = "linux")]
fn splice_left(dir: &Dir) -> Option<u64> {
    match &dir.tracker {
        Some(t) => t
            .opaque_payload_left()
            .filter(|l| *l >= splice::MIN_PAYLOAD),
        None => Some(u64::MAX),
    }
}

/// The slow half of forwarding, boxed so an idle connection does not carry its state: write
/// `rest` (what the destination could not take at once), waiting for it; or move a payload
/// through splice, falling back to a copy through a pooled buffer where splice is refused.
/// `None`: go on waiting; `Some`: this direction ended.
async fn transfer(
    dir: &mut Dir,
    src: &TcpStream,
    dst: &TcpStream,
    sh: &Shared,
    rest: Option<Rest>,
) -> Option<End> {
    let (buffer_size, limits) = (sh.buffer_size as usize, sh.limits);
    let bit = if dir.to_upstream { 1 } else { 2 };
    if let Some(Rest { buf, len, close }) = rest {
        let w = write_all(dst, &buf[..len], limits.stall_timeout, &mut dir.paused).await;
        BUFFERS.put(buf);
        if let Err(e) = w {
            return Some(write_end(e));
        }
        if close {
            sh.closes.forwarded(bit);
        }
        return None;
    }
    #[cfg(target_os = "linux")]
    if let Some(left) = splice_left(dir) {
        let want = (buffer_size as u64).min(left) as usize;
        match splice::forward(
            src,
            dst,
            want,
            buffer_size,
            limits.stall_timeout,
            &mut dir.paused,
        )
        .await
        {
            splice::Step::Moved(n) => {
                sh.touch();
                dir.stats.on_read(n);
                if let Some(t) = dir.tracker.as_mut() {
                    let stats = &mut dir.stats;
                    let now = Instant::now();
                    t.skip_payload(n as u64, |e| {
                        if let FrameEvent::Message(m) = e {
                            stats.on_message(m, now, sh.origin);
                        }
                    });
                }
                return None;
            }
            splice::Step::Empty => return None,
            splice::Step::Eof => {
                let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
                return Some(End::Eof);
            }
            splice::Step::ReadError(e) => return Some(End::ReadError(e)),
            splice::Step::WriteError(e) => return Some(write_end(e)),
            // Refused by the kernel (now off for the process): the copy path below.
            splice::Step::Unsupported => {}
        }
    }
    let (buf, n) = match read_pooled(src, buffer_size) {
        Ok(Pooled::Bytes(buf, n)) => (buf, n),
        Ok(Pooled::Eof) => {
            let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
            return Some(End::Eof);
        }
        Ok(Pooled::Nothing) => return None,
        Err(e) => return Some(End::ReadError(e)),
    };
    let now = Instant::now();
    let Tracked { close, only_pongs } = track(dir, &buf[..n], now, sh);
    if !only_pongs {
        sh.touch_at(now);
    }
    let w = write_all(dst, &buf[..n], limits.stall_timeout, &mut dir.paused).await;
    if w.is_ok() {
        sample(dir, &buf[..n]);
    }
    BUFFERS.put(buf);
    if let Err(e) = w {
        return Some(write_end(e));
    }
    if close {
        sh.closes.forwarded(bit);
    }
    None
}

/// The proxy closes one direction: a close frame at a frame boundary (WebSocket), FIN, then
/// the source's remaining bytes (its close reply) are read and discarded for a while.
async fn close_direction(
    dir: &mut Dir,
    src: &TcpStream,
    dst: &TcpStream,
    req: CloseRequest,
    at_boundary: bool,
    sh: &Shared,
) -> End {
    let limits = sh.limits;
    if at_boundary && dir.tracker.is_some() {
        let (code, reason) = req.toward(dir.to_upstream);
        let (f, n) = close_frame(code, reason, dir.to_upstream);
        let _ = write_all(dst, &f[..n], limits.close_grace, &mut dir.paused).await;
    }
    let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
    dir.closed_by_proxy = true;
    // Discard what the source still sends (its close reply) until it finishes.
    let drain = async {
        let mut scratch = [0u8; 1024];
        loop {
            if src.readable().await.is_err() {
                return;
            }
            match src.try_read(&mut scratch) {
                Ok(0) => return,
                // The peer's close reply ends the handshake: no need to wait on.
                Ok(n) => {
                    if track(dir, &scratch[..n], Instant::now(), sh).close {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    };
    if tokio::time::timeout(limits.close_grace, drain)
        .await
        .is_err()
    {
        dir.silent = dir.tracker.as_ref().is_some_and(|t| t.close().is_none());
    }
    End::ProxyClosed
}

fn write_end(e: io::Error) -> End {
    if e.kind() == io::ErrorKind::TimedOut {
        End::Stalled
    } else {
        End::WriteError(e)
    }
}

/// splice(2) through pooled pipes (Linux).
#[cfg(target_os = "linux")]
mod splice {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    /// Payloads shorter than this take the copy path (two syscalls either way).
    pub const MIN_PAYLOAD: u64 = 4096;

    static DISABLED: AtomicBool = AtomicBool::new(false);

    /// Whether splice is in use (turned off for the process if the kernel refuses it).
    pub fn enabled() -> bool {
        !DISABLED.load(Ordering::Relaxed)
    }

    /// A pipe: (read end, write end).
    #[derive(Debug)]
    struct Pipe(OwnedFd, OwnedFd);

    /// Idle pipes by size class; a pipe is held by a connection only while bytes are in it.
    static POOL: [Mutex<Vec<Pipe>>; 4] = [
        Mutex::new(Vec::new()),
        Mutex::new(Vec::new()),
        Mutex::new(Vec::new()),
        Mutex::new(Vec::new()),
    ];
    const KEEP: usize = 256;

    fn class(size: usize) -> usize {
        tuning::settings::BUFFER_SIZES
            .iter()
            .position(|s| *s as usize >= size)
            .unwrap_or(3)
    }

    fn take(size: usize) -> io::Result<Pipe> {
        if let Some(p) = POOL[class(size)].lock().expect("pipe pool").pop() {
            return Ok(p);
        }
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just created and are owned by nobody else.
        let p = unsafe { Pipe(OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let want = tuning::settings::BUFFER_SIZES[class(size)] as libc::c_int;
        // SAFETY: F_SETPIPE_SZ on a pipe we own; failure leaves the default size (64 KiB).
        unsafe { libc::fcntl(p.1.as_raw_fd(), libc::F_SETPIPE_SZ, want) };
        Ok(p)
    }

    fn give(size: usize, p: Pipe) {
        let mut pool = POOL[class(size)].lock().expect("pipe pool");
        if pool.len() < KEEP {
            pool.push(p);
        }
    }

    fn raw_splice(from: i32, to: i32, len: usize) -> io::Result<usize> {
        // SAFETY: plain splice(2) between descriptors we hold, no offsets.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// What one splice step did.
    #[derive(Debug)]
    pub enum Step {
        /// Bytes moved from source to destination.
        Moved(usize),
        /// The source had nothing after all (readiness cleared).
        Empty,
        /// The source finished.
        Eof,
        /// Reading the source failed.
        ReadError(io::Error),
        /// Writing the destination failed (or stalled: kind `TimedOut`).
        WriteError(io::Error),
        /// splice is not available here: use the copy path.
        Unsupported,
    }

    /// Move up to `want` bytes from `src` to `dst` through a pooled pipe, draining the pipe
    /// completely before returning it (a pipe with bytes in it is never pooled).
    pub async fn forward(
        src: &TcpStream,
        dst: &TcpStream,
        want: usize,
        size: usize,
        stall: Duration,
        paused: &mut super::Paused,
    ) -> Step {
        let pipe = match take(size) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "no pipe for splice: copying instead");
                return Step::Unsupported;
            }
        };
        let (r, w) = (pipe.0.as_raw_fd(), pipe.1.as_raw_fd());
        // The pipe is empty, so EAGAIN here can only mean the socket is.
        let n = match src.try_io(Interest::READABLE, || raw_splice(src.as_raw_fd(), w, want)) {
            Ok(0) => {
                give(size, pipe);
                return Step::Eof;
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                give(size, pipe);
                return Step::Empty;
            }
            Err(e)
                if e.raw_os_error() == Some(libc::EINVAL)
                    || e.raw_os_error() == Some(libc::ENOSYS) =>
            {
                DISABLED.store(true, Ordering::Relaxed);
                tracing::warn!(error = %e, "splice unsupported: copy loop from now on");
                give(size, pipe);
                return Step::Unsupported;
            }
            Err(e) => {
                give(size, pipe);
                return Step::ReadError(e);
            }
        };
        let mut left = n;
        while left > 0 {
            match dst.try_io(Interest::WRITABLE, || raw_splice(r, dst.as_raw_fd(), left)) {
                Ok(k) => left -= k,
                // The pipe holds bytes, so EAGAIN means the socket is full: wait for it.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let t = paused.begin();
                    let ready = tokio::time::timeout(stall, dst.writable()).await;
                    paused.end(t);
                    match ready {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => return Step::WriteError(e),
                        Err(_) => {
                            return Step::WriteError(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "stalled",
                            ));
                        }
                    }
                }
                // The pipe still holds bytes: it is dropped (closed), not pooled.
                Err(e) => return Step::WriteError(e),
            }
        }
        give(size, pipe);
        Step::Moved(n)
    }
}

/// Set TCP keepalive as the `zero_copy` stand-in for pings: idle = interval, 3 probes.
pub fn set_keepalive(s: &TcpStream, ping_interval: u32) {
    if ping_interval == 0 {
        return;
    }
    let d = Duration::from_secs(u64::from(ping_interval));
    let ka = socket2::TcpKeepalive::new()
        .with_time(d)
        .with_interval(d)
        .with_retries(tuning::settings::MISSED_PONGS_FOR_DEAD_PEER);
    if let Err(e) = socket2::SockRef::from(s).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "could not set TCP keepalive");
    }
}

pub(super) async fn idle_expired(activity: &AtomicU64, origin: Instant, idle: Duration) {
    loop {
        let last = origin + Duration::from_nanos(activity.load(Ordering::Relaxed));
        let deadline = last + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// What the connection's one timer is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timer {
    /// The idle deadline (moved on by traffic).
    Idle,
    /// This connection's slot in the drain window, once the data plane shuts down.
    Drain,
    /// Nothing: the proxy asked the connection to close.
    Off,
}

/// Forward until both directions finish, an error ends the connection, or the proxy closes it.
///
/// `client_head` are bytes the client sent after its request head (forwarded to the upstream
/// first); `upstream_head` are bytes the upstream sent after its 101 (forwarded to the client
/// first). `shutdown` turns true when the data plane drains; the connection then waits
/// `drain_delay` (its slot in the drain window) and closes with 1001.
#[allow(clippy::too_many_arguments)]
pub fn run(
    client: TcpStream,
    client_head: Vec<u8>,
    upstream: TcpStream,
    upstream_head: Vec<u8>,
    settings: Settings,
    framing: Framing,
    limits: ForwardLimits,
    mut shutdown: watch::Receiver<bool>,
    drain_delay: Duration,
) -> impl std::future::Future<Output = Outcome> + Send + use<> {
    let origin = Instant::now();
    // A WebSocket is pinged with ping frames, as `frame_aware` does: they find a peer that
    // stopped answering whatever its kernel does (TCP keepalive, the stand-in for an opaque
    // tunnel, is answered by the kernel of a peer whose process hangs).
    let ping_every = (settings.ping_interval > 0 && framing == Framing::WebSocket)
        .then(|| Duration::from_secs(u64::from(settings.ping_interval)));
    let sh = Shared {
        buffer_size: settings.buffer_size,
        limits,
        origin,
        activity: AtomicU64::new(0),
        closes: Closes::default(),
        close: AtomicU8::new(0),
        ping_due: AtomicU8::new(0),
        pings: ping_every.map(|every| {
            Box::new(Mutex::new(ZcPings {
                every,
                next: origin + every,
                legs: [Pings::default(), Pings::default()],
            }))
        }),
    };
    if framing == Framing::Opaque {
        set_keepalive(&client, settings.ping_interval);
        set_keepalive(&upstream, settings.ping_interval);
    }
    let tracker = || (framing == Framing::WebSocket).then(FrameTracker::default);
    let mut c2u = Dir {
        stats: DirStats::new(),
        tracker: tracker(),
        paused: Paused::default(),
        to_upstream: true,
        closed_by_proxy: false,
        silent: false,
        reads: 0,
    };
    let mut u2c = Dir {
        stats: DirStats::new(),
        tracker: tracker(),
        paused: Paused::default(),
        to_upstream: false,
        closed_by_proxy: false,
        silent: false,
        reads: 0,
    };
    let idle = Duration::from_secs(u64::from(settings.idle_timeout));
    // Everything above is set up before the first poll; the future holds only what the
    // connection needs from here on (not the arguments it was made from).
    async move {
        // The outcome is assembled after the loop: kept out of the state held across awaits.
        let (first_end, idle_timeout_fired) = {
            let mut a = pin!(pump(&mut c2u, &client, &upstream, &client_head, &sh));
            let mut b = pin!(pump(&mut u2c, &upstream, &client, &upstream_head, &sh));
            // One timer for the connection's life: the idle deadline, then (once the data plane
            // drains) this connection's slot in the drain window. Reset, never made afresh.
            let first = ping_every.map_or(idle, |p| p.min(idle));
            let mut timer = pin!(tokio::time::sleep(first));
            let mut timer_for = Timer::Idle;
            let mut shut = pin!(shutdown.wait_for(|v| *v));
            let mut draining = false;
            let (mut a_done, mut b_done) = (false, false);
            let mut first_end: Option<(bool, End)> = None;
            let mut idle_timeout_fired = false;
            let sh = &sh;
            // A `move` closure: the loop's flags live in it, and the pinned futures are held
            // by one reference each rather than a reference to a reference.
            std::future::poll_fn(move |cx| {
                loop {
                    for (from_client, fut, done) in [
                        (true, a.as_mut(), &mut a_done),
                        (false, b.as_mut(), &mut b_done),
                    ] {
                        if *done {
                            continue;
                        }
                        if let Poll::Ready(e) = fut.poll(cx) {
                            *done = true;
                            let fatal = !matches!(e, End::Eof | End::ProxyClosed);
                            if first_end.is_none() {
                                first_end = Some((from_client, e));
                            }
                            // After a complete close handshake one FIN ends the connection.
                            if fatal || sh.closes.handshake_done() {
                                return Poll::Ready((first_end.take(), idle_timeout_fired));
                            }
                        }
                    }
                    if a_done && b_done {
                        return Poll::Ready((first_end.take(), idle_timeout_fired));
                    }
                    if !draining
                        && timer_for != Timer::Off
                        && let Poll::Ready(r) = shut.as_mut().poll(cx)
                    {
                        draining = true;
                        if r.is_ok() {
                            timer_for = Timer::Drain;
                            timer
                                .as_mut()
                                .reset(tokio::time::Instant::now() + drain_delay);
                        }
                    }
                    if timer_for == Timer::Off || timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    if timer_for == Timer::Idle {
                        let now = Instant::now();
                        // The one timer also keeps the pings' clock.
                        let next_ping = match sh.ping_clock(now) {
                            Ok(next) => next,
                            Err(dead) => {
                                sh.request_close(dead);
                                timer_for = Timer::Off;
                                continue;
                            }
                        };
                        let last =
                            origin + Duration::from_nanos(sh.activity.load(Ordering::Relaxed));
                        if now < last + idle {
                            // Traffic since, or a ping due first: wait for the next deadline
                            // (the directions see a due ping when polled again, right below).
                            let at = next_ping.map_or(last + idle, |p| p.min(last + idle));
                            timer.as_mut().reset(at.into());
                            continue;
                        }
                        idle_timeout_fired = true;
                        sh.request_close(CloseRequest::Idle);
                    } else {
                        sh.request_close(CloseRequest::Shutdown);
                    }
                    // Poll both directions again: they see the request now.
                    timer_for = Timer::Off;
                }
            })
            .await
        };
        let end = Instant::now();
        let mut out = Outcome {
            idle_timeout_fired,
            paused: c2u.paused.total() + u2c.paused.total(),
            ..Outcome::default()
        };
        // Close code: whichever side sent a close frame first is the one we can name; prefer the
        // direction that ended first.
        let close_of = |d: &Dir| {
            d.tracker
                .as_ref()
                .and_then(|t| t.close())
                .map(|(c, r)| (c, String::from_utf8_lossy(r).into_owned()))
        };
        let proxy_closed = c2u.closed_by_proxy || u2c.closed_by_proxy;
        match first_end {
            Some((from_client, e)) => {
                let (first, second) = if from_client {
                    (&c2u, &u2c)
                } else {
                    (&u2c, &c2u)
                };
                // The side that sent the first close frame closed; failing that, the first to end.
                let side = match sh.closes.first.load(Ordering::Relaxed) {
                    1 => ClosedBy::Client,
                    2 => ClosedBy::Upstream,
                    _ if from_client => ClosedBy::Client,
                    _ => ClosedBy::Upstream,
                };
                out.closed_by = Some(if proxy_closed { ClosedBy::Proxy } else { side });
                let (first, second) = match sh.closes.first.load(Ordering::Relaxed) {
                    1 => (&c2u, &u2c),
                    2 => (&u2c, &c2u),
                    _ => (first, second),
                };
                if let Some((c, r)) = close_of(first).or_else(|| close_of(second)) {
                    out.close_code = Some(c);
                    out.close_reason = Some(r);
                }
                let was_read = matches!(e, End::ReadError(_));
                match e {
                    // A WebSocket peer whose stream ended with no close frame either way went
                    // away: recorded as `frame_aware` records it (RFC 6455 §7.1.5's 1006), so
                    // the two modes' profiles of the same event agree.
                    End::Eof
                        if framing == Framing::WebSocket
                            && !proxy_closed
                            && sh.closes.first.load(Ordering::Relaxed) == 0
                            && out.close_code.is_none() =>
                    {
                        out.close_code = Some(1006);
                        out.close_reason = Some(String::new());
                        out.error_class = Some(if from_client {
                            "client_gone"
                        } else {
                            "upstream_gone"
                        });
                    }
                    End::Eof | End::ProxyClosed => {}
                    End::Stalled => {
                        out.closed_by = Some(ClosedBy::Proxy);
                        // An upstream that stops reading while the client is not reading its
                        // replies either is backpressure from the client, not a stall of its own.
                        let client_too = u2c.paused.waiting();
                        out.error_class = Some(if from_client && !client_too {
                            "upstream_stalled"
                        } else {
                            "client_stalled"
                        });
                    }
                    End::ReadError(e) | End::WriteError(e) => {
                        let client_side = from_client == was_read;
                        // A keepalive that went unanswered surfaces as ETIMEDOUT.
                        let dead = e.raw_os_error() == Some(libc::ETIMEDOUT);
                        out.dead_peer = dead;
                        out.closed_by = Some(if client_side {
                            ClosedBy::Client
                        } else {
                            ClosedBy::Upstream
                        });
                        out.error_class = Some(match (client_side, dead) {
                            (true, true) => "client_dead",
                            (false, true) => "upstream_dead",
                            (true, false) => "client_io",
                            (false, false) => "upstream_io",
                        });
                    }
                }
                if proxy_closed {
                    let req = sh.close_requested().unwrap_or(CloseRequest::Shutdown);
                    // Recorded as `frame_aware` records it: the close sent to the peer that
                    // is still there.
                    let (c, r) = req.toward(req == CloseRequest::DeadClient);
                    if framing == Framing::WebSocket {
                        out.close_code = Some(c);
                        out.close_reason = Some(r.into());
                    }
                    if let Some(dead) = match req {
                        CloseRequest::DeadClient => Some("client_dead"),
                        CloseRequest::DeadUpstream => Some("upstream_dead"),
                        // An idle client that did not answer the close had gone silent: the
                        // idle timeout found a dead peer (what the cost model must know to
                        // weigh pings against a longer timeout).
                        CloseRequest::Idle if c2u.silent => Some("client_dead"),
                        _ => None,
                    } {
                        out.dead_peer = true;
                        out.error_class = Some(dead);
                    }
                }
            }
            None => out.closed_by = Some(ClosedBy::Proxy),
        }
        out.c2u = c2u.stats.finish(end, origin);
        out.u2c = u2c.stats.finish(end, origin);
        if let Some(p) = sh.pings.as_deref() {
            let p = p.lock().expect("pings");
            out.ping_client = p.legs[CLIENT].stats();
            out.ping_upstream = p.legs[UPSTREAM].stats();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_frames_are_well_formed() {
        let (f, n) = close_frame(1001, "idle timeout", false);
        assert_eq!(&f[..4], &[0x88, 14, 0x03, 0xE9]);
        assert_eq!(&f[4..n], b"idle timeout");
        let (m, n) = close_frame(1001, "idle timeout", true);
        assert_eq!(m[1], 0x80 | 14);
        let key = [m[2], m[3], m[4], m[5]];
        let payload: Vec<u8> = m[6..n]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        assert_eq!(&payload[..2], &[0x03, 0xE9]);
        assert_eq!(&payload[2..], b"idle timeout");
        let mut t = FrameTracker::default();
        let mut seen = false;
        t.feed(&m[..n], |e| seen = e == FrameEvent::Close);
        assert!(seen);
        assert_eq!(t.close().map(|(c, _)| c), Some(1001));
    }
}

#[cfg(test)]
mod sockets {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_tungstenite::tungstenite::protocol::Role;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    /// A client socket, an upstream socket, `zero_copy` forwarding between them (draining
    /// over `drain_delay` once told to shut down) and the shutdown switch.
    async fn forwarding(
        framing: Framing,
        drain_delay: Duration,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<Outcome>,
        watch::Sender<bool>,
    ) {
        forwarding_with(framing, drain_delay, Settings::default()).await
    }

    /// [`forwarding`] under `settings`.
    async fn forwarding_with(
        framing: Framing,
        drain_delay: Duration,
        settings: Settings,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<Outcome>,
        watch::Sender<bool>,
    ) {
        let (client, proxy_c) = pair().await;
        let (proxy_u, upstream) = pair().await;
        let (tx, rx) = watch::channel(false);
        let limits = ForwardLimits {
            stall_timeout: Duration::from_secs(5),
            max_message_bytes: 1 << 20,
            close_grace: Duration::from_secs(1),
        };
        let fwd = tokio::spawn(run(
            proxy_c,
            Vec::new(),
            proxy_u,
            Vec::new(),
            settings,
            framing,
            limits,
            rx,
            drain_delay,
        ));
        (client, upstream, fwd, tx)
    }

    /// A masked text frame from the client.
    fn masked_text(payload: &[u8]) -> Vec<u8> {
        let key = [1u8, 2, 3, 4];
        let mut frame = vec![0x81, 0x80 | payload.len() as u8];
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        frame
    }

    /// While a connection waits for its slot in the drain window it still forwards (the wait
    /// once stopped both directions for the whole delay); then it closes with 1001 both ways.
    #[tokio::test]
    async fn a_draining_connection_forwards_until_its_slot_then_closes_with_1001() {
        let delay = Duration::from_millis(1500);
        let (mut client, mut upstream, fwd, tx) = forwarding(Framing::WebSocket, delay).await;
        tx.send(true).unwrap();
        let t0 = Instant::now();
        // A masked text frame "hello" from the client, an unmasked one back from the upstream.
        let frame = masked_text(b"hello");
        client.write_all(&frame).await.unwrap();
        let mut got = vec![0u8; frame.len()];
        upstream.read_exact(&mut got).await.unwrap();
        assert_eq!(got, frame);
        upstream.write_all(&[0x81, 0x02, b'o', b'k']).await.unwrap();
        let mut back = [0u8; 4];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, &[0x81, 0x02, b'o', b'k']);
        assert!(
            t0.elapsed() < delay / 2,
            "forwarding waited for the drain slot: {:?}",
            t0.elapsed()
        );
        // Then the close, unmasked to the client, masked to the upstream, after the delay.
        let mut head = [0u8; 2];
        client.read_exact(&mut head).await.unwrap();
        assert!(t0.elapsed() >= delay, "closed before its slot");
        assert_eq!(head[0], 0x88);
        let mut payload = vec![0u8; usize::from(head[1] & 0x7f)];
        client.read_exact(&mut payload).await.unwrap();
        assert_eq!(&payload[..2], &1001u16.to_be_bytes());
        assert_eq!(&payload[2..], b"proxy shutting down");
        let mut up_head = [0u8; 6];
        upstream.read_exact(&mut up_head).await.unwrap();
        assert_eq!(up_head[0], 0x88);
        assert_eq!(
            up_head[1] & 0x80,
            0x80,
            "a close toward the upstream is masked"
        );
        // Both peers answer; the connection ends as closed by the proxy.
        drop(client);
        drop(upstream);
        let out = tokio::time::timeout(Duration::from_secs(5), fwd)
            .await
            .expect("forwarding ended")
            .unwrap();
        assert_eq!(out.closed_by, Some(ClosedBy::Proxy));
        assert_eq!(out.c2u.messages, 1);
        assert_eq!(out.u2c.messages, 1);
    }

    /// The client sends "hi", then (maybe) its close frame (1000), then its stream ends (a
    /// device that lost its connection, as a FIN); the upstream closes once the proxy has
    /// passed that on.
    async fn client_leaves(framing: Framing, close_first: bool) -> Outcome {
        let (mut client, mut upstream, fwd, _tx) = forwarding(framing, Duration::ZERO).await;
        let mut frames = masked_text(b"hi");
        if close_first {
            let key = [9u8, 8, 7, 6];
            frames.extend([0x88, 0x82]);
            frames.extend_from_slice(&key);
            frames.extend([0x03, 0xE8].iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        client.write_all(&frames).await.unwrap();
        let mut got = vec![0u8; frames.len()];
        upstream.read_exact(&mut got).await.unwrap();
        drop(client);
        let mut rest = Vec::new();
        let _ = upstream.read_to_end(&mut rest).await;
        drop(upstream);
        tokio::time::timeout(Duration::from_secs(5), fwd)
            .await
            .expect("forwarding ended")
            .unwrap()
    }

    /// A client that goes away without a close frame is recorded with 1006 and `client_gone`,
    /// as `frame_aware` records it; one that sent its close frame keeps its code, and an
    /// opaque tunnel has no close codes at all.
    #[tokio::test]
    async fn a_websocket_client_gone_without_a_close_frame_is_recorded_as_1006() {
        let out = client_leaves(Framing::WebSocket, false).await;
        assert_eq!(out.close_code, Some(1006));
        assert_eq!(out.error_class, Some("client_gone"));
        assert_eq!(out.closed_by, Some(ClosedBy::Client));
        let out = client_leaves(Framing::WebSocket, true).await;
        assert_eq!(out.close_code, Some(1000));
        assert_eq!(out.error_class, None);
        assert_eq!(out.closed_by, Some(ClosedBy::Client));
        let out = client_leaves(Framing::Opaque, false).await;
        assert_eq!((out.close_code, out.error_class), (None, None));
    }

    fn pinging(ping_interval: u32, idle_timeout: u32) -> Settings {
        Settings {
            ping_interval,
            idle_timeout,
            ..Settings::default()
        }
    }

    use super::super::tests::ws_peer;

    /// The forwarding's outcome, within 10 s.
    async fn ended(fwd: tokio::task::JoinHandle<Outcome>) -> Outcome {
        tokio::time::timeout(Duration::from_secs(10), fwd)
            .await
            .expect("forwarding ended")
            .unwrap()
    }

    /// A client whose process hangs (its socket open, no FIN, nothing read or answered) is
    /// found by the proxy's ping frames: dead after three missed pongs, closed with 1001 "client
    /// not responding" toward the upstream. The pings are real frames: unmasked to the
    /// client, masked to the upstream (whose tungstenite refuses an unmasked frame).
    #[tokio::test]
    async fn ping_frames_find_a_silent_websocket_client() {
        let (mut client, upstream, fwd, _tx) =
            forwarding_with(Framing::WebSocket, Duration::ZERO, pinging(1, 900)).await;
        let up = ws_peer(upstream, Role::Server);
        let t0 = Instant::now();
        let out = ended(fwd).await;
        let took = t0.elapsed();
        assert!(out.dead_peer);
        assert_eq!(out.error_class, Some("client_dead"));
        assert_eq!(out.closed_by, Some(ClosedBy::Proxy));
        assert_eq!((out.ping_client.sent, out.ping_client.missed), (3, 3));
        assert!(out.ping_upstream.answered >= 2, "{:?}", out.ping_upstream);
        // Pings at 1, 2 and 3 s, dead at the fourth tick (as `frame_aware`: 3 intervals after
        // the first ping), then the close grace for the client's reply that never comes.
        assert!(
            took >= Duration::from_secs(4) && took < Duration::from_secs(7),
            "{took:?}"
        );
        assert_eq!(
            up.await.unwrap(),
            Some((1001, "client not responding".to_string()))
        );
        // What waits in the client's socket starts with the first ping: id 1, unmasked.
        let mut first = [0u8; 10];
        client.read_exact(&mut first).await.unwrap();
        assert_eq!(first[..2], [0x89, 8]);
        assert_eq!(u64::from_be_bytes(first[2..].try_into().unwrap()), 1);
    }

    /// A client that answers the pings is alive, and its pongs are no traffic: the idle
    /// timeout still closes it on time, and as a live peer (it answered the close).
    #[tokio::test]
    async fn pongs_neither_hold_an_idle_connection_nor_make_it_dead() {
        let (client, upstream, fwd, _tx) =
            forwarding_with(Framing::WebSocket, Duration::ZERO, pinging(1, 3)).await;
        let c = ws_peer(client, Role::Client);
        let up = ws_peer(upstream, Role::Server);
        let t0 = Instant::now();
        let out = ended(fwd).await;
        let took = t0.elapsed();
        assert!(out.idle_timeout_fired);
        assert!(!out.dead_peer, "{out:?}");
        assert!(out.ping_client.answered >= 2, "{:?}", out.ping_client);
        assert_eq!(out.ping_client.missed, 0);
        assert!(
            took < Duration::from_secs(5),
            "pongs held it open: {took:?}"
        );
        assert_eq!(c.await.unwrap(), Some((1001, "idle timeout".to_string())));
        assert_eq!(up.await.unwrap(), Some((1001, "idle timeout".to_string())));
    }

    /// Without pings, the idle timeout is what finds a silent client: one that does not answer
    /// its close within the grace had gone away, and the profile says so.
    #[tokio::test]
    async fn an_unanswered_idle_close_finds_a_dead_client() {
        let (_client, upstream, fwd, _tx) =
            forwarding_with(Framing::WebSocket, Duration::ZERO, pinging(0, 2)).await;
        let up = ws_peer(upstream, Role::Server);
        let out = ended(fwd).await;
        assert!(out.idle_timeout_fired);
        assert!(out.dead_peer);
        assert_eq!(out.error_class, Some("client_dead"));
        assert_eq!(out.ping_client.sent, 0);
        assert_eq!(up.await.unwrap(), Some((1001, "idle timeout".to_string())));
    }
}

#[cfg(test)]
mod idle_size {
    use super::*;

    /// Every idle connection holds this future (boxed) for its whole life: the bytes-moving
    /// and closing paths are boxed separately so that it stays small. A regression guard
    /// (debug build sizes; release ones are smaller).
    #[tokio::test]
    async fn the_idle_forwarding_state_stays_small() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (u, _) = l.accept().await.unwrap();
        let (_tx, rx) = watch::channel(false);
        let limits = ForwardLimits {
            stall_timeout: Duration::from_secs(1),
            max_message_bytes: 1 << 20,
            close_grace: Duration::from_secs(1),
        };
        let settings = Settings::default();
        let f = run(
            c,
            Vec::new(),
            u,
            Vec::new(),
            settings,
            Framing::WebSocket,
            limits,
            rx,
            Duration::ZERO,
        );
        let size = std::mem::size_of_val(&f);
        eprintln!("zero_copy::run's state: {size} bytes");
        // 1,504 bytes in a debug build (1,520 before the pings' 8 bytes went in and the buffer
        // size became a u32 beside the flags), 1,504 in release before (1,568 before `Paused` and the
        // direction stats shed 32 bytes each; 3,060 before the one poll loop). tokio rounds a
        // task to 128 bytes: at 1,504 the tunnel's task is 1,664 bytes, at 1,568 it was 1,792
        // (heaptrack, 3,000 idle connections).
        assert!(size <= 1536, "zero_copy::run's state grew to {size} bytes");
    }
}
