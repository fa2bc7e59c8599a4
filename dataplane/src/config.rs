//! The data plane's configuration: one TOML file, deserialized once and validated into a
//! checked [`Config`] at startup. Every problem is reported with its key and value.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use tuning::{PartialSettings, Settings};

/// The configuration file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address the proxy listens on.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Address of the admin endpoint (`/healthz`, `/readyz`, `/metrics`).
    #[serde(default = "default_admin")]
    pub admin_listen: String,
    /// Name of this data plane in profiles and logs (default: the host name).
    #[serde(default)]
    pub dataplane_id: Option<String>,
    /// Connection worker threads, each with its own event loop; a connection stays on the
    /// worker that took it (default: one per available core).
    #[serde(default)]
    pub workers: Option<usize>,
    /// Limits that apply to every connection.
    #[serde(default)]
    pub limits: RawLimits,
    /// Static settings for every service unless the service says otherwise.
    #[serde(default)]
    pub defaults: Settings,
    /// Services by name.
    #[serde(default)]
    pub services: BTreeMap<String, RawService>,
    /// Where profiles go; when absent they are only logged.
    #[serde(default)]
    pub profiles: Option<RawProfiles>,
    /// Client regions by name: lists of CIDR blocks (`"10.0.0.0/8"`, `"2001:db8::/32"`).
    #[serde(default)]
    pub regions: BTreeMap<String, Vec<String>>,
    /// The optimizer to take decisions from; when absent, every service's static settings.
    #[serde(default)]
    pub optimizer: Option<RawOptimizer>,
    /// Request header that names the client (for per-client overrides and rollout cohorts);
    /// absent or missing on a request: the client's IP address.
    #[serde(default)]
    pub client_key_header: Option<String>,
    /// Span export over OTLP/HTTP; absent: no spans (trace context is propagated either way).
    #[serde(default)]
    pub tracing: Option<RawTracing>,
    /// Extra listeners, each with its own protocol detection (the `listen` address is the
    /// listener named `main`: HTTP/1.1, h2c and TLS passthrough by SNI).
    #[serde(default)]
    pub listeners: Vec<RawListener>,
    /// HTTP CONNECT tunnels; absent: CONNECT is refused with 405.
    #[serde(default)]
    pub connect: Option<RawConnect>,
}

/// An extra listener as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    /// Its name (in logs, metrics, and the route of raw TCP profiles).
    pub name: String,
    /// Address to listen on.
    pub listen: String,
    /// How long to wait for a client's first bytes before the listener's `tcp_service` takes
    /// the connection (server-speaks-first protocols send nothing).
    #[serde(default = "d_detect")]
    pub detect_timeout: String,
    /// Serve HTTP/1.1, WebSocket and h2c here (default true).
    #[serde(default = "d_true")]
    pub http: bool,
    /// Service for raw TCP: bytes that are no protocol the listener serves, or silence for
    /// `detect_timeout`.
    #[serde(default)]
    pub tcp_service: Option<String>,
    /// CIDR blocks whose connections may start with a PROXY protocol v1/v2 header; a header
    /// from anywhere else is refused.
    #[serde(default)]
    pub proxy_protocol_from: Vec<String>,
}

fn d_detect() -> String {
    "500ms".into()
}
fn d_true() -> bool {
    true
}

/// HTTP CONNECT as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConnect {
    /// Allowed destinations: `host:port`, where host is a name, `*.suffix`, an IP address or
    /// a CIDR block (matched against IP literals only) and port a number, `a-b` or `*`.
    pub allow: Vec<String>,
    /// Changes to the default settings for CONNECT tunnels (profiled as service `connect`).
    #[serde(default)]
    pub settings: PartialSettings,
}

/// Span export as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    /// OTLP/HTTP collector (`http://host:4318`); spans go to `<endpoint>/v1/traces` as JSON.
    pub otlp_endpoint: String,
    /// `service.name` of the exported resource (default `trimtab-dataplane`).
    #[serde(default = "d_trace_service")]
    pub service_name: String,
    /// Post a batch at least this often (default `1s`).
    #[serde(default = "d_trace_batch")]
    pub batch_interval: String,
    /// Spans waiting for export at most; more are dropped and counted (default 10000).
    #[serde(default = "d_trace_queue")]
    pub queue_capacity: usize,
}

fn d_trace_service() -> String {
    "trimtab-dataplane".into()
}
fn d_trace_batch() -> String {
    "1s".into()
}
fn d_trace_queue() -> usize {
    10_000
}

/// The optimizer connection as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOptimizer {
    /// Base URL (`http://host:port`).
    pub url: String,
    /// Bearer token with the reader role (prefer `token_env`).
    #[serde(default)]
    pub token: Option<String>,
    /// Environment variable holding the token.
    #[serde(default)]
    pub token_env: Option<String>,
    /// Abandon an optimizer call after this long.
    #[serde(default = "d_opt_timeout")]
    pub timeout: String,
    /// Keep using an expired answer this long while refreshing it.
    #[serde(default = "d_opt_stale")]
    pub max_stale: String,
}

fn d_opt_timeout() -> String {
    "500ms".into()
}
fn d_opt_stale() -> String {
    "5m".into()
}

/// The profile writer as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfiles {
    /// PostgreSQL URL; when absent, the `DATABASE_URL` environment variable.
    #[serde(default)]
    pub database_url: Option<String>,
    /// Directory of the spool (rows waiting for PostgreSQL).
    #[serde(default = "d_spool_dir")]
    pub spool_dir: String,
    /// Most bytes the spool may hold (`"1GiB"` style or bytes).
    #[serde(default = "d_spool_max")]
    pub spool_max_bytes: String,
    /// Rows the in-memory queue holds.
    #[serde(default = "d_queue")]
    pub queue_capacity: usize,
    /// Rows per COPY batch.
    #[serde(default = "d_batch_rows")]
    pub batch_rows: usize,
    /// Longest wait before a partial batch is written.
    #[serde(default = "d_batch_interval")]
    pub batch_interval: String,
    /// A database write slower than this sends the rows to the spool.
    #[serde(default = "d_write_timeout")]
    pub write_timeout: String,
    /// Delete profiles older than this (`"30d"`); absent: keep everything.
    #[serde(default)]
    pub retention: Option<String>,
}

fn d_spool_dir() -> String {
    "spool".into()
}
fn d_spool_max() -> String {
    "1GiB".into()
}
fn d_queue() -> usize {
    65_536
}
fn d_batch_rows() -> usize {
    1000
}
fn d_batch_interval() -> String {
    "1s".into()
}
fn d_write_timeout() -> String {
    "5s".into()
}

/// Limits as written (durations in seconds or `"30s"` forms).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// Most client connections open at once; more are refused with 503.
    #[serde(default = "d_max_connections")]
    pub max_connections: usize,
    /// Time a client has to send a complete request head.
    #[serde(default = "d_handshake_timeout")]
    pub handshake_timeout: String,
    /// Largest request head accepted, bytes (larger: 431).
    #[serde(default = "d_max_head_bytes")]
    pub max_head_bytes: usize,
    /// Largest WebSocket message in `frame_aware` (larger: close 1009).
    #[serde(default = "d_max_message_bytes")]
    pub max_message_bytes: usize,
    /// A peer that does not accept bytes for this long is closed (1008) and counted.
    #[serde(default = "d_stall_timeout")]
    pub stall_timeout: String,
    /// How long shutdown waits for connections to finish after sending them close 1001.
    #[serde(default = "d_drain")]
    pub drain_timeout: String,
    /// Upstream connect timeout.
    #[serde(default = "d_connect_timeout")]
    pub connect_timeout: String,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_connections: d_max_connections(),
            handshake_timeout: d_handshake_timeout(),
            max_head_bytes: d_max_head_bytes(),
            max_message_bytes: d_max_message_bytes(),
            stall_timeout: d_stall_timeout(),
            drain_timeout: d_drain(),
            connect_timeout: d_connect_timeout(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:8080".into()
}
fn default_admin() -> String {
    "127.0.0.1:8091".into()
}
fn d_max_connections() -> usize {
    10_000
}
fn d_handshake_timeout() -> String {
    "10s".into()
}
fn d_max_head_bytes() -> usize {
    16 << 10
}
fn d_max_message_bytes() -> usize {
    16 << 20
}
fn d_stall_timeout() -> String {
    "30s".into()
}
fn d_drain() -> String {
    "10s".into()
}
fn d_connect_timeout() -> String {
    "5s".into()
}

/// A service as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    /// Upstream addresses (`host:port`), used round robin.
    pub upstreams: Vec<String>,
    /// Routes that lead to this service.
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    /// Changes to the default settings for this service.
    #[serde(default)]
    pub settings: PartialSettings,
    /// Upstream keep-alive pool for plain HTTP.
    #[serde(default)]
    pub pool: RawPool,
    /// Share of this service's connections that become profile rows (0–1).
    #[serde(default = "d_sample")]
    pub profile_sample_rate: f64,
    /// TLS server names (`name` or `*.suffix`) passed through to this service's upstreams
    /// unterminated, routed by the ClientHello's SNI.
    #[serde(default)]
    pub sni: Vec<String>,
    /// How plain HTTP reaches the upstreams: `"http1"` (default) or `"h2c"` (HTTP/2 prior
    /// knowledge, needed for gRPC upstreams).
    #[serde(default)]
    pub upstream_protocol: UpstreamProtocol,
    /// Send a PROXY protocol header (`"v1"` or `"v2"`) first on every tunnelled upstream
    /// connection (WebSocket, Upgrade, raw TCP, TLS passthrough).
    #[serde(default)]
    pub send_proxy_protocol: Option<ProxyVersion>,
}

/// How plain HTTP requests reach a service's upstreams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 over the keep-alive pool.
    #[default]
    Http1,
    /// HTTP/2 without TLS, prior knowledge: one multiplexed connection per upstream.
    H2c,
}

/// PROXY protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyVersion {
    /// The text header.
    V1,
    /// The binary header.
    V2,
}

fn d_sample() -> f64 {
    1.0
}

/// A route as written: a host (optional) and a path prefix.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Host to match (case-insensitive, port ignored); any host when absent.
    #[serde(default)]
    pub host: Option<String>,
    /// Path prefix to match, at a segment boundary (`/ws` matches `/ws` and `/ws/x`).
    #[serde(default = "d_prefix")]
    pub path_prefix: String,
    /// Name of the route in profiles (default: the path prefix).
    #[serde(default)]
    pub name: Option<String>,
}

fn d_prefix() -> String {
    "/".into()
}

/// Upstream pool limits as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    /// Most connections open to one upstream address at once.
    #[serde(default = "d_pool_max")]
    pub max_per_upstream: usize,
    /// An idle pooled connection is closed after this long.
    #[serde(default = "d_pool_idle")]
    pub idle_timeout: String,
    /// A pooled connection is not reused once this old.
    #[serde(default = "d_pool_life")]
    pub max_lifetime: String,
}

impl Default for RawPool {
    fn default() -> Self {
        RawPool {
            max_per_upstream: d_pool_max(),
            idle_timeout: d_pool_idle(),
            max_lifetime: d_pool_life(),
        }
    }
}

fn d_pool_max() -> usize {
    256
}
fn d_pool_idle() -> String {
    "60s".into()
}
fn d_pool_life() -> String {
    "10m".into()
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Proxy listen address.
    pub listen: SocketAddr,
    /// Admin listen address.
    pub admin_listen: SocketAddr,
    /// This data plane's name.
    pub dataplane_id: String,
    /// See [`RawConfig::workers`].
    pub workers: usize,
    /// Limits.
    pub limits: Limits,
    /// Services.
    pub services: BTreeMap<String, Service>,
    /// The profile writer, when configured.
    pub profiles: Option<crate::profiles::WriterConfig>,
    /// Client regions.
    pub regions: Regions,
    /// The optimizer, when configured.
    pub optimizer: Option<crate::decisions::OptimizerConfig>,
    /// See [`RawConfig::client_key_header`].
    pub client_key_header: Option<http::HeaderName>,
    /// Span export, when configured.
    pub tracing: Option<crate::telemetry::traces::TracingConfig>,
    /// Every listener, `main` (from `listen`) first.
    pub listeners: Vec<Listener>,
    /// CONNECT tunnels, when enabled.
    pub connect: Option<Connect>,
}

impl Config {
    /// The listener with this name.
    pub fn listener(&self, name: &str) -> Option<&Listener> {
        self.listeners.iter().find(|l| l.name == name)
    }

    /// The service whose `sni` patterns match a server name (exact names before wildcards).
    pub fn sni_service(&self, name: &str) -> Option<(&Service, &str)> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let exact = self
            .services
            .values()
            .find_map(|s| s.sni.iter().find(|p| **p == name).map(|p| (s, p.as_str())));
        exact.or_else(|| {
            self.services
                .values()
                .flat_map(|s| s.sni.iter().map(move |p| (s, p.as_str())))
                .filter(|(_, p)| {
                    p.strip_prefix('*')
                        .is_some_and(|suffix| name.ends_with(suffix) && name.len() > suffix.len())
                })
                .max_by_key(|(_, p)| p.len())
        })
    }

    /// Whether any service is reached by TLS passthrough.
    pub fn has_sni(&self) -> bool {
        self.services.values().any(|s| !s.sni.is_empty())
    }
}

/// A validated listener.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Its name.
    pub name: String,
    /// Where it listens.
    pub listen: SocketAddr,
    /// See [`RawListener::detect_timeout`].
    pub detect_timeout: Duration,
    /// See [`RawListener::http`].
    pub http: bool,
    /// See [`RawListener::tcp_service`].
    pub tcp_service: Option<String>,
    /// Sources trusted to send a PROXY protocol header.
    pub proxy_trusted: Vec<(std::net::IpAddr, u8)>,
}

impl Listener {
    /// Whether a PROXY protocol header from this address is accepted.
    pub fn trusts(&self, ip: std::net::IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.proxy_trusted
            .iter()
            .any(|(net, len)| cidr_contains(*net, *len, ip))
    }
}

/// Validated CONNECT settings.
#[derive(Debug, Clone)]
pub struct Connect {
    /// The allow-list.
    pub allow: Vec<AllowRule>,
    /// The pseudo-service `connect` (settings and profiles of CONNECT tunnels).
    pub service: Service,
}

impl Connect {
    /// Whether `host:port` (an authority) may be tunnelled to.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let ip = host.parse::<std::net::IpAddr>().ok().map(canonical_ip);
        self.allow.iter().any(|r| {
            r.ports.0 <= port
                && port <= r.ports.1
                && match &r.host {
                    AllowHost::Name(n) => *n == host,
                    AllowHost::Suffix(s) => host.ends_with(s.as_str()) && host.len() > s.len(),
                    AllowHost::Cidr(net, len) => ip.is_some_and(|ip| cidr_contains(*net, *len, ip)),
                }
        })
    }
}

/// One CONNECT allow-list entry.
#[derive(Debug, Clone)]
pub struct AllowRule {
    /// Which hosts.
    pub host: AllowHost,
    /// Which ports (inclusive range).
    pub ports: (u16, u16),
}

/// The host part of an allow-list entry.
#[derive(Debug, Clone)]
pub enum AllowHost {
    /// This name exactly (lower case).
    Name(String),
    /// Any name ending in this (`.example.com`).
    Suffix(String),
    /// IP literals in this block.
    Cidr(std::net::IpAddr, u8),
}

fn parse_allow(v: &str) -> Option<AllowRule> {
    let (host, port) = v.trim().rsplit_once(':')?;
    let ports = match port {
        "*" => (1, u16::MAX),
        p => match p.split_once('-') {
            Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
            None => {
                let n = p.parse().ok()?;
                (n, n)
            }
        },
    };
    if ports.0 == 0 || ports.0 > ports.1 {
        return None;
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = if let Some(s) = host.strip_prefix("*.") {
        if s.is_empty() || s.contains('*') {
            return None;
        }
        AllowHost::Suffix(format!(".{}", s.to_ascii_lowercase()))
    } else if let Some((ip, len)) = parse_cidr(host) {
        AllowHost::Cidr(canonical_ip(ip), len)
    } else if !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        AllowHost::Name(host.to_ascii_lowercase())
    } else {
        return None;
    };
    Some(AllowRule { host, ports })
}

fn valid_sni_pattern(p: &str) -> bool {
    let name = p.strip_prefix("*.").unwrap_or(p);
    !name.is_empty()
        && !name.contains('*')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

fn canonical_ip(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip {
        std::net::IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
        v4 => v4,
    }
}

/// A CIDR table: the first region whose block contains an address names it.
#[derive(Debug, Clone, Default)]
pub struct Regions(Vec<(String, std::net::IpAddr, u8)>);

impl Regions {
    /// The region of an address, or `"unknown"`.
    pub fn lookup(&self, ip: std::net::IpAddr) -> &str {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(v6), std::net::IpAddr::V4),
            v4 => v4,
        };
        self.0
            .iter()
            .find(|(_, net, len)| cidr_contains(*net, *len, ip))
            .map_or("unknown", |(n, _, _)| n.as_str())
    }
}

fn cidr_contains(net: std::net::IpAddr, len: u8, ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr::{V4, V6};
    match (net, ip) {
        (V4(n), V4(a)) => {
            let mask = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len))
            };
            u32::from(n) & mask == u32::from(a) & mask
        }
        (V6(n), V6(a)) => {
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len))
            };
            u128::from(n) & mask == u128::from(a) & mask
        }
        _ => false,
    }
}

fn parse_cidr(s: &str) -> Option<(std::net::IpAddr, u8)> {
    let (a, l) = s.split_once('/').unwrap_or((s, ""));
    let ip: std::net::IpAddr = a.trim().parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = if l.is_empty() {
        max
    } else {
        l.trim().parse().ok()?
    };
    (len <= max).then_some((ip, len))
}

/// Validated limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// See [`RawLimits::max_connections`].
    pub max_connections: usize,
    /// See [`RawLimits::handshake_timeout`].
    pub handshake_timeout: Duration,
    /// See [`RawLimits::max_head_bytes`].
    pub max_head_bytes: usize,
    /// See [`RawLimits::max_message_bytes`].
    pub max_message_bytes: usize,
    /// See [`RawLimits::stall_timeout`].
    pub stall_timeout: Duration,
    /// See [`RawLimits::drain_timeout`].
    pub drain_timeout: Duration,
    /// See [`RawLimits::connect_timeout`].
    pub connect_timeout: Duration,
}

/// A validated service.
#[derive(Debug, Clone)]
pub struct Service {
    /// Its name.
    pub name: String,
    /// Upstream addresses as `host:port` (resolved at connect time).
    pub upstreams: Vec<String>,
    /// Routes.
    pub routes: Vec<Route>,
    /// Static settings (defaults with the service's changes).
    pub settings: Settings,
    /// Pool limits.
    pub pool: PoolLimits,
    /// Share of connections profiled.
    pub profile_sample_rate: f64,
    /// TLS server-name patterns (lower case).
    pub sni: Vec<String>,
    /// How plain HTTP reaches the upstreams.
    pub upstream_protocol: UpstreamProtocol,
    /// PROXY protocol header sent on tunnelled upstream connections.
    pub send_proxy_protocol: Option<ProxyVersion>,
}

/// A validated route.
#[derive(Debug, Clone)]
pub struct Route {
    /// Lower-case host without port, or any.
    pub host: Option<String>,
    /// Path prefix (starts with `/`, no trailing `/` except the root).
    pub path_prefix: String,
    /// Name in profiles.
    pub name: String,
}

/// Validated pool limits.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    /// See [`RawPool::max_per_upstream`].
    pub max_per_upstream: usize,
    /// See [`RawPool::idle_timeout`].
    pub idle_timeout: Duration,
    /// See [`RawPool::max_lifetime`].
    pub max_lifetime: Duration,
}

fn dur(errors: &mut Vec<String>, key: &str, v: &str) -> Duration {
    match parse_duration(v) {
        Some(d) => d,
        None => {
            errors.push(format!(
                "{key} = {v:?} is not a duration (e.g. \"500ms\", \"30s\", \"5m\")"
            ));
            Duration::ZERO
        }
    }
}

/// Parse `"250ms"`, `"30s"`, `"5m"`, `"1h"`, `"30d"` or plain seconds.
pub fn parse_duration(v: &str) -> Option<Duration> {
    let t = v.trim();
    if let Some(ms) = t.strip_suffix("ms") {
        return ms.trim().parse().ok().map(Duration::from_millis);
    }
    if let Some(d) = t.strip_suffix('d') {
        return d
            .trim()
            .parse::<u64>()
            .ok()
            .map(|d| Duration::from_secs(d * 86_400));
    }
    tuning::settings::parse_secs(t)
        .filter(|_| !t.eq_ignore_ascii_case("off"))
        .map(|s| Duration::from_secs(u64::from(s)))
}

fn addr(errors: &mut Vec<String>, key: &str, v: &str) -> SocketAddr {
    v.parse().unwrap_or_else(|_| {
        errors.push(format!(
            "{key} = {v:?} is not an address (e.g. \"127.0.0.1:8080\")"
        ));
        SocketAddr::from(([0, 0, 0, 0], 0))
    })
}

fn valid_upstream(v: &str) -> bool {
    match v.rsplit_once(':') {
        Some((host, port)) => {
            !host.is_empty()
                && port.parse::<u16>().is_ok_and(|p| p > 0)
                && !host.contains('/')
                && !host.contains(' ')
        }
        None => false,
    }
}

impl Config {
    /// Parse and validate a TOML text. On failure, every problem found, each naming its key.
    pub fn from_toml(text: &str) -> Result<Config, Vec<String>> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| vec![e.to_string()])?;
        raw.validate()
    }
}

impl RawConfig {
    /// Check everything; collect every problem rather than stopping at the first.
    pub fn validate(self) -> Result<Config, Vec<String>> {
        let mut e = Vec::new();
        let listen = addr(&mut e, "listen", &self.listen);
        let admin_listen = addr(&mut e, "admin_listen", &self.admin_listen);
        let l = &self.limits;
        if l.max_connections == 0 {
            e.push("limits.max_connections = 0 must be at least 1".into());
        }
        if l.max_head_bytes < 8192 {
            e.push(format!(
                "limits.max_head_bytes = {} must be at least 8192",
                l.max_head_bytes
            ));
        }
        if l.max_message_bytes < 125 {
            e.push(format!(
                "limits.max_message_bytes = {} must be at least 125",
                l.max_message_bytes
            ));
        }
        let limits = Limits {
            max_connections: l.max_connections,
            handshake_timeout: dur(&mut e, "limits.handshake_timeout", &l.handshake_timeout),
            max_head_bytes: l.max_head_bytes,
            max_message_bytes: l.max_message_bytes,
            stall_timeout: dur(&mut e, "limits.stall_timeout", &l.stall_timeout),
            drain_timeout: dur(&mut e, "limits.drain_timeout", &l.drain_timeout),
            connect_timeout: dur(&mut e, "limits.connect_timeout", &l.connect_timeout),
        };
        for p in self.defaults.problems() {
            e.push(format!("defaults.{p}"));
        }
        if self.services.is_empty() {
            e.push("services: at least one service is needed".into());
        }
        let tcp_services: Vec<String> = self
            .listeners
            .iter()
            .filter_map(|l| l.tcp_service.clone())
            .collect();
        let mut services = BTreeMap::new();
        for (name, s) in self.services {
            let key = format!("services.{name}");
            if s.upstreams.is_empty() {
                e.push(format!("{key}.upstreams = [] needs at least one address"));
            }
            for u in &s.upstreams {
                if !valid_upstream(u) {
                    e.push(format!(
                        "{key}.upstreams: {u:?} is not host:port (e.g. \"127.0.0.1:9000\")"
                    ));
                }
            }
            let settings = self.defaults.with(&s.settings);
            for p in settings.problems() {
                e.push(format!("{key}.settings.{p}"));
            }
            for p in &s.sni {
                if !valid_sni_pattern(p) {
                    e.push(format!(
                        "{key}.sni: {p:?} is not a server name (e.g. \"db.example\" or \"*.example\")"
                    ));
                }
            }
            let tcp_only = !s.sni.is_empty() || tcp_services.contains(&name);
            let raw_routes = if s.routes.is_empty() && !tcp_only {
                vec![RawRoute {
                    host: None,
                    path_prefix: format!("/{name}"),
                    name: None,
                }]
            } else {
                s.routes
            };
            let mut routes = Vec::new();
            for (i, r) in raw_routes.into_iter().enumerate() {
                if !r.path_prefix.starts_with('/') {
                    e.push(format!(
                        "{key}.routes[{i}].path_prefix = {:?} must start with '/'",
                        r.path_prefix
                    ));
                }
                let mut prefix = r.path_prefix.clone();
                while prefix.len() > 1 && prefix.ends_with('/') {
                    prefix.pop();
                }
                routes.push(Route {
                    host: r.host.map(|h| h.to_ascii_lowercase()),
                    name: r.name.unwrap_or_else(|| prefix.clone()),
                    path_prefix: prefix,
                });
            }
            let pool = PoolLimits {
                max_per_upstream: s.pool.max_per_upstream,
                idle_timeout: dur(
                    &mut e,
                    &format!("{key}.pool.idle_timeout"),
                    &s.pool.idle_timeout,
                ),
                max_lifetime: dur(
                    &mut e,
                    &format!("{key}.pool.max_lifetime"),
                    &s.pool.max_lifetime,
                ),
            };
            if !(0.0..=1.0).contains(&s.profile_sample_rate) {
                e.push(format!(
                    "{key}.profile_sample_rate = {} must be between 0 and 1",
                    s.profile_sample_rate
                ));
            }
            if pool.max_per_upstream == 0 {
                e.push(format!(
                    "{key}.pool.max_per_upstream = 0 must be at least 1"
                ));
            }
            services.insert(
                name.clone(),
                Service {
                    name,
                    upstreams: s.upstreams,
                    routes,
                    settings,
                    pool,
                    profile_sample_rate: s.profile_sample_rate,
                    sni: s.sni.iter().map(|p| p.to_ascii_lowercase()).collect(),
                    upstream_protocol: s.upstream_protocol,
                    send_proxy_protocol: s.send_proxy_protocol,
                },
            );
        }
        // Two services may not claim the same host + prefix.
        let mut seen = BTreeMap::new();
        for s in services.values() {
            for r in &s.routes {
                let k = (r.host.clone(), r.path_prefix.clone());
                if let Some(other) = seen.insert(k, s.name.clone()) {
                    e.push(format!(
                        "services.{}.routes: path_prefix {:?}{} is also routed to service {other}",
                        s.name,
                        r.path_prefix,
                        r.host
                            .as_ref()
                            .map(|h| format!(" on host {h:?}"))
                            .unwrap_or_default()
                    ));
                }
            }
        }
        // Two services may not claim the same server name.
        let mut names = BTreeMap::new();
        for s in services.values() {
            for p in &s.sni {
                if let Some(other) = names.insert(p.clone(), s.name.clone()) {
                    e.push(format!(
                        "services.{}.sni: {p:?} is also claimed by service {other}",
                        s.name
                    ));
                }
            }
        }
        let mut listeners = vec![Listener {
            name: "main".into(),
            listen,
            detect_timeout: Duration::from_millis(500),
            http: true,
            tcp_service: None,
            proxy_trusted: Vec::new(),
        }];
        for (i, l) in self.listeners.iter().enumerate() {
            let key = format!("listeners[{i}]");
            if l.name.is_empty() || listeners.iter().any(|o| o.name == l.name) {
                e.push(format!(
                    "{key}.name = {:?} must be non-empty and unique (\"main\" is the listen address)",
                    l.name
                ));
            }
            if let Some(t) = &l.tcp_service
                && !services.contains_key(t)
            {
                e.push(format!("{key}.tcp_service = {t:?} is not a service"));
            }
            let has_sni = services.values().any(|s| !s.sni.is_empty());
            if !l.http && l.tcp_service.is_none() && !has_sni {
                e.push(format!(
                    "{key}: http = false needs a tcp_service (or services with sni) to serve"
                ));
            }
            let mut proxy_trusted = Vec::new();
            for b in &l.proxy_protocol_from {
                match parse_cidr(b) {
                    Some((ip, len)) => proxy_trusted.push((canonical_ip(ip), len)),
                    None => e.push(format!(
                        "{key}.proxy_protocol_from: {b:?} is not a CIDR block (e.g. \"10.0.0.0/8\")"
                    )),
                }
            }
            listeners.push(Listener {
                name: l.name.clone(),
                listen: addr(&mut e, &format!("{key}.listen"), &l.listen),
                detect_timeout: dur(&mut e, &format!("{key}.detect_timeout"), &l.detect_timeout),
                http: l.http,
                tcp_service: l.tcp_service.clone(),
                proxy_trusted,
            });
        }
        let connect = self.connect.map(|c| {
            let mut allow = Vec::new();
            for a in &c.allow {
                match parse_allow(a) {
                    Some(r) => allow.push(r),
                    None => e.push(format!(
                        "connect.allow: {a:?} is not host:port (host a name, *.suffix, IP or CIDR; port a number, a-b or *)"
                    )),
                }
            }
            if services.contains_key("connect") {
                e.push("services.connect: the name is taken by CONNECT tunnels ([connect])".into());
            }
            let settings = self.defaults.with(&c.settings);
            for p in settings.problems() {
                e.push(format!("connect.settings.{p}"));
            }
            Connect {
                allow,
                service: Service {
                    name: "connect".into(),
                    upstreams: Vec::new(),
                    routes: Vec::new(),
                    settings,
                    pool: PoolLimits {
                        max_per_upstream: 1,
                        idle_timeout: Duration::ZERO,
                        max_lifetime: Duration::ZERO,
                    },
                    profile_sample_rate: 1.0,
                    sni: Vec::new(),
                    upstream_protocol: UpstreamProtocol::Http1,
                    send_proxy_protocol: None,
                },
            }
        });
        let mut regions = Vec::new();
        for (name, blocks) in &self.regions {
            for b in blocks {
                match parse_cidr(b) {
                    Some((ip, len)) => regions.push((name.clone(), ip, len)),
                    None => e.push(format!(
                        "regions.{name}: {b:?} is not a CIDR block (e.g. \"10.0.0.0/8\")"
                    )),
                }
            }
        }
        let profiles = self.profiles.map(|p| {
            let url = p
                .database_url
                .clone()
                .or_else(|| std::env::var("DATABASE_URL").ok())
                .unwrap_or_else(|| {
                    e.push("profiles.database_url is not set and DATABASE_URL is not in the environment".into());
                    String::new()
                });
            let spool_max_bytes = tuning::settings::parse_bytes_u64(&p.spool_max_bytes).unwrap_or_else(|| {
                e.push(format!(
                    "profiles.spool_max_bytes = {:?} is not a size (e.g. \"1GiB\")",
                    p.spool_max_bytes
                ));
                0
            });
            if p.queue_capacity == 0 {
                e.push("profiles.queue_capacity = 0 must be at least 1".into());
            }
            if p.batch_rows == 0 {
                e.push("profiles.batch_rows = 0 must be at least 1".into());
            }
            crate::profiles::WriterConfig {
                database_url: url,
                spool_dir: p.spool_dir.clone().into(),
                spool_max_bytes,
                queue_capacity: p.queue_capacity.max(1),
                batch_rows: p.batch_rows.max(1),
                batch_interval: dur(&mut e, "profiles.batch_interval", &p.batch_interval),
                write_timeout: dur(&mut e, "profiles.write_timeout", &p.write_timeout),
                retention: p
                    .retention
                    .as_deref()
                    .map(|r| dur(&mut e, "profiles.retention", r)),
            }
        });
        let optimizer = self.optimizer.map(|o| {
            if !(o.url.starts_with("http://") && o.url.len() > "http://".len()) {
                e.push(format!(
                    "optimizer.url = {:?} must be an http:// URL (e.g. \"http://127.0.0.1:8090\")",
                    o.url
                ));
            }
            let token = match (&o.token, &o.token_env) {
                (Some(t), None) => Some(t.clone()),
                (None, Some(var)) => match std::env::var(var) {
                    Ok(t) => Some(t),
                    Err(_) => {
                        e.push(format!(
                            "optimizer.token_env = {var:?}: the variable is not set"
                        ));
                        None
                    }
                },
                (None, None) => None,
                (Some(_), Some(_)) => {
                    e.push("optimizer: set one of token and token_env, not both".into());
                    None
                }
            };
            crate::decisions::OptimizerConfig {
                url: o.url.clone(),
                token,
                timeout: dur(&mut e, "optimizer.timeout", &o.timeout),
                max_stale: dur(&mut e, "optimizer.max_stale", &o.max_stale),
                max_entries: 100_000,
            }
        });
        let client_key_header = self.client_key_header.as_deref().and_then(|h| {
            http::HeaderName::from_bytes(h.as_bytes())
                .map_err(|_| e.push(format!("client_key_header = {h:?} is not a header name")))
                .ok()
        });
        let tracing = self.tracing.map(|t| {
            if !(t.otlp_endpoint.starts_with("http://") && t.otlp_endpoint.len() > "http://".len())
            {
                e.push(format!(
                    "tracing.otlp_endpoint = {:?} must be an http:// URL (e.g. \"http://127.0.0.1:4318\")",
                    t.otlp_endpoint
                ));
            }
            if t.queue_capacity == 0 {
                e.push("tracing.queue_capacity = 0 must be at least 1".into());
            }
            crate::telemetry::traces::TracingConfig {
                otlp_endpoint: t.otlp_endpoint.clone(),
                service_name: t.service_name.clone(),
                batch_interval: dur(&mut e, "tracing.batch_interval", &t.batch_interval),
                queue_capacity: t.queue_capacity,
            }
        });
        let workers = match self.workers {
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
            Some(n @ 1..=MAX_WORKERS) => n,
            Some(n) => {
                e.push(format!("workers = {n} must be between 1 and {MAX_WORKERS}"));
                1
            }
        };
        if !e.is_empty() {
            return Err(e);
        }
        Ok(Config {
            workers,
            listeners,
            connect,
            tracing,
            client_key_header,
            optimizer,
            profiles,
            regions: Regions(regions),
            listen,
            admin_listen,
            dataplane_id: self.dataplane_id.unwrap_or_else(default_id),
            limits,
            services,
        })
    }
}

/// Most connection worker threads a data plane runs.
pub const MAX_WORKERS: usize = 256;

fn default_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "dataplane".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "127.0.0.1:0"
[services.chat]
upstreams = ["127.0.0.1:9000"]
routes = [{ path_prefix = "/ws/" }, { host = "Chat.Example", path_prefix = "/" }]
settings = { mode = "frame_aware", ping_interval = "15s" }
"#;

    #[test]
    fn good_config_validates() {
        let c = Config::from_toml(GOOD).unwrap();
        let s = &c.services["chat"];
        assert_eq!(s.routes[0].path_prefix, "/ws");
        assert_eq!(s.routes[1].host.as_deref(), Some("chat.example"));
        assert_eq!(s.settings.ping_interval, 15);
        assert_eq!(c.limits.handshake_timeout, Duration::from_secs(10));
    }

    #[test]
    fn workers_default_to_the_cores_and_out_of_range_is_named() {
        let cores = std::thread::available_parallelism().unwrap().get();
        assert_eq!(Config::from_toml(GOOD).unwrap().workers, cores);
        let with = |n: &str| Config::from_toml(&format!("workers = {n}\n{GOOD}"));
        assert_eq!(with("3").unwrap().workers, 3);
        for bad in ["0", "257"] {
            let e = with(bad).unwrap_err().join("\n");
            assert!(
                e.contains(&format!("workers = {bad} must be between 1 and 256")),
                "{e}"
            );
        }
    }

    #[test]
    fn every_problem_names_key_and_value() {
        let e = Config::from_toml(
            r#"
listen = "nowhere"
[limits]
stall_timeout = "soon"
[services.bulk]
upstreams = ["localhost"]
routes = [{ path_prefix = "bulk" }]
settings = { buffer_size = 1000, compression = true }
[services.other]
upstreams = ["127.0.0.1:1"]
routes = [{ path_prefix = "/bulk" }]
[tracing]
otlp_endpoint = "collector:4318"
batch_interval = "often"
"#,
        )
        .unwrap_err();
        let all = e.join("\n");
        for needle in [
            "listen = \"nowhere\"",
            "limits.stall_timeout = \"soon\"",
            "services.bulk.upstreams: \"localhost\" is not host:port",
            "services.bulk.routes[0].path_prefix = \"bulk\" must start with '/'",
            "services.bulk.settings.buffer_size = 1000",
            "services.bulk.settings.compression = true requires mode",
            "tracing.otlp_endpoint = \"collector:4318\" must be an http:// URL",
            "tracing.batch_interval = \"often\"",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
    }

    #[test]
    fn protocol_keys_are_validated_by_name() {
        let e = Config::from_toml(
            r#"
[services.a]
upstreams = ["127.0.0.1:1"]
sni = ["db.example", "bad*name"]
[services.b]
upstreams = ["127.0.0.1:2"]
sni = ["db.example"]
send_proxy_protocol = "v3"
"#,
        )
        .unwrap_err();
        assert!(
            e[0].contains("send_proxy_protocol") && e[0].contains("v3"),
            "{e:?}"
        );
        let e = Config::from_toml(
            r#"
[services.a]
upstreams = ["127.0.0.1:1"]
sni = ["db.example", "bad*name"]
[services.b]
upstreams = ["127.0.0.1:2"]
sni = ["DB.example"]
[[listeners]]
name = "main"
listen = "127.0.0.1:x"
tcp_service = "nope"
detect_timeout = "soon"
proxy_protocol_from = ["10.0.0.0/40"]
[[listeners]]
name = "raw"
listen = "127.0.0.1:0"
http = false
[connect]
allow = ["example.com", "*.ok.example:443", "10.0.0.0/8:1-*"]
"#,
        )
        .unwrap_err();
        let all = e.join("\n");
        for needle in [
            "services.a.sni: \"bad*name\" is not a server name",
            "services.b.sni: \"db.example\" is also claimed by service a",
            "listeners[0].name = \"main\" must be non-empty and unique",
            "listeners[0].listen = \"127.0.0.1:x\"",
            "listeners[0].tcp_service = \"nope\" is not a service",
            "listeners[0].detect_timeout = \"soon\"",
            "listeners[0].proxy_protocol_from: \"10.0.0.0/40\"",
            "connect.allow: \"example.com\" is not host:port",
            "connect.allow: \"10.0.0.0/8:1-*\" is not host:port",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in:\n{all}");
        }
        assert!(!all.contains("*.ok.example"), "{all}");
        assert!(
            !all.contains("listeners[1]"),
            "sni services make an http = false listener useful: {all}"
        );
    }

    #[test]
    fn sni_and_connect_rules_match() {
        let c = Config::from_toml(
            r#"
[services.a]
upstreams = ["127.0.0.1:1"]
sni = ["*.example", "db.example"]
[services.b]
upstreams = ["127.0.0.1:2"]
sni = ["*.eu.example"]
[connect]
allow = ["api.example:443", "*.internal.example:8000-8100", "10.1.0.0/16:*", "[::1]:22"]
"#,
        )
        .unwrap();
        let svc = |n: &str| {
            c.sni_service(n)
                .map(|(s, p)| (s.name.clone(), p.to_string()))
        };
        assert_eq!(svc("DB.example."), Some(("a".into(), "db.example".into())));
        assert_eq!(
            svc("x.eu.example"),
            Some(("b".into(), "*.eu.example".into()))
        );
        assert_eq!(svc("x.example"), Some(("a".into(), "*.example".into())));
        assert_eq!(svc("example"), None);
        assert_eq!(svc("other.test"), None);
        assert!(
            c.services["a"].routes.is_empty(),
            "a TLS service gets no HTTP route"
        );
        let k = c.connect.as_ref().unwrap();
        assert!(k.allows("API.example", 443));
        assert!(!k.allows("api.example", 444));
        assert!(!k.allows("evil-api.example", 443));
        assert!(k.allows("a.internal.example", 8050));
        assert!(!k.allows("internal.example", 8050));
        assert!(k.allows("10.1.2.3", 5));
        assert!(!k.allows("10.2.0.1", 5));
        assert!(k.allows("[::1]", 22));
        assert!(!k.allows("localhost", 22));
    }

    #[test]
    fn duplicate_routes_are_refused() {
        let e = Config::from_toml(
            r#"
[services.a]
upstreams = ["127.0.0.1:1"]
routes = [{ path_prefix = "/x" }]
[services.b]
upstreams = ["127.0.0.1:2"]
routes = [{ path_prefix = "/x/" }]
"#,
        )
        .unwrap_err();
        assert!(e[0].contains("also routed to service a"), "{e:?}");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::from_toml("lisen = \"x\"\n").unwrap_err();
        assert!(e[0].contains("lisen"), "{e:?}");
    }

    #[test]
    fn regions_match_cidr_blocks() {
        let c = Config::from_toml(
            r#"
[regions]
eu = ["10.1.0.0/16", "2001:db8::/32"]
us = ["10.0.0.0/8"]
[services.a]
upstreams = ["127.0.0.1:1"]
"#,
        )
        .unwrap();
        let r = &c.regions;
        assert_eq!(r.lookup("10.1.2.3".parse().unwrap()), "eu");
        assert_eq!(r.lookup("10.2.2.3".parse().unwrap()), "us");
        assert_eq!(r.lookup("::ffff:10.1.0.9".parse().unwrap()), "eu");
        assert_eq!(r.lookup("2001:db8::1".parse().unwrap()), "eu");
        assert_eq!(r.lookup("192.168.0.1".parse().unwrap()), "unknown");
        let e = Config::from_toml(
            "[regions]\nx = [\"10.0.0.0/33\"]\n[services.a]\nupstreams = [\"127.0.0.1:1\"]\n",
        )
        .unwrap_err();
        assert!(
            e[0].contains("regions.x: \"10.0.0.0/33\" is not a CIDR block"),
            "{e:?}"
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration("off"), None);
    }
}
