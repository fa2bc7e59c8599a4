//! The upstream keep-alive pool for plain HTTP/1.1: per-upstream connection limits, idle
//! timeout and maximum lifetime. A connection goes back to the pool only after its response
//! body has been read to the end; one whose body was abandoned is closed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::PoolLimits;
use crate::telemetry::METRICS;

/// How a pooled connection is driven.
#[derive(Debug)]
pub enum Link {
    /// By hyper's client (its own task on the connection's worker): requests the fast path
    /// hands back to hyper.
    Hyper(SendRequest<ClientBody>),
    /// By the request that checked it out ([`crate::h1`], the plain HTTP/1.1 fast path).
    Raw(TcpStream),
}

impl Link {
    fn is_raw(&self) -> bool {
        matches!(self, Link::Raw(_))
    }

    /// Known closed (or, raw, readable while idle).
    fn is_closed(&self) -> bool {
        match self {
            Link::Hyper(s) => s.is_closed(),
            // An idle connection has nothing to read: read readiness means the upstream
            // closed it (or sent bytes no request asked for). The reactor's recorded state,
            // no system call.
            Link::Raw(t) => t
                .poll_read_ready(&mut Context::from_waker(std::task::Waker::noop()))
                .is_ready(),
        }
    }

    fn is_ready(&self) -> bool {
        match self {
            Link::Hyper(s) => s.is_ready(),
            Link::Raw(_) => true,
        }
    }
}

/// A connection checked out of the pool.
#[derive(Debug)]
pub struct Conn {
    /// The connection.
    pub link: Link,
    /// The upstream address.
    pub upstream: Arc<str>,
    /// When it was opened.
    pub created: Instant,
    /// When it was last given back (equals `created` for a new connection).
    pub idle_since: Instant,
    /// Whether it served a request before.
    pub reused: bool,
    /// The connection worker whose event loop drives it ([`crate::server::worker_index`]).
    worker: usize,
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    /// Age of the connection.
    pub fn age(&self) -> Duration {
        self.created.elapsed()
    }

    /// How long it sat idle before this checkout.
    pub fn idle(&self) -> Duration {
        if self.reused {
            self.idle_since.elapsed()
        } else {
            Duration::ZERO
        }
    }
}

/// Why no connection could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// Every connection to this upstream is busy and none freed up in time.
    #[error("upstream {0} connection limit reached")]
    Saturated(Arc<str>),
    /// TCP connect failed or timed out.
    #[error("connect to upstream {upstream} failed: {reason}")]
    Connect {
        /// The upstream.
        upstream: Arc<str>,
        /// What happened.
        reason: String,
    },
}

impl ConnectError {
    /// Count and log an upstream connection that could not be had for a request to
    /// `service`; whether it was the limit (503) rather than the connect (502).
    pub fn report(&self, service: &str, upstream: &str) -> bool {
        let saturated = matches!(self, ConnectError::Saturated(_));
        METRICS.upstream_error(if saturated { "saturated" } else { "connect" }, false, None);
        METRICS.finish("http", "upstream_error");
        tracing::warn!(side = "upstream", %service, %upstream, error = %self, "upstream unavailable");
        saturated
    }
}

#[derive(Debug)]
struct Upstream {
    /// Idle connections by the worker that drives them: a request takes one of its own
    /// worker's first, so its bytes do not cross threads.
    idle: Vec<Vec<Conn>>,
    limit: Arc<Semaphore>,
}

impl Upstream {
    /// The most recently idle usable connection of worker `me`, or with `others` of any other
    /// worker, that can serve the kind asked for (`raw`: only a raw one; hyper can take over
    /// a raw one); expired or closed ones met on the way are dropped.
    fn take(&mut self, me: usize, others: bool, raw: bool, limits: PoolLimits) -> Option<Conn> {
        let now = Instant::now();
        let usable = |c: &Conn| {
            now.saturating_duration_since(c.created) < limits.max_lifetime
                && now.saturating_duration_since(c.idle_since) < limits.idle_timeout
                && !c.link.is_closed()
                && c.link.is_ready()
        };
        let n = self.idle.len();
        let rest = (0..n).filter(|w| others && *w != me);
        for w in std::iter::once(me).chain(rest) {
            let Some(list) = self.idle.get_mut(w) else {
                continue;
            };
            // One of the kind asked for first; hyper takes over a raw one only when it has none
            // of its own here (the plain path cannot use hyper's).
            let pick = |list: &Vec<Conn>| {
                list.iter()
                    .rposition(|c| c.link.is_raw() == raw)
                    .or_else(|| (!raw).then(|| list.iter().rposition(|c| c.link.is_raw()))?)
            };
            while let Some(i) = pick(list) {
                let c = list.remove(i);
                if usable(&c) {
                    return Some(c);
                }
                // dropped: closes the connection and frees its permit
            }
        }
        None
    }

    /// Close one idle connection hyper drives (any worker's), for a raw request at the
    /// limit; whether there was one.
    fn evict_hyper(&mut self) -> bool {
        for list in &mut self.idle {
            if let Some(i) = list.iter().position(|c| !c.link.is_raw()) {
                list.remove(i);
                return true;
            }
        }
        false
    }
}

/// What [`Pool::take_or_reserve`] found.
enum Got {
    Idle(Conn),
    Open(Arc<str>, Arc<Semaphore>, Option<OwnedSemaphorePermit>),
}

/// The pool of every upstream.
#[derive(Debug, Default)]
pub struct Pool {
    upstreams: Mutex<HashMap<Arc<str>, Upstream>>,
}

impl Pool {
    /// Take an idle connection (not expired, still open) or open a new one: an idle one this
    /// worker drives; else a new one while the upstream's limit allows; else another worker's
    /// idle one (its bytes then cross threads); else wait for the limit. `raw` asks for a
    /// connection the caller drives itself ([`Link::Raw`]), else one hyper drives.
    pub async fn checkout(
        &self,
        upstream: &str,
        limits: PoolLimits,
        connect_timeout: Duration,
        raw: bool,
    ) -> Result<Conn, ConnectError> {
        let (key, sem, permit) = match self.take_or_reserve(upstream, limits, raw) {
            Got::Idle(c) => {
                METRICS.pool_reused.fetch_add(1, Ordering::Relaxed);
                return reuse(c, raw).await;
            }
            Got::Open(key, sem, permit) => (key, sem, permit),
        };
        let permit = match permit {
            Some(p) => p,
            None => tokio::time::timeout(connect_timeout, sem.acquire_owned())
                .await
                .map_err(|_| ConnectError::Saturated(key.clone()))?
                .expect("semaphore never closed"),
        };
        METRICS.pool_new.fetch_add(1, Ordering::Relaxed);
        // Boxed: the connect and handshake state exists only while a connection opens, not in
        // every request's future (which hyper moves as a whole).
        Box::pin(open(key, permit, connect_timeout, raw)).await
    }

    /// An idle connection, or the upstream's key, limit and (if the limit allows) a permit
    /// for a new one.
    fn take_or_reserve(&self, upstream: &str, limits: PoolLimits, raw: bool) -> Got {
        let mut map = self.upstreams.lock().expect("pool lock");
        let key: Arc<str> = match map.get_key_value(upstream) {
            Some((k, _)) => k.clone(),
            None => upstream.into(),
        };
        let u = map.entry(key.clone()).or_insert_with(|| Upstream {
            idle: Vec::new(),
            limit: Arc::new(Semaphore::new(limits.max_per_upstream)),
        });
        let me = crate::server::worker_index();
        if let Some(c) = u.take(me, false, raw, limits) {
            return Got::Idle(c);
        }
        if let Ok(p) = u.limit.clone().try_acquire_owned() {
            Got::Open(key, u.limit.clone(), Some(p))
        } else if let Some(c) = u.take(me, true, raw, limits) {
            Got::Idle(c)
        } else if raw && u.evict_hyper() {
            // An idle connection hyper holds cannot serve a raw request: it is closed and its
            // place goes to a new one, rather than the request waiting for the limit.
            Got::Open(
                key,
                u.limit.clone(),
                u.limit.clone().try_acquire_owned().ok(),
            )
        } else {
            Got::Open(key, u.limit.clone(), None)
        }
    }

    /// Give a connection back after its response completed.
    pub fn checkin(&self, mut c: Conn, limits: PoolLimits) {
        let now = Instant::now();
        if c.link.is_closed() || now.saturating_duration_since(c.created) >= limits.max_lifetime {
            return;
        }
        c.idle_since = now;
        let mut map = self.upstreams.lock().expect("pool lock");
        if let Some(u) = map.get_mut(&c.upstream) {
            if u.idle.len() <= c.worker {
                u.idle.resize_with(c.worker + 1, Vec::new);
            }
            u.idle[c.worker].push(c);
        }
    }

    /// Close idle connections past their idle timeout or lifetime (run periodically).
    pub fn sweep(&self, limits_of: impl Fn(&str) -> Option<PoolLimits>) {
        let mut map = self.upstreams.lock().expect("pool lock");
        for (k, u) in map.iter_mut() {
            let Some(l) = limits_of(k) else {
                u.idle.clear();
                continue;
            };
            for list in &mut u.idle {
                list.retain(|c| {
                    c.idle_since.elapsed() < l.idle_timeout
                        && c.created.elapsed() < l.max_lifetime
                        && !c.link.is_closed()
                });
            }
        }
    }

    /// Idle connections currently pooled for an upstream.
    pub fn idle_count(&self, upstream: &str) -> usize {
        self.upstreams
            .lock()
            .expect("pool lock")
            .get(upstream)
            .map_or(0, |u| u.idle.iter().map(Vec::len).sum())
    }
}

/// Open a new connection to `key` under `permit`; unless `raw`, spawn hyper's task that
/// drives it.
async fn open(
    key: Arc<str>,
    permit: OwnedSemaphorePermit,
    connect_timeout: Duration,
    raw: bool,
) -> Result<Conn, ConnectError> {
    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(&*key))
        .await
        .map_err(|_| ConnectError::Connect {
            upstream: key.clone(),
            reason: "timed out".into(),
        })?
        .map_err(|e| ConnectError::Connect {
            upstream: key.clone(),
            reason: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    let now = Instant::now();
    let conn = |link| Conn {
        link,
        upstream: key.clone(),
        created: now,
        idle_since: now,
        reused: false,
        worker: crate::server::worker_index(),
        _permit: permit,
    };
    if raw {
        return Ok(conn(Link::Raw(tcp)));
    }
    Ok(conn(Link::Hyper(hyper_over(tcp, &key).await?)))
}

/// An idle connection taken for a request; a raw one asked for by hyper is handed to it.
async fn reuse(mut c: Conn, raw: bool) -> Result<Conn, ConnectError> {
    c.reused = true;
    if !raw && let Link::Raw(tcp) = c.link {
        c.link = Link::Hyper(hyper_over(tcp, &c.upstream).await?);
    }
    Ok(c)
}

/// Hand an upstream connection to hyper's client: spawn the task that drives it.
async fn hyper_over(
    tcp: TcpStream,
    upstream: &Arc<str>,
) -> Result<SendRequest<ClientBody>, ConnectError> {
    let (sender, driver) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| ConnectError::Connect {
            upstream: upstream.clone(),
            reason: e.to_string(),
        })?;
    let up = upstream.clone();
    tokio::spawn(async move {
        if let Err(e) = driver.await {
            tracing::debug!(upstream = %up, error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}

/// A client's request body on its way upstream; remembers whether the client's framing broke
/// (e.g. a bad chunk size), so the proxy can answer 400 rather than blame the upstream.
#[derive(Debug)]
pub struct ClientBody {
    inner: Incoming,
    failed: Arc<std::sync::atomic::AtomicBool>,
}

impl ClientBody {
    /// Wrap a request body; `failed` turns true if reading it fails.
    pub fn new(inner: Incoming, failed: Arc<std::sync::atomic::AtomicBool>) -> ClientBody {
        ClientBody { inner, failed }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &r {
            self.failed
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that returns its connection to the pool once read to the end.
#[derive(Debug)]
pub struct PooledBody {
    inner: Incoming,
    conn: Option<Conn>,
    pool: Arc<Pool>,
    limits: PoolLimits,
}

impl PooledBody {
    /// Wrap an upstream response body.
    pub fn new(inner: Incoming, conn: Conn, pool: Arc<Pool>, limits: PoolLimits) -> PooledBody {
        let mut b = PooledBody {
            inner,
            conn: Some(conn),
            pool,
            limits,
        };
        if b.inner.is_end_stream() {
            b.release();
        }
        b
    }

    fn release(&mut self) {
        if let Some(c) = self.conn.take() {
            self.pool.checkin(c, self.limits);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.conn = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// HTTP/2 (h2c, prior knowledge) upstream connections: one multiplexed connection per
/// upstream address, opened on first use and replaced when it closes.
#[derive(Debug, Default)]
pub struct H2Upstreams {
    conns: Mutex<HashMap<String, hyper::client::conn::http2::SendRequest<ClientBody>>>,
}

impl H2Upstreams {
    /// A ready sender to `upstream` (reused, or a new connection); the bool says reused.
    pub async fn sender(
        &self,
        upstream: &str,
        connect_timeout: Duration,
    ) -> Result<(hyper::client::conn::http2::SendRequest<ClientBody>, bool), ConnectError> {
        let existing = self
            .conns
            .lock()
            .expect("h2 upstreams")
            .get(upstream)
            .cloned();
        if let Some(mut s) = existing
            && !s.is_closed()
            && s.ready().await.is_ok()
        {
            return Ok((s, true));
        }
        let failed = |reason: String| ConnectError::Connect {
            upstream: upstream.into(),
            reason,
        };
        let mut timings = tuning::Timings::default();
        let tcp = crate::proxy::connect_upstream(upstream, connect_timeout, &mut timings)
            .await
            .map_err(|(_, _, detail)| failed(detail))?;
        let _ = tcp.set_nodelay(true);
        let (sender, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| failed(e.to_string()))?;
        let up = upstream.to_string();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(side = "upstream", upstream = %up, error = %e, "HTTP/2 upstream connection ended");
            }
        });
        self.conns
            .lock()
            .expect("h2 upstreams")
            .insert(upstream.to_string(), sender.clone());
        Ok((sender, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::set_worker_index;

    /// A request takes an idle connection its own worker drives first; then opens one while
    /// the upstream's limit allows; then takes another worker's idle one.
    /// An upstream that accepts and holds every connection, and its address.
    fn holding_upstream() -> (String, tokio::task::JoinHandle<()>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                open.push(s);
            }
        });
        (addr, held)
    }

    fn limits(max_per_upstream: usize) -> PoolLimits {
        PoolLimits {
            max_per_upstream,
            idle_timeout: Duration::from_secs(60),
            max_lifetime: Duration::from_secs(600),
        }
    }

    #[tokio::test]
    async fn a_request_takes_its_own_workers_idle_connection_first() {
        let (addr, held) = holding_upstream();
        let pool = Pool::default();
        let limits = limits(3);
        let connect = Duration::from_secs(2);
        let mut mine = Vec::new();
        for w in [0, 1] {
            set_worker_index(w);
            let mut c = pool.checkout(&addr, limits, connect, false).await.unwrap();
            assert!(!c.reused);
            assert_eq!(c.worker, w);
            let Link::Hyper(s) = &mut c.link else {
                panic!("asked for a hyper connection")
            };
            s.ready().await.unwrap();
            mine.push(c);
        }
        let created: Vec<Instant> = mine.iter().map(|c| c.created).collect();
        for c in mine {
            pool.checkin(c, limits);
        }
        assert_eq!(pool.idle_count(&addr), 2);
        set_worker_index(1);
        let own = pool.checkout(&addr, limits, connect, false).await.unwrap();
        assert!(own.reused);
        assert_eq!((own.worker, own.created), (1, created[1]));
        // None of its own left, the limit (3) not reached: a new connection, not worker 0's.
        let new = pool.checkout(&addr, limits, connect, false).await.unwrap();
        assert!(!new.reused);
        assert_eq!(new.worker, 1);
        assert_eq!(pool.idle_count(&addr), 1);
        // The limit reached: worker 0's idle connection rather than a wait for one to close.
        let other = pool.checkout(&addr, limits, connect, false).await.unwrap();
        assert!(other.reused);
        assert_eq!((other.worker, other.created), (0, created[0]));
        assert_eq!(pool.idle_count(&addr), 0);
        set_worker_index(0);
        held.abort();
    }

    /// Hyper takes over an idle connection the plain path left; the plain path cannot use
    /// one hyper drives, so at the limit it closes that one rather than wait.
    #[tokio::test]
    async fn raw_and_hyper_requests_share_an_upstreams_limit() {
        let (addr, held) = holding_upstream();
        let pool = Pool::default();
        let limits = limits(1);
        let connect = Duration::from_secs(2);
        let raw = pool.checkout(&addr, limits, connect, true).await.unwrap();
        assert!(matches!(raw.link, Link::Raw(_)) && !raw.reused);
        let created = raw.created;
        pool.checkin(raw, limits);
        let mut h = pool.checkout(&addr, limits, connect, false).await.unwrap();
        assert!(h.reused, "hyper took the idle raw connection");
        assert_eq!(h.created, created);
        let Link::Hyper(s) = &mut h.link else {
            panic!("handed to hyper")
        };
        s.ready().await.unwrap();
        pool.checkin(h, limits);
        assert_eq!(pool.idle_count(&addr), 1);
        // The limit (1) is held by hyper's idle connection: it goes, a new raw one comes.
        let raw = tokio::time::timeout(
            Duration::from_millis(500),
            pool.checkout(&addr, limits, connect, true),
        )
        .await
        .expect("no wait for the limit")
        .unwrap();
        assert!(matches!(raw.link, Link::Raw(_)) && !raw.reused);
        assert_eq!(pool.idle_count(&addr), 0);
        held.abort();
    }

    /// A request for hyper takes an idle connection hyper drives before it takes over a raw
    /// one (which the plain path could still use).
    #[tokio::test]
    async fn a_hyper_request_takes_a_hyper_connection_before_a_raw_one() {
        let (addr, held) = holding_upstream();
        let pool = Pool::default();
        let limits = limits(2);
        let connect = Duration::from_secs(2);
        let mut h = pool.checkout(&addr, limits, connect, false).await.unwrap();
        let Link::Hyper(s) = &mut h.link else {
            panic!("asked for a hyper connection")
        };
        s.ready().await.unwrap();
        let hyper_created = h.created;
        let raw = pool.checkout(&addr, limits, connect, true).await.unwrap();
        pool.checkin(h, limits);
        // The raw one is the most recently idle.
        pool.checkin(raw, limits);
        let again = pool.checkout(&addr, limits, connect, false).await.unwrap();
        assert!(again.reused);
        assert_eq!(again.created, hyper_created);
        let left = pool.checkout(&addr, limits, connect, true).await.unwrap();
        assert!(
            left.reused && matches!(left.link, Link::Raw(_)),
            "the raw one stayed"
        );
        held.abort();
    }

    /// A raw idle connection the upstream closed is not handed out again: the reactor has
    /// marked it readable, and checkout opens a new one instead.
    #[tokio::test]
    async fn an_idle_raw_connection_the_upstream_closed_is_not_reused() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        // Accepts, then closes every connection at once.
        let closer = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                drop(s);
            }
        });
        let pool = Pool::default();
        let limits = limits(2);
        let connect = Duration::from_secs(2);
        let first = pool.checkout(&addr, limits, connect, true).await.unwrap();
        let created = first.created;
        pool.checkin(first, limits);
        // Once the close has reached the reactor, the next checkout opens a new connection.
        let deadline = Instant::now() + Duration::from_secs(2);
        let fresh = loop {
            let c = pool.checkout(&addr, limits, connect, true).await.unwrap();
            if c.created != created {
                break c;
            }
            assert!(
                Instant::now() < deadline,
                "the closed connection kept being reused"
            );
            pool.checkin(c, limits);
            tokio::task::yield_now().await;
        };
        assert!(!fresh.reused);
        closer.abort();
    }
}
