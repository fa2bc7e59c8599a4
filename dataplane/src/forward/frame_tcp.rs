//! `frame_aware` between two plain TCP sockets, with the proxy's own RFC 6455 frame forwarder.
//!
//! The behaviour is [`super::frame_aware`]'s — the proxy pings each peer itself and declares a
//! dead one after missed pongs, refuses a message over the limit with 1009, a protocol error
//! with 1002 and invalid UTF-8 with 1007, propagates close codes both ways, closes with 1001 on
//! idle timeout and shutdown — without tokio-tungstenite's costs:
//! - An idle connection holds no buffer: each direction waits for readability holding
//!   nothing, takes a pooled buffer of `buffer_size` only when bytes are there and gives it
//!   back once they are written (as `zero_copy` does). tungstenite keeps a read buffer of
//!   `buffer_size` per leg for the connection's life and zeroes it before every read.
//! - Data frames are forwarded as they arrive, their bytes unmodified (a client's masked frames
//!   stay masked toward the upstream), in one write per read: a message is never reassembled
//!   or copied. Only control frames are taken out of the stream: pings are answered, pongs
//!   matched with the proxy's own pings, close frames propagated.
//!
//! What streaming changes: a message found too big by the sum of its fragments, or a text
//! message found to be invalid UTF-8, has had its earlier frames forwarded already; the other
//! peer then gets the proxy's close (1001) after them. When the bad bytes are in a frame the
//! proxy has partly forwarded, no close frame can follow (it cannot go inside a frame): that
//! peer's stream just ends.
//!
//! Legs that are not plain TCP (permessage-deflate toward the client, an HTTP/2 stream under
//! RFC 8441) go through [`super::frame_aware`].

use std::io;
use std::pin::pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tuning::{ClosedBy, Settings};

use super::frame_aware::Pings;
use super::zero_copy::{Pooled, idle_expired, read_pooled, write_all};
use super::{BUFFERS, CloseRequest, Failure, ForwardLimits, Outcome, Paused, Signal, verdict};
use crate::stats::DirStats;

const CLIENT: usize = 0;
const UPSTREAM: usize = 1;

/// Pongs are queued for a leg only while its queue of control frames is shorter than this.
const OUTBOX_PONGS_UNTIL: usize = 1024;

/// Longest frame header: 2 + 8 (length) + 4 (mask).
const MAX_HEAD: usize = 14;

/// Why a direction stopped: the source's close frame, or a failure of either leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PumpEnd {
    /// The source sent its close frame.
    Closed,
    /// Reading the source failed, or writing the destination (`Failure::Write`).
    Failed(Failure),
}

/// A frame header.
#[derive(Debug, Clone, Copy)]
struct Head {
    fin: bool,
    opcode: u8,
    mask: Option<[u8; 4]>,
    len: u64,
}

impl Head {
    fn is_control(&self) -> bool {
        self.opcode >= 8
    }
}

/// Parse a frame header: `Ok(None)` when `b` does not hold all of it yet; the header and its
/// length otherwise. Reserved bits and opcodes are protocol errors (no extension is
/// negotiated on these legs).
fn parse_head(b: &[u8]) -> Result<Option<(Head, usize)>, PumpEnd> {
    if b.len() < 2 {
        return Ok(None);
    }
    if b[0] & 0x70 != 0 {
        return Err(PumpEnd::Failed(Failure::Protocol));
    }
    let opcode = b[0] & 0x0f;
    if !matches!(opcode, 0 | 1 | 2 | 8 | 9 | 10) {
        return Err(PumpEnd::Failed(Failure::Protocol));
    }
    let masked = b[1] & 0x80 != 0;
    let (len, mut at) = match b[1] & 0x7f {
        126 => {
            if b.len() < 4 {
                return Ok(None);
            }
            (u64::from(u16::from_be_bytes([b[2], b[3]])), 4)
        }
        127 => {
            if b.len() < 10 {
                return Ok(None);
            }
            let l = u64::from_be_bytes(b[2..10].try_into().expect("8 bytes"));
            if l >> 63 != 0 {
                return Err(PumpEnd::Failed(Failure::Protocol));
            }
            (l, 10)
        }
        l => (u64::from(l), 2),
    };
    let mask = if masked {
        if b.len() < at + 4 {
            return Ok(None);
        }
        let m = [b[at], b[at + 1], b[at + 2], b[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some((
        Head {
            fin: b[0] & 0x80 != 0,
            opcode,
            mask,
            len,
        },
        at,
    )))
}

/// A control frame (payload ≤ 125 bytes) as the proxy sends it; masked toward the upstream.
fn control_frame(opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let payload = &payload[..payload.len().min(125)];
    let mut f = Vec::with_capacity(6 + payload.len());
    f.push(0x80 | opcode);
    if masked {
        let k = *uuid::Uuid::new_v4().as_bytes();
        f.push(0x80 | payload.len() as u8);
        f.extend_from_slice(&k[..4]);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
    } else {
        f.push(payload.len() as u8);
        f.extend_from_slice(payload);
    }
    f
}

fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    if code == 1005 {
        return Vec::new();
    }
    let mut p = code.to_be_bytes().to_vec();
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    p.extend_from_slice(&reason.as_bytes()[..end]);
    p
}

/// Incremental UTF-8 validation of a text message that arrives in pieces.
#[derive(Debug, Default)]
struct Utf8 {
    /// The start of a character cut by the end of the previous piece.
    partial: [u8; 4],
    len: u8,
}

impl Utf8 {
    fn char_len(lead: u8) -> usize {
        match lead {
            0xc2..=0xdf => 2,
            0xe0..=0xef => 3,
            _ => 4,
        }
    }

    /// Whether `b` continues the text validly so far (fail fast: an invalid byte is refused in
    /// the piece where it arrives).
    fn feed(&mut self, mut b: &[u8]) -> bool {
        if self.len > 0 {
            let have = self.len as usize;
            let want = Self::char_len(self.partial[0]);
            let take = (want - have).min(b.len());
            self.partial[have..have + take].copy_from_slice(&b[..take]);
            self.len += take as u8;
            b = &b[take..];
            let so_far = &self.partial[..self.len as usize];
            match std::str::from_utf8(so_far) {
                Ok(_) => self.len = 0,
                Err(e) if e.error_len().is_some() => return false,
                Err(_) => return b.is_empty(),
            }
        }
        match std::str::from_utf8(b) {
            Ok(_) => true,
            Err(e) if e.error_len().is_some() => false,
            Err(e) => {
                let rest = &b[e.valid_up_to()..];
                self.partial[..rest.len()].copy_from_slice(rest);
                self.len = rest.len() as u8;
                true
            }
        }
    }

    fn complete(&self) -> bool {
        self.len == 0
    }
}

/// The frame being read.
#[derive(Debug)]
struct Cur {
    head: Head,
    /// Payload bytes read so far.
    done: u64,
    /// A control frame's payload, unmasked (allocated per control frame).
    control: Option<Vec<u8>>,
}

/// One direction's reading state.
#[derive(Debug)]
struct Parser {
    /// The source is the client (its frames must be masked; the upstream's must not be).
    from_client: bool,
    /// The start of a header cut by the end of a read (not forwarded until it is known to be
    /// a data frame's).
    head: [u8; MAX_HEAD],
    head_len: u8,
    cur: Option<Cur>,
    /// A data message is in progress: whether it is text.
    message: Option<bool>,
    message_bytes: u64,
    utf8: Utf8,
}

/// One direction: the source's parser and statistics; the proxy writes the destination.
#[derive(Debug)]
struct Dir {
    stats: DirStats,
    parser: Parser,
    paused: Paused,
    /// The destination's stream is inside a data frame the proxy has partly written: no
    /// control frame may go out before that frame is complete.
    out_mid_frame: bool,
    /// Reads so far (compressibility is sampled on the upstream → client direction).
    reads: u64,
}

impl Dir {
    fn new(from_client: bool) -> Dir {
        Dir {
            stats: DirStats::new(),
            parser: Parser {
                from_client,
                head: [0; MAX_HEAD],
                head_len: 0,
                cur: None,
                message: None,
                message_bytes: 0,
                utf8: Utf8::default(),
            },
            paused: Paused::default(),
            out_mid_frame: false,
            reads: 0,
        }
    }

    fn src(&self) -> usize {
        if self.parser.from_client {
            CLIENT
        } else {
            UPSTREAM
        }
    }
}

/// What the two directions and the connection's loop share (all polled by one task).
#[derive(Debug)]
struct Shared {
    origin: Instant,
    activity: AtomicU64,
    /// Control frames waiting for a leg's writer (the direction toward that leg) to reach a
    /// frame boundary, encoded.
    outbox: [Mutex<Vec<u8>>; 2],
    signal: [Signal; 2],
    /// The direction toward this leg still runs (and is the one to write to it).
    writer_alive: [AtomicBool; 2],
    /// This leg's stream was left inside a frame: nothing more can be sent to it.
    broken: [AtomicBool; 2],
    /// A close frame went (or is queued) to this leg.
    close_sent: [AtomicBool; 2],
    closing: AtomicBool,
    /// The client sent a close frame.
    client_closed: AtomicBool,
    first_close: Mutex<Option<(ClosedBy, u16, String)>>,
    /// Ping bookkeeping per leg, when the proxy pings.
    pings: [Mutex<Option<Box<Pings>>>; 2],
}

impl Shared {
    fn touch(&self) {
        self.activity
            .store(self.origin.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn record_close(&self, by: ClosedBy, code: u16, reason: &str) {
        let mut g = self.first_close.lock().expect("close lock");
        if g.is_none() {
            *g = Some((by, code, reason.to_string()));
        }
    }

    fn outbox_empty(&self, leg: usize) -> bool {
        self.outbox[leg].lock().expect("outbox lock").is_empty()
    }

    fn take_outbox(&self, leg: usize) -> Vec<u8> {
        std::mem::take(&mut *self.outbox[leg].lock().expect("outbox lock"))
    }

    /// Send a control frame to `leg`: queued for its writer while that direction runs,
    /// written here (bounded by `grace`) once it has stopped.
    async fn send(
        &self,
        leg: usize,
        sock: &TcpStream,
        opcode: u8,
        payload: &[u8],
        grace: Duration,
    ) {
        if opcode == 8 {
            self.close_sent[leg].store(true, Ordering::Relaxed);
        }
        if self.broken[leg].load(Ordering::Relaxed) {
            return;
        }
        let f = control_frame(opcode, payload, leg == UPSTREAM);
        if self.writer_alive[leg].load(Ordering::Relaxed) {
            let mut out = self.outbox[leg].lock().expect("outbox lock");
            // A peer that pings while not reading gets no queue of pongs: past a few frames,
            // pongs are dropped (answering only the latest ping is what RFC 6455 allows).
            if opcode == 10 && out.len() >= OUTBOX_PONGS_UNTIL {
                return;
            }
            out.extend_from_slice(&f);
            drop(out);
            self.signal[leg].raise();
        } else {
            let _ = write_all(sock, &f, grace, &mut Paused::default()).await;
        }
    }
}

/// Write the bytes a direction forwards; a destination that accepts nothing for `stall` ends
/// the direction.
async fn forward(
    d: &mut Dir,
    dst: &TcpStream,
    bytes: &[u8],
    stall: Duration,
) -> Result<(), PumpEnd> {
    if bytes.is_empty() {
        return Ok(());
    }
    write_all(dst, bytes, stall, &mut d.paused)
        .await
        .map_err(|e| {
            PumpEnd::Failed(Failure::Write(if e.kind() == io::ErrorKind::TimedOut {
                "stalled"
            } else {
                "io"
            }))
        })
}

/// Write the control frames queued for the destination (called at frame boundaries only).
async fn flush_outbox(
    d: &mut Dir,
    dst_leg: usize,
    dst: &TcpStream,
    sh: &Shared,
    stall: Duration,
) -> Result<(), PumpEnd> {
    let out = sh.take_outbox(dst_leg);
    forward(d, dst, &out, stall).await
}

/// A control frame is complete: answer a ping, match a pong, or take in a close.
/// `Err` ends the direction: a close (`Closed`) or a broken close frame.
async fn on_control(
    d: &mut Dir,
    opcode: u8,
    payload: &[u8],
    src: &TcpStream,
    dst: &TcpStream,
    sh: &Shared,
    limits: ForwardLimits,
) -> Result<(), PumpEnd> {
    let me = d.src();
    let other = 1 - me;
    match opcode {
        9 => {
            sh.send(me, src, 10, payload, limits.close_grace).await;
            Ok(())
        }
        10 => {
            if let Some(p) = sh.pings[me].lock().expect("pings").as_mut() {
                p.on_pong(payload);
            }
            Ok(())
        }
        _ => {
            let (code, reason) = match payload.len() {
                0 => (1005, String::new()),
                1 => return Err(PumpEnd::Failed(Failure::Protocol)),
                _ => {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    let Ok(reason) = std::str::from_utf8(&payload[2..]) else {
                        return Err(PumpEnd::Failed(Failure::InvalidUtf8));
                    };
                    if CloseCode::from(code).is_allowed() {
                        (code, reason.to_string())
                    } else {
                        (1002, "Protocol violation".to_string())
                    }
                }
            };
            tracing::debug!(
                from_client = d.parser.from_client,
                code,
                "close frame received"
            );
            let by = if me == CLIENT {
                sh.client_closed.store(true, Ordering::Relaxed);
                ClosedBy::Client
            } else {
                ClosedBy::Upstream
            };
            sh.record_close(by, code, &reason);
            let reply = close_payload(code, &reason);
            if !sh.closing.swap(true, Ordering::Relaxed) {
                // Propagate to the other leg, same code and reason. This direction writes
                // there and is at a frame boundary (frames arrive one after another).
                flush_outbox(d, other, dst, sh, limits.stall_timeout).await?;
                sh.close_sent[other].store(true, Ordering::Relaxed);
                if !sh.broken[other].load(Ordering::Relaxed) {
                    let f = control_frame(8, &reply, other == UPSTREAM);
                    forward(d, dst, &f, limits.stall_timeout).await?;
                }
            }
            // Answer the peer's close unless it answers ours.
            if !sh.close_sent[me].load(Ordering::Relaxed) {
                sh.send(me, src, 8, &reply, limits.close_grace).await;
            }
            Err(PumpEnd::Closed)
        }
    }
}

/// Check the payload piece of a text message (unmasked on a scratch copy when masked).
fn text_ok(utf8: &mut Utf8, piece: &[u8], mask: Option<[u8; 4]>, offset: u64) -> bool {
    match mask {
        None => utf8.feed(piece),
        Some(k) => {
            let mut scratch = [0u8; 512];
            let mut at = offset;
            for chunk in piece.chunks(scratch.len()) {
                for (i, b) in chunk.iter().enumerate() {
                    scratch[i] = b ^ k[((at + i as u64) % 4) as usize];
                }
                if !utf8.feed(&scratch[..chunk.len()]) {
                    return false;
                }
                at += chunk.len() as u64;
            }
            true
        }
    }
}

/// Parse what was read and forward its data frames: the bytes of data frames are written in
/// runs as long as the read allows; control frames are taken out and acted on.
async fn process(
    d: &mut Dir,
    data: &[u8],
    src: &TcpStream,
    dst: &TcpStream,
    sh: &Shared,
    limits: ForwardLimits,
) -> Result<(), PumpEnd> {
    let stall = limits.stall_timeout;
    let max = limits.max_message_bytes as u64;
    d.stats.on_read(data.len());
    let mut i = 0;
    // Start of the data-frame bytes parsed but not written yet.
    let mut run = 0;
    // Where the current data frame's header starts in this read (not written yet), if it does.
    let mut frame_start: Option<usize> = None;
    while i < data.len() {
        if d.parser.cur.is_none() {
            // A header, perhaps begun in the previous read.
            let held = d.parser.head_len as usize;
            let take = (MAX_HEAD - held).min(data.len() - i);
            let mut h = [0u8; MAX_HEAD];
            h[..held].copy_from_slice(&d.parser.head[..held]);
            h[held..held + take].copy_from_slice(&data[i..i + take]);
            let parsed = parse_head(&h[..held + take]);
            let bad = match parsed {
                Err(e) => Some(e),
                Ok(None) => None,
                Ok(Some((head, _))) => {
                    let p = &d.parser;
                    if head.mask.is_some() != p.from_client {
                        Some(PumpEnd::Failed(Failure::Protocol))
                    } else if head.is_control() {
                        (!head.fin || head.len > 125).then_some(PumpEnd::Failed(Failure::Protocol))
                    } else if (head.opcode == 0) != p.message.is_some() {
                        // A continuation outside a message, or a new message inside one.
                        Some(PumpEnd::Failed(Failure::Protocol))
                    } else if head.len > max || p.message_bytes + head.len > max {
                        Some(PumpEnd::Failed(Failure::TooBig))
                    } else {
                        None
                    }
                }
            };
            // A data frame's header joins the run; anything else ends it here (everything
            // before this header is whole frames).
            let joins_run =
                matches!(parsed, Ok(Some((h, _))) if !h.is_control() && held == 0) && bad.is_none();
            if !joins_run {
                forward(d, dst, &data[run..i], stall).await?;
                d.out_mid_frame = false;
                run = i;
            }
            if let Some(e) = bad {
                return Err(e);
            }
            let Ok(Some((head, size))) = parsed else {
                // Not all of the header yet: hold it back (a control frame's never goes out).
                let rest = &data[i..];
                d.parser.head[held..held + rest.len()].copy_from_slice(rest);
                d.parser.head_len += rest.len() as u8;
                return Ok(());
            };
            d.parser.head_len = 0;
            let in_this_read = size - held;
            if head.is_control() {
                i += in_this_read;
                run = i;
                frame_start = None;
            } else {
                if held > 0 {
                    // The header began in the previous read: its first bytes go out now.
                    let h = d.parser.head;
                    forward(d, dst, &h[..held], stall).await?;
                    d.out_mid_frame = true;
                    frame_start = None;
                } else {
                    frame_start = Some(i);
                }
                i += in_this_read;
                if head.opcode != 0 {
                    d.parser.message = Some(head.opcode == 1);
                    d.parser.message_bytes = 0;
                }
                d.parser.message_bytes += head.len;
            }
            d.parser.cur = Some(Cur {
                head,
                done: 0,
                control: head
                    .is_control()
                    .then(|| Vec::with_capacity(head.len as usize)),
            });
        } else {
            let cur = d.parser.cur.as_mut().expect("current frame");
            let k = (cur.head.len - cur.done).min((data.len() - i) as u64) as usize;
            let piece = &data[i..i + k];
            if let Some(c) = cur.control.as_mut() {
                let at = cur.done;
                c.extend(piece.iter().enumerate().map(|(j, b)| match cur.head.mask {
                    Some(m) => b ^ m[((at + j as u64) % 4) as usize],
                    None => *b,
                }));
                i += k;
                run = i;
            } else {
                let text = d.parser.message == Some(true);
                if text && !text_ok(&mut d.parser.utf8, piece, cur.head.mask, cur.done) {
                    return Err(refuse_frame(d, dst, data, run, frame_start, stall).await);
                }
                i += k;
            }
            cur.done += k as u64;
        }
        // A complete frame (an empty one is complete at its header).
        if d.parser.cur.as_ref().is_some_and(|c| c.done == c.head.len) {
            let cur = d.parser.cur.take().expect("current frame");
            match cur.control {
                Some(payload) => {
                    on_control(d, cur.head.opcode, &payload, src, dst, sh, limits).await?
                }
                None if cur.head.fin => {
                    if d.parser.message == Some(true) && !d.parser.utf8.complete() {
                        // The message ends inside a character.
                        return Err(refuse_frame(d, dst, data, run, frame_start, stall).await);
                    }
                    let n = d.parser.message_bytes;
                    d.stats.on_message(n, Instant::now(), sh.origin);
                    d.parser.message = None;
                    d.parser.message_bytes = 0;
                    d.parser.utf8 = Utf8::default();
                }
                None => {}
            }
            frame_start = None;
        }
    }
    forward(d, dst, &data[run..], stall).await?;
    d.out_mid_frame = d.parser.cur.as_ref().is_some_and(|c| !c.head.is_control());
    if !d.parser.from_client {
        d.reads += 1;
        if super::samples(d.reads, super::ZERO_COPY_SAMPLE_EVERY, d.stats.sampled_in()) {
            let (raw, out) = super::deflated_size(data);
            d.stats.on_sample(raw, out);
        }
    }
    Ok(())
}

/// The current data frame carries invalid UTF-8: write what precedes it when none of it has
/// gone out (the destination's stream stays at a frame boundary); otherwise that stream is
/// left inside the frame.
async fn refuse_frame(
    d: &mut Dir,
    dst: &TcpStream,
    data: &[u8],
    run: usize,
    frame_start: Option<usize>,
    stall: Duration,
) -> PumpEnd {
    match frame_start {
        Some(start) if start >= run => {
            if let Err(e) = forward(d, dst, &data[run..start], stall).await {
                return e;
            }
            d.out_mid_frame = false;
        }
        _ => d.out_mid_frame = true,
    }
    PumpEnd::Failed(Failure::InvalidUtf8)
}

/// Read what `src` has and forward it. `None`: go on; `Some`: this direction is over.
async fn transfer(
    d: &mut Dir,
    src: &TcpStream,
    dst: &TcpStream,
    buffer_size: usize,
    sh: &Shared,
    limits: ForwardLimits,
) -> Option<PumpEnd> {
    let (buf, n) = match read_pooled(src, buffer_size) {
        Ok(Pooled::Bytes(buf, n)) => (buf, n),
        Ok(Pooled::Eof) => return Some(PumpEnd::Failed(Failure::Abnormal("eof"))),
        Ok(Pooled::Nothing) => return None,
        Err(_) => return Some(PumpEnd::Failed(Failure::Abnormal("io"))),
    };
    sh.touch();
    let r = process(d, &buf[..n], src, dst, sh, limits).await;
    BUFFERS.put(buf);
    r.err()
}

/// One direction: read `src`, forward to `dst`, and write the control frames queued for `dst`
/// at frame boundaries. After it ends, others write to `dst` directly.
async fn pump(
    d: &mut Dir,
    src: &TcpStream,
    dst: &TcpStream,
    head: &[u8],
    buffer_size: usize,
    sh: &Shared,
    limits: ForwardLimits,
) -> PumpEnd {
    let to = 1 - d.src();
    let end = 'run: {
        if !head.is_empty() {
            sh.touch();
            if let Err(e) = Box::pin(process(d, head, src, dst, sh, limits)).await {
                break 'run e;
            }
        }
        loop {
            if !d.out_mid_frame
                && !sh.outbox_empty(to)
                && let Err(e) = flush_outbox(d, to, dst, sh, limits.stall_timeout).await
            {
                break 'run e;
            }
            let ready = tokio::select! {
                biased;
                () = sh.signal[to].wait() => continue,
                r = src.readable() => r,
            };
            if ready.is_err() {
                break 'run PumpEnd::Failed(Failure::Abnormal("io"));
            }
            // Boxed: the state of moving bytes exists only while bytes are in flight.
            if let Some(e) = Box::pin(transfer(d, src, dst, buffer_size, sh, limits)).await {
                break 'run e;
            }
        }
    };
    if matches!(end, PumpEnd::Failed(Failure::Write(_))) || d.out_mid_frame {
        // No close frame can reach that peer now: end its stream instead, so that it closes.
        sh.broken[to].store(true, Ordering::Relaxed);
        let _ = socket2::SockRef::from(dst).shutdown(std::net::Shutdown::Write);
    } else {
        let _ = flush_outbox(d, to, dst, sh, limits.stall_timeout).await;
    }
    sh.writer_alive[to].store(false, Ordering::Relaxed);
    end
}

async fn tick(i: Option<&mut tokio::time::Interval>) {
    match i {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// A ping is due on `leg`: `false` when the peer missed enough pongs to be dead.
async fn ping(sh: &Shared, leg: usize, sock: &TcpStream, grace: Duration) -> bool {
    let payload = {
        let mut g = sh.pings[leg].lock().expect("pings");
        let Some(p) = g.as_mut() else { return true };
        let Some(id) = p.tick() else { return false };
        id.to_be_bytes()
    };
    sh.send(leg, sock, 9, &payload, grace).await;
    true
}

/// Forward a WebSocket connection between two TCP sockets, frame by frame. The arguments are
/// those of [`super::zero_copy::run`].
#[allow(clippy::too_many_arguments)]
pub async fn run(
    client: TcpStream,
    client_head: Vec<u8>,
    upstream: TcpStream,
    upstream_head: Vec<u8>,
    settings: Settings,
    limits: ForwardLimits,
    mut shutdown: watch::Receiver<bool>,
    drain_delay: Duration,
) -> Outcome {
    let origin = Instant::now();
    let pinging = settings.ping_interval > 0;
    let new_pings = || Mutex::new(pinging.then(|| Box::new(Pings::default())));
    let sh = Shared {
        origin,
        activity: AtomicU64::new(0),
        outbox: [Mutex::new(Vec::new()), Mutex::new(Vec::new())],
        signal: [Signal::default(), Signal::default()],
        writer_alive: [AtomicBool::new(true), AtomicBool::new(true)],
        broken: [AtomicBool::new(false), AtomicBool::new(false)],
        close_sent: [AtomicBool::new(false), AtomicBool::new(false)],
        closing: AtomicBool::new(false),
        client_closed: AtomicBool::new(false),
        first_close: Mutex::new(None),
        pings: [new_pings(), new_pings()],
    };
    let mut c2u = Dir::new(true);
    let mut u2c = Dir::new(false);
    let bs = settings.buffer_size as usize;
    let idle = Duration::from_secs(u64::from(settings.idle_timeout));
    let socks = [&client, &upstream];
    let mut error_class: Option<&'static str> = None;
    let (mut dead_peer, mut idle_timeout_fired) = (false, false);
    let mut client_stalled = false;
    {
        let mut a = pin!(pump(
            &mut c2u,
            &client,
            &upstream,
            &client_head,
            bs,
            &sh,
            limits
        ));
        let mut b = pin!(pump(
            &mut u2c,
            &upstream,
            &client,
            &upstream_head,
            bs,
            &sh,
            limits
        ));
        let every = Duration::from_secs(u64::from(settings.ping_interval));
        let interval = || {
            let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        };
        let mut ping_c = pinging.then(interval);
        let mut ping_u = pinging.then(interval);
        let (mut a_done, mut b_done, mut draining) = (false, false, false);
        let mut decided = false;
        let mut deferred_client: Option<(u16, &'static str)> = None;
        let mut grace: Option<tokio::time::Instant> = None;
        loop {
            let grace_sleep = async {
                match grace {
                    Some(g) => tokio::time::sleep_until(g).await,
                    None => std::future::pending().await,
                }
            };
            // What the proxy decides: (code to the client, reason, code to the upstream,
            // reason); 0 sends nothing to that leg.
            let mut decide: Option<(u16, &'static str, u16, &'static str)> = None;
            let mut defer_client = false;
            tokio::select! {
                e = &mut a, if !a_done => {
                    a_done = true;
                    // Reading the client, or writing the upstream, failed.
                    if let PumpEnd::Failed(f) = e {
                        let v = verdict(!matches!(f, Failure::Write(_)), f);
                        decide = Some(v.apply(&mut error_class, |by, c, r| sh.record_close(by, c, r)));
                        defer_client = v.defer_client;
                    }
                }
                e = &mut b, if !b_done => {
                    b_done = true;
                    if let Some((c, r)) = deferred_client.take() {
                        sh.send(CLIENT, &client, 8, &close_payload(c, r), limits.close_grace).await;
                    }
                    // Reading the upstream, or writing the client, failed.
                    if let PumpEnd::Failed(f) = e {
                        let v = verdict(matches!(f, Failure::Write(_)), f);
                        decide = Some(v.apply(&mut error_class, |by, c, r| sh.record_close(by, c, r)));
                        client_stalled |= f == Failure::Write("stalled");
                    }
                }
                () = tick(ping_c.as_mut()) => {
                    if !ping(&sh, CLIENT, &client, limits.close_grace).await {
                        dead_peer = true;
                        error_class.get_or_insert("client_dead");
                        sh.record_close(ClosedBy::Proxy, 1001, "client not responding");
                        decide = Some((1001, "ping timeout", 1001, "client not responding"));
                        ping_c = None;
                    }
                }
                () = tick(ping_u.as_mut()) => {
                    if !ping(&sh, UPSTREAM, &upstream, limits.close_grace).await {
                        dead_peer = true;
                        error_class.get_or_insert("upstream_dead");
                        sh.record_close(ClosedBy::Proxy, 1011, "upstream not responding");
                        decide = Some((1011, "upstream not responding", 1001, "ping timeout"));
                        ping_u = None;
                    }
                }
                () = idle_expired(&sh.activity, origin, idle), if !decided && !sh.closing.load(Ordering::Relaxed) => {
                    idle_timeout_fired = true;
                    let (c, r) = CloseRequest::Idle.code_reason();
                    sh.record_close(ClosedBy::Proxy, c, r);
                    decide = Some((c, r, c, r));
                }
                r = async { shutdown.wait_for(|v| *v).await.is_ok() }, if !draining => {
                    draining = true;
                    if r {
                        tokio::time::sleep(drain_delay).await;
                        if !sh.closing.load(Ordering::Relaxed) {
                            let (c, r) = CloseRequest::Shutdown.code_reason();
                            sh.record_close(ClosedBy::Proxy, c, r);
                            decide = Some((c, r, c, r));
                        }
                    }
                }
                () = grace_sleep => break,
            }
            if let Some(d) = decide
                && !decided
            {
                decided = true;
                sh.closing.store(true, Ordering::Relaxed);
                if d.0 != 0 {
                    if defer_client && !b_done {
                        deferred_client = Some((d.0, d.1));
                    } else {
                        sh.send(
                            CLIENT,
                            socks[CLIENT],
                            8,
                            &close_payload(d.0, d.1),
                            limits.close_grace,
                        )
                        .await;
                    }
                }
                if d.2 != 0 {
                    sh.send(
                        UPSTREAM,
                        socks[UPSTREAM],
                        8,
                        &close_payload(d.2, d.3),
                        limits.close_grace,
                    )
                    .await;
                }
            }
            if sh.closing.load(Ordering::Relaxed) && grace.is_none() {
                grace = Some(tokio::time::Instant::now() + limits.close_grace);
            }
            if a_done && b_done {
                break;
            }
        }
        // A client that answered the idle close with neither a close frame nor the end of its
        // stream within the grace had gone silent: the idle timeout found a dead peer.
        if idle_timeout_fired && !a_done && !sh.client_closed.load(Ordering::Relaxed) {
            dead_peer = true;
            error_class.get_or_insert("client_dead");
        }
    }
    // An upstream that stopped reading while the client was not reading its replies either
    // is backpressure from the client, not a stall of its own.
    if error_class == Some("upstream_stalled") && (client_stalled || u2c.paused.waiting()) {
        error_class = Some("client_stalled");
        let mut first = sh.first_close.lock().expect("close lock");
        if let Some((ClosedBy::Proxy, 1008, reason)) = first.as_mut() {
            *reason = "client stalled".into();
        }
    }
    let end = Instant::now();
    let mut out = Outcome {
        error_class,
        dead_peer,
        idle_timeout_fired,
        paused: c2u.paused.total() + u2c.paused.total(),
        ..Outcome::default()
    };
    if let Some((by, code, reason)) = sh.first_close.lock().expect("close lock").take() {
        out.closed_by = Some(by);
        out.close_code = Some(code);
        out.close_reason = (!reason.is_empty()).then_some(reason);
    } else {
        out.closed_by = Some(ClosedBy::Proxy);
    }
    out.c2u = c2u.stats.finish(end, origin);
    out.u2c = u2c.stats.finish(end, origin);
    let stats = |leg: usize| {
        sh.pings[leg]
            .lock()
            .expect("pings")
            .as_ref()
            .map(|p| p.stats())
            .unwrap_or_default()
    };
    out.ping_client = stats(CLIENT);
    out.ping_upstream = stats(UPSTREAM);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tuning::Mode;

    fn limits(max: usize) -> ForwardLimits {
        ForwardLimits {
            stall_timeout: Duration::from_secs(5),
            max_message_bytes: max,
            close_grace: Duration::from_secs(2),
        }
    }

    fn settings(ping: u32) -> Settings {
        Settings {
            ping_interval: ping,
            idle_timeout: 900,
            mode: Mode::FrameAware,
            ..Settings::default()
        }
    }

    /// Two connected sockets: (the peer's end, the proxy's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        a.set_nodelay(true).unwrap();
        b.set_nodelay(true).unwrap();
        (a, b)
    }

    /// `run` between two socket pairs: (the client's end, the upstream's end, the forwarding).
    async fn forwarding(
        s: Settings,
        l: ForwardLimits,
    ) -> (TcpStream, TcpStream, tokio::task::JoinHandle<Outcome>) {
        let (client, proxy_c) = pair().await;
        let (proxy_u, upstream) = pair().await;
        let fwd = tokio::spawn(async move {
            let (_tx, rx) = watch::channel(false);
            run(
                proxy_c,
                Vec::new(),
                proxy_u,
                Vec::new(),
                s,
                l,
                rx,
                Duration::ZERO,
            )
            .await
        });
        (client, upstream, fwd)
    }

    /// A frame with this first byte (FIN and opcode) and payload, masked with `mask` when given.
    fn frame(first: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        crate::frames::tests::frame(first & 0x80 != 0, first & 0x0f, payload, mask)
    }

    /// Read exactly `n` bytes (or fail after 5 s).
    async fn read_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut v))
            .await
            .expect("bytes in time")
            .expect("read");
        v
    }

    /// Read one unmasked frame: (first byte, payload).
    async fn read_frame(s: &mut TcpStream) -> (u8, Vec<u8>) {
        let h = read_n(s, 2).await;
        let masked = h[1] & 0x80 != 0;
        let len = match h[1] & 0x7f {
            126 => u16::from_be_bytes(read_n(s, 2).await.try_into().unwrap()) as usize,
            127 => u64::from_be_bytes(read_n(s, 8).await.try_into().unwrap()) as usize,
            l => l as usize,
        };
        let key = if masked {
            Some(read_n(s, 4).await)
        } else {
            None
        };
        let mut p = read_n(s, len).await;
        if let Some(k) = key {
            for (i, b) in p.iter_mut().enumerate() {
                *b ^= k[i % 4];
            }
        }
        (h[0], p)
    }

    #[test]
    fn utf8_is_checked_across_any_split() {
        let text = "h€llo wörld 𝄞!".as_bytes();
        for cut in 0..=text.len() {
            let mut u = Utf8::default();
            assert!(u.feed(&text[..cut]) && u.feed(&text[cut..]), "cut at {cut}");
            assert!(u.complete());
        }
        // U+110000 (0xf4 0x90 …) is refused in the piece where its second byte arrives.
        let mut u = Utf8::default();
        assert!(u.feed(b"ok \xf4"));
        assert!(!u.feed(b"\x90\x80\x80"));
        // A message may not end inside a character.
        let mut u = Utf8::default();
        assert!(u.feed(b"ok \xe2\x82"));
        assert!(!u.complete());
    }

    #[test]
    fn headers_parse_only_when_whole_and_refuse_reserved_bits_and_opcodes() {
        let f = frame(0x82, &[0u8; 300], Some([1, 2, 3, 4]));
        for cut in 0..8 {
            assert!(matches!(parse_head(&f[..cut]), Ok(None)), "cut {cut}");
        }
        let (h, n) = parse_head(&f).unwrap().unwrap();
        assert_eq!((h.opcode, h.fin, h.len, n), (2, true, 300, 8));
        assert_eq!(h.mask, Some([1, 2, 3, 4]));
        assert_eq!(
            parse_head(&[0xc2, 0]).unwrap_err(),
            PumpEnd::Failed(Failure::Protocol)
        );
        assert_eq!(
            parse_head(&[0x83, 0]).unwrap_err(),
            PumpEnd::Failed(Failure::Protocol)
        );
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(
            parse_head(&huge).unwrap_err(),
            PumpEnd::Failed(Failure::Protocol)
        );
    }

    /// Frames written one byte at a time (every header and payload split across reads), a
    /// fragmented text message with a ping between its fragments: the upstream receives the
    /// data frames byte for byte (still masked), the ping is answered by the proxy and not
    /// forwarded, and the upstream's reply reaches the client.
    #[tokio::test]
    async fn frames_split_across_reads_are_forwarded_whole_and_pings_answered() {
        let (mut client, mut upstream, fwd) = forwarding(settings(0), limits(1 << 20)).await;
        let k = [9, 8, 7, 6];
        let first = frame(0x01, "h€l".as_bytes(), Some(k));
        let ping = frame(0x89, b"are you there", Some(k));
        let last = frame(0x80, "lo".as_bytes(), Some(k));
        for b in first.iter().chain(&ping).chain(&last) {
            client.write_all(&[*b]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut want = first.clone();
        want.extend_from_slice(&last);
        assert_eq!(read_n(&mut upstream, want.len()).await, want);
        assert_eq!(
            read_frame(&mut client).await,
            (0x8a, b"are you there".to_vec())
        );
        upstream
            .write_all(&frame(0x82, &[5u8; 70_000], None))
            .await
            .unwrap();
        assert_eq!(read_frame(&mut client).await, (0x82, vec![5u8; 70_000]));
        // The client closes; the upstream gets the same code and answers.
        let mut close = 1000u16.to_be_bytes().to_vec();
        close.extend_from_slice(b"bye");
        client
            .write_all(&frame(0x88, &close, Some(k)))
            .await
            .unwrap();
        assert_eq!(read_frame(&mut upstream).await, (0x88, close.clone()));
        upstream
            .write_all(&frame(0x88, &close, None))
            .await
            .unwrap();
        assert_eq!(read_frame(&mut client).await, (0x88, close));
        let out = tokio::time::timeout(Duration::from_secs(5), fwd)
            .await
            .expect("ends after the close handshake")
            .unwrap();
        assert_eq!(out.closed_by, Some(ClosedBy::Client));
        assert_eq!(out.close_code, Some(1000));
        assert_eq!(out.c2u.messages, 1);
        assert_eq!(out.u2c.messages, 1);
        assert_eq!(out.error_class, None);
    }

    /// A message over the limit: the upstream gets 1001 before any of it, the client 1009
    /// once the upstream has closed.
    #[tokio::test]
    async fn a_message_over_the_limit_is_refused_with_1009() {
        let (mut client, mut upstream, fwd) = forwarding(settings(0), limits(1000)).await;
        let k = [1, 2, 3, 4];
        client
            .write_all(&frame(0x82, &[1u8; 500], Some(k)))
            .await
            .unwrap();
        client
            .write_all(&frame(0x82, &[2u8; 2000], Some(k)))
            .await
            .unwrap();
        assert_eq!(read_frame(&mut upstream).await, (0x82, vec![1u8; 500]));
        let (op, p) = read_frame(&mut upstream).await;
        assert_eq!((op, &p[..2]), (0x88, &1001u16.to_be_bytes()[..]));
        upstream.write_all(&frame(0x88, &p, None)).await.unwrap();
        let (op, p) = read_frame(&mut client).await;
        assert_eq!((op, &p[..2]), (0x88, &1009u16.to_be_bytes()[..]));
        let out = tokio::time::timeout(Duration::from_secs(5), fwd)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out.error_class, Some("client_message_too_big"));
    }

    /// The proxy pings both legs; the upstream answers, the client does not and is declared
    /// dead after three missed pongs.
    #[tokio::test]
    async fn a_client_that_stops_answering_pings_is_declared_dead() {
        let t0 = Instant::now();
        let (_client, mut upstream, fwd) = forwarding(settings(1), limits(1 << 20)).await;
        let answer = tokio::spawn(async move {
            loop {
                let (op, p) = read_frame(&mut upstream).await;
                if op == 0x89 {
                    upstream.write_all(&frame(0x8a, &p, None)).await.unwrap();
                } else {
                    return (op, p);
                }
            }
        });
        let out = tokio::time::timeout(Duration::from_secs(10), fwd)
            .await
            .unwrap()
            .unwrap();
        assert!(out.dead_peer);
        assert_eq!(out.error_class, Some("client_dead"));
        assert_eq!(out.ping_client.missed, 3);
        assert!(out.ping_upstream.answered >= 3, "{:?}", out.ping_upstream);
        assert!(t0.elapsed() >= Duration::from_secs(4), "{:?}", t0.elapsed());
        let (op, p) = answer.await.unwrap();
        assert_eq!((op, &p[..2]), (0x88, &1001u16.to_be_bytes()[..]));
    }

    /// Idle closes: a client that answers with its close is alive; one that answers nothing
    /// within the grace had gone silent, a dead peer.
    #[tokio::test]
    async fn an_idle_close_tells_a_live_client_from_a_dead_one() {
        for answers in [true, false] {
            let s = Settings {
                idle_timeout: 1,
                ..settings(0)
            };
            let (mut client, mut upstream, fwd) = forwarding(s, limits(1 << 20)).await;
            // The upstream answers the proxy's close and waits for the end.
            let up = tokio::spawn(async move {
                let got = read_frame(&mut upstream).await;
                let reply = frame(0x88, &1001u16.to_be_bytes(), None);
                upstream.write_all(&reply).await.unwrap();
                let _ = upstream.read_to_end(&mut Vec::new()).await;
                got
            });
            let (op, _) = read_frame(&mut client).await;
            assert_eq!(op, 0x88);
            if answers {
                let reply = frame(0x88, &1001u16.to_be_bytes(), Some([1, 2, 3, 4]));
                client.write_all(&reply).await.unwrap();
            }
            let out = tokio::time::timeout(Duration::from_secs(10), fwd)
                .await
                .unwrap()
                .unwrap();
            assert!(out.idle_timeout_fired);
            assert_eq!(out.dead_peer, !answers, "{out:?}");
            assert_eq!(
                out.error_class,
                (!answers).then_some("client_dead"),
                "{out:?}"
            );
            assert_eq!(up.await.unwrap().0, 0x88);
        }
    }

    /// A peer that floods pings and never reads cannot grow the queue of pongs toward it.
    #[tokio::test]
    async fn pongs_for_a_peer_that_does_not_read_are_bounded() {
        let (_peer, sock) = pair().await;
        let sh = Shared {
            origin: Instant::now(),
            activity: AtomicU64::new(0),
            outbox: [Mutex::new(Vec::new()), Mutex::new(Vec::new())],
            signal: [Signal::default(), Signal::default()],
            writer_alive: [AtomicBool::new(true), AtomicBool::new(true)],
            broken: [AtomicBool::new(false), AtomicBool::new(false)],
            close_sent: [AtomicBool::new(false), AtomicBool::new(false)],
            closing: AtomicBool::new(false),
            client_closed: AtomicBool::new(false),
            first_close: Mutex::new(None),
            pings: [Mutex::new(None), Mutex::new(None)],
        };
        for _ in 0..10_000 {
            sh.send(CLIENT, &sock, 10, &[7u8; 125], Duration::from_secs(1))
                .await;
        }
        let queued = sh.outbox[CLIENT].lock().unwrap().len();
        assert!(
            queued < OUTBOX_PONGS_UNTIL + 128,
            "{queued} bytes of pongs queued"
        );
        // A close still gets through.
        sh.send(
            CLIENT,
            &sock,
            8,
            &close_payload(1001, "bye"),
            Duration::from_secs(1),
        )
        .await;
        assert!(sh.outbox[CLIENT].lock().unwrap().len() > queued);
    }

    /// What an idle connection holds is the future of `run` (under 4 KiB: two directions'
    /// statistics and parsers, the waits and timers), never a buffer.
    #[tokio::test]
    async fn the_idle_forwarding_state_stays_small() {
        let (_c, proxy_c) = pair().await;
        let (proxy_u, _u) = pair().await;
        let (_tx, rx) = watch::channel(false);
        let s = settings(30);
        let f = run(
            proxy_c,
            Vec::new(),
            proxy_u,
            Vec::new(),
            s,
            limits(1 << 20),
            rx,
            Duration::ZERO,
        );
        let size = std::mem::size_of_val(&f);
        eprintln!("frame_tcp::run's state: {size} bytes");
        // 3,744 bytes in a debug build.
        assert!(size <= 4096, "frame_tcp::run's state grew to {size} bytes");
    }
}
