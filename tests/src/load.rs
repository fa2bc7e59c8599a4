//! Load generators for benchmarks: real WebSocket clients over loopback, bounded in count and
//! time. Every function returns raw measurements; the caller prints medians and ratios.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Summary of latency samples.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Samples.
    pub n: usize,
}

/// Percentiles of a set of samples.
pub fn latency(mut v: Vec<Duration>) -> Latency {
    v.sort_unstable();
    let at = |q: f64| {
        if v.is_empty() {
            Duration::ZERO
        } else {
            v[((v.len() as f64 - 1.0) * q).round() as usize]
        }
    };
    Latency {
        p50: at(0.5),
        p99: at(0.99),
        n: v.len(),
    }
}

/// Median of some numbers.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// A client WebSocket.
pub type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;

/// Connect a WebSocket client (TCP_NODELAY) to `path` on `addr`.
pub async fn connect(addr: SocketAddr, path: &str) -> anyhow::Result<Ws> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}{path}"), tcp).await?;
    Ok(ws)
}

/// `conns` WebSocket connections each doing `per_conn` echo round trips of `size`-byte binary
/// messages, one at a time. Returns every round trip time.
pub async fn ws_round_trips(
    addr: SocketAddr,
    conns: usize,
    per_conn: usize,
    size: usize,
) -> anyhow::Result<Vec<Duration>> {
    // Every connection is open before any round trip is timed: the figure is the round trip
    // on open connections, not a mix with other connections' handshakes.
    let all_open = Arc::new(tokio::sync::Barrier::new(conns));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let all_open = all_open.clone();
        tasks.push(tokio::spawn(async move {
            let ws = connect(addr, "/bench").await;
            all_open.wait().await;
            let mut ws = ws?;
            let msg = vec![0x5au8; size];
            let mut out = Vec::with_capacity(per_conn);
            for _ in 0..per_conn {
                let t = Instant::now();
                ws.send(Message::binary(msg.clone())).await?;
                let _ = ws.next().await.ok_or_else(|| anyhow::anyhow!("closed"))??;
                out.push(t.elapsed());
            }
            ws.close(None).await?;
            while ws.next().await.is_some() {}
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(all)
}

/// `total` short WebSocket connections (handshake, one echo, close), `concurrency` at a time.
/// Returns connections per second.
pub async fn ws_churn(addr: SocketAddr, total: usize, concurrency: usize) -> anyhow::Result<f64> {
    let t = Instant::now();
    let per = total.div_ceil(concurrency);
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                let mut ws = connect(addr, "/churn").await?;
                ws.send(Message::text("hello")).await?;
                let _ = ws.next().await.ok_or_else(|| anyhow::anyhow!("closed"))??;
                ws.close(None).await?;
                while ws.next().await.is_some() {}
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((per * concurrency) as f64 / t.elapsed().as_secs_f64())
}

/// Throughput of `conns` connections each echoing `count` messages of `size` bytes with up to
/// `window` messages in flight. Returns bytes per second (one direction).
pub async fn ws_throughput(
    addr: SocketAddr,
    conns: usize,
    count: usize,
    size: usize,
    window: usize,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conns {
        tasks.push(tokio::spawn(async move {
            let ws = connect(addr, "/bulk").await?;
            let (mut tx, mut rx) = ws.split();
            let (credit_tx, mut credit_rx) = tokio::sync::mpsc::channel::<()>(window);
            for _ in 0..window {
                credit_tx.send(()).await?;
            }
            let msg = bytes::Bytes::from(vec![0xa5u8; size]);
            let sender = tokio::spawn(async move {
                for _ in 0..count {
                    credit_rx.recv().await;
                    tx.send(Message::Binary(msg.clone())).await?;
                }
                Ok::<_, anyhow::Error>(tx)
            });
            for _ in 0..count {
                let _ = rx.next().await.ok_or_else(|| anyhow::anyhow!("closed"))??;
                let _ = credit_tx.try_send(());
            }
            let mut tx = sender.await??;
            tx.close().await?;
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok((conns * count * size) as f64 / t.elapsed().as_secs_f64())
}

/// Resident memory of a process, KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

/// Bounded wait helper for benchmarks.
pub async fn within<T>(d: Duration, f: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| anyhow::anyhow!("benchmark step exceeded {d:?}"))
}
