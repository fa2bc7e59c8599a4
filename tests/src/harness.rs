//! Spawning the real binaries for end-to-end tests: each on port 0, its bound addresses read
//! from its own log line, its logs kept for assertions, killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the workspace's binaries are: `TRIMTAB_BIN_DIR`, else next to the test executable.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TRIMTAB_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/e2e-… → target/debug
    exe.parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .to_path_buf()
}

/// A unique scratch directory for one test.
pub fn scratch_dir(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!(
        "trimtab-test-{}-{}-{n}-{name}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d
}

/// A running data plane process.
#[derive(Debug)]
pub struct DataPlaneProc {
    child: Child,
    /// The proxy's address.
    pub proxy: SocketAddr,
    /// The admin endpoint's address.
    pub admin: SocketAddr,
    /// Every listener's address by name (`main` is `proxy`).
    pub listeners: std::collections::HashMap<String, SocketAddr>,
    /// Every log line so far.
    pub logs: Arc<Mutex<Vec<String>>>,
    /// The config file (rewrite it and send SIGHUP to reload).
    pub config_path: PathBuf,
}

/// Spawn a service whose stderr is JSON log lines; keep every line, and wait (at most 20 s)
/// for the first line containing `ready` (returned parsed).
fn spawn_service(
    mut cmd: Command,
    what: &str,
    ready: &'static str,
) -> (Child, serde_json::Value, Arc<Mutex<Vec<String>>>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {what} (build it first: cargo build --bins): {e}"));
    let logs = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().expect("stderr");
    let l2 = logs.clone();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !sent
                && line.contains(ready)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            {
                let _ = tx.send(v);
                sent = true;
            }
            l2.lock().expect("logs").push(line);
        }
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(v) => (child, v, logs),
        Err(_) => {
            let _ = child.kill();
            panic!(
                "{what} did not start; logs:\n{}",
                logs.lock().expect("logs").join("\n")
            );
        }
    }
}

impl DataPlaneProc {
    /// Start `dataplane` with this config text (whose `listen` and `admin_listen` should be
    /// `127.0.0.1:0`), and wait until it reports where it listens.
    pub fn start(config: &str) -> DataPlaneProc {
        let dir = scratch_dir("dataplane");
        let config_path = dir.join("dataplane.toml");
        std::fs::write(&config_path, config).expect("write config");
        let mut cmd = Command::new(bin_dir().join("dataplane"));
        cmd.arg("--config").arg(&config_path).env(
            "RUST_LOG",
            std::env::var("TRIMTAB_TEST_LOG").unwrap_or_else(|_| "info,dataplane=debug".into()),
        );
        let (child, ready, logs) = spawn_service(cmd, "dataplane", "data plane listening");
        let addr = |k: &str| -> SocketAddr {
            ready[k]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("address in the log line")
        };
        let (proxy, admin) = (addr("proxy"), addr("admin"));
        let listeners = ready["listeners"]
            .as_str()
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect();
        DataPlaneProc {
            child,
            proxy,
            admin,
            listeners,
            logs,
            config_path,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send a signal (e.g. `libc::SIGTERM`).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Wait for the process to exit; its status, or `None` on timeout.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// All logs so far, joined.
    pub fn log_text(&self) -> String {
        self.logs.lock().expect("logs").join("\n")
    }

    /// Wait until a log line contains `needle`.
    pub async fn wait_log(&self, needle: &str, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(l) = self
                .logs
                .lock()
                .expect("logs")
                .iter()
                .find(|l| l.contains(needle))
            {
                return Some(l.clone());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// The log lines of finished connections (one JSON object each).
    pub fn closed_connections(&self) -> Vec<serde_json::Value> {
        self.logs
            .lock()
            .expect("logs")
            .iter()
            .filter(|l| l.contains("\"connection closed\""))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for DataPlaneProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Retry an async check until it returns `Some` or the time is up.
pub async fn eventually<T, F, Fut>(within: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A TCP relay in front of a server (PostgreSQL, say) that a test can cut and restore, to make
/// the server unreachable without stopping it.
#[derive(Debug)]
pub struct Relay {
    /// The relay's address: point clients here.
    pub addr: SocketAddr,
    up: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    /// Relay 127.0.0.1:0 → `target`, up.
    pub async fn start(target: SocketAddr) -> Relay {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind relay");
        let addr = l.local_addr().expect("addr");
        let (up, up_rx) = tokio::sync::watch::channel(true);
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = l.accept().await else {
                    continue;
                };
                if !*up_rx.borrow() {
                    drop(client);
                    continue;
                }
                let mut cut = up_rx.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = async { cut.wait_for(|v| !*v).await.is_ok() } => {}
                    }
                });
            }
        });
        Relay { addr, up }
    }

    /// Cut every connection and refuse new ones (`false`), or accept again (`true`).
    pub fn set_up(&self, up: bool) {
        let _ = self.up.send(up);
    }
}

/// The URL of the database a `#[sqlx::test]` pool is connected to, with host, port and user
/// from `DATABASE_URL` (which `./dev` sets).
pub async fn database_url_of(pool: &sqlx::PgPool) -> String {
    let name: String = sqlx::query_scalar("select current_database()")
        .fetch_one(pool)
        .await
        .expect("current_database");
    let base = std::env::var("DATABASE_URL").expect("DATABASE_URL (./dev sets it)");
    let (prefix, rest) = base.rsplit_once('/').expect("URL has a path");
    let query = rest
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    format!("{prefix}/{name}{query}")
}

/// Point a URL at another host:port (for the relay).
pub fn url_via(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").expect("scheme");
    let (auth_host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let auth = auth_host
        .rsplit_once('@')
        .map(|(a, _)| format!("{a}@"))
        .unwrap_or_default();
    format!("{scheme}://{auth}{addr}/{path}")
}

/// Read one metric's value from a data plane's admin endpoint.
pub async fn metric(admin: SocketAddr, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A running optimizer process.
#[derive(Debug)]
pub struct OptimizerProc {
    child: Child,
    /// Its API address.
    pub addr: SocketAddr,
    /// Every log line so far.
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl OptimizerProc {
    /// Start `optimizer` with this config (its `listen` should be `127.0.0.1:0`) against the
    /// database at `database_url`.
    pub fn start(config: &str, database_url: &str) -> OptimizerProc {
        let dir = scratch_dir("optimizer");
        let path = dir.join("optimizer.toml");
        std::fs::write(&path, config).expect("write config");
        let mut cmd = Command::new(bin_dir().join("optimizer"));
        cmd.arg("--config")
            .arg(&path)
            .env("DATABASE_URL", database_url)
            .env("RUST_LOG", "info");
        let (child, ready, logs) = spawn_service(cmd, "optimizer", "optimizer listening");
        let addr = ready["addr"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("address in the log line");
        OptimizerProc { child, addr, logs }
    }

    /// Stop it (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OptimizerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A small HTTP/1.1 JSON call (for API tests against real processes).
pub async fn http_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> (u16, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}
