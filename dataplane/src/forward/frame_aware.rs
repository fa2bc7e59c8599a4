//! `frame_aware` mode for client legs that are not a plain socket — permessage-deflate toward
//! the client, an HTTP/2 stream under RFC 8441 (two sockets go through [`super::frame_tcp`]).
//!
//! WebSocket messages are parsed on both legs (tokio-tungstenite), so the
//! proxy can ping each peer itself, detect a dead one, enforce the maximum message size with
//! close 1009, propagate close codes both ways and close cleanly on idle timeout or shutdown.
//!
//! Each leg has one writer fed by a channel of capacity 1: a reader whose destination does not
//! keep up waits on that channel, so at most a couple of messages per direction are held in the
//! proxy, and a peer that accepts nothing for the stall timeout is closed with 1008.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tuning::{ClosedBy, PingStats, Settings};

use super::{CloseRequest, Failure, ForwardLimits, Outcome, SAMPLE_EVERY, deflated_size, verdict};
use crate::stats::DirStats;

/// Which leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Leg {
    Client,
    Upstream,
}

/// Ping bookkeeping for one leg, compact (every pinged connection holds two: 80 bytes each):
/// the ping ids are the count sent, RTTs in microseconds and a histogram that stays inline.
#[derive(Debug)]
pub(super) struct Pings {
    /// When the outstanding ping (id `sent`) went out.
    outstanding: Option<Instant>,
    consecutive_missed: u32,
    sent: u32,
    answered: u32,
    missed: u32,
    /// Fastest and slowest answer, µs (`u32::MAX` / 0 before the first).
    rtt_min: u32,
    rtt_max: u32,
    rtts: crate::stats::Counts,
}

impl Default for Pings {
    fn default() -> Self {
        Pings {
            outstanding: None,
            consecutive_missed: 0,
            sent: 0,
            answered: 0,
            missed: 0,
            rtt_min: u32::MAX,
            rtt_max: 0,
            rtts: crate::stats::Counts::new(),
        }
    }
}

impl Pings {
    /// A ping is due: the id of the one to send, or `None` when the peer missed enough pongs
    /// in a row to be dead (the one that was outstanding counts as missed).
    pub(super) fn tick(&mut self) -> Option<u64> {
        if self.outstanding.take().is_some() {
            self.missed += 1;
            self.consecutive_missed += 1;
            if self.consecutive_missed >= tuning::settings::MISSED_PONGS_FOR_DEAD_PEER {
                return None;
            }
        }
        self.sent += 1;
        self.outstanding = Some(Instant::now());
        Some(u64::from(self.sent))
    }

    /// The id of the outstanding ping, if one is.
    pub(super) fn outstanding_id(&self) -> Option<u64> {
        self.outstanding.map(|_| u64::from(self.sent))
    }

    pub(super) fn on_pong(&mut self, payload: &[u8]) {
        let Ok(id) = <[u8; 8]>::try_from(payload).map(u64::from_be_bytes) else {
            return;
        };
        if self.outstanding_id() == Some(id) {
            self.answered_now();
        }
    }

    /// The outstanding ping, if any, was answered now (`zero_copy` sees that a pong passed,
    /// not its payload).
    pub(super) fn answered_now(&mut self) {
        if let Some(at) = self.outstanding.take() {
            let us = at.elapsed().as_micros().min(u128::from(u32::MAX - 1)) as u32;
            self.answered += 1;
            self.rtt_min = self.rtt_min.min(us);
            self.rtt_max = self.rtt_max.max(us);
            self.rtts.record(u64::from(us));
            self.consecutive_missed = 0;
        }
    }

    pub(super) fn stats(&self) -> PingStats {
        let rtts = self.rtts.widen();
        let answered = self.answered > 0;
        PingStats {
            sent: u64::from(self.sent),
            answered: u64::from(self.answered),
            missed: u64::from(self.missed),
            rtt_min_us: answered.then_some(u64::from(self.rtt_min)),
            rtt_p50_us: rtts.quantile_upper(0.5),
            rtt_p99_us: rtts.quantile_upper(0.99),
            rtt_max_us: answered.then_some(u64::from(self.rtt_max)),
        }
    }
}

/// What ended a reader.
#[derive(Debug, Clone, Copy)]
enum ReadEnd {
    /// The peer closed (close frame, then end of stream).
    Closed,
    /// The stream ended without a close frame, or failed.
    Abnormal(&'static str),
    /// The peer sent a message larger than the limit.
    TooBig,
    /// The peer broke the protocol.
    Protocol,
    /// The peer sent a text message that is not UTF-8.
    InvalidUtf8,
}

impl ReadEnd {
    /// The failure, unless the peer closed.
    fn failure(self) -> Option<Failure> {
        match self {
            ReadEnd::Closed => None,
            ReadEnd::Abnormal(why) => Some(Failure::Abnormal(why)),
            ReadEnd::TooBig => Some(Failure::TooBig),
            ReadEnd::Protocol => Some(Failure::Protocol),
            ReadEnd::InvalidUtf8 => Some(Failure::InvalidUtf8),
        }
    }
}

/// State shared by the futures of one connection (all polled by one task).
#[derive(Debug)]
struct Shared {
    origin: Instant,
    activity: AtomicU64,
    in_flight: AtomicU64,
    peak: AtomicU64,
    paused_ns: AtomicU64,
    /// The first close seen: (by, code, reason).
    first_close: Mutex<Option<(ClosedBy, u16, String)>>,
    closing: AtomicBool,
    /// The client sent a close frame.
    client_closed: AtomicBool,
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
}

fn ws_config(settings: &Settings, limits: &ForwardLimits) -> WebSocketConfig {
    let mut c = WebSocketConfig::default();
    c.read_buffer_size = settings.buffer_size as usize;
    c.write_buffer_size = 0;
    c.max_message_size = Some(limits.max_message_bytes);
    c.max_frame_size = Some(limits.max_message_bytes);
    c
}

fn close_msg(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    }))
}

/// Read one leg and forward to the other's writer.
async fn reader<S>(
    leg: Leg,
    mut stream: S,
    to_other: mpsc::Sender<Message>,
    stats: &mut DirStats,
    pings: &Mutex<Pings>,
    shared: &Shared,
) -> ReadEnd
where
    S: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
{
    let by = match leg {
        Leg::Client => ClosedBy::Client,
        Leg::Upstream => ClosedBy::Upstream,
    };
    let mut closed = false;
    loop {
        let msg = match stream.next().await {
            None => {
                return if closed {
                    ReadEnd::Closed
                } else {
                    ReadEnd::Abnormal("eof")
                };
            }
            Some(Ok(m)) => m,
            Some(Err(WsError::ConnectionClosed)) => return ReadEnd::Closed,
            Some(Err(WsError::Capacity(_))) => return ReadEnd::TooBig,
            Some(Err(WsError::Protocol(p))) => {
                if closed {
                    return ReadEnd::Closed;
                }
                tracing::debug!(?leg, error = %p, "protocol error");
                return ReadEnd::Protocol;
            }
            Some(Err(WsError::Utf8(_))) => return ReadEnd::InvalidUtf8,
            Some(Err(_)) => {
                return if closed {
                    ReadEnd::Closed
                } else {
                    ReadEnd::Abnormal("io")
                };
            }
        };
        match msg {
            Message::Text(_) | Message::Binary(_) => {
                let n = match &msg {
                    Message::Text(t) => t.len(),
                    Message::Binary(b) => b.len(),
                    _ => 0,
                } as u64;
                let now = Instant::now();
                stats.on_read(n as usize);
                stats.on_message(n, now.into_std(), shared.origin.into_std());
                if super::samples(stats.messages, SAMPLE_EVERY, stats.sampled_in()) {
                    let payload: &[u8] = match &msg {
                        Message::Text(t) => t.as_bytes(),
                        Message::Binary(b) => b,
                        _ => &[],
                    };
                    let (raw, out) = deflated_size(payload);
                    stats.on_sample(raw, out);
                }
                shared.touch();
                if closed {
                    continue;
                }
                let inflight = shared.in_flight.fetch_add(n, Ordering::Relaxed) + n;
                shared.peak.fetch_max(inflight, Ordering::Relaxed);
                match to_other.try_send(msg) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(m)) => {
                        let t = Instant::now();
                        let r = to_other.send(m).await;
                        shared
                            .paused_ns
                            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
                        if r.is_err() {
                            return ReadEnd::Abnormal("other_leg_gone");
                        }
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        return ReadEnd::Abnormal("other_leg_gone");
                    }
                }
            }
            Message::Pong(p) => pings.lock().expect("pings").on_pong(&p),
            // tungstenite answers pings itself; the proxy does not forward them.
            Message::Ping(_) | Message::Frame(_) => {}
            Message::Close(frame) => {
                tracing::debug!(?leg, ?frame, "close frame received");
                if leg == Leg::Client {
                    shared.client_closed.store(true, Ordering::Relaxed);
                }
                let (code, reason) = frame.as_ref().map_or((1005, String::new()), |f| {
                    (u16::from(f.code), f.reason.to_string())
                });
                shared.record_close(by, code, &reason);
                if !closed && !shared.closing.swap(true, Ordering::Relaxed) {
                    // Propagate the peer's close to the other leg, same code and reason.
                    let fwd = match frame {
                        Some(f) if code != 1005 => Message::Close(Some(f)),
                        _ => Message::Close(None),
                    };
                    let _ = to_other.send(fwd).await;
                }
                // tungstenite replies to the close itself; keep reading until the stream ends.
                closed = true;
            }
        }
    }
}

/// Write messages from the channel to one leg.
async fn writer<S>(
    mut sink: S,
    mut rx: mpsc::Receiver<Message>,
    stall: Duration,
    shared: &Shared,
) -> Result<(), &'static str>
where
    S: futures_util::Sink<Message, Error = WsError> + Unpin,
{
    while let Some(m) = rx.recv().await {
        let n = match &m {
            Message::Text(t) => t.len() as u64,
            Message::Binary(b) => b.len() as u64,
            _ => 0,
        };
        let is_close = matches!(m, Message::Close(_));
        let r = tokio::time::timeout(stall, sink.send(m)).await;
        shared.in_flight.fetch_sub(n, Ordering::Relaxed);
        match r {
            Err(_) => return Err("stalled"),
            Ok(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => return Ok(()),
            Ok(Err(WsError::Protocol(_))) if is_close => {}
            Ok(Err(_)) => return Err("io"),
            Ok(Ok(())) => {}
        }
    }
    let _ = tokio::time::timeout(stall, sink.close()).await;
    Ok(())
}

/// Ping one leg every `interval`; returns when the peer missed enough pongs to be dead.
async fn pinger(interval: Duration, tx: mpsc::Sender<Message>, pings: &Mutex<Pings>) {
    let mut tick = tokio::time::interval_at(Instant::now() + interval, interval);
    loop {
        tick.tick().await;
        let Some(id) = pings.lock().expect("pings").tick() else {
            return;
        };
        let payload = id.to_be_bytes();
        // A full channel means the writer is busy with data: the ping waits its turn.
        if tx
            .send(Message::Ping(Bytes::copy_from_slice(&payload)))
            .await
            .is_err()
        {
            std::future::pending::<()>().await;
        }
    }
}

async fn idle_expired(shared: &Shared, idle: Duration) {
    loop {
        let last = shared.origin + Duration::from_nanos(shared.activity.load(Ordering::Relaxed));
        let deadline = last + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline).await;
    }
}

async fn maybe<F: std::future::Future<Output = ()>>(f: Option<F>) {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Forward a WebSocket connection message by message. See [`super::zero_copy::run`] for the
/// meaning of the arguments.
#[allow(clippy::too_many_arguments)]
pub async fn run<C, U>(
    client: C,
    client_head: Vec<u8>,
    upstream: U,
    upstream_head: Vec<u8>,
    settings: Settings,
    limits: ForwardLimits,
    mut shutdown: watch::Receiver<bool>,
    drain_delay: Duration,
) -> Outcome
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
    U: AsyncRead + AsyncWrite + Unpin + Send,
{
    let cfg = ws_config(&settings, &limits);
    let client_ws =
        WebSocketStream::from_partially_read(client, client_head, Role::Server, Some(cfg)).await;
    let upstream_ws =
        WebSocketStream::from_partially_read(upstream, upstream_head, Role::Client, Some(cfg))
            .await;
    let (c_sink, c_stream) = client_ws.split();
    let (u_sink, u_stream) = upstream_ws.split();
    let (c_tx, c_rx) = mpsc::channel::<Message>(1);
    let (u_tx, u_rx) = mpsc::channel::<Message>(1);
    let shared = Shared {
        origin: Instant::now(),
        activity: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        peak: AtomicU64::new(0),
        paused_ns: AtomicU64::new(0),
        first_close: Mutex::new(None),
        closing: AtomicBool::new(false),
        client_closed: AtomicBool::new(false),
    };
    let mut c2u = DirStats::new();
    let mut u2c = DirStats::new();
    let c_pings = Mutex::new(Pings::default());
    let u_pings = Mutex::new(Pings::default());
    let idle = Duration::from_secs(u64::from(settings.idle_timeout));
    let ping_every = (settings.ping_interval > 0)
        .then(|| Duration::from_secs(u64::from(settings.ping_interval)));
    // The outcome is assembled after the loop: kept out of the state held across awaits.
    let mut error_class: Option<&'static str> = None;
    let (mut dead_peer, mut idle_timeout_fired) = (false, false);

    let mut proxy_close: Option<(u16, &'static str, u16, &'static str)> = None;
    {
        let mut r_client = std::pin::pin!(reader(
            Leg::Client,
            c_stream,
            u_tx.clone(),
            &mut c2u,
            &c_pings,
            &shared
        ));
        let mut r_upstream = std::pin::pin!(reader(
            Leg::Upstream,
            u_stream,
            c_tx.clone(),
            &mut u2c,
            &u_pings,
            &shared
        ));
        let mut w_client = std::pin::pin!(writer(c_sink, c_rx, limits.stall_timeout, &shared));
        let mut w_upstream = std::pin::pin!(writer(u_sink, u_rx, limits.stall_timeout, &shared));
        let mut p_client =
            std::pin::pin!(maybe(ping_every.map(|d| pinger(d, c_tx.clone(), &c_pings))));
        let mut p_upstream =
            std::pin::pin!(maybe(ping_every.map(|d| pinger(d, u_tx.clone(), &u_pings))));
        let (mut rc_done, mut ru_done, mut wc_done, mut wu_done) = (false, false, false, false);
        let mut grace: Option<Instant> = None;
        // Close frames the proxy still has to hand to a leg's writer.
        let mut to_client: Option<Message> = None;
        let mut to_upstream: Option<Message> = None;
        let mut deferred_client: Option<Message> = None;
        let mut draining = false;
        loop {
            let grace_sleep = async {
                match grace {
                    Some(g) => tokio::time::sleep_until(g).await,
                    None => std::future::pending().await,
                }
            };
            // What the proxy decides to do: (code to client, reason, code to upstream, reason).
            let mut decide: Option<(u16, &'static str, u16, &'static str)> = None;
            // A client that broke the protocol is answered only after the upstream has closed,
            // so that every message the upstream sent before reaches the client first.
            let mut defer_client = false;
            tokio::select! {
                e = &mut r_client, if !rc_done => {
                    rc_done = true;
                    if let Some(f) = e.failure() {
                        let v = verdict(true, f);
                        decide = Some(v.apply(&mut error_class, |by, c, r| shared.record_close(by, c, r)));
                        defer_client = v.defer_client;
                    }
                }
                e = &mut r_upstream, if !ru_done => {
                    ru_done = true;
                    if let Some(m) = deferred_client.take() {
                        to_client.get_or_insert(m);
                    }
                    if let Some(f) = e.failure() {
                        let v = verdict(false, f);
                        decide = Some(v.apply(&mut error_class, |by, c, r| shared.record_close(by, c, r)));
                    }
                }
                r = &mut w_client, if !wc_done => {
                    wc_done = true;
                    if let Err(why) = r {
                        let v = verdict(true, Failure::Write(why));
                        decide = Some(v.apply(&mut error_class, |by, c, r| shared.record_close(by, c, r)));
                    }
                }
                r = &mut w_upstream, if !wu_done => {
                    wu_done = true;
                    if let Err(why) = r {
                        let v = verdict(false, Failure::Write(why));
                        decide = Some(v.apply(&mut error_class, |by, c, r| shared.record_close(by, c, r)));
                    }
                }
                () = &mut p_client => {
                    dead_peer = true;
                    error_class.get_or_insert("client_dead");
                    shared.record_close(ClosedBy::Proxy, 1001, "client not responding");
                    decide = Some((1001, "ping timeout", 1001, "client not responding"));
                    p_client.set(maybe(None));
                }
                () = &mut p_upstream => {
                    dead_peer = true;
                    error_class.get_or_insert("upstream_dead");
                    shared.record_close(ClosedBy::Proxy, 1011, "upstream not responding");
                    decide = Some((1011, "upstream not responding", 1001, "ping timeout"));
                    p_upstream.set(maybe(None));
                }
                () = idle_expired(&shared, idle), if proxy_close.is_none() && !shared.closing.load(Ordering::Relaxed) => {
                    idle_timeout_fired = true;
                    let (c, r) = CloseRequest::Idle.code_reason();
                    shared.record_close(ClosedBy::Proxy, c, r);
                    decide = Some((c, r, c, r));
                }
                r = async { shutdown.wait_for(|v| *v).await.is_ok() }, if !draining => {
                    draining = true;
                    if r {
                        tokio::time::sleep(drain_delay).await;
                        if !shared.closing.load(Ordering::Relaxed) {
                            let (c, r) = CloseRequest::Shutdown.code_reason();
                            shared.record_close(ClosedBy::Proxy, c, r);
                            decide = Some((c, r, c, r));
                        }
                    }
                }
                p = c_tx.reserve(), if to_client.is_some() && !wc_done => {
                    if let (Ok(p), Some(m)) = (p, to_client.take()) {
                        p.send(m);
                    }
                }
                p = u_tx.reserve(), if to_upstream.is_some() && !wu_done => {
                    if let (Ok(p), Some(m)) = (p, to_upstream.take()) {
                        p.send(m);
                    }
                }
                () = grace_sleep => break,
            }
            if let Some(d) = decide
                && proxy_close.is_none()
            {
                proxy_close = Some(d);
                shared.closing.store(true, Ordering::Relaxed);
                if d.0 != 0 {
                    if defer_client && !ru_done {
                        deferred_client = Some(close_msg(d.0, d.1));
                    } else {
                        to_client = Some(close_msg(d.0, d.1));
                    }
                }
                if d.2 != 0 {
                    to_upstream = Some(close_msg(d.2, d.3));
                }
            }
            if shared.closing.load(Ordering::Relaxed) && grace.is_none() {
                grace = Some(Instant::now() + limits.close_grace);
            }
            if rc_done && ru_done && to_client.is_none() && to_upstream.is_none() {
                break;
            }
        }
        // A client that answered the idle close with neither a close frame nor the end of its
        // stream within the grace had gone silent: the idle timeout found a dead peer.
        if idle_timeout_fired && !rc_done && !shared.client_closed.load(Ordering::Relaxed) {
            dead_peer = true;
            error_class.get_or_insert("client_dead");
        }
        // Let the writers deliver what is queued (close frames above all), then stop them.
        p_client.set(maybe(None));
        p_upstream.set(maybe(None));
        drop(c_tx);
        drop(u_tx);
        let flush = async {
            if !wc_done {
                let _ = (&mut w_client).await;
            }
            if !wu_done {
                let _ = (&mut w_upstream).await;
            }
        };
        let _ = tokio::time::timeout(limits.close_grace, flush).await;
    }
    let end = Instant::now().into_std();
    let mut out = Outcome {
        error_class,
        dead_peer,
        idle_timeout_fired,
        ..Outcome::default()
    };
    if let Some((by, code, reason)) = shared.first_close.lock().expect("close lock").take() {
        out.closed_by = Some(by);
        out.close_code = Some(code);
        out.close_reason = (!reason.is_empty()).then_some(reason);
    } else {
        out.closed_by = Some(ClosedBy::Proxy);
    }
    out.c2u = c2u.finish(end, shared.origin.into_std());
    out.u2c = u2c.finish(end, shared.origin.into_std());
    out.ping_client = c_pings.lock().expect("pings").stats();
    out.ping_upstream = u_pings.lock().expect("pings").stats();
    out.paused = Duration::from_nanos(shared.paused_ns.load(Ordering::Relaxed));
    out.peak_buffered = shared.peak.load(Ordering::Relaxed);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tuning::Mode;

    fn limits() -> ForwardLimits {
        ForwardLimits {
            stall_timeout: Duration::from_secs(30),
            max_message_bytes: 1 << 20,
            close_grace: Duration::from_secs(2),
        }
    }

    fn settings(ping: u32, idle: u32) -> Settings {
        Settings {
            ping_interval: ping,
            idle_timeout: idle,
            mode: Mode::FrameAware,
            ..Settings::default()
        }
    }

    /// An upstream peer that answers pings and reports the close it got.
    fn upstream_peer(
        io: tokio::io::DuplexStream,
    ) -> tokio::task::JoinHandle<Option<(u16, String)>> {
        super::super::tests::ws_peer(io, Role::Server)
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_answering_pings_is_declared_dead_after_three() {
        let (client_proxy, client_peer) = tokio::io::duplex(1 << 16);
        let (up_proxy, up_peer) = tokio::io::duplex(1 << 16);
        let up = upstream_peer(up_peer);
        let (_tx, rx) = watch::channel(false);
        let t0 = Instant::now();
        // The client never reads: its pings go unanswered.
        let out = run(
            client_proxy,
            vec![],
            up_proxy,
            vec![],
            settings(15, 900),
            limits(),
            rx,
            Duration::ZERO,
        )
        .await;
        drop(client_peer);
        assert!(out.dead_peer);
        assert_eq!(out.error_class, Some("client_dead"));
        assert_eq!(out.ping_client.missed, 3);
        assert!(out.ping_upstream.answered >= 3, "{:?}", out.ping_upstream);
        assert!(out.ping_upstream.rtt_max_us.is_some());
        // Dead after 3 missed pongs: the first ping at 15 s, declared at 60 s.
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_secs(60) && took < Duration::from_secs(66),
            "{took:?}"
        );
        assert_eq!(
            up.await.unwrap(),
            Some((1001, "client not responding".to_string()))
        );
    }

    /// The idle timeout closes both legs with 1001 "idle timeout". A client that answers the
    /// close is alive; one that answers nothing within the grace (no close frame, no end of
    /// stream) had gone silent: a dead peer, which pings would have found sooner.
    #[tokio::test(start_paused = true)]
    async fn idle_timeout_closes_both_legs_with_1001_and_finds_a_silent_client_dead() {
        for answers in [true, false] {
            let (client_proxy, client_peer) = tokio::io::duplex(1 << 16);
            let (up_proxy, up_peer) = tokio::io::duplex(1 << 16);
            let up = upstream_peer(up_peer);
            let (client, _silent) = if answers {
                (Some(upstream_peer_client(client_peer)), None)
            } else {
                (None, Some(client_peer))
            };
            let (_tx, rx) = watch::channel(false);
            let t0 = Instant::now();
            let out = run(
                client_proxy,
                vec![],
                up_proxy,
                vec![],
                settings(0, 30),
                limits(),
                rx,
                Duration::ZERO,
            )
            .await;
            assert!(out.idle_timeout_fired);
            assert!(t0.elapsed() >= Duration::from_secs(30));
            assert_eq!(out.close_code, Some(1001));
            assert_eq!(out.dead_peer, !answers, "{out:?}");
            assert_eq!(out.error_class, (!answers).then_some("client_dead"));
            assert_eq!(up.await.unwrap(), Some((1001, "idle timeout".to_string())));
            if let Some(client) = client {
                assert_eq!(
                    client.await.unwrap(),
                    Some((1001, "idle timeout".to_string()))
                );
            }
        }
    }

    fn upstream_peer_client(
        io: tokio::io::DuplexStream,
    ) -> tokio::task::JoinHandle<Option<(u16, String)>> {
        super::super::tests::ws_peer(io, Role::Client)
    }

    #[tokio::test]
    async fn an_oversized_message_is_refused_with_1009() {
        let (client_proxy, client_peer) = tokio::io::duplex(1 << 20);
        let (up_proxy, up_peer) = tokio::io::duplex(1 << 20);
        let up = upstream_peer(up_peer);
        let (_tx, rx) = watch::channel(false);
        let mut l = limits();
        l.max_message_bytes = 1000;
        let client = tokio::spawn(async move {
            let mut ws = WebSocketStream::from_raw_socket(client_peer, Role::Client, None).await;
            ws.send(Message::binary(vec![0u8; 5000])).await.unwrap();
            let mut close = None;
            while let Some(Ok(m)) = ws.next().await {
                if let Message::Close(Some(f)) = m {
                    close = Some(u16::from(f.code));
                }
            }
            close
        });
        let out = run(
            client_proxy,
            vec![],
            up_proxy,
            vec![],
            settings(0, 900),
            l,
            rx,
            Duration::ZERO,
        )
        .await;
        assert_eq!(out.error_class, Some("client_message_too_big"));
        assert_eq!(client.await.unwrap(), Some(1009));
        assert_eq!(up.await.unwrap().map(|c| c.0), Some(1001));
    }
}
