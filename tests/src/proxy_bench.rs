//! Benchmark 1: proxy performance. The same load client against the echo upstream directly,
//! through trimtab in both modes, and through nginx and HAProxy (from the OS packages, when
//! installed), all in one run, every figure a median over runs.
//!
//! The upstream runs in its own process (`trimtab-bench echo-server`), so the client, the
//! upstream and each proxy have their own file table (a process here may open 20,000 files)
//! and the proxy's memory and CPU are read from its own process tree.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{DataPlaneProc, scratch_dir};
use crate::load::{latency, median, within, ws_round_trips, ws_throughput};

/// What one run measures.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Idle WebSockets held open for the memory figure.
    pub idle_conns: usize,
    /// Round trips on the single connection.
    pub rtt_single: usize,
    /// Round trips per connection on the 100-connection test.
    pub rtt_per_conn: usize,
    /// 16 KiB messages per throughput connection (8 connections).
    pub throughput_msgs: usize,
    /// How long the 100 active connections run for the CPU figure.
    pub cpu_seconds: u64,
    /// HTTP requests on one connection (latency) and per connection of 50 (rate).
    pub http_requests: usize,
    /// Which figures to measure (all by default).
    pub figures: &'static [Figure],
    /// The echo upstream's process, whose own CPU is the baseline of the CPU figure.
    pub upstream_pid: Option<u32>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            idle_conns: 9000,
            rtt_single: 2000,
            rtt_per_conn: 1000,
            throughput_msgs: 10_000,
            cpu_seconds: 5,
            http_requests: 3000,
            upstream_pid: None,
            figures: Figure::ALL,
        }
    }
}

/// A group of figures, measurable on its own (`--figures`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Figure {
    /// Memory per idle WebSocket.
    Memory,
    /// WebSocket round trips, 1 and 100 connections.
    Rtt,
    /// WebSocket throughput, 16 KiB messages.
    Throughput,
    /// HTTP GET latency and rate.
    Http,
    /// CPU per 100 active WebSockets, beside the upstream's own.
    Cpu,
}

impl Figure {
    /// Every figure, in the order they are measured.
    pub const ALL: &'static [Figure] = &[
        Figure::Memory,
        Figure::Rtt,
        Figure::Throughput,
        Figure::Http,
        Figure::Cpu,
    ];
}

/// One target's figures from one run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Figures {
    /// WebSocket round trip p50, 64 B, one connection, µs.
    pub rtt1_p50: f64,
    /// WebSocket round trip p50, 64 B, 100 connections, µs.
    pub rtt100_p50: f64,
    /// WebSocket round trip p99, 64 B, 100 connections, µs.
    pub rtt100_p99: f64,
    /// Echo throughput of 16 KiB messages, 8 connections, MiB/s one way.
    pub throughput: f64,
    /// Resident memory growth per idle WebSocket, KiB (None for direct: no proxy process).
    pub idle_kib: Option<f64>,
    /// The same, counted only over the last two thirds of the connections: RSS growth from
    /// N/3 to N connections over 2N/3. Without the fixed part (memory the opening burst touched
    /// and the allocator kept), this is what one more idle connection costs.
    pub idle_marginal_kib: Option<f64>,
    /// CPU per 100 active connections (each 100 msgs/s of 64 B), % of one core.
    pub cpu_pct: Option<f64>,
    /// The echo upstream's own CPU over the same window, % of one core.
    pub upstream_cpu_pct: Option<f64>,
    /// HTTP GET p50 on one keep-alive connection, µs.
    pub http_p50: f64,
    /// HTTP GET rate on 50 keep-alive connections, requests/s.
    pub http_rate: f64,
}

/// A process that is killed (its whole group) when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    _dir: Option<PathBuf>,
}

impl Proc {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the group this process leads; no memory is touched.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What keeps a target's process alive.
#[derive(Debug)]
enum Keep {
    DataPlane(#[allow(dead_code)] DataPlaneProc),
    Proc(#[allow(dead_code)] Proc),
}

/// A proxy (or the upstream itself) to measure.
#[derive(Debug)]
pub struct Target {
    /// Name in the table.
    pub name: String,
    /// Where the client connects.
    pub addr: SocketAddr,
    /// The process tree to read memory and CPU from.
    pub pid: Option<u32>,
    /// Keeps the process alive.
    _keep: Option<Keep>,
}

fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn spawn_grouped(mut cmd: Command) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt as _;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
}

async fn wait_listening(addr: SocketAddr, what: &str) -> anyhow::Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("{what} did not listen on {addr} within 10 s")
}

/// The echo upstream in its own process: this executable's `echo-server` subcommand.
pub async fn spawn_upstream() -> anyhow::Result<(SocketAddr, Proc)> {
    let port = free_port()?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("echo-server").arg("--port").arg(port.to_string());
    let child = spawn_grouped(cmd)?;
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let p = Proc { child, _dir: None };
    wait_listening(addr, "the echo upstream").await?;
    Ok((addr, p))
}

/// trimtab in one mode, profiles and optimizer off (the proxy alone; the profile path has its
/// own benchmark), warnings only in its log.
pub fn trimtab(upstream: SocketAddr, mode: &str) -> Target {
    let config = format!(
        r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
dataplane_id = "bench-{mode}"
[limits]
max_connections = 19000
[defaults]
mode = "{mode}"
buffer_size = "16KiB"
idle_timeout = "15m"
ping_interval = "off"
compression = false
[services.bulk]
upstreams = ["{upstream}"]
routes = [{{ path_prefix = "/bulk" }}]
settings = {{ buffer_size = "256KiB" }}
[services.echo]
upstreams = ["{upstream}"]
routes = [{{ path_prefix = "/" }}]
"#
    );
    // SAFETY: set before the child is spawned; the bench's own threads do not read it.
    unsafe {
        std::env::set_var(
            "TRIMTAB_TEST_LOG",
            "warn,dataplane=info,dataplane::source=warn",
        )
    };
    let dp = DataPlaneProc::start(&config);
    Target {
        name: format!("trimtab {mode}"),
        addr: dp.proxy,
        pid: Some(dp.pid()),
        _keep: Some(Keep::DataPlane(dp)),
    }
}

fn which(bin: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(bin))
        .find(|p| p.exists())
}

/// nginx from the OS package, 2 workers, WebSocket upgrade as its documentation shows, access
/// log off, no limit on requests per keep-alive connection (its default closes one after 1,000,
/// fewer than the HTTP figures send). `Err` says why it is skipped.
pub async fn nginx(upstream: SocketAddr) -> Result<Target, String> {
    let bin = which("nginx").ok_or("nginx is not installed (apt-get install nginx-light)")?;
    let dir = scratch_dir("nginx");
    let port = free_port().map_err(|e| e.to_string())?;
    let d = dir.display();
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root;"
    } else {
        ""
    };
    let conf = format!(
        r#"{user}
worker_processes 2;
worker_rlimit_nofile 20000;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 19000; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  upstream echo {{ server {upstream}; keepalive 64; }}
  map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://echo;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
    }}
  }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.arg("-p").arg(&dir).arg("-c").arg(&path);
    let child = spawn_grouped(cmd).map_err(|e| format!("nginx: {e}"))?;
    let proc = Proc {
        child,
        _dir: Some(dir.clone()),
    };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_listening(addr, "nginx").await.map_err(|e| {
        format!(
            "{e}: {}",
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        )
    })?;
    Ok(Target {
        name: "nginx".into(),
        addr,
        pid: Some(proc.pid()),
        _keep: Some(Keep::Proc(proc)),
    })
}

/// HAProxy from the OS package, 2 threads, HTTP mode (WebSocket upgrades become tunnels).
pub async fn haproxy(upstream: SocketAddr) -> Result<Target, String> {
    let bin = which("haproxy").ok_or("HAProxy is not installed (apt-get install haproxy)")?;
    let dir = scratch_dir("haproxy");
    let port = free_port().map_err(|e| e.to_string())?;
    let conf = format!(
        r#"global
  maxconn 9700
  nbthread 2
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  server echo {upstream}
"#
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, conf).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(bin);
    cmd.arg("-db").arg("-f").arg(&path);
    let child = spawn_grouped(cmd).map_err(|e| format!("haproxy: {e}"))?;
    let proc = Proc {
        child,
        _dir: Some(dir),
    };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    wait_listening(addr, "haproxy")
        .await
        .map_err(|e| e.to_string())?;
    Ok(Target {
        name: "HAProxy".into(),
        addr,
        pid: Some(proc.pid()),
        _keep: Some(Keep::Proc(proc)),
    })
}

/// The upstream itself, as the baseline.
pub fn direct(upstream: SocketAddr) -> Target {
    Target {
        name: "direct".into(),
        addr: upstream,
        pid: None,
        _keep: None,
    }
}

/// A process and its descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let children =
                    std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
        i += 1;
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn tree_rss_kib(pid: u32) -> u64 {
    tree(pid).into_iter().map(crate::load::rss_kib).sum()
}

fn tree_cpu(pid: u32) -> Duration {
    tree(pid).into_iter().map(crate::load::cpu_time).sum()
}

async fn ws(addr: SocketAddr, path: &str) -> anyhow::Result<crate::load::Ws> {
    crate::load::connect(addr, path).await
}

/// Open `n` WebSockets (each echoes one message, so both legs exist), hold them, and return
/// the RSS growth of the process tree per connection, KiB, over all `n` and over the last two
/// thirds (the growth from `n / 3` connections to `n`).
async fn idle_memory(t: &Target, n: usize) -> anyhow::Result<Option<(f64, f64)>> {
    let Some(pid) = t.pid.filter(|_| n > 0) else {
        return Ok(None);
    };
    // Let the previous step's connections go away first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = tree_rss_kib(pid);
    let addr = t.addr;
    let mut held = Vec::with_capacity(n);
    let mut at_third = None;
    for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
        if at_third.is_none() && held.len() >= n / 3 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            at_third = Some((held.len(), tree_rss_kib(pid)));
        }
        let mut tasks = Vec::new();
        for _ in chunk {
            tasks.push(tokio::spawn(async move {
                let mut w = ws(addr, "/idle").await?;
                w.send(Message::binary(vec![1u8; 16])).await?;
                let _ = w.next().await.ok_or_else(|| anyhow::anyhow!("closed"))??;
                Ok::<_, anyhow::Error>(w)
            }));
        }
        for task in tasks {
            held.push(task.await??);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = tree_rss_kib(pid);
    let per = (after.saturating_sub(before)) as f64 / n as f64;
    let (k, third) = at_third.unwrap_or((0, before));
    let marginal = (after.saturating_sub(third)) as f64 / (n - k).max(1) as f64;
    // Close them all (and let the proxy free them before the next step).
    let closes = held.into_iter().map(|mut w| async move {
        let _ = w.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while w.next().await.is_some() {}
        })
        .await;
    });
    futures_util::future::join_all(closes).await;
    Ok(Some((per, marginal)))
}

/// 100 connections each sending a 64 B message every 10 ms and reading its echo, for
/// `seconds`; the proxy's and the upstream's CPU time over the wall time, % of one core.
async fn cpu_per_100(
    t: &Target,
    seconds: u64,
    upstream: Option<u32>,
) -> anyhow::Result<(Option<f64>, Option<f64>)> {
    let addr = t.addr;
    let mut conns = Vec::new();
    for _ in 0..100 {
        conns.push(ws(addr, "/active").await?);
    }
    let cpu0 = t.pid.map(tree_cpu);
    let up0 = upstream.map(tree_cpu);
    let t0 = Instant::now();
    let until = t0 + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for mut w in conns {
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            let msg = vec![7u8; 64];
            while Instant::now() < until {
                tick.tick().await;
                w.send(Message::binary(msg.clone())).await?;
                let _ = w.next().await.ok_or_else(|| anyhow::anyhow!("closed"))??;
            }
            w.close(None).await?;
            while w.next().await.is_some() {}
            Ok::<_, anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let wall = t0.elapsed().as_secs_f64();
    let pct = |pid: Option<u32>, before: Option<Duration>| {
        Some((tree_cpu(pid?) - before?).as_secs_f64() / wall * 100.0)
    };
    Ok((pct(t.pid, cpu0), pct(upstream, up0)))
}

async fn http_conn(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(send)
}

async fn http_get(
    send: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
) -> anyhow::Result<()> {
    send.ready().await?;
    let req = http::Request::get("/bench")
        .header(http::header::HOST, addr.to_string())
        .body(Empty::new())?;
    let resp = send.send_request(req).await?;
    anyhow::ensure!(resp.status().is_success(), "HTTP status {}", resp.status());
    resp.into_body().collect().await?;
    Ok(())
}

/// HTTP GET p50 on one keep-alive connection (µs) and the rate on 50 (requests/s).
async fn http(addr: SocketAddr, n: usize) -> anyhow::Result<(f64, f64)> {
    let mut one = http_conn(addr).await?;
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        http_get(&mut one, addr).await?;
        samples.push(t.elapsed());
    }
    let p50 = latency(samples).p50.as_secs_f64() * 1e6;
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        tasks.push(tokio::spawn(async move {
            let mut c = http_conn(addr).await?;
            for _ in 0..n / 5 {
                http_get(&mut c, addr).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let rate = (50 * (n / 5)) as f64 / t0.elapsed().as_secs_f64();
    Ok((p50, rate))
}

/// One run against one target.
pub async fn run_once(t: &Target, p: &Params) -> anyhow::Result<Figures> {
    let limit = Duration::from_secs(180);
    // Memory first, while the proxy process is fresh (a heap grown by earlier steps would
    // absorb the idle connections and hide their cost).
    let mut f = Figures::default();
    let on = |g| p.figures.contains(&g);
    if on(Figure::Memory)
        && let Some((per, marginal)) = within(limit, idle_memory(t, p.idle_conns)).await??
    {
        f.idle_kib = Some(per);
        f.idle_marginal_kib = Some(marginal);
    }
    if on(Figure::Rtt) {
        let l = latency(within(limit, ws_round_trips(t.addr, 1, p.rtt_single, 64)).await??);
        f.rtt1_p50 = l.p50.as_secs_f64() * 1e6;
        let l = latency(within(limit, ws_round_trips(t.addr, 100, p.rtt_per_conn, 64)).await??);
        f.rtt100_p50 = l.p50.as_secs_f64() * 1e6;
        f.rtt100_p99 = l.p99.as_secs_f64() * 1e6;
    }
    if on(Figure::Throughput) {
        f.throughput = within(
            limit,
            ws_throughput(t.addr, 8, p.throughput_msgs, 16 << 10, 8),
        )
        .await??
            / (1 << 20) as f64;
    }
    if on(Figure::Http) {
        (f.http_p50, f.http_rate) = within(limit, http(t.addr, p.http_requests)).await??;
    }
    if on(Figure::Cpu) {
        (f.cpu_pct, f.upstream_cpu_pct) =
            within(limit, cpu_per_100(t, p.cpu_seconds, p.upstream_pid)).await??;
    }
    Ok(f)
}

/// Medians over runs of each figure.
pub fn medians(runs: &[Figures]) -> Figures {
    let m = |g: &dyn Fn(&Figures) -> f64| median(runs.iter().map(g).collect());
    let mo = |g: &dyn Fn(&Figures) -> Option<f64>| {
        let v: Vec<f64> = runs.iter().filter_map(g).collect();
        (!v.is_empty()).then(|| median(v))
    };
    Figures {
        rtt1_p50: m(&|f| f.rtt1_p50),
        rtt100_p50: m(&|f| f.rtt100_p50),
        rtt100_p99: m(&|f| f.rtt100_p99),
        throughput: m(&|f| f.throughput),
        idle_kib: mo(&|f| f.idle_kib),
        idle_marginal_kib: mo(&|f| f.idle_marginal_kib),
        cpu_pct: mo(&|f| f.cpu_pct),
        upstream_cpu_pct: mo(&|f| f.upstream_cpu_pct),
        http_p50: m(&|f| f.http_p50),
        http_rate: m(&|f| f.http_rate),
    }
}

/// The table: one row per figure, one column per target, each with its ratio to direct.
pub fn table(names: &[String], figs: &[Figures], measured: &[Figure]) -> String {
    use std::fmt::Write as _;
    type Row = (Figure, &'static str, fn(&Figures) -> Option<f64>, bool);
    let rows: [Row; 11] = [
        (
            Figure::Rtt,
            "WS round trip p50, 1 conn (µs)",
            |f| Some(f.rtt1_p50),
            true,
        ),
        (
            Figure::Rtt,
            "WS round trip p50, 100 conns (µs)",
            |f| Some(f.rtt100_p50),
            true,
        ),
        (
            Figure::Rtt,
            "WS round trip p99, 100 conns (µs)",
            |f| Some(f.rtt100_p99),
            true,
        ),
        (
            Figure::Throughput,
            "WS throughput 16 KiB, 8 conns (MiB/s)",
            |f| Some(f.throughput),
            true,
        ),
        (
            Figure::Memory,
            "memory per idle WS (KiB)",
            |f| f.idle_kib,
            false,
        ),
        (
            Figure::Memory,
            "  per connection from N/3 to N (KiB)",
            |f| f.idle_marginal_kib,
            false,
        ),
        (
            Figure::Cpu,
            "CPU per 100 active WS (% core)",
            |f| f.cpu_pct,
            false,
        ),
        (
            Figure::Cpu,
            "  echo upstream's own CPU meanwhile (%)",
            |f| f.upstream_cpu_pct,
            false,
        ),
        (
            Figure::Cpu,
            "  proxy CPU / upstream CPU",
            |f| Some(f.cpu_pct? / f.upstream_cpu_pct?),
            false,
        ),
        (
            Figure::Http,
            "HTTP GET p50, 1 conn (µs)",
            |f| Some(f.http_p50),
            true,
        ),
        (
            Figure::Http,
            "HTTP GET rate, 50 conns (req/s)",
            |f| Some(f.http_rate),
            true,
        ),
    ];
    let mut out = String::new();
    let _ = write!(out, "{:<40}", "");
    for n in names {
        let _ = write!(out, "{n:>22}");
    }
    out.push('\n');
    for (figure, label, get, ratio) in rows {
        if !measured.contains(&figure) {
            continue;
        }
        let _ = write!(out, "{label:<40}");
        let base = get(&figs[0]);
        for f in figs {
            let cell = match (get(f), base) {
                (Some(v), Some(b)) if ratio && b > 0.0 => format!("{} ({:.2}x)", num(v), v / b),
                (Some(v), _) => num(v),
                (None, _) => "-".into(),
            };
            let _ = write!(out, "{cell:>22}");
        }
        out.push('\n');
    }
    out
}

fn num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}
