//! Plain HTTP/1.1 without hyper: the path the common request takes.
//!
//! A client connection's requests are read here while each one is a plain request this path
//! serves whole: HTTP/1.1 in origin form, with a Host the routes know, no body or a
//! `Content-Length` one, and nothing that asks for more than forwarding (no `Upgrade`,
//! `Transfer-Encoding`, `Expect`, `TE` or extra `Connection` options, no `Via` loop), to a
//! service whose upstreams speak HTTP/1.1. The request head is rewritten once into the
//! upstream's head (hop-by-hop fields out; `X-Forwarded-*`, `Forwarded`, `Via` and
//! `traceparent` in) and sent on a pooled upstream connection this task drives itself; the
//! response head is rewritten the same way and the body passes through in its own framing
//! (`Content-Length`, chunked, or up to the upstream's close), scanned only to find its end.
//! An event stream is re-chunked so that keep-alive comments and the idle end apply
//! ([`crate::sse`]).
//!
//! The first request that is anything else — `CONNECT`, an upgrade, HTTP/1.0, a chunked
//! body, a malformed or oversized head, no route — and every request after it on that
//! connection go to hyper ([`crate::proxy::Proxy::handle`]) with the bytes already read put
//! back in front, before anything of it was sent upstream. Both paths share the pool, the
//! metrics and the trace spans, so a client sees the same proxy either way.
//!
//! Why: per request this path does two reads and two writes and no work between tasks;
//! hyper's server and client halves cost about twice the user CPU per request, which on
//! these machines set the request rate below nginx's and HAProxy's.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::{Service, UpstreamProtocol};
use crate::pool::Link;
use crate::proxy::{ConnInfo, Proxy};
use crate::sse::{Due, Keeper, PING};
use crate::telemetry::METRICS;
use crate::telemetry::traces::{self, TraceContext};

/// Fields a head may have here (hyper's limit too); more goes to hyper.
const MAX_HEADERS: usize = 100;
/// Bytes read from the upstream at a time.
const READ_CHUNK: usize = 16 * 1024;

thread_local! {
    /// Each worker's spare read buffers: a request takes one when bytes come and gives it
    /// back when its exchange ends, so that the heap is not asked for 16 KiB twice per request
    /// and a connection between requests holds none.
    static SPARE: std::cell::RefCell<Vec<Vec<u8>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Spare buffers a worker keeps.
const SPARE_KEEP: usize = 64;

/// An empty buffer with room for [`READ_CHUNK`] bytes.
fn take_buf() -> Vec<u8> {
    SPARE
        .with(|s| s.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(READ_CHUNK))
}

/// Give a buffer back (one grown past 4 × [`READ_CHUNK`] is freed instead).
fn give_buf(mut b: Vec<u8>) {
    if b.capacity() < READ_CHUNK || b.capacity() > 4 * READ_CHUNK {
        return;
    }
    b.clear();
    SPARE.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < SPARE_KEEP {
            s.push(b);
        }
    });
}

/// Serve an HTTP/1.1 client connection; `buf` holds what protocol detection read.
pub(crate) async fn serve(
    proxy: Arc<Proxy>,
    mut client: TcpStream,
    mut buf: Vec<u8>,
    mut info: ConnInfo,
) {
    let mut shutdown = proxy.shutdown.clone();
    loop {
        let plan = match next_request(&proxy, &mut client, &mut buf, &info, &mut shutdown).await {
            Read::Plan(p) => p,
            Read::Done => return,
            Read::Hyper => break,
        };
        METRICS.h1_plain.fetch_add(1, Ordering::Relaxed);
        match exchange(&proxy, &mut client, *plan).await {
            Next::KeepAlive if !*shutdown.borrow() => {}
            Next::KeepAlive | Next::Close => return linger(&mut client).await,
            Next::Abort => return,
        }
    }
    METRICS.h1_handoffs.fetch_add(1, Ordering::Relaxed);
    // Only the bytes go on, in a block of their size; the read buffer goes back to the worker's
    // spares (a WebSocket handshake comes this way, and its connection may stay for hours).
    let head = buf.clone();
    give_buf(buf);
    let (stream, marks) = crate::sniff::Sniff::new(crate::prefixed::Prefixed::new(head, client));
    let stream = crate::stall::StallGuard::new(stream, proxy.routes().config.limits.stall_timeout);
    info.marks = marks;
    crate::server::serve_http1(proxy, stream, info).await;
}

/// Close after the last response: send FIN, then read and drop what the client still sends
/// (a request it pipelined, a body nobody read) for up to 2 s, so that closing with unread
/// bytes does not reset the connection under a response the client has not read yet.
async fn linger(client: &mut TcpStream) {
    let _ = client.shutdown().await;
    let mut sink = [0u8; 1024];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(1..) = client.read(&mut sink).await {}
    })
    .await;
}

/// Write all of `b` unless the peer takes none of it for `stall` (`limits.stall_timeout`): a
/// client that stops reading, or an upstream that stops taking a body, is given up rather than
/// holding the connections for ever. The forwarders' own write: a write the socket takes at
/// once arms no timer.
async fn put(s: &mut TcpStream, b: &[u8], stall: Duration) -> std::io::Result<()> {
    let r = crate::forward::zero_copy::write_all(s, b, stall, &mut Default::default()).await;
    if r.as_ref()
        .is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut)
    {
        METRICS.stalled_closes.fetch_add(1, Ordering::Relaxed);
    }
    r
}

/// What reading the next request gave.
enum Read {
    /// A request this path serves.
    Plan(Box<Plan>),
    /// The client closed between requests, stayed silent past the head timeout, or the
    /// proxy is draining.
    Done,
    /// A request for hyper (it is still all in the buffer).
    Hyper,
}

/// After an exchange.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    KeepAlive,
    /// Close politely (the client asked, or the response was delimited by the close).
    Close,
    /// Drop the connection: its framing is lost (a side vanished mid-message).
    Abort,
}

/// One request as it goes upstream.
struct Plan {
    service: Arc<Service>,
    upstream: usize,
    /// The upstream request head, followed by the body bytes already read.
    head: Vec<u8>,
    /// Body bytes still to come from the client.
    body_left: u64,
    method: Method,
    /// The client asked to close after this response.
    close: bool,
    trace: TraceContext,
    t0: Instant,
    /// `limits.stall_timeout`.
    stall: Duration,
}

/// Read until a whole request head is buffered (within the head timeout), then plan it.
async fn next_request(
    proxy: &Proxy,
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
    info: &ConnInfo,
    shutdown: &mut watch::Receiver<bool>,
) -> Read {
    let routes = proxy.routes();
    let limits = routes.config.limits;
    let deadline = tokio::time::Instant::now() + limits.handshake_timeout;
    loop {
        if !buf.is_empty() {
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut fields);
            match req.parse(buf) {
                Ok(httparse::Status::Complete(n)) => {
                    return match plan(proxy, &routes, &req, n, buf, info) {
                        Some((p, taken)) => {
                            buf.drain(..taken);
                            Read::Plan(Box::new(p))
                        }
                        None => Read::Hyper,
                    };
                }
                Ok(httparse::Status::Partial) if buf.len() < limits.max_head_bytes => {}
                _ => return Read::Hyper,
            }
        }
        // Nothing is held while the connection waits: a buffer is taken when bytes come.
        if buf.is_empty() && buf.capacity() > 0 {
            give_buf(std::mem::take(buf));
        }
        let ready = tokio::select! {
            r = tokio::time::timeout_at(deadline, client.readable()) => r,
            _ = shutdown.wait_for(|v| *v), if buf.is_empty() => return Read::Done,
        };
        match ready {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Read::Done,
            Err(_) => {
                if !buf.is_empty() {
                    tracing::info!(side = "client", peer = %info.peer, "request head not complete within the handshake timeout");
                }
                return Read::Done;
            }
        }
        if buf.capacity() == 0 {
            *buf = take_buf();
        } else if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_CHUNK);
        }
        match client.try_read_buf(buf) {
            Ok(0) => {
                if !buf.is_empty() {
                    // A partial head then EOF: hyper reports it as it always has.
                    return Read::Hyper;
                }
                return Read::Done;
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Read::Done,
        }
    }
}

/// Whether a `Connection` value holds only `close` and `keep-alive`; and whether `close`.
fn connection_options(v: &[u8]) -> Option<bool> {
    let mut close = false;
    for t in std::str::from_utf8(v).ok()?.split(',') {
        let t = t.trim();
        if t.eq_ignore_ascii_case("close") {
            close = true;
        } else if !t.is_empty() && !t.eq_ignore_ascii_case("keep-alive") {
            return None;
        }
    }
    Some(close)
}

/// A `Content-Length` value: digits only.
fn content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

fn put_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The upstream request for a parsed head of `n` bytes at the front of `buf`, and how many
/// bytes of `buf` it took (the head and the body bytes already read); `None` when hyper should
/// serve it.
fn plan(
    proxy: &Proxy,
    routes: &crate::proxy::Routes,
    req: &httparse::Request<'_, '_>,
    n: usize,
    buf: &[u8],
    info: &ConnInfo,
) -> Option<(Plan, usize)> {
    let (method, target) = (req.method?, req.path?);
    if req.version != Some(1) || method == "CONNECT" || !target.starts_with('/') {
        return None;
    }
    let mut host: Option<&str> = None;
    let mut length: Option<u64> = None;
    let mut close = false;
    let mut xff: Option<&[u8]> = None;
    let mut traceparent: Option<&str> = None;
    for f in req.headers.iter() {
        let name = f.name;
        let is = |s: &str| name.eq_ignore_ascii_case(s);
        if is("host") {
            if host.is_some() {
                return None;
            }
            let h = std::str::from_utf8(f.value).ok()?;
            if !h.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
                return None;
            }
            host = Some(h);
        } else if is("content-length") {
            if length.is_some() {
                return None;
            }
            length = Some(content_length(f.value)?);
        } else if is("connection") {
            close |= connection_options(f.value)?;
        } else if is("transfer-encoding")
            || is("upgrade")
            || is("expect")
            || is("te")
            || is("http2-settings")
        {
            return None;
        } else if is("via") {
            if crate::headers::via_names(std::str::from_utf8(f.value).ok()?, proxy.via_token()) {
                return None;
            }
        } else if is("traceparent") {
            traceparent = std::str::from_utf8(f.value).ok();
        } else if is("x-forwarded-for") && xff.is_none() {
            xff = Some(f.value);
        }
    }
    let host = host?;
    let path = target.split('?').next().unwrap_or(target);
    let route = routes.router.route(Some(host), path)?;
    let service = route.service;
    if service.upstream_protocol != UpstreamProtocol::Http1 {
        return None;
    }
    let method = Method::from_bytes(method.as_bytes()).ok()?;
    let trace = TraceContext::from_traceparent(traceparent);

    let mut head = Vec::with_capacity(n + 256);
    head.extend_from_slice(method.as_str().as_bytes());
    head.push(b' ');
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    for f in req.headers.iter() {
        let name = f.name;
        let is = |s: &str| name.eq_ignore_ascii_case(s);
        if is("connection")
            || is("keep-alive")
            || is("proxy-connection")
            || is("x-forwarded-for")
            || is("x-forwarded-proto")
            || is("x-forwarded-host")
            || is("traceparent")
        {
            continue;
        }
        put_field(&mut head, name.as_bytes(), f.value);
    }
    match xff.filter(|v| !v.trim_ascii().is_empty()) {
        Some(prev) => {
            head.extend_from_slice(b"x-forwarded-for: ");
            head.extend_from_slice(prev);
            head.extend_from_slice(b", ");
            head.extend_from_slice(info.client.addr());
            head.extend_from_slice(b"\r\n");
        }
        None => put_field(&mut head, b"x-forwarded-for", info.client.addr()),
    }
    put_field(&mut head, b"x-forwarded-proto", b"http");
    put_field(&mut head, b"x-forwarded-host", host.as_bytes());
    let fwd = crate::headers::forwarded_value(&info.client, "http", Some(host.as_bytes()));
    put_field(&mut head, b"forwarded", &fwd);
    put_field(&mut head, b"via", proxy.via().as_bytes());
    put_field(&mut head, b"traceparent", trace.traceparent().as_bytes());
    head.extend_from_slice(b"\r\n");
    let length = length.unwrap_or(0);
    let have = ((buf.len() - n) as u64).min(length) as usize;
    head.extend_from_slice(&buf[n..n + have]);
    let plan = Plan {
        upstream: proxy.pick_upstream_index(&service),
        service,
        head,
        body_left: length - have as u64,
        method,
        close,
        trace,
        t0: Instant::now(),
        stall: routes.config.limits.stall_timeout,
    };
    Some((plan, n + have))
}

/// A short plain-text response of the proxy's own.
fn own_response(status: u16, reason: &str, extra: &str, close: bool) -> Vec<u8> {
    let phrase = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    format!(
        "HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n{extra}{}\r\n{reason}\n",
        reason.len() + 1,
        if close { "connection: close\r\n" } else { "" },
    )
    .into_bytes()
}

/// Send one request upstream and its response back.
async fn exchange(proxy: &Proxy, client: &mut TcpStream, plan: Plan) -> Next {
    let service = &plan.service;
    let upstream = service.upstreams[plan.upstream].as_str();
    let connect_timeout = proxy.routes().config.limits.connect_timeout;
    // With the whole body in hand a request can be sent again.
    let resendable = plan.body_left == 0 && crate::proxy::is_idempotent(&plan.method);
    let mut retried = false;
    // Before the body went upstream whole, some of it may still be on its way from the client,
    // and it cannot be told apart from a next request: a refusal then closes.
    let unread = plan.close || plan.body_left > 0;
    let refuse = |status: u16, reason: &str, extra: &str, close: bool| {
        traces::request(
            &plan.trace,
            &service.name,
            &plan.method,
            Some(status),
            plan.t0.elapsed(),
        );
        own_response(status, reason, extra, close)
    };
    loop {
        let mut c = match proxy
            .pool
            .checkout(upstream, service.pool, connect_timeout, true)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                let r = if e.report(&service.name, upstream) {
                    refuse(
                        503,
                        "upstream connection limit reached",
                        "retry-after: 1\r\n",
                        unread,
                    )
                } else {
                    refuse(502, "upstream connect failed", "", unread)
                };
                return reply(client, &r, unread, plan.stall).await;
            }
        };
        let reused = c.reused;
        let Link::Raw(up) = &mut c.link else {
            unreachable!("checkout(raw = true) gives a raw connection")
        };
        let sent = match put(up, &plan.head, plan.stall).await {
            Ok(()) if plan.body_left > 0 => send_body(client, up, plan.body_left, plan.stall).await,
            Ok(()) => Ok(()),
            Err(e) => Err(Side::Upstream(e)),
        };
        let failure = match sent {
            Ok(()) => match relay_response(proxy, client, up, &plan).await {
                Ok((next, keep)) => {
                    if keep {
                        proxy.pool.checkin(c, service.pool);
                    }
                    return next;
                }
                Err(f) => f,
            },
            Err(Side::Client(e)) => {
                tracing::info!(side = "client", service = %service.name, method = %plan.method, error = %e, "client left while sending its request body");
                METRICS.finish("http", "client_error");
                return Next::Abort;
            }
            Err(Side::Upstream(e)) => Failure::BeforeResponse(e),
        };
        match failure {
            Failure::BeforeResponse(e) => {
                METRICS.upstream_error("send", reused, Some(c.age()));
                tracing::warn!(
                    side = "upstream",
                    service = %service.name,
                    %upstream,
                    method = %plan.method,
                    reused,
                    conn_age_ms = c.age().as_millis() as u64,
                    conn_idle_ms = c.idle().as_millis() as u64,
                    error = %e,
                    "upstream request failed"
                );
                if reused && resendable && !retried {
                    retried = true;
                    METRICS.retries.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                METRICS.finish("http", "upstream_error");
                let r = refuse(502, "upstream request failed", "", unread);
                return reply(client, &r, unread, plan.stall).await;
            }
            Failure::BadResponse(why) => {
                METRICS.upstream_error("send", reused, Some(c.age()));
                METRICS.finish("http", "upstream_error");
                tracing::warn!(side = "upstream", service = %service.name, %upstream, method = %plan.method, reason = why, "upstream sent a malformed response");
                let r = refuse(502, "upstream sent a malformed response", "", plan.close);
                return reply(client, &r, plan.close, plan.stall).await;
            }
            Failure::MidBody(why) => {
                tracing::warn!(side = "upstream", service = %service.name, %upstream, method = %plan.method, reason = %why, "response cut off");
                return Next::Abort;
            }
            Failure::ClientGone(e) => {
                tracing::info!(side = "client", service = %service.name, method = %plan.method, error = %e, "client left (or stalled) during the response");
                return Next::Abort;
            }
        }
    }
}

/// Write a response of the proxy's own; the connection then closes if `close`.
async fn reply(client: &mut TcpStream, r: &[u8], close: bool, stall: Duration) -> Next {
    match put(client, r, stall).await {
        Ok(()) if close => Next::Close,
        Ok(()) => Next::KeepAlive,
        Err(_) => Next::Abort,
    }
}

/// Which side an I/O error came from.
enum Side {
    Client(std::io::Error),
    Upstream(std::io::Error),
}

/// How an exchange failed.
enum Failure {
    /// No byte of a response came (the request may be sent again).
    BeforeResponse(std::io::Error),
    /// The response head was not HTTP.
    BadResponse(&'static str),
    /// The upstream broke off a response the client already has part of: both connections
    /// are dropped.
    MidBody(String),
    /// The client went away, or stalled, while the response was written to it.
    ClientGone(std::io::Error),
}

/// Copy the rest of a `Content-Length` body from the client to the upstream.
/// (The client's buffer is empty here: every body byte it held went with the head.)
async fn send_body(
    client: &mut TcpStream,
    up: &mut TcpStream,
    mut left: u64,
    stall: Duration,
) -> Result<(), Side> {
    use bytes::BufMut;
    let mut chunk = take_buf();
    while left > 0 {
        chunk.clear();
        let want = READ_CHUNK.min(left as usize);
        // A client that sends none of its announced body for `stall` is given up as well.
        let n = match tokio::time::timeout(stall, client.read_buf(&mut (&mut chunk).limit(want)))
            .await
        {
            Ok(r) => r.map_err(Side::Client)?,
            Err(_) => return Err(Side::Client(std::io::ErrorKind::TimedOut.into())),
        };
        if n == 0 {
            return Err(Side::Client(std::io::ErrorKind::UnexpectedEof.into()));
        }
        put(up, &chunk, stall).await.map_err(Side::Upstream)?;
        left -= n as u64;
    }
    give_buf(chunk);
    Ok(())
}

/// How a response body is delimited.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked(Chunked),
    /// Up to the upstream's close.
    Close,
}

/// What a response head said.
struct ResponseHead {
    status: u16,
    /// The head as the client gets it.
    head: Vec<u8>,
    head_len: usize,
    framing: Framing,
    /// The upstream closes after this response.
    upstream_close: bool,
    /// An event stream, re-chunked under a [`Keeper`].
    sse: bool,
}

/// Parse a response head at the front of `b`: `Ok(None)` while incomplete.
fn response_head(
    b: &[u8],
    head_request: bool,
    client_close: bool,
    via: &[u8],
    max: usize,
) -> Result<Option<ResponseHead>, &'static str> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut fields);
    let n = match r.parse(b) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if b.len() < max => return Ok(None),
        Ok(httparse::Status::Partial) => return Err("response head too large"),
        Err(_) => return Err("response head does not parse"),
    };
    let status = r.code.ok_or("no status")?;
    let mut length: Option<u64> = None;
    let mut chunked = false;
    let mut coded = false;
    let mut upstream_close = r.version == Some(0);
    let mut sse = false;
    let mut named: Vec<&str> = Vec::new();
    for f in r.headers.iter() {
        let is = |s: &str| f.name.eq_ignore_ascii_case(s);
        if is("content-length") {
            let l = content_length(f.value).ok_or("bad Content-Length")?;
            if length.is_some_and(|p| p != l) {
                return Err("conflicting Content-Length");
            }
            length = Some(l);
        } else if is("transfer-encoding") {
            coded = true;
            chunked = std::str::from_utf8(f.value)
                .ok()
                .and_then(|v| v.rsplit(',').next())
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
        } else if is("connection") {
            for t in std::str::from_utf8(f.value).unwrap_or("").split(',') {
                let t = t.trim();
                if t.eq_ignore_ascii_case("close") {
                    upstream_close = true;
                } else if t.eq_ignore_ascii_case("keep-alive") {
                    if r.version == Some(0) {
                        upstream_close = false;
                    }
                } else if !t.is_empty() {
                    named.push(t);
                }
            }
        } else if is("content-type") {
            sse = std::str::from_utf8(f.value).is_ok_and(crate::sse::is_event_stream_type);
        }
    }
    let interim = (100..200).contains(&status);
    let framing = if head_request || interim || status == 204 || status == 304 {
        Framing::Empty
    } else if coded {
        if chunked {
            Framing::Chunked(Chunked::default())
        } else {
            Framing::Close
        }
    } else if let Some(l) = length {
        Framing::Length(l)
    } else {
        Framing::Close
    };
    let sse = sse && !matches!(framing, Framing::Empty);
    // A body up to the close reaches the client the same way, unless it is re-chunked.
    let close_client = client_close || (framing == Framing::Close && !sse);
    let mut head = Vec::with_capacity(n + 64);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(status.to_string().as_bytes());
    head.push(b' ');
    head.extend_from_slice(r.reason.unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    for f in r.headers.iter() {
        let is = |s: &str| f.name.eq_ignore_ascii_case(s);
        let framing_field = is("content-length") || is("transfer-encoding");
        if is("connection")
            || is("keep-alive")
            || is("proxy-connection")
            || is("te")
            || is("upgrade")
            || (sse && framing_field)
            // Transfer-Encoding overrides a Content-Length beside it (RFC 9112 §6.3), which
            // must not reach the client with it.
            || (coded && is("content-length"))
            || (!sse && framing == Framing::Close && is("transfer-encoding"))
            || named.iter().any(|t| f.name.eq_ignore_ascii_case(t))
        {
            continue;
        }
        put_field(&mut head, f.name.as_bytes(), f.value);
    }
    if framing == Framing::Close && !sse && coded {
        // A coding without chunked on top: the client reads it to the close as well.
        for f in r.headers.iter() {
            if f.name.eq_ignore_ascii_case("transfer-encoding") {
                put_field(&mut head, f.name.as_bytes(), f.value);
            }
        }
    }
    if sse {
        put_field(&mut head, b"transfer-encoding", b"chunked");
    }
    put_field(&mut head, b"via", via);
    if close_client && !interim {
        put_field(&mut head, b"connection", b"close");
    }
    head.extend_from_slice(b"\r\n");
    Ok(Some(ResponseHead {
        status,
        head,
        head_len: n,
        framing,
        upstream_close,
        sse,
    }))
}

/// Read the response (after any interim ones) and pass it to the client. Gives what the
/// client connection does next and whether the upstream connection can serve another.
async fn relay_response(
    proxy: &Proxy,
    client: &mut TcpStream,
    up: &mut TcpStream,
    plan: &Plan,
) -> Result<(Next, bool), Failure> {
    let max = proxy.routes().config.limits.max_head_bytes;
    let head_request = plan.method == Method::HEAD;
    let mut rb = take_buf();
    let mut got_any = false;
    let rh = loop {
        if !rb.is_empty()
            && let Some(rh) =
                response_head(&rb, head_request, plan.close, proxy.via().as_bytes(), max)
                    .map_err(Failure::BadResponse)?
        {
            if rh.status == 101 {
                return Err(Failure::BadResponse("101 to a request without Upgrade"));
            }
            if (100..200).contains(&rh.status) {
                put(client, &rh.head, plan.stall)
                    .await
                    .map_err(Failure::ClientGone)?;
                rb.drain(..rh.head_len);
                continue;
            }
            break rh;
        }
        if rb.capacity() - rb.len() < 1024 {
            rb.reserve(READ_CHUNK);
        }
        match up.read_buf(&mut rb).await {
            Ok(0) if !got_any => {
                return Err(Failure::BeforeResponse(
                    std::io::ErrorKind::UnexpectedEof.into(),
                ));
            }
            Ok(0) => return Err(Failure::BadResponse("closed inside the response head")),
            Ok(_) => got_any = true,
            Err(e) if !got_any => return Err(Failure::BeforeResponse(e)),
            Err(_) => return Err(Failure::BadResponse("reset inside the response head")),
        }
    };
    let service = &plan.service;
    METRICS.finish("http", "ok");
    let took = plan.t0.elapsed();
    crate::telemetry::HTTP.observe(&service.name, took.as_secs_f64());
    traces::request(
        &plan.trace,
        &service.name,
        &plan.method,
        Some(rh.status),
        took,
    );
    let close_client = plan.close || (rh.framing == Framing::Close && !rh.sse);
    let mut framing = rh.framing.clone();
    rb.drain(..rh.head_len);
    let end = if rh.sse {
        let s = service.settings;
        let keeper = Keeper::new(
            Duration::from_secs(u64::from(s.ping_interval)),
            Duration::from_secs(u64::from(s.idle_timeout)),
        );
        put(client, &rh.head, plan.stall)
            .await
            .map_err(Failure::ClientGone)?;
        rechunk(client, up, &mut rb, &mut framing, keeper, plan.stall).await?
    } else {
        passthrough(client, up, &mut rb, &mut framing, rh.head, plan.stall).await?
    };
    give_buf(rb);
    let keep = !rh.upstream_close && end == End::Clean;
    let next = if close_client {
        Next::Close
    } else {
        Next::KeepAlive
    };
    Ok((next, keep))
}

/// How a body ended.
#[derive(Debug, PartialEq, Eq)]
enum End {
    /// At its framing's end, nothing after it.
    Clean,
    /// The upstream closed (close-delimited), sent bytes past the end, or an event stream
    /// went idle: the upstream connection is not used again.
    Spent,
}

/// Pass the body through in its own framing; `first` (the head) goes out with the first
/// body bytes.
async fn passthrough(
    client: &mut TcpStream,
    up: &mut TcpStream,
    rb: &mut Vec<u8>,
    framing: &mut Framing,
    first: Vec<u8>,
    stall: Duration,
) -> Result<End, Failure> {
    let mut head = Some(first);
    loop {
        let (n, done) = framing
            .scan_all(rb)
            .map_err(|e| Failure::MidBody(e.into()))?;
        let sent = match head.take() {
            // The head and the first body bytes in one write.
            Some(mut h) => {
                h.extend_from_slice(&rb[..n]);
                put(client, &h, stall).await
            }
            None if n > 0 => put(client, &rb[..n], stall).await,
            None => Ok(()),
        };
        sent.map_err(Failure::ClientGone)?;
        if done {
            return Ok(if n < rb.len() { End::Spent } else { End::Clean });
        }
        rb.clear();
        rb.reserve(READ_CHUNK);
        match up.read_buf(rb).await {
            Ok(0) if *framing == Framing::Close => return Ok(End::Spent),
            Ok(0) => return Err(Failure::MidBody("upstream closed inside the body".into())),
            Ok(_) => {}
            Err(e) => return Err(Failure::MidBody(e.to_string())),
        }
    }
}

/// Re-chunk an event stream's body, with keep-alive comments and the idle end.
async fn rechunk(
    client: &mut TcpStream,
    up: &mut TcpStream,
    rb: &mut Vec<u8>,
    framing: &mut Framing,
    mut keeper: Keeper,
    stall: Duration,
) -> Result<End, Failure> {
    let mut out = Vec::new();
    loop {
        let mut at = 0;
        let mut done = false;
        while at < rb.len() && !done {
            let s = framing
                .scan(&rb[at..])
                .map_err(|e| Failure::MidBody(e.into()))?;
            let data = &rb[at + s.data.start..at + s.data.end];
            if !data.is_empty() {
                keeper.data(data);
                out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                out.extend_from_slice(data);
                out.extend_from_slice(b"\r\n");
            }
            at += s.consumed;
            done = s.done;
        }
        done |= *framing == Framing::Length(0) || *framing == Framing::Empty;
        if done {
            out.extend_from_slice(b"0\r\n\r\n");
        }
        if !out.is_empty() {
            put(client, &out, stall)
                .await
                .map_err(Failure::ClientGone)?;
            out.clear();
        }
        if done {
            return Ok(if at < rb.len() {
                End::Spent
            } else {
                End::Clean
            });
        }
        rb.clear();
        rb.reserve(READ_CHUNK);
        let wait = loop {
            match keeper.due(tokio::time::Instant::now()) {
                Due::Ping => {
                    let mut chunk = format!("{:x}\r\n", PING.len()).into_bytes();
                    chunk.extend_from_slice(PING);
                    chunk.extend_from_slice(b"\r\n");
                    put(client, &chunk, stall)
                        .await
                        .map_err(Failure::ClientGone)?;
                }
                Due::End => {
                    put(client, b"0\r\n\r\n", stall)
                        .await
                        .map_err(Failure::ClientGone)?;
                    return Ok(End::Spent);
                }
                Due::Wait(w) => break w,
            }
        };
        let read = match wait {
            Some(w) => tokio::select! {
                r = up.read_buf(rb) => Some(r),
                _ = tokio::time::sleep_until(w) => None,
            },
            None => Some(up.read_buf(rb).await),
        };
        match read {
            None => {}
            Some(Ok(0)) if *framing == Framing::Close => {
                put(client, b"0\r\n\r\n", stall)
                    .await
                    .map_err(Failure::ClientGone)?;
                return Ok(End::Spent);
            }
            Some(Ok(0)) => return Err(Failure::MidBody("upstream closed inside the body".into())),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(Failure::MidBody(e.to_string())),
        }
    }
}

/// One step of [`Framing::scan`].
#[derive(Debug, PartialEq, Eq)]
struct Scan {
    /// Input bytes used.
    consumed: usize,
    /// Where within them the body's data is (empty if none).
    data: Range<usize>,
    /// The body ended.
    done: bool,
}

/// The state of a chunked body between reads (RFC 9112 §7.1).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Chunked {
    /// In a chunk-size line: the size so far and whether a digit was seen.
    #[default]
    Start,
    Size(u64),
    /// After the size: extensions up to the line's end.
    Ext(u64),
    /// After the size line's CR.
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final blank line).
    Trailer,
    TrailerLine,
    FinalLf,
    Done,
}

/// Why a chunked body is malformed.
const BAD_CHUNK: &str = "malformed chunked body from the upstream";

impl Framing {
    /// Consume `input` up to the next piece of data or the end.
    fn scan(&mut self, input: &[u8]) -> Result<Scan, &'static str> {
        match self {
            Framing::Empty => Ok(Scan {
                consumed: 0,
                data: 0..0,
                done: true,
            }),
            Framing::Length(left) => {
                let n = (*left).min(input.len() as u64) as usize;
                *left -= n as u64;
                Ok(Scan {
                    consumed: n,
                    data: 0..n,
                    done: *left == 0,
                })
            }
            Framing::Close => Ok(Scan {
                consumed: input.len(),
                data: 0..input.len(),
                done: false,
            }),
            Framing::Chunked(c) => c.scan(input),
        }
    }

    /// Consume as much of `input` as belongs to the body: (bytes, ended).
    fn scan_all(&mut self, input: &[u8]) -> Result<(usize, bool), &'static str> {
        let mut at = 0;
        loop {
            let s = self.scan(&input[at..])?;
            at += s.consumed;
            if s.done {
                return Ok((at, true));
            }
            if at == input.len() {
                return Ok((at, false));
            }
        }
    }
}

impl Chunked {
    fn scan(&mut self, input: &[u8]) -> Result<Scan, &'static str> {
        let mut i = 0;
        while i < input.len() {
            if let Chunked::Data(left) = self {
                let n = (*left).min((input.len() - i) as u64) as usize;
                *left -= n as u64;
                if *left == 0 {
                    *self = Chunked::DataCr;
                }
                return Ok(Scan {
                    consumed: i + n,
                    data: i..i + n,
                    done: false,
                });
            }
            let b = input[i];
            i += 1;
            *self = match (&*self, b) {
                (Chunked::Start, b) => Chunked::Size(hex(b).ok_or(BAD_CHUNK)?),
                (Chunked::Size(s), b) if hex(b).is_some() => {
                    let d = hex(b).unwrap_or_default();
                    Chunked::Size(
                        s.checked_mul(16)
                            .and_then(|s| s.checked_add(d))
                            .ok_or(BAD_CHUNK)?,
                    )
                }
                (Chunked::Size(s), b';' | b' ' | b'\t') => Chunked::Ext(*s),
                (Chunked::Size(s) | Chunked::Ext(s), b'\r') => Chunked::SizeLf(*s),
                (Chunked::Size(s) | Chunked::Ext(s) | Chunked::SizeLf(s), b'\n') => {
                    if *s == 0 {
                        Chunked::Trailer
                    } else {
                        Chunked::Data(*s)
                    }
                }
                (Chunked::Size(_), _) | (Chunked::SizeLf(_), _) => return Err(BAD_CHUNK),
                (Chunked::Ext(s), _) => Chunked::Ext(*s),
                (Chunked::DataCr, b'\r') => Chunked::DataLf,
                (Chunked::DataCr | Chunked::DataLf, b'\n') => Chunked::Start,
                (Chunked::DataCr | Chunked::DataLf, _) => return Err(BAD_CHUNK),
                (Chunked::Trailer, b'\r') => Chunked::FinalLf,
                (Chunked::Trailer | Chunked::FinalLf, b'\n') => Chunked::Done,
                (Chunked::FinalLf, _) => return Err(BAD_CHUNK),
                (Chunked::TrailerLine, b'\n') => Chunked::Trailer,
                (Chunked::Trailer | Chunked::TrailerLine, _) => Chunked::TrailerLine,
                (Chunked::Data(_), _) | (Chunked::Done, _) => unreachable!("handled above"),
            };
            if *self == Chunked::Done {
                return Ok(Scan {
                    consumed: i,
                    data: i..i,
                    done: true,
                });
            }
        }
        Ok(Scan {
            consumed: i,
            data: i..i,
            done: *self == Chunked::Done,
        })
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `body` split at every position; gives the data and whether the end was found
    /// where it is.
    fn scan_split(framing: Framing, body: &[u8]) -> Vec<(Vec<u8>, usize)> {
        let mut results = Vec::new();
        for cut in 0..=body.len() {
            let mut f = framing.clone();
            let mut data = Vec::new();
            let mut used = 0;
            for part in [&body[..cut], &body[cut..]] {
                let mut at = 0;
                while at < part.len() {
                    let s = f.scan(&part[at..]).expect("well-formed");
                    data.extend_from_slice(&part[at + s.data.start..at + s.data.end]);
                    at += s.consumed;
                    if s.done {
                        break;
                    }
                }
                used += at;
                if matches!(f, Framing::Chunked(Chunked::Done)) {
                    break;
                }
            }
            results.push((data, used));
        }
        results
    }

    #[test]
    fn a_chunked_body_is_found_whole_wherever_the_reads_split_it() {
        let body = b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: t\r\n\r\nNEXT";
        let end = body.len() - 4;
        for (data, used) in scan_split(Framing::Chunked(Chunked::default()), body) {
            assert_eq!(data, b"hello, world");
            assert_eq!(used, end, "the end is found and nothing after it taken");
        }
    }

    #[test]
    fn a_malformed_chunk_is_refused() {
        for bad in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"\r\n",
            b"ffffffffffffffffff\r\n",
        ] {
            let mut f = Framing::Chunked(Chunked::default());
            assert!(
                f.scan_all(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_length_body_ends_at_its_length() {
        let mut f = Framing::Length(5);
        assert_eq!(f.scan_all(b"helloNEXT"), Ok((5, true)));
        let mut f = Framing::Length(5);
        assert_eq!(f.scan_all(b"hel"), Ok((3, false)));
        assert_eq!(f.scan_all(b"loX"), Ok((2, true)));
    }

    #[test]
    fn response_heads_are_rewritten_for_the_client() {
        let up = b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\nX-App: a\r\n\r\nhi";
        let rh = response_head(up, false, false, b"1.1 trimtab-t", 8192)
            .unwrap()
            .unwrap();
        let head = String::from_utf8(rh.head).unwrap();
        assert_eq!(
            head,
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-App: a\r\nvia: 1.1 trimtab-t\r\n\r\n"
        );
        assert_eq!(rh.framing, Framing::Length(2));
        assert!(!rh.upstream_close);

        // Up to the close: the client is told it closes too.
        let up = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n";
        let rh = response_head(up, false, false, b"1.1 t", 8192)
            .unwrap()
            .unwrap();
        assert_eq!(rh.framing, Framing::Close);
        assert!(
            String::from_utf8(rh.head)
                .unwrap()
                .ends_with("connection: close\r\n\r\n")
        );

        // An event stream is re-chunked: its own framing fields go.
        let up =
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 10\r\n\r\n";
        let rh = response_head(up, false, false, b"1.1 t", 8192)
            .unwrap()
            .unwrap();
        assert!(rh.sse);
        let head = String::from_utf8(rh.head).unwrap();
        assert!(!head.to_ascii_lowercase().contains("content-length"));
        assert!(head.contains("transfer-encoding: chunked\r\n"));

        // Chunked with a Content-Length beside it: the length goes.
        let up = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nTransfer-Encoding: chunked\r\n\r\n";
        let rh = response_head(up, false, false, b"1.1 t", 8192)
            .unwrap()
            .unwrap();
        assert_eq!(rh.framing, Framing::Chunked(Chunked::default()));
        let head = String::from_utf8(rh.head).unwrap();
        assert!(!head.contains("Content-Length"), "{head}");
        assert!(head.contains("Transfer-Encoding: chunked\r\n"), "{head}");

        // HEAD, 204 and 304 have no body whatever the fields say.
        let up = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n";
        let rh = response_head(up, true, false, b"1.1 t", 8192)
            .unwrap()
            .unwrap();
        assert_eq!(rh.framing, Framing::Empty);

        assert!(
            response_head(
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                false,
                false,
                b"v",
                8192
            )
            .is_err()
        );
        assert!(response_head(b"NOT HTTP\r\n\r\n", false, false, b"v", 8192).is_err());
        assert_eq!(
            response_head(b"HTTP/1.1 200 OK\r\nX: y", false, false, b"v", 8192)
                .ok()
                .map(|r| r.is_none()),
            Some(true)
        );
    }

    proptest::proptest! {
        /// Any chunked body (sizes, extensions, trailers), cut into any three reads, gives
        /// back its data and ends exactly where it ends.
        #[test]
        fn chunked_bodies_are_found_whole_in_any_reads(
            chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..300), 0..6),
            ext in proptest::bool::ANY,
            trailers in 0usize..3,
            cuts in (0.0f64..1.0, 0.0f64..1.0),
        ) {
            let mut body = Vec::new();
            for c in &chunks {
                body.extend_from_slice(format!("{:X}", c.len()).as_bytes());
                if ext {
                    body.extend_from_slice(b";name=\"v\"");
                }
                body.extend_from_slice(b"\r\n");
                body.extend_from_slice(c);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n");
            for t in 0..trailers {
                body.extend_from_slice(format!("x-t{t}: v\r\n").as_bytes());
            }
            body.extend_from_slice(b"\r\n");
            let end = body.len();
            body.extend_from_slice(b"GET /next");
            let (a, b) = (cuts.0.min(cuts.1), cuts.0.max(cuts.1));
            let (a, b) = ((a * end as f64) as usize, (b * end as f64) as usize);
            let mut f = Framing::Chunked(Chunked::default());
            let mut data = Vec::new();
            let mut used = 0;
            let mut done = false;
            for part in [&body[..a], &body[a..b], &body[b..]] {
                let mut at = 0;
                while at < part.len() && !done {
                    let s = f.scan(&part[at..]).expect("well-formed");
                    data.extend_from_slice(&part[at + s.data.start..at + s.data.end]);
                    at += s.consumed;
                    done = s.done;
                }
                used += at;
                if done {
                    break;
                }
            }
            proptest::prop_assert!(done);
            proptest::prop_assert_eq!(used, end);
            proptest::prop_assert_eq!(data, chunks.concat());
        }
    }
}
