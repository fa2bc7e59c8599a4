//! The request handler: plain HTTP/1.1 through the keep-alive pool, and upgrades (WebSocket in
//! either mode, any other token as a byte tunnel) handed to the forwarders.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
use tuning::{ClientClass, ConnectionContext, Decision, Mode, Profile, Protocol, Timings};

use crate::config::{Config, Limits, Service};
use crate::forward::{self, ForwardLimits, Outcome};
use crate::headers::{self, BadRequest};
use crate::pool::{ClientBody, Pool, PooledBody};
use crate::routing::{RouteMatch, Router};
use crate::source::{ProfileSink, SettingsSource, applicable};
use crate::telemetry::METRICS;
use crate::telemetry::traces::{self, TraceContext};

/// The body of every response the proxy sends.
pub type RespBody = UnsyncBoxBody<Bytes, hyper::Error>;

/// The routing state, swapped whole on reload.
#[derive(Debug)]
pub struct Routes {
    /// The validated config.
    pub config: Config,
    /// The table built from it.
    pub router: Router,
}

impl Routes {
    /// Build from a validated config.
    pub fn new(config: Config) -> Routes {
        Routes {
            router: Router::new(&config),
            config,
        }
    }
}

/// Everything the handler shares across connections.
#[derive(Debug)]
pub struct Proxy {
    routes: RwLock<Arc<Routes>>,
    /// The upstream HTTP pool.
    pub pool: Arc<Pool>,
    /// HTTP/2 upstream connections (services with `upstream_protocol = "h2c"`).
    h2: crate::pool::H2Upstreams,
    source: Arc<dyn SettingsSource>,
    sink: Arc<dyn ProfileSink>,
    /// Turns true when the data plane starts draining.
    pub shutdown: watch::Receiver<bool>,
    via_token: String,
    /// Our Via entry, `1.1 <via_token>`.
    via: HeaderValue,
    rr: AtomicUsize,
}

/// Per-client-connection facts.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// When the TCP connection was accepted.
    pub accepted: Instant,
    /// Held while any part of this connection (including an upgraded tunnel) lives.
    pub guard: Arc<dyn std::any::Any + Send + Sync>,
    /// Per-request smuggling marks from the framing watcher under hyper.
    pub marks: crate::sniff::Marks,
    /// The address the client connected to (the PROXY header's destination when sent on).
    pub local: SocketAddr,
    /// The listener's name.
    pub listener: Arc<str>,
    /// The client's address as the forwarding headers write it.
    pub client: headers::Client,
}

/// What a tunnel keeps for its profile, boxed once.
#[derive(Debug)]
struct Tunnel {
    id: uuid::Uuid,
    ctx: ConnectionContext,
    decision: Decision,
    timings: Timings,
    started_at: chrono::DateTime<chrono::Utc>,
    /// When the client's connection was accepted.
    accepted: Instant,
    /// The connection's slot (see [`ConnInfo::guard`]); the rest of `ConnInfo` is not kept.
    _guard: Arc<dyn std::any::Any + Send + Sync>,
    trace: TraceContext,
}

/// The client side of a tunnel.
#[derive(Debug)]
pub enum ClientLeg {
    /// A TCP socket (HTTP/1.1 upgrades, CONNECT, raw TCP, TLS passthrough).
    Tcp(TcpStream),
    /// An HTTP/2 stream (RFC 8441 WebSocket): only `frame_aware` can serve it.
    H2(TokioIo<hyper::upgrade::Upgraded>),
}

/// The TCP socket and every byte already read from it, from an upgraded HTTP/1.1 connection.
fn into_tcp(parts: hyper::upgrade::Parts<TokioIo<crate::server::Http1Io>>) -> (TcpStream, Vec<u8>) {
    let (tcp, rest) = parts.io.into_inner().into_inner().into_inner().into_parts();
    // hyper's buffer holds what it read past the request head; the detection head's unread
    // part (if any) comes after it, then the socket.
    let mut head = detach(parts.read_buf);
    head.extend_from_slice(&rest);
    (tcp, head)
}

/// Resolve (timed as DNS) and connect (timed as connect) to `host:port`, trying each address.
pub(crate) async fn connect_upstream(
    upstream: &str,
    timeout: Duration,
    timings: &mut Timings,
) -> Result<TcpStream, (StatusCode, &'static str, String)> {
    let t = Instant::now();
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout(timeout, tokio::net::lookup_host(upstream)).await {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => {
                return Err((
                    StatusCode::BAD_GATEWAY,
                    "upstream name did not resolve",
                    e.to_string(),
                ));
            }
            Err(_) => {
                return Err((
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream name resolution timed out",
                    "dns timeout".into(),
                ));
            }
        };
    timings.dns_us = Some(t.elapsed().as_micros() as u64);
    let t = Instant::now();
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::from("no address");
    for a in addrs {
        match tokio::time::timeout_at(deadline, TcpStream::connect(a)).await {
            Ok(Ok(s)) => {
                timings.connect_us = Some(t.elapsed().as_micros() as u64);
                return Ok(s);
            }
            Ok(Err(e)) => last = format!("{a}: {e}"),
            Err(_) => {
                return Err((
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream connect timed out",
                    format!("{a}: timeout"),
                ));
            }
        }
    }
    Err((StatusCode::BAD_GATEWAY, "upstream connect failed", last))
}

fn full(status: StatusCode, reason: &str) -> Response<RespBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{reason}\n")))
            .map_err(|never: Infallible| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn bad_request(reason: &str) -> Response<RespBody> {
    METRICS.refused_bad_request.fetch_add(1, Ordering::Relaxed);
    let mut r = full(StatusCode::BAD_REQUEST, reason);
    // The framing of what follows cannot be trusted: close after this response.
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Methods a request may be sent again for (RFC 9110 §9.2.2).
pub(crate) fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn valid_ws_key(v: &HeaderValue) -> bool {
    // 16 random bytes, base64: 22 significant characters and "==".
    let b = v.as_bytes();
    b.len() == 24
        && b.ends_with(b"==")
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

fn offered_subprotocols(h: &http::HeaderMap) -> Vec<String> {
    h.get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

fn offers_deflate(h: &http::HeaderMap) -> bool {
    h.get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains("permessage-deflate"))
}

impl Proxy {
    /// A proxy over a validated config.
    pub fn new(
        config: Config,
        source: Arc<dyn SettingsSource>,
        sink: Arc<dyn ProfileSink>,
        shutdown: watch::Receiver<bool>,
    ) -> Proxy {
        let via_token = format!("trimtab-{}", config.dataplane_id);
        Proxy {
            routes: RwLock::new(Arc::new(Routes::new(config))),
            pool: Arc::new(Pool::default()),
            h2: crate::pool::H2Upstreams::default(),
            source,
            sink,
            shutdown,
            via: headers::via_value(&via_token),
            via_token,
            rr: AtomicUsize::new(0),
        }
    }

    /// The current routing state.
    pub fn routes(&self) -> Arc<Routes> {
        self.routes.read().expect("routes lock").clone()
    }

    /// Replace the routes (SIGHUP). Live connections keep what they started with.
    pub fn reload(&self, config: Config) {
        *self.routes.write().expect("routes lock") = Arc::new(Routes::new(config));
    }

    fn limits(&self) -> Limits {
        self.routes().config.limits
    }

    fn pick_upstream<'a>(&self, s: &'a Service) -> &'a str {
        &s.upstreams[self.pick_upstream_index(s)]
    }

    /// The next of a service's upstreams in turn.
    pub(crate) fn pick_upstream_index(&self, s: &Service) -> usize {
        self.rr.fetch_add(1, Ordering::Relaxed) % s.upstreams.len()
    }

    /// The token our `Via` entries name (a request that already has it is a loop).
    pub(crate) fn via_token(&self) -> &str {
        &self.via_token
    }

    /// Our `Via` entry.
    pub(crate) fn via(&self) -> &HeaderValue {
        &self.via
    }

    /// Handle one request from a client connection.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        mut conn: ConnInfo,
    ) -> Result<Response<RespBody>, Infallible> {
        let t0 = Instant::now();
        // An upgrade's tunnel is timed from its request.
        conn.accepted = t0;
        if conn.marks.next_request_is_smuggling() {
            tracing::info!(side = "client", peer = %conn.peer, "request with Content-Length and Transfer-Encoding refused");
            return Ok(bad_request(&BadRequest::LengthAndChunked.to_string()));
        }
        if let Err(e) = headers::check_request(req.headers(), &self.via_token) {
            return Ok(match e {
                BadRequest::Loop => full(StatusCode::LOOP_DETECTED, &e.to_string()),
                _ => bad_request(&e.to_string()),
            });
        }
        let extended_connect = req.method() == Method::CONNECT
            && req.extensions().get::<hyper::ext::Protocol>().is_some();
        if req.method() == Method::CONNECT && !extended_connect {
            return Ok(Box::pin(self.connect(req, conn)).await);
        }
        let mut req = req;
        if req.version() == http::Version::HTTP_11 && wants_h2c(req.headers()) {
            if request_has_body(req.headers()) {
                // RFC 7540 §3.2: a server may ignore the upgrade; a body would have to be read
                // before switching, so this request stays HTTP/1.1.
                req.headers_mut().remove(header::UPGRADE);
                req.headers_mut().remove("http2-settings");
            } else {
                return Ok(self.h2c_upgrade(req, conn));
            }
        }
        let routes = self.routes();
        // The Host field, or the request target's authority (absolute form).
        let host = match req.headers().get(header::HOST) {
            Some(h) if h.to_str().is_ok() => Some(h.clone()),
            _ => req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
        };
        let host_str = host.as_ref().and_then(|h| h.to_str().ok());
        let Some(route) = routes.router.route(host_str, req.uri().path()) else {
            return Ok(full(
                StatusCode::NOT_FOUND,
                "no route for this host and path",
            ));
        };
        // The tunnel and upgrade paths are boxed: a plain request's future (which hyper moves
        // whole, more than once per request) then has only the plain path's size, 2,928 bytes
        // in a release build against 4,792 with every path inline (the pool's connect, below,
        // is boxed for the same reason).
        if extended_connect || headers::wants_upgrade(req.headers()) {
            Ok(Box::pin(self.upgrade(req, conn, route, host, t0)).await)
        } else {
            Ok(self.forward_http(req, conn, route, host).await)
        }
    }

    async fn forward_http(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
        route: RouteMatch,
        host: Option<HeaderValue>,
    ) -> Response<RespBody> {
        let (mut parts, body) = req.into_parts();
        let trace = TraceContext::from_headers(&parts.headers);
        // TE is hop-by-hop, but a client that accepts trailers gets them: the proxy forwards
        // trailer fields, so it asks the upstream for them in its own name.
        let wants_trailers = parts
            .headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
        headers::strip_hop_by_hop(&mut parts.headers);
        if wants_trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        headers::add_forwarded(&mut parts.headers, &conn.client, "http", host.as_ref());
        headers::add_via(&mut parts.headers, &self.via);
        trace.inject(&mut parts.headers);
        if !parts.headers.contains_key(header::HOST)
            && let Some(h) = &host
        {
            parts.headers.insert(header::HOST, h.clone());
        }
        parts.uri = parts
            .uri
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
        parts.version = http::Version::HTTP_11;
        let idempotent = is_idempotent(&parts.method);
        let method = parts.method.clone();
        let body_failed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut req = Request::from_parts(parts, ClientBody::new(body, body_failed.clone()));
        let service = route.service.clone();
        let limits = self.limits();
        let upstream = self.pick_upstream(&service).to_string();
        let mut retried = false;
        let t0 = conn.accepted;
        if service.upstream_protocol == crate::config::UpstreamProtocol::H2c {
            return Box::pin(self.forward_h2(req, &service, &upstream, host, trace, body_failed))
                .await;
        }
        loop {
            let mut c = match self
                .pool
                .checkout(&upstream, service.pool, limits.connect_timeout, false)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    let saturated = e.report(&service.name, &upstream);
                    let status = if saturated { 503 } else { 502 };
                    traces::request(&trace, &service.name, &method, Some(status), t0.elapsed());
                    return if saturated {
                        let mut r = full(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "upstream connection limit reached",
                        );
                        r.headers_mut()
                            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                        r
                    } else {
                        full(StatusCode::BAD_GATEWAY, "upstream connect failed")
                    };
                }
            };
            let reused = c.reused;
            let crate::pool::Link::Hyper(sender) = &mut c.link else {
                unreachable!("checkout(raw = false) gives a hyper connection")
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let (mut parts, body) = resp.into_parts();
                    headers::strip_hop_by_hop(&mut parts.headers);
                    headers::add_via(&mut parts.headers, &self.via);
                    METRICS.finish("http", "ok");
                    let took = t0.elapsed();
                    crate::telemetry::HTTP.observe(&service.name, took.as_secs_f64());
                    traces::request(
                        &trace,
                        &service.name,
                        &method,
                        Some(parts.status.as_u16()),
                        took,
                    );
                    let body = PooledBody::new(body, c, self.pool.clone(), service.pool);
                    let body = event_stream(&parts.headers, body.boxed_unsync(), &service);
                    return Response::from_parts(parts, body);
                }
                Err(mut e) => {
                    let unsent = e.take_message();
                    let err = e.into_error();
                    if body_failed.load(Ordering::Relaxed) {
                        tracing::info!(side = "client", service = %service.name, %method, error = %err, "malformed request body");
                        METRICS.finish("http", "client_error");
                        return bad_request("malformed request body");
                    }
                    METRICS.upstream_error("send", reused, Some(c.age()));
                    tracing::warn!(
                        side = "upstream",
                        service = %service.name,
                        %upstream,
                        %method,
                        reused,
                        conn_age_ms = c.age().as_millis() as u64,
                        conn_idle_ms = c.idle().as_millis() as u64,
                        request_sent = unsent.is_none(),
                        error = %err,
                        "upstream request failed"
                    );
                    match unsent {
                        Some(r) if reused && idempotent && !retried => {
                            retried = true;
                            METRICS.retries.fetch_add(1, Ordering::Relaxed);
                            req = r;
                            continue;
                        }
                        _ => {
                            METRICS.finish("http", "upstream_error");
                            traces::request(
                                &trace,
                                &service.name,
                                &method,
                                Some(502),
                                t0.elapsed(),
                            );
                            return full(StatusCode::BAD_GATEWAY, "upstream request failed");
                        }
                    }
                }
            }
        }
    }

    /// Plain HTTP to an HTTP/2 upstream: one multiplexed connection per upstream; trailers
    /// (gRPC's status) pass through as they are.
    #[allow(clippy::too_many_arguments)]
    async fn forward_h2(
        &self,
        req: Request<ClientBody>,
        service: &Service,
        upstream: &str,
        host: Option<HeaderValue>,
        trace: TraceContext,
        body_failed: Arc<std::sync::atomic::AtomicBool>,
    ) -> Response<RespBody> {
        let t0 = Instant::now();
        let (mut parts, body) = req.into_parts();
        let method = parts.method.clone();
        parts.headers.remove(header::HOST);
        let authority = host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .unwrap_or(upstream)
            .to_string();
        let pq = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        parts.uri = match format!("http://{authority}{pq}").parse() {
            Ok(u) => u,
            Err(_) => return bad_request("invalid authority or path"),
        };
        parts.version = http::Version::HTTP_2;
        let mut req = Request::from_parts(parts, body);
        let limits = self.limits();
        let mut retried = false;
        let finish = |status: u16, outcome: &str| {
            METRICS.finish("http", outcome);
            traces::request(&trace, &service.name, &method, Some(status), t0.elapsed());
        };
        loop {
            let (mut sender, reused) = match self.h2.sender(upstream, limits.connect_timeout).await
            {
                Ok(s) => s,
                Err(e) => {
                    METRICS.upstream_error("connect", false, None);
                    tracing::warn!(side = "upstream", service = %service.name, %upstream, error = %e, "HTTP/2 upstream unavailable");
                    finish(502, "upstream_error");
                    return full(StatusCode::BAD_GATEWAY, "upstream connect failed");
                }
            };
            if reused {
                METRICS.pool_reused.fetch_add(1, Ordering::Relaxed);
            } else {
                METRICS.pool_new.fetch_add(1, Ordering::Relaxed);
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let (mut parts, body) = resp.into_parts();
                    headers::strip_hop_by_hop(&mut parts.headers);
                    headers::add_via(&mut parts.headers, &self.via);
                    crate::telemetry::HTTP.observe(&service.name, t0.elapsed().as_secs_f64());
                    finish(parts.status.as_u16(), "ok");
                    let body = event_stream(&parts.headers, body.boxed_unsync(), service);
                    return Response::from_parts(parts, body);
                }
                Err(mut e) => {
                    let unsent = e.take_message();
                    let err = e.into_error();
                    if body_failed.load(Ordering::Relaxed) {
                        METRICS.finish("http", "client_error");
                        return bad_request("malformed request body");
                    }
                    METRICS.upstream_error("send", reused, None);
                    tracing::warn!(side = "upstream", service = %service.name, %upstream, %method, reused, error = %err, "HTTP/2 upstream request failed");
                    match unsent {
                        // Not sent (the connection went away): once more on a new connection.
                        Some(r) if !retried => {
                            retried = true;
                            METRICS.retries.fetch_add(1, Ordering::Relaxed);
                            req = r;
                        }
                        _ => {
                            finish(502, "upstream_error");
                            return full(StatusCode::BAD_GATEWAY, "upstream request failed");
                        }
                    }
                }
            }
        }
    }

    async fn upgrade(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        conn: ConnInfo,
        route: RouteMatch,
        host: Option<HeaderValue>,
        t0: Instant,
    ) -> Response<RespBody> {
        // RFC 8441: WebSocket over an HTTP/2 stream (extended CONNECT with :protocol).
        let h2 = req.version() == http::Version::HTTP_2;
        let token_value = if h2 {
            let p = req
                .extensions()
                .get::<hyper::ext::Protocol>()
                .map(|p| p.as_str().to_ascii_lowercase())
                .unwrap_or_default();
            if p != "websocket" {
                return full(
                    StatusCode::NOT_IMPLEMENTED,
                    "extended CONNECT supports only :protocol websocket",
                );
            }
            HeaderValue::from_static("websocket")
        } else {
            req.headers()[header::UPGRADE].clone()
        };
        let token = token_value
            .to_str()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let is_ws = token == "websocket";
        let client_key = req.headers().get(header::SEC_WEBSOCKET_KEY).cloned();
        if is_ws {
            if req.method() != Method::GET && !h2 {
                return bad_request("WebSocket upgrade must use GET");
            }
            let version_ok = req
                .headers()
                .get(header::SEC_WEBSOCKET_VERSION)
                .is_some_and(|v| v == "13");
            if !version_ok {
                let mut r = full(
                    StatusCode::UPGRADE_REQUIRED,
                    "unsupported WebSocket version",
                );
                r.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
                return r;
            }
            if !h2 && !client_key.as_ref().is_some_and(valid_ws_key) {
                return bad_request("missing or invalid Sec-WebSocket-Key");
            }
        }
        let service = route.service.clone();
        let routes = self.routes();
        let limits = routes.config.limits;
        let offered = offered_subprotocols(req.headers());
        let ua = req
            .headers()
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok());
        let started_at = chrono::Utc::now();
        let ctx = ConnectionContext {
            service: service.name.clone(),
            route: route.route.clone(),
            protocol: if is_ws {
                Protocol::Websocket
            } else {
                Protocol::Upgrade
            },
            subprotocol: offered.first().cloned(),
            offers_deflate: offers_deflate(req.headers()),
            client_class: ClientClass::from_user_agent(ua),
            client_region: routes.config.regions.lookup(conn.peer.ip()).to_string(),
            hour_of_week: tuning::context::hour_of_week(started_at.timestamp()),
            client_key: Some(
                routes
                    .config
                    .client_key_header
                    .as_ref()
                    .and_then(|h| req.headers().get(h))
                    .and_then(|v| v.to_str().ok())
                    .map(|v| v.trim().chars().take(128).collect::<String>())
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| conn.peer.ip().to_string()),
            ),
        };
        let connection_id = uuid::Uuid::new_v4();
        let mut decision = applicable(self.source.decide(&ctx, &service, &connection_id));
        if h2 {
            // The client leg is an HTTP/2 stream, not a socket: nothing to splice, so frames
            // are parsed. The profile records the mode applied.
            decision.settings.mode = Mode::FrameAware;
        }
        let frame_aware = is_ws && decision.settings.mode == Mode::FrameAware;
        // permessage-deflate toward the client, when decided and the client offers it. The
        // profile records what was applied: compression off when the client offered nothing
        // acceptable.
        let deflate = if frame_aware && decision.settings.compression {
            crate::deflate::negotiate(
                req.headers()
                    .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            )
        } else {
            None
        };
        decision.settings.compression = deflate.is_some();

        // Upstream: connect, send the upgrade request, read its answer.
        let upstream = self.pick_upstream(&service).to_string();
        let mut timings = Timings::default();
        let tcp = match connect_upstream(&upstream, limits.connect_timeout, &mut timings).await {
            Ok(t) => t,
            Err((status, reason, detail)) => {
                METRICS.upstream_error("connect", false, None);
                METRICS.finish(ctx.protocol.as_str(), "upstream_error");
                tracing::warn!(side = "upstream", service = %service.name, %upstream, error = %detail, "upstream connect failed");
                return full(status, reason);
            }
        };
        let _ = tcp.set_nodelay(true);
        let mut tcp = tcp;
        if let Some(v) = service.send_proxy_protocol
            && let Err(e) = send_proxy_header(&mut tcp, v, &conn).await
        {
            METRICS.upstream_error("send", false, Some(Duration::ZERO));
            METRICS.finish(ctx.protocol.as_str(), "upstream_error");
            tracing::warn!(side = "upstream", service = %service.name, %upstream, error = %e, "sending the PROXY header failed");
            return full(StatusCode::BAD_GATEWAY, "upstream connect failed");
        }
        let mut up_headers = req.headers().clone();
        let trace = TraceContext::from_headers(&up_headers);
        headers::strip_hop_by_hop(&mut up_headers);
        headers::add_forwarded(&mut up_headers, &conn.client, "http", host.as_ref());
        headers::add_via(&mut up_headers, &self.via);
        trace.inject(&mut up_headers);
        up_headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        up_headers.insert(header::UPGRADE, token_value.clone());
        if !up_headers.contains_key(header::HOST)
            && let Some(h) = &host
        {
            up_headers.insert(header::HOST, h.clone());
        }
        let up_key = if frame_aware {
            let k = generate_key();
            up_headers.insert(
                header::SEC_WEBSOCKET_KEY,
                HeaderValue::from_str(&k).expect("base64 is a valid header value"),
            );
            // The upstream leg is plain RFC 6455: no extensions offered.
            up_headers.remove(header::SEC_WEBSOCKET_EXTENSIONS);
            Some(k)
        } else {
            client_key
                .as_ref()
                .and_then(|k| k.to_str().ok())
                .map(str::to_owned)
        };
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        // A target that does not parse as one is sent as "/" (as before, through `Uri`).
        let path = if path.parse::<Uri>().is_ok() {
            path
        } else {
            "/".to_string()
        };
        let mut tcp = tcp;
        let handshake = async {
            crate::upgrade::send_request(&mut tcp, &path, &up_headers).await?;
            crate::upgrade::read_answer(&mut tcp).await
        };
        let answer = match tokio::time::timeout(limits.handshake_timeout, handshake).await {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                METRICS.upstream_error("send", false, Some(Duration::ZERO));
                METRICS.finish(ctx.protocol.as_str(), "upstream_error");
                tracing::warn!(side = "upstream", service = %service.name, %upstream, error = %e, "upstream upgrade request failed");
                return full(StatusCode::BAD_GATEWAY, "upstream upgrade request failed");
            }
            Err(_) => {
                METRICS.finish(ctx.protocol.as_str(), "timeout");
                return full(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream did not answer the upgrade",
                );
            }
        };
        if answer.status != StatusCode::SWITCHING_PROTOCOLS {
            // The upstream refused the upgrade: relay its answer, body included.
            let crate::upgrade::Answer {
                status,
                headers: mut parts_headers,
                rest,
            } = answer;
            let body = tokio::time::timeout(
                limits.handshake_timeout,
                crate::upgrade::read_body(&mut tcp, status, &parts_headers, rest),
            )
            .await;
            let body = match body {
                Ok(Ok(b)) => b,
                Ok(Err(e)) => {
                    METRICS.finish(ctx.protocol.as_str(), "upstream_error");
                    tracing::warn!(side = "upstream", service = %service.name, %upstream, %status, error = %e, "reading the upstream's refusal failed");
                    return full(
                        StatusCode::BAD_GATEWAY,
                        "upstream refused the upgrade with an unreadable answer",
                    );
                }
                Err(_) => {
                    METRICS.finish(ctx.protocol.as_str(), "timeout");
                    return full(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream did not finish its refusal",
                    );
                }
            };
            headers::strip_hop_by_hop(&mut parts_headers);
            parts_headers.remove(header::CONTENT_LENGTH);
            headers::add_via(&mut parts_headers, &self.via);
            METRICS.finish(ctx.protocol.as_str(), "ok");
            let mut r = Response::new(Full::new(body).map_err(|e| match e {}).boxed_unsync());
            *r.status_mut() = status;
            *r.headers_mut() = parts_headers;
            return r;
        }
        // Check the upstream's 101 before telling the client yes.
        let up_h = &answer.headers;
        let upgrade_ok = up_h
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case(&token));
        if !upgrade_ok {
            METRICS.finish(ctx.protocol.as_str(), "upstream_error");
            return full(
                StatusCode::BAD_GATEWAY,
                "upstream switched to a different protocol",
            );
        }
        if is_ws {
            let want = up_key.as_deref().map(|k| derive_accept_key(k.as_bytes()));
            let got = up_h
                .get(header::SEC_WEBSOCKET_ACCEPT)
                .and_then(|v| v.to_str().ok());
            if want.as_deref() != got {
                METRICS.finish("websocket", "upstream_error");
                return full(
                    StatusCode::BAD_GATEWAY,
                    "upstream sent a wrong Sec-WebSocket-Accept",
                );
            }
            let selected = up_h
                .get(header::SEC_WEBSOCKET_PROTOCOL)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.trim().to_string());
            if let Some(s) = &selected
                && !offered.iter().any(|o| o == s)
            {
                METRICS.finish("websocket", "upstream_error");
                return full(
                    StatusCode::BAD_GATEWAY,
                    "upstream selected a subprotocol the client did not offer",
                );
            }
            if frame_aware && up_h.contains_key(header::SEC_WEBSOCKET_EXTENSIONS) {
                METRICS.finish("websocket", "upstream_error");
                return full(
                    StatusCode::BAD_GATEWAY,
                    "upstream negotiated an extension it was not offered",
                );
            }
        }
        let mut client_headers = answer.headers;
        headers::strip_hop_by_hop(&mut client_headers);
        headers::add_via(&mut client_headers, &self.via);
        client_headers.remove(header::SEC_WEBSOCKET_ACCEPT);
        if !h2 {
            client_headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            client_headers.insert(header::UPGRADE, token_value);
        }
        if is_ws && !h2 {
            let k = client_key.as_ref().expect("validated above").as_bytes();
            client_headers.insert(
                header::SEC_WEBSOCKET_ACCEPT,
                HeaderValue::from_str(&derive_accept_key(k)).expect("base64"),
            );
        }
        let deflate = deflate.map(|(params, response)| {
            if let Ok(v) = HeaderValue::from_str(&response) {
                client_headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, v);
            }
            params
        });
        timings.upgrade_us = Some(t0.elapsed().as_micros() as u64);
        let (upstream, upstream_head) = (tcp, answer.rest);
        let client_on = hyper::upgrade::on(&mut req);
        let proxy = self.clone();
        // One box for everything the tunnel keeps: captured loose, each value would be held
        // twice for the connection's life (by this task and by the tunnel's own state).
        let meta = Box::new(Tunnel {
            id: connection_id,
            ctx,
            decision,
            timings,
            started_at,
            accepted: conn.accepted,
            _guard: conn.guard,
            trace,
        });
        tokio::spawn(async move {
            let c = match client_on.await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "the client's upgrade did not complete");
                    return;
                }
            };
            let (client, client_head) = if h2 {
                (ClientLeg::H2(TokioIo::new(c)), Vec::new())
            } else {
                match c.downcast::<TokioIo<crate::server::Http1Io>>() {
                    Ok(c) => {
                        let (tcp, head) = into_tcp(c);
                        (ClientLeg::Tcp(tcp), head)
                    }
                    Err(_) => {
                        tracing::error!("upgraded client connection is not a TCP stream");
                        return;
                    }
                }
            };
            proxy.tunnel(client, client_head, upstream, upstream_head, deflate, meta);
        });
        let mut r = Response::new(
            Empty::new()
                .map_err(|never: Infallible| match never {})
                .boxed_unsync(),
        );
        *r.status_mut() = if h2 {
            StatusCode::OK
        } else {
            StatusCode::SWITCHING_PROTOCOLS
        };
        *r.headers_mut() = client_headers;
        r
    }

    /// Answer `Upgrade: h2c` (a request without a body): 101, then HTTP/2 on the connection,
    /// the upgrade request answered on stream 1.
    fn h2c_upgrade(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        conn: ConnInfo,
    ) -> Response<RespBody> {
        let authority = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost")
            .to_string();
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        let frame =
            match crate::h2c::upgrade_request_frame(req.method(), &path, &authority, req.headers())
            {
                Ok(f) => f,
                Err(reason) => {
                    return full(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, reason);
                }
            };
        let on = hyper::upgrade::on(&mut req);
        let proxy = self.clone();
        tokio::spawn(async move {
            let upgraded = match on.await {
                Ok(u) => u,
                Err(e) => {
                    tracing::debug!(error = %e, "h2c upgrade did not complete");
                    return;
                }
            };
            let Ok(parts) = upgraded.downcast::<TokioIo<crate::server::Http1Io>>() else {
                tracing::error!("upgraded client connection is not a TCP stream");
                return;
            };
            METRICS.h2c_upgrades.fetch_add(1, Ordering::Relaxed);
            let (tcp, head) = into_tcp(parts);
            let stream =
                crate::h2c::Upgraded::new(crate::prefixed::Prefixed::new(head, tcp), frame);
            crate::server::serve_h2(proxy, stream, conn).await;
        });
        let mut r = Response::new(
            Empty::new()
                .map_err(|never: Infallible| match never {})
                .boxed_unsync(),
        );
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        r.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        r
    }

    /// HTTP CONNECT: a byte tunnel to an allowed destination.
    async fn connect(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        conn: ConnInfo,
    ) -> Response<RespBody> {
        let routes = self.routes();
        let Some(connect) = routes.config.connect.clone() else {
            METRICS.refused_connect.fetch_add(1, Ordering::Relaxed);
            return full(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not enabled on this proxy",
            );
        };
        if req.version() != http::Version::HTTP_11 {
            return full(
                StatusCode::NOT_IMPLEMENTED,
                "CONNECT is served over HTTP/1.1 only",
            );
        }
        let Some((host, port)) = req
            .uri()
            .authority()
            .and_then(|a| Some((a.host().to_string(), a.port_u16()?)))
        else {
            return bad_request("CONNECT needs host:port");
        };
        if !connect.allows(&host, port) {
            METRICS.refused_connect.fetch_add(1, Ordering::Relaxed);
            tracing::info!(side = "client", peer = %conn.peer, %host, port, "CONNECT to a destination not on the allow-list refused");
            return full(StatusCode::FORBIDDEN, "destination not allowed");
        }
        let started_at = chrono::Utc::now();
        let ctx = self.tcp_context(
            &connect.service.name,
            "connect".into(),
            None,
            &conn,
            req.headers(),
            started_at,
        );
        let id = uuid::Uuid::new_v4();
        let mut decision = applicable(self.source.decide(&ctx, &connect.service, &id));
        decision.settings.mode = Mode::ZeroCopy;
        decision.settings.compression = false;
        let mut timings = Timings::default();
        let target = format!("{}:{port}", req.uri().authority().map_or("", |a| a.host()));
        let up = match connect_upstream(&target, routes.config.limits.connect_timeout, &mut timings)
            .await
        {
            Ok(t) => t,
            Err((status, reason, detail)) => {
                METRICS.upstream_error("connect", false, None);
                METRICS.finish("tcp", "upstream_error");
                tracing::warn!(side = "upstream", service = "connect", %target, error = %detail, "CONNECT destination unreachable");
                return full(status, reason);
            }
        };
        let _ = up.set_nodelay(true);
        let trace = TraceContext::from_headers(req.headers());
        let on = hyper::upgrade::on(&mut req);
        let proxy = self.clone();
        let meta = Box::new(Tunnel {
            id,
            ctx,
            decision,
            timings,
            started_at,
            accepted: conn.accepted,
            _guard: conn.guard,
            trace,
        });
        tokio::spawn(async move {
            let parts = match on
                .await
                .map(|u| u.downcast::<TokioIo<crate::server::Http1Io>>())
            {
                Ok(Ok(p)) => p,
                _ => {
                    tracing::debug!("CONNECT tunnel did not start");
                    return;
                }
            };
            let (tcp, head) = into_tcp(parts);
            proxy.tunnel(ClientLeg::Tcp(tcp), head, up, Vec::new(), None, meta);
        });
        let mut r = Response::new(
            Empty::new()
                .map_err(|never: Infallible| match never {})
                .boxed_unsync(),
        );
        headers::add_via(r.headers_mut(), &self.via);
        r
    }

    /// The decision-time context of a raw byte tunnel (CONNECT, raw TCP, TLS passthrough).
    fn tcp_context(
        &self,
        service: &str,
        route: String,
        subprotocol: Option<String>,
        conn: &ConnInfo,
        h: &http::HeaderMap,
        started_at: chrono::DateTime<chrono::Utc>,
    ) -> ConnectionContext {
        let routes = self.routes();
        let ua = h.get(header::USER_AGENT).and_then(|v| v.to_str().ok());
        ConnectionContext {
            service: service.to_string(),
            route,
            protocol: Protocol::Tcp,
            subprotocol,
            offers_deflate: false,
            client_class: ClientClass::from_user_agent(ua),
            client_region: routes.config.regions.lookup(conn.peer.ip()).to_string(),
            hour_of_week: tuning::context::hour_of_week(started_at.timestamp()),
            client_key: Some(
                routes
                    .config
                    .client_key_header
                    .as_ref()
                    .and_then(|k| h.get(k))
                    .and_then(|v| v.to_str().ok())
                    .map(|v| v.trim().chars().take(128).collect::<String>())
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| conn.peer.ip().to_string()),
            ),
        }
    }

    /// A raw TCP or TLS passthrough connection: connect to the service and forward bytes
    /// (`head` first) with `zero_copy`, profiled like any tunnel.
    #[allow(clippy::too_many_arguments)]
    pub async fn raw_tunnel(
        self: Arc<Self>,
        mut client: TcpStream,
        head: Vec<u8>,
        service: &str,
        route: String,
        subprotocol: Option<String>,
        conn: ConnInfo,
        tls: bool,
    ) {
        let routes = self.routes();
        let Some(service) = routes.config.services.get(service).cloned() else {
            return;
        };
        let started_at = chrono::Utc::now();
        let ctx = self.tcp_context(
            &service.name,
            route,
            subprotocol,
            &conn,
            &http::HeaderMap::new(),
            started_at,
        );
        let id = uuid::Uuid::new_v4();
        let mut decision = applicable(self.source.decide(&ctx, &service, &id));
        decision.settings.mode = Mode::ZeroCopy;
        decision.settings.compression = false;
        let upstream = self.pick_upstream(&service).to_string();
        let mut timings = Timings::default();
        let mut up = match connect_upstream(
            &upstream,
            routes.config.limits.connect_timeout,
            &mut timings,
        )
        .await
        {
            Ok(t) => t,
            Err((_, _, detail)) => {
                METRICS.upstream_error("connect", false, None);
                METRICS.finish("tcp", "upstream_error");
                tracing::warn!(side = "upstream", service = %service.name, %upstream, error = %detail, "upstream connect failed");
                if tls {
                    use tokio::io::AsyncWriteExt;
                    let _ = client.write_all(&crate::tls::ALERT_INTERNAL_ERROR).await;
                }
                return;
            }
        };
        let _ = up.set_nodelay(true);
        if let Some(v) = service.send_proxy_protocol
            && let Err(e) = send_proxy_header(&mut up, v, &conn).await
        {
            METRICS.upstream_error("send", false, Some(Duration::ZERO));
            METRICS.finish("tcp", "upstream_error");
            tracing::warn!(side = "upstream", service = %service.name, %upstream, error = %e, "sending the PROXY header failed");
            return;
        }
        let trace = TraceContext::from_headers(&http::HeaderMap::new());
        let meta = Box::new(Tunnel {
            id,
            ctx,
            decision,
            timings,
            started_at,
            accepted: conn.accepted,
            _guard: conn.guard,
            trace,
        });
        self.tunnel(ClientLeg::Tcp(client), head, up, Vec::new(), None, meta);
    }

    /// Start forwarding an upgraded connection in its own task (this returns at once).
    #[allow(clippy::too_many_arguments)]
    fn tunnel(
        self: Arc<Self>,
        client: ClientLeg,
        client_head: Vec<u8>,
        upstream: TcpStream,
        upstream_head: Vec<u8>,
        deflate: Option<crate::deflate::DeflateParams>,
        meta: Box<Tunnel>,
    ) {
        METRICS.active_upgraded.fetch_add(1, Ordering::Relaxed);
        // Copy the bytes that came with the handshakes and let hyper's read buffers go: a
        // `Bytes` slice keeps its whole allocation (8 KiB or more per side) alive, which would
        // be held for the life of an idle connection.
        let (client_head, upstream_head) = (shrink(client_head), shrink(upstream_head));
        let limits = self.limits();
        let settings = meta.decision.settings;
        let fl = ForwardLimits {
            stall_timeout: limits.stall_timeout,
            max_message_bytes: limits.max_message_bytes,
            close_grace: limits.drain_timeout.min(Duration::from_secs(5)),
        };
        // Spread shutdown closes over most of the drain window.
        let slot = tuning::hash::unit(tuning::hash::stable_hash(&[meta.id.as_bytes()]));
        let drain_delay = limits.drain_timeout.mul_f64(0.5 * slot);
        let is_ws = meta.ctx.protocol == Protocol::Websocket;
        // Each mode's forwarding is a task of its own, sized to that mode's state: one task
        // type for every mode would be as large as the largest mode's state (13 KiB measured),
        // held by every connection for its whole life; a task that awaited a boxed forwarding
        // future would hold its own state and a second allocation besides. Each arm passes the
        // forwarding future itself: wrapped in an `async` block, its arguments would be held a
        // second time.
        let shutdown = self.shutdown.clone();
        match client {
            // An HTTP/2 stream is no socket: frames are parsed.
            ClientLeg::H2(client) => self.spawn_forwarding(
                meta,
                frame_aware(
                    client,
                    client_head,
                    upstream,
                    upstream_head,
                    deflate,
                    settings,
                    fl,
                    shutdown,
                    drain_delay,
                ),
            ),
            // Two sockets and no deflate: the proxy's own frame forwarder.
            ClientLeg::Tcp(client)
                if deflate.is_none() && is_ws && settings.mode == Mode::FrameAware =>
            {
                self.spawn_forwarding(
                    meta,
                    forward::frame_tcp::run(
                        client,
                        client_head,
                        upstream,
                        upstream_head,
                        settings,
                        fl,
                        shutdown,
                        drain_delay,
                    ),
                )
            }
            ClientLeg::Tcp(client) if deflate.is_some() => self.spawn_forwarding(
                meta,
                frame_aware(
                    client,
                    client_head,
                    upstream,
                    upstream_head,
                    deflate,
                    settings,
                    fl,
                    shutdown,
                    drain_delay,
                ),
            ),
            ClientLeg::Tcp(client) => {
                let framing = if is_ws {
                    forward::zero_copy::Framing::WebSocket
                } else {
                    forward::zero_copy::Framing::Opaque
                };
                self.spawn_forwarding(
                    meta,
                    forward::zero_copy::run(
                        client,
                        client_head,
                        upstream,
                        upstream_head,
                        settings,
                        framing,
                        fl,
                        shutdown,
                        drain_delay,
                    ),
                )
            }
        }
    }

    /// Run `forwarding` as the connection's task, then count it and emit its profile.
    fn spawn_forwarding(
        self: Arc<Self>,
        meta: Box<Tunnel>,
        forwarding: impl std::future::Future<Output = Outcome> + Send + 'static,
    ) {
        tokio::spawn(Finishing {
            forwarding,
            then: Some((self, meta)),
        });
    }

    /// Count a finished tunnel and emit its profile.
    fn finish_tunnel(&self, out: Outcome, meta: Box<Tunnel>) {
        let Tunnel {
            id,
            ctx,
            decision,
            timings,
            started_at,
            accepted,
            _guard: guard,
            trace,
        } = *meta;
        METRICS.active_upgraded.fetch_sub(1, Ordering::Relaxed);
        let m = &METRICS;
        m.bytes[0].fetch_add(out.c2u.bytes, Ordering::Relaxed);
        m.bytes[1].fetch_add(out.u2c.bytes, Ordering::Relaxed);
        m.messages[0].fetch_add(out.c2u.messages, Ordering::Relaxed);
        m.messages[1].fetch_add(out.u2c.messages, Ordering::Relaxed);
        m.paused_us
            .fetch_add(out.paused.as_micros() as u64, Ordering::Relaxed);
        if out.dead_peer {
            m.dead_peers.fetch_add(1, Ordering::Relaxed);
        }
        if out.idle_timeout_fired {
            m.idle_timeouts.fetch_add(1, Ordering::Relaxed);
        }
        if out.error_class.is_some_and(|e| e.ends_with("_stalled")) {
            m.stalled_closes.fetch_add(1, Ordering::Relaxed);
        }
        let outcome = match (out.error_class, out.closed_by) {
            (Some(e), _) if e.starts_with("upstream") => "upstream_error",
            (Some(_), _) => "client_error",
            (None, Some(tuning::ClosedBy::Proxy)) => "proxy_closed",
            _ => "ok",
        };
        m.finish(ctx.protocol.as_str(), outcome);
        let profile = Profile {
            connection_id: id,
            dataplane_id: self.routes().config.dataplane_id.clone(),
            started_at,
            duration_us: accepted.elapsed().as_micros() as u64,
            context: ctx,
            decision,
            timings,
            client_to_upstream: out.c2u,
            upstream_to_client: out.u2c,
            ping_client: out.ping_client,
            ping_upstream: out.ping_upstream,
            paused_ms: out.paused.as_millis() as u64,
            peak_buffered_bytes: out.peak_buffered,
            closed_by: out.closed_by.unwrap_or(tuning::ClosedBy::Proxy),
            close_code: out.close_code,
            close_reason: out.close_reason,
            error_class: out.error_class.map(str::to_owned),
            dead_peer: out.dead_peer,
            idle_timeout_fired: out.idle_timeout_fired,
        };
        crate::telemetry::CONNECTIONS.observe(&profile);
        traces::connection(&trace, &profile);
        // Per-service sampling, decided by the connection id so replays agree.
        let rate = self
            .routes()
            .config
            .services
            .get(&profile.context.service)
            .map_or(1.0, |s| s.profile_sample_rate);
        if rate >= 1.0
            || tuning::hash::unit(tuning::hash::stable_hash(&[b"sample", id.as_bytes()])) < rate
        {
            m.profiles_emitted.fetch_add(1, Ordering::Relaxed);
            self.sink.emit(profile);
        }
        // The connection's slot is released only after its profile was handed over.
        drop(guard);
    }
}

pin_project_lite::pin_project! {
    /// A connection's forwarding, then its profile: the task of an upgraded connection. A
    /// future of its own rather than an `async` block: a block that awaits a future it was
    /// given holds that future twice (once as the captured value, once as the awaited one;
    /// 4,696 bytes instead of 2,336 measured for `zero_copy`), for the connection's life.
    struct Finishing<F> {
        #[pin]
        forwarding: F,
        then: Option<(Arc<Proxy>, Box<Tunnel>)>,
    }
}

impl<F: std::future::Future<Output = Outcome>> std::future::Future for Finishing<F> {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let this = self.project();
        let out = std::task::ready!(this.forwarding.poll(cx));
        if let Some((proxy, meta)) = this.then.take() {
            proxy.finish_tunnel(out, meta);
        }
        std::task::Poll::Ready(())
    }
}

/// A boxed forwarding future (each mode's at its own size).
type Forwarding = std::pin::Pin<Box<dyn std::future::Future<Output = Outcome> + Send>>;

/// `frame_aware` forwarding of a client leg, under permessage-deflate when it was agreed.
#[allow(clippy::too_many_arguments)]
fn frame_aware<C>(
    client: C,
    client_head: Vec<u8>,
    upstream: TcpStream,
    upstream_head: Vec<u8>,
    deflate: Option<crate::deflate::DeflateParams>,
    settings: tuning::Settings,
    fl: ForwardLimits,
    shutdown: watch::Receiver<bool>,
    drain_delay: Duration,
) -> Forwarding
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match deflate {
        Some(params) => {
            let client =
                crate::deflate::DeflateStream::new(client, params, fl.max_message_bytes, 6)
                    .with_prefix(&client_head);
            Box::pin(forward::frame_aware::run(
                client,
                Vec::new(),
                upstream,
                upstream_head,
                settings,
                fl,
                shutdown,
                drain_delay,
            ))
        }
        None => Box::pin(forward::frame_aware::run(
            client,
            client_head,
            upstream,
            upstream_head,
            settings,
            fl,
            shutdown,
            drain_delay,
        )),
    }
}

/// An event stream's body gets the service's idle and keep-alive handling; others pass as
/// they are.
fn event_stream(h: &http::HeaderMap, body: RespBody, service: &Service) -> RespBody {
    if !crate::sse::is_event_stream(h) {
        return body;
    }
    let s = service.settings;
    crate::sse::SseBody::new(
        body,
        Duration::from_secs(u64::from(s.ping_interval)),
        Duration::from_secs(u64::from(s.idle_timeout)),
    )
    .boxed_unsync()
}

/// An owned copy of `b`, sized to its bytes; `b` (and the allocation it slices) is dropped.
fn detach(b: Bytes) -> Vec<u8> {
    b.to_vec()
}

/// `b` without spare capacity (it may be held for the life of an idle connection).
fn shrink(mut b: Vec<u8>) -> Vec<u8> {
    b.shrink_to_fit();
    b
}

/// Write the PROXY protocol header for this client first on an upstream connection.
async fn send_proxy_header(
    up: &mut TcpStream,
    version: crate::config::ProxyVersion,
    conn: &ConnInfo,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let h = crate::proxy_protocol::encode(version, conn.peer, conn.local);
    up.write_all(&h).await
}

/// Whether a request asks to upgrade to h2c (RFC 7540 §3.2: with an HTTP2-Settings header).
fn wants_h2c(h: &http::HeaderMap) -> bool {
    h.contains_key("http2-settings")
        && h.get_all(header::UPGRADE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("h2c"))
}

/// Whether a request head announces a body.
fn request_has_body(h: &http::HeaderMap) -> bool {
    h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() != "0")
}
