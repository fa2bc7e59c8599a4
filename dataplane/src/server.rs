//! The accept loop, the connection workers, the connection limit, graceful shutdown and the
//! admin endpoint.
//!
//! One task per client connection, holding a permit of the connection limit for as long as any
//! part of it lives (an upgraded tunnel keeps it). The accept loop hands each connection to one
//! of `workers` threads in turn, each running its own single-threaded event loop, as nginx's
//! and HAProxy's workers do: the connection, its upstream and every task it spawns stay on that
//! thread, so forwarding a message never wakes another thread (a decision fetch the
//! connection starts runs there too, never awaited by it). Accepting, the admin endpoint and
//! the profile writer run on the process's main runtime. Accept errors such as EMFILE back off
//! instead of ending the loop. On shutdown the listener closes, HTTP connections finish their current
//! request, WebSockets get close 1001 spread over the drain window, and `serve` returns once
//! every connection is gone or the drain deadline passed.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::config::Config;
use crate::detect::{Kind, Refused};
use crate::prefixed::Prefixed;
use crate::proxy::{ConnInfo, Proxy};
use crate::source::{ProfileSink, SettingsSource};
use crate::telemetry::METRICS;

/// A data plane ready to serve.
#[derive(Debug)]
pub struct DataPlane {
    /// The shared handler (reload through it).
    pub proxy: Arc<Proxy>,
    shutdown_tx: watch::Sender<bool>,
    limit: Arc<Semaphore>,
    max_connections: usize,
    workers: Arc<Workers>,
}

thread_local! {
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The index of the connection worker running on this thread (0 on any other thread).
pub fn worker_index() -> usize {
    WORKER.get()
}

/// Pretend this thread is worker `i` (tests of worker affinity).
#[cfg(test)]
pub(crate) fn set_worker_index(i: usize) {
    WORKER.set(i);
}

/// Work handed to a worker: run on its thread, where it spawns the connection's task.
type Job = Box<dyn FnOnce() + Send>;

/// Connection worker threads, each running a single-threaded tokio runtime until the
/// `Workers` is dropped (which ends the tasks still on them).
///
/// A connection reaches its worker as a small job that spawns the connection's task there, so
/// the task (the whole HTTP/1.1 connection's state while it handshakes) is allocated by the
/// thread that runs and frees it: glibc gives each thread its own heap (arena), and a task
/// allocated by the accepting thread but freed by a worker left the accepting thread's heap
/// fragmented (0.7 KiB more per idle WebSocket in the proxy benchmark).
#[derive(Debug)]
pub struct Workers {
    jobs: Vec<tokio::sync::mpsc::UnboundedSender<Job>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Workers {
    /// Start `n` worker threads (at least one, at most [`crate::config::MAX_WORKERS`]).
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let mut jobs = Vec::new();
        for i in 0..n.clamp(1, crate::config::MAX_WORKERS) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
            jobs.push(tx);
            std::thread::Builder::new()
                .name(format!("trimtab-worker-{i}"))
                .spawn(move || {
                    WORKER.set(i);
                    rt.block_on(async move {
                        while let Some(job) = rx.recv().await {
                            job();
                        }
                    });
                })?;
        }
        Ok(Workers {
            jobs,
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// How many worker threads there are.
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Never: there is at least one worker.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// The next worker in turn.
    pub fn next(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.jobs.len()
    }

    /// Spawn the future `make` returns as a task on worker `i` ([`Workers::next`]); `make`
    /// runs on that worker's thread.
    pub fn spawn_on<F, Fut>(&self, i: usize, make: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let job: Job = Box::new(move || {
            tokio::spawn(make());
        });
        // The receiver lives as long as its thread, which ends only when `self` is dropped or
        // the thread died; then the job (and its connection) is dropped, and said.
        if self.jobs[i].send(job).is_err() {
            tracing::error!(worker = i, "connection worker is gone: connection dropped");
        }
    }
}

impl DataPlane {
    /// Build from a validated config, a settings source and a profile sink.
    pub fn new(
        config: Config,
        source: Arc<dyn SettingsSource>,
        sink: Arc<dyn ProfileSink>,
    ) -> std::io::Result<DataPlane> {
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let max = config.limits.max_connections;
        let workers = Arc::new(Workers::start(config.workers)?);
        METRICS.workers.store(workers.len(), Ordering::Relaxed);
        Ok(DataPlane {
            proxy: Arc::new(Proxy::new(config, source, sink, shutdown_rx)),
            shutdown_tx,
            limit: Arc::new(Semaphore::new(max)),
            max_connections: max,
            workers,
        })
    }

    /// Replace routes and services (SIGHUP); live connections are not touched. The listen
    /// addresses and the connection limit keep their startup values.
    pub fn reload(&self, config: Config) {
        self.proxy.reload(config);
        tracing::info!("configuration reloaded");
    }

    /// Serve on already-bound listeners (by the names of the config's listeners) until
    /// `shutdown` resolves, then drain.
    pub async fn serve(
        &self,
        listeners: Vec<(String, TcpListener)>,
        admin: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) {
        let admin_task = tokio::spawn(serve_admin(admin, self.proxy.shutdown.clone()));
        let sweeper = {
            let proxy = self.proxy.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    let routes = proxy.routes();
                    proxy.pool.sweep(|up| {
                        routes
                            .config
                            .services
                            .values()
                            .find(|s| s.upstreams.iter().any(|u| u == up))
                            .map(|s| s.pool)
                    });
                }
            })
        };
        let refusals = Arc::new(Semaphore::new(256));
        let accepting: Vec<_> = listeners
            .into_iter()
            .map(|(name, l)| {
                tokio::spawn(accept_loop(
                    name,
                    l,
                    self.proxy.clone(),
                    self.limit.clone(),
                    refusals.clone(),
                    self.workers.clone(),
                ))
            })
            .collect();
        shutdown.await;
        for a in &accepting {
            a.abort();
        }
        for a in accepting {
            let _ = a.await; // the listener closes when its task is gone
        }
        let limits = self.proxy.routes().config.limits;
        tracing::info!(
            open = self.max_connections - self.limit.available_permits(),
            "shutting down: draining connections"
        );
        let _ = self.shutdown_tx.send(true);
        let deadline = Instant::now() + limits.drain_timeout + Duration::from_secs(1);
        while self.limit.available_permits() < self.max_connections && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.max_connections - self.limit.available_permits();
        if left > 0 {
            tracing::warn!(left, "drain deadline passed with connections still open");
        }
        sweeper.abort();
        admin_task.abort();
    }
}

async fn accept_loop(
    name: String,
    listener: TcpListener,
    proxy: Arc<Proxy>,
    limit: Arc<Semaphore>,
    refusals: Arc<Semaphore>,
    workers: Arc<Workers>,
) {
    let name: Arc<str> = name.into();
    // Accepted sockets are not registered here (see `accept_raw`): the listener is watched
    // for readiness directly.
    let watched = listener.into_std().and_then(|l| {
        // SAFETY: the std listener owns its descriptor and the AsyncFd owns the listener, so
        // the descriptor stays open and the same for the AsyncFd's whole life.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(l, tokio::io::Interest::READABLE)
        }
        .map_err(std::io::Error::from)
    });
    let listener = match watched {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(listener = %name, error = %e, "cannot watch the listener");
            return;
        }
    };
    let mut backoff = Duration::from_millis(5);
    loop {
        {
            let accepted = listener
                .async_io(tokio::io::Interest::READABLE, accept_raw)
                .await;
            let (stream, peer) = match accepted {
                Ok(x) => {
                    backoff = Duration::from_millis(5);
                    x
                }
                Err(e) => {
                    // EMFILE, ENFILE, ENOBUFS…: wait and try again; never end the loop.
                    tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let Ok(permit) = limit.clone().try_acquire_owned() else {
                METRICS.refused_limit.fetch_add(1, Ordering::Relaxed);
                if let Ok(p) = refusals.clone().try_acquire_owned() {
                    tokio::spawn(async move {
                        if let Ok(stream) = TcpStream::from_std(stream) {
                            refuse(stream).await;
                        }
                        drop(p);
                    });
                }
                continue;
            };
            let worker = workers.next();
            let guard = Arc::new(ActiveGuard::new(permit, worker));
            let proxy = proxy.clone();
            let name = name.clone();
            workers.spawn_on(worker, move || async move {
                match TcpStream::from_std(stream) {
                    Ok(stream) => serve_connection(proxy, stream, peer, guard, name).await,
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "a worker could not take a connection")
                    }
                }
            });
        }
    }
}

/// Accept one connection, nonblocking and close-on-exec from the start, without registering it
/// with the accepting thread's event loop: the worker that serves it registers it with its own.
fn accept_raw(
    l: &std::net::TcpListener,
) -> std::io::Result<(std::net::TcpStream, std::net::SocketAddr)> {
    let l = socket2::SockRef::from(l);
    #[cfg(target_os = "linux")]
    let (s, addr) = l.accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
    #[cfg(not(target_os = "linux"))]
    let (s, addr) = {
        let (s, addr) = l.accept()?;
        s.set_nonblocking(true)?;
        (s, addr)
    };
    let peer = addr.as_socket().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "a peer that is not IP")
    })?;
    Ok((s.into(), peer))
}

/// A connection's permit of the connection limit and its place in the gauges (the total and
/// its worker's), released when the last holder drops.
#[derive(Debug)]
struct ActiveGuard {
    _permit: tokio::sync::OwnedSemaphorePermit,
    worker: usize,
}

impl ActiveGuard {
    fn new(permit: tokio::sync::OwnedSemaphorePermit, worker: usize) -> ActiveGuard {
        METRICS.active_connections.fetch_add(1, Ordering::Relaxed);
        METRICS.worker_connections[worker].fetch_add(1, Ordering::Relaxed);
        ActiveGuard {
            _permit: permit,
            worker,
        }
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        METRICS.active_connections.fetch_sub(1, Ordering::Relaxed);
        METRICS.worker_connections[self.worker].fetch_sub(1, Ordering::Relaxed);
    }
}

/// The client stream under hyper's HTTP/1.1 server (upgrades downcast to it).
pub type Http1Io = crate::stall::StallGuard<crate::sniff::Sniff<Prefixed<TcpStream>>>;

async fn serve_connection(
    proxy: Arc<Proxy>,
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    guard: Arc<ActiveGuard>,
    listener: Arc<str>,
) {
    let accepted = Instant::now();
    let routes = proxy.routes();
    let Some(l) = routes.config.listener(&listener).cloned() else {
        return;
    };
    let local = stream.local_addr().unwrap_or(peer);
    let detected = match crate::detect::detect(&mut stream, peer, &l, &routes.config).await {
        Ok(d) => d,
        Err(r) => {
            METRICS.detect_refused(r.label());
            let alert = match r {
                Refused::UnknownSni(_) => Some(crate::tls::ALERT_UNRECOGNIZED_NAME),
                Refused::BadHello(_) => Some(crate::tls::ALERT_DECODE_ERROR),
                _ => None,
            };
            if !matches!(r, Refused::Closed) {
                tracing::info!(side = "client", %peer, listener = %l.name, reason = %r, "connection refused during protocol detection");
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                if let Some(a) = alert {
                    stream.write_all(&a).await?;
                }
                stream.shutdown().await
            })
            .await;
            return;
        }
    };
    drop(routes);
    if detected.proxied {
        METRICS.proxy_headers.fetch_add(1, Ordering::Relaxed);
    }
    let info = |marks| ConnInfo {
        peer: detected.peer,
        local,
        accepted,
        guard: guard.clone(),
        marks,
        listener: listener.clone(),
        client: crate::headers::Client::new(detected.peer.ip()),
    };
    match detected.kind {
        Kind::Http1 => {
            METRICS.detected("http1");
            crate::h1::serve(proxy, stream, detected.head, info(Default::default())).await;
        }
        Kind::H2 => {
            METRICS.detected("h2");
            serve_h2(
                proxy,
                Prefixed::new(detected.head, stream),
                info(Default::default()),
            )
            .await;
        }
        Kind::Tls {
            service,
            pattern,
            alpn,
        } => {
            METRICS.detected("tls");
            proxy
                .raw_tunnel(
                    stream,
                    detected.head,
                    &service,
                    pattern,
                    alpn,
                    info(Default::default()),
                    true,
                )
                .await;
        }
        Kind::Tcp { service } => {
            METRICS.detected("tcp");
            proxy
                .raw_tunnel(
                    stream,
                    detected.head,
                    &service,
                    l.name.clone(),
                    None,
                    info(Default::default()),
                    false,
                )
                .await;
        }
    }
}

/// Serve HTTP/2 (prior knowledge, or after an h2c upgrade) on a client stream.
pub async fn serve_h2<S>(proxy: Arc<Proxy>, stream: S, info: ConnInfo)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limits = proxy.routes().config.limits;
    let mut shutdown = proxy.shutdown.clone();
    let peer = info.peer;
    let svc_proxy = proxy.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let p = svc_proxy.clone();
        p.handle(req, info.clone())
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_header_list_size(limits.max_head_bytes as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        // A client that stops reading while its flow-control windows let the proxy write on
        // fills the socket: its writes give up after the stall limit, as on HTTP/1.1. (With
        // small windows nothing waits on the socket; hyper's keep-alive pings, unanswered by
        // a client that reads nothing, end it.)
        .serve_connection(
            TokioIo::new(crate::stall::StallGuard::new(stream, limits.stall_timeout)),
            service,
        );
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = async { shutdown.wait_for(|v| *v).await.is_ok() } => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(e) = r {
        tracing::debug!(side = "client", %peer, error = %e, "HTTP/2 client connection ended with an error");
    }
}

pub(crate) async fn serve_http1(proxy: Arc<Proxy>, stream: Http1Io, info: ConnInfo) {
    let limits = proxy.routes().config.limits;
    let mut shutdown = proxy.shutdown.clone();
    let peer = info.peer;
    let svc_proxy = proxy.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let p = svc_proxy.clone();
        p.handle(req, info.clone())
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.handshake_timeout)
        .max_buf_size(limits.max_head_bytes)
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let r = tokio::select! {
        r = conn.as_mut() => r,
        _ = async { shutdown.wait_for(|v| *v).await.is_ok() } => {
            conn.as_mut().graceful_shutdown();
            conn.as_mut().await
        }
    };
    if let Err(e) = r {
        tracing::debug!(side = "client", %peer, error = %e, "client connection ended with an error");
    }
}

/// Answer 503 with Retry-After to a connection over the limit, then close it politely.
async fn refuse(mut stream: TcpStream) {
    let body = "connection limit reached\n";
    let msg = format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut scratch = [0u8; 2048];
        // Read what the client sent first, so that closing does not reset the answer away.
        let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut scratch)).await;
        stream.write_all(msg.as_bytes()).await?;
        stream.shutdown().await?;
        while stream.read(&mut scratch).await? > 0 {}
        Ok::<_, std::io::Error>(())
    })
    .await;
}

async fn serve_admin(listener: TcpListener, shutdown: watch::Receiver<bool>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let draining = *shutdown.borrow();
                async move {
                    let (status, body, ctype) = match req.uri().path() {
                        "/healthz" => (StatusCode::OK, "ok\n".to_string(), "text/plain"),
                        "/readyz" if draining => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "draining\n".into(),
                            "text/plain",
                        ),
                        "/readyz" => (StatusCode::OK, "ready\n".into(), "text/plain"),
                        "/metrics" => (
                            StatusCode::OK,
                            METRICS.render(),
                            "text/plain; version=0.0.4; charset=utf-8",
                        ),
                        _ => (StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
                    };
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    *r.status_mut() = status;
                    r.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static(ctype),
                    );
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Raise the soft open-files limit to the hard limit (each proxied connection needs two
/// descriptors). Returns the new soft limit.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if rl.rlim_cur < rl.rlim_max {
            rl.rlim_cur = rl.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &rl) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(rl.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections go to the workers in turn, and run on the worker's own thread.
    #[test]
    fn connections_go_to_the_workers_in_turn_on_their_own_threads() {
        let w = Workers::start(2).unwrap();
        assert_eq!(w.len(), 2);
        let (tx, rx) = std::sync::mpsc::channel();
        for _ in 0..4 {
            let tx = tx.clone();
            w.spawn_on(w.next(), move || {
                // `make` itself runs on the worker too (where the task is allocated).
                let made_on = worker_index();
                async move {
                    let name = std::thread::current().name().unwrap_or("").to_string();
                    tx.send((made_on, worker_index(), name)).unwrap();
                }
            });
        }
        let got: Vec<_> = (0..4)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        let mut seen: Vec<_> = got.iter().map(|(_, i, _)| *i).collect();
        seen.sort();
        assert_eq!(seen, [0, 0, 1, 1]);
        for (made_on, i, name) in got {
            assert_eq!(made_on, i);
            assert_eq!(name, format!("trimtab-worker-{i}"));
        }
        // Dropping the workers ends the tasks still on them.
        struct Dropped(std::sync::mpsc::Sender<()>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = self.0.send(());
            }
        }
        let (tx, rx) = std::sync::mpsc::channel();
        w.spawn_on(w.next(), move || async move {
            let _d = Dropped(tx);
            std::future::pending::<()>().await;
        });
        assert!(rx.recv_timeout(Duration::from_millis(100)).is_err());
        drop(w);
        rx.recv_timeout(Duration::from_secs(5)).unwrap();
    }
}
