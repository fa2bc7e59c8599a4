//! The workload generator: real WebSocket and tunnel traffic through a running data plane, in
//! archetypes whose best settings differ, each with its own decision-time signature (service,
//! route, user agent). Every run is bounded in connections and time and stays on the address it
//! is given (loopback in the demo and the tests).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// A client's stream: plain TCP, or TCP under permessage-deflate.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A kind of traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archetype {
    /// Small compressible JSON both ways, 1–2 s apart; one session in three idles long once
    /// (browsers).
    Chat,
    /// The server pushes many small messages a second (server-side consumers).
    Feed,
    /// Large binary messages (server-side tools).
    Bulk,
    /// Tiny messages every 20–60 s (at the benchmark's 6 s sessions); one device in five
    /// vanishes without closing: no close frame, no FIN, nothing answered (devices).
    Iot,
    /// Medium compressible JSON at a steady rate (browsers).
    Dashboard,
    /// A generic-upgrade tunnel with bursts of keystrokes (kubectl-style).
    Terminal,
}

impl Archetype {
    /// Every archetype.
    pub const ALL: [Archetype; 6] = [
        Archetype::Chat,
        Archetype::Feed,
        Archetype::Bulk,
        Archetype::Iot,
        Archetype::Dashboard,
        Archetype::Terminal,
    ];

    /// Whether its clients offer permessage-deflate: browsers and Python's `websockets` do;
    /// the Go tool, the devices and the tunnel do not.
    pub fn offers_deflate(self) -> bool {
        matches!(
            self,
            Archetype::Chat | Archetype::Dashboard | Archetype::Feed
        )
    }

    /// Its path prefix (the demo config routes each to its own service).
    pub fn route(self) -> &'static str {
        match self {
            Archetype::Chat => "/chat",
            Archetype::Feed => "/feed",
            Archetype::Bulk => "/bulk",
            Archetype::Iot => "/iot",
            Archetype::Dashboard => "/dashboard",
            Archetype::Terminal => "/terminal",
        }
    }

    /// Its user agent (the client class in profiles).
    pub fn user_agent(self) -> &'static str {
        match self {
            Archetype::Chat | Archetype::Dashboard => {
                "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0"
            }
            Archetype::Feed => "python-websockets/12.0",
            Archetype::Bulk => "go-http-client/1.1",
            Archetype::Iot => "esp32-telemetry/1.2",
            Archetype::Terminal => "kubectl/v1.30",
        }
    }

    /// How long one of its sessions lasts, given the workload's session length and the
    /// session's seed (a chat session may idle long; see [`Archetype::long_idle`]).
    pub fn life(self, session: Duration, seed: u64) -> Duration {
        session.mul_f64(match self {
            Archetype::Bulk => 0.5,
            Archetype::Iot => 10.0,
            _ => 1.0,
        }) + self.long_idle(session, seed).unwrap_or_default()
    }

    /// The long idle gap of a session, if it has one: one chat session in three goes quiet
    /// after its first exchange for 6 to 8 session lengths (a user who left the tab open: 36–48 s
    /// at the benchmark's 6 s sessions, past a 30 s idle timeout and inside a 60 s one). Drawn
    /// from the session's seed alone, so both sessions of a pair idle alike.
    pub fn long_idle(self, session: Duration, seed: u64) -> Option<Duration> {
        if self != Archetype::Chat {
            return None;
        }
        let mut s = (seed ^ 0x6c6f_6e67_6964_6c65).max(1);
        let draw = rng(&mut s);
        draw.is_multiple_of(3)
            .then(|| session.mul_f64(6.0 + (draw >> 8) as f64 / (u64::MAX >> 8) as f64 * 2.0))
    }

    /// An IoT device's reporting interval: 10/3 to 10 session lengths (20–60 s at the
    /// benchmark's 6 s sessions), drawn from the session's seed alone.
    pub fn report_every(session: Duration, seed: u64) -> Duration {
        let mut s = (seed ^ 0x7265_706f_7274_0001).max(1);
        let u = (rng(&mut s) >> 11) as f64 / (1u64 << 53) as f64;
        session.mul_f64(10.0 / 3.0 + u * 20.0 / 3.0)
    }

    /// When an IoT device vanishes, if it does: one in five, 2 to 7 session lengths into its
    /// life (12–42 s at the benchmark's 6 s sessions, with readings every 20–60 s: after its
    /// first reading or two), drawn from the session's seed alone, so both sessions of a pair
    /// vanish alike. Early enough in a device's life that, within a bounded run, the proxy's
    /// pings or idle timeout can find it before the run ends.
    pub fn vanishes_after(self, session: Duration, seed: u64) -> Option<Duration> {
        if self != Archetype::Iot {
            return None;
        }
        let mut s = (seed ^ 0x7661_6e69_7368_0001).max(1);
        let draw = rng(&mut s);
        draw.is_multiple_of(5)
            .then(|| session.mul_f64(2.0 + (draw >> 11) as f64 / (1u64 << 53) as f64 * 5.0))
    }

    /// Parse a name.
    pub fn parse(s: &str) -> Option<Archetype> {
        Archetype::ALL
            .into_iter()
            .find(|a| a.route().trim_start_matches('/') == s)
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Workload {
    /// The data plane's proxy address.
    pub proxy: SocketAddr,
    /// Connections open at once.
    pub concurrency: usize,
    /// Connections in all (the run stops at this many or at `duration`).
    pub total: usize,
    /// Longest the run may take.
    pub duration: Duration,
    /// How long one connection lives (scaled per archetype).
    pub session: Duration,
    /// The archetypes, picked round robin with the seed.
    pub mix: Vec<Archetype>,
    /// Seed of every random choice.
    pub seed: u64,
    /// Run every session twice at once, as a client in a rollout's control and as one in its
    /// canary, with the same traffic (see [`Paired`]); `None` runs each session once, as one
    /// of 64 sticky clients per archetype.
    pub paired: Option<Paired>,
}

/// A rollout's cohort split, known to the workload so that it can run each session as a pair
/// of connections side by side: one from a client the split puts in the control, one from a
/// client it puts in the canary, both with the same random draws (archetype, gaps, bursts,
/// whether the device vanishes). A comparison of the two cohorts over such pairs measures what
/// the settings change, not what the traffic happened to be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Paired {
    /// The rollout's cohort salt.
    pub salt: u64,
    /// Its canary percentage (strictly between 0 and 100).
    pub percent: f64,
}

impl Paired {
    /// The client keys of session `n` of archetype service `service`: `[control, canary]`,
    /// each `"{service}-{n}-{j}"` with the first `j` that lands in that cohort; `None` when
    /// the split puts (nearly) everyone on one side.
    pub fn keys(self, service: &str, n: usize) -> Option<[String; 2]> {
        let mut found: [Option<String>; 2] = [None, None];
        for j in 0..1000 {
            let key = format!("{service}-{n}-{j}");
            let side = usize::from(tuning::cohort::in_canary(
                self.salt,
                service,
                &key,
                self.percent,
            ));
            if found[side].is_none() {
                found[side] = Some(key);
            }
            if let [Some(a), Some(b)] = &found {
                return Some([a.clone(), b.clone()]);
            }
        }
        None
    }
}

/// The pair a client key of a paired run belongs to (`"{service}-{n}"`).
pub fn pair_of(client_key: &str) -> Option<&str> {
    client_key.rsplit_once('-').map(|(pair, _)| pair)
}

/// Counters of a run.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections completed.
    pub connections: AtomicU64,
    /// Connections that failed.
    pub failures: AtomicU64,
    /// Messages sent by clients.
    pub sent: AtomicU64,
    /// Messages received by clients.
    pub received: AtomicU64,
    /// Why the first few failed connections failed (archetype: error).
    pub errors: std::sync::Mutex<Vec<String>>,
    /// Message latencies the clients measured, per client key (see [`Latencies`]).
    pub latency: Latencies,
}

/// Message latencies the clients measured, in µs, per client key: for the archetypes whose
/// server pushes (feed, dashboard), each push's time from the upstream's send (the time it
/// carries in `"at"`, µs since the epoch on the same machine) to its arrival; for the others,
/// each message's round trip from the client's send to its echo (a terminal's keystroke to its
/// echoed byte).
#[derive(Default)]
pub struct Latencies(std::sync::Mutex<std::collections::HashMap<String, Vec<u64>>>);

impl Latencies {
    fn add(&self, client: &str, mut v: Vec<u64>) {
        let mut m = self.0.lock().expect("latencies");
        m.entry(client.to_string()).or_default().append(&mut v);
    }

    /// Every client's samples, taken out.
    pub fn take(&self) -> std::collections::HashMap<String, Vec<u64>> {
        std::mem::take(&mut *self.0.lock().expect("latencies"))
    }
}

impl std::fmt::Debug for Latencies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0.lock().expect("latencies");
        let samples: usize = m.values().map(Vec::len).sum();
        write!(
            f,
            "Latencies {{ clients: {}, samples: {samples} }}",
            m.len()
        )
    }
}

/// Microseconds since the Unix epoch (what an upstream's push carries in `"at"`).
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The send time a pushed message carries (`"at":<µs since the epoch>`), if it carries one.
pub fn pushed_at(text: &str) -> Option<u64> {
    let rest = &text[text.find("\"at\":")? + 5..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

impl Stats {
    fn failed(&self, a: Archetype, why: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut e = self.errors.lock().expect("errors");
        if e.len() < 8 {
            e.push(format!("{a:?}: {why}"));
        }
    }
}

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// Run the workload; returns the counters when every connection has ended.
pub async fn run(w: Workload) -> Arc<Stats> {
    let stats = Arc::new(Stats::default());
    let deadline = Instant::now() + w.duration;
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    // A pair is two connections open at once.
    let per_worker = if w.paired.is_some() { 2 } else { 1 };
    for worker in 0..(w.concurrency / per_worker).max(1) {
        let w = w.clone();
        let stats = stats.clone();
        let next = next.clone();
        workers.push(tokio::spawn(async move {
            let mut seed =
                (w.seed ^ (worker as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)).max(1);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i * per_worker >= w.total || Instant::now() >= deadline || w.mix.is_empty() {
                    return;
                }
                let a = w.mix[(rng(&mut seed) as usize) % w.mix.len()];
                let session_seed = rng(&mut seed).max(1);
                // Start only sessions that can end on their own before the deadline: a session
                // cut at the deadline would end abnormally and skew what the profiles say.
                let life = a.life(w.session, session_seed);
                let fits =
                    |life: Duration| Instant::now() + life + Duration::from_secs(3) <= deadline;
                if !fits(life) {
                    // a long session (an IoT device's, a chat with a long idle) may not fit
                    // where an ordinary one still does: draw again
                    if fits(w.session) {
                        continue;
                    }
                    return;
                }
                let service = a.route().trim_start_matches('/');
                let left = deadline.saturating_duration_since(Instant::now());
                let one = |client: String| {
                    let (w, stats) = (&w, &stats);
                    async move {
                        let mut seed = session_seed;
                        let mut latency = Vec::new();
                        let r = tokio::time::timeout(
                            left + Duration::from_secs(2),
                            session(w, a, &client, &mut seed, stats, deadline, &mut latency),
                        )
                        .await;
                        stats.latency.add(&client, latency);
                        match r {
                            Ok(Ok(())) => {
                                stats.connections.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(Err(e)) => stats.failed(a, format!("{e:#}")),
                            Err(_) => stats.failed(a, "did not end by the deadline".into()),
                        }
                    }
                };
                match w.paired {
                    None => one(format!("{service}-{}", rng(&mut seed) % 64)).await,
                    Some(p) => match p.keys(service, i) {
                        Some([control, canary]) => {
                            tokio::join!(one(control), one(canary));
                        }
                        None => {
                            stats.failures.fetch_add(2, Ordering::Relaxed);
                            return;
                        }
                    },
                }
            }
        }));
    }
    for t in workers {
        let _ = t.await;
    }
    stats
}

async fn session(
    w: &Workload,
    a: Archetype,
    client: &str,
    seed: &mut u64,
    stats: &Stats,
    deadline: Instant,
    latency: &mut Vec<u64>,
) -> anyhow::Result<()> {
    if a == Archetype::Terminal {
        return terminal(w, client, seed, stats, latency).await;
    }
    let pushed = matches!(a, Archetype::Feed | Archetype::Dashboard);
    let query = match a {
        Archetype::Feed => "?push=50&size=120",
        Archetype::Dashboard => "?push=2&size=3000",
        _ => "",
    };
    let mut long_idle = a.long_idle(w.session, *seed);
    let start = Instant::now();
    let vanish_at = a.vanishes_after(w.session, *seed).map(|d| start + d);
    let end = vanish_at.unwrap_or(start + a.life(w.session, *seed));
    let (mut ws, socket) =
        ws_handshake(w.proxy, &format!("{}/stream{query}", a.route()), a, client).await?;
    let report_every = Archetype::report_every(w.session, *seed);
    let (msg, gap): (Vec<u8>, Duration) = match a {
        Archetype::Chat => (
            br#"{"type":"message","room":"general","text":"hello everyone, how is it going?"}"#
                .to_vec(),
            Duration::from_millis(800 + rng(seed) % 1500),
        ),
        Archetype::Bulk => (vec![0xab; 256 << 10], Duration::from_millis(50)),
        Archetype::Iot => (br#"{"t":21.5,"h":40}"#.to_vec(), report_every),
        _ => (br#"{"ack":1}"#.to_vec(), Duration::from_millis(1000)),
    };
    while Instant::now() < end {
        if a == Archetype::Bulk {
            ws.send(Message::binary(msg.clone())).await?;
        } else {
            ws.send(Message::text(String::from_utf8_lossy(&msg).to_string()))
                .await?;
        }
        stats.sent.fetch_add(1, Ordering::Relaxed);
        let (sent_at, mut echoed) = (Instant::now(), false);
        // read what arrives until the next send (after the first exchange, a long idle gap
        // if the session has one), or until the session's end: a session ends within its life
        // (a device's 20–60 s interval would otherwise carry it past the end its run planned)
        let until = (Instant::now() + long_idle.take().map_or(gap, |idle| gap + idle)).min(end);
        while let Ok(m) = tokio::time::timeout_at(until.into(), ws.next()).await {
            match m {
                Some(Ok(Message::Close(_))) | None => return Ok(()),
                Some(Ok(m)) => {
                    stats.received.fetch_add(1, Ordering::Relaxed);
                    if pushed {
                        if let Some(at) = m.to_text().ok().and_then(pushed_at) {
                            latency.push(unix_us().saturating_sub(at));
                        }
                    } else if !echoed {
                        // (nothing but echoes comes back to these: the first is this send's)
                        echoed = true;
                        latency.push(sent_at.elapsed().as_micros() as u64);
                    }
                }
                Some(Err(e)) => return Err(e.into()),
            }
        }
    }
    if vanish_at.is_some() {
        return vanish(ws, socket, deadline).await;
    }
    ws.close(None).await?;
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(2), ws.next()).await {}
    Ok(())
}

/// A device that vanishes: it stops sending and answering (no close frame, no pong),
/// and its socket stays open, so no FIN tells the proxy either, as when a device loses power
/// or its network. Only the proxy's pings or its idle timeout can find it. `socket` is a
/// duplicate of the connection's socket: closing the WebSocket's own descriptor then sends
/// nothing. What the proxy sends is read from the duplicate and thrown away, never
/// answered (its pings get no pong; reading keeps the receive window open, where a powered-off
/// device's would stop acknowledging). When the proxy closes, the device does not answer that
/// either: the socket is held [`VANISHED_HOLD`] longer, past the proxy's close grace, before it
/// is dropped (a FIN the proxy no longer waits for); at the run's deadline it is dropped in any
/// case (the run is bounded).
async fn vanish(
    ws: WebSocketStream<Box<dyn Io>>,
    socket: std::os::fd::OwnedFd,
    deadline: Instant,
) -> anyhow::Result<()> {
    drop(ws);
    let std = std::net::TcpStream::from(socket);
    std.set_nonblocking(true)?;
    let mut s = TcpStream::from_std(std)?;
    let mut sink = vec![0u8; 4096];
    let _ = tokio::time::timeout_at(deadline.into(), async {
        while let Ok(n) = s.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
        // A gone device sends no FIN back: the proxy's close must go unanswered.
        tokio::time::sleep(VANISHED_HOLD).await;
    })
    .await;
    Ok(())
}

/// How long a vanished device holds its socket after the proxy closed it: longer than the
/// data plane's close grace (`limits.drain_timeout`, at most 5 s), so that the close goes
/// unanswered, as it would to a device that lost power. Dropping it at once sent a FIN
/// within the grace, and the data plane took the device for a live one that answered its idle
/// close.
pub const VANISHED_HOLD: Duration = Duration::from_secs(7);

/// The WebSocket handshake as the archetype's client makes it (offering permessage-deflate
/// when it does, and speaking it when the proxy agrees); with a duplicate of the socket's
/// descriptor (for [`vanish`]).
async fn ws_handshake(
    proxy: SocketAddr,
    path: &str,
    a: Archetype,
    client: &str,
) -> anyhow::Result<(WebSocketStream<Box<dyn Io>>, std::os::fd::OwnedFd)> {
    let mut tcp = TcpStream::connect(proxy).await?;
    let socket = std::os::fd::AsFd::as_fd(&tcp).try_clone_to_owned()?;
    let key = generate_key();
    let mut head = format!(
        "GET {path} HTTP/1.1\r\nHost: {proxy}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nUser-Agent: {}\r\nX-Client-Id: {client}\r\n",
        a.user_agent()
    );
    if a.offers_deflate() {
        head.push_str("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n");
    }
    head.push_str("\r\n");
    tcp.write_all(head.as_bytes()).await?;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    let end = loop {
        if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        anyhow::ensure!(got.len() < 16 << 10, "response head too large");
        let n = tcp.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "closed during the handshake");
        got.extend_from_slice(&buf[..n]);
    };
    let text = String::from_utf8_lossy(&got[..end]).into_owned();
    anyhow::ensure!(text.starts_with("HTTP/1.1 101"), "no 101: {text}");
    let header = |name: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    anyhow::ensure!(
        header("sec-websocket-accept").as_deref()
            == Some(derive_accept_key(key.as_bytes()).as_str()),
        "wrong Sec-WebSocket-Accept"
    );
    let rest = got[end..].to_vec();
    let io: Box<dyn Io> = match header("sec-websocket-extensions") {
        Some(answer) => {
            anyhow::ensure!(a.offers_deflate(), "an extension nobody offered: {answer}");
            let params = dataplane::deflate::accepted(&answer)
                .ok_or_else(|| anyhow::anyhow!("unusable extension answer {answer:?}"))?;
            Box::new(
                dataplane::deflate::DeflateStream::client(tcp, params, 64 << 20, 6)
                    .with_prefix(&rest),
            )
        }
        None => Box::new(dataplane::prefixed::Prefixed::new(rest, tcp)),
    };
    Ok((
        WebSocketStream::from_raw_socket(io, Role::Client, None).await,
        socket,
    ))
}

async fn terminal(
    w: &Workload,
    client: &str,
    seed: &mut u64,
    stats: &Stats,
    latency: &mut Vec<u64>,
) -> anyhow::Result<()> {
    let mut s = TcpStream::connect(w.proxy).await?;
    let head = format!(
        "GET /terminal/exec HTTP/1.1\r\nHost: demo\r\nConnection: Upgrade\r\nUpgrade: x-echo\r\nUser-Agent: {}\r\nX-Client-Id: {client}\r\n\r\n",
        Archetype::Terminal.user_agent()
    );
    s.write_all(head.as_bytes()).await?;
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "closed during the upgrade");
        got.extend_from_slice(&buf[..n]);
    }
    anyhow::ensure!(got.starts_with(b"HTTP/1.1 101"), "no 101");
    let end = Instant::now() + w.session;
    while Instant::now() < end {
        // a burst of keystrokes, each echoed as a terminal echoes it, then a pause
        for _ in 0..(3 + rng(seed) % 10) {
            let t = Instant::now();
            s.write_all(b"k").await?;
            stats.sent.fetch_add(1, Ordering::Relaxed);
            if let Ok(Ok(1..)) =
                tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await
            {
                stats.received.fetch_add(1, Ordering::Relaxed);
                latency.push(t.elapsed().as_micros() as u64);
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        tokio::time::sleep(Duration::from_millis(500 + rng(seed) % 1000)).await;
    }
    s.shutdown().await?;
    Ok(())
}
