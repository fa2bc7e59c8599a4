//! The one telemetry module: logging set-up and the data plane's metrics (atomics, rendered in
//! the Prometheus text format on the admin port). Labels are low-cardinality by construction:
//! they come from fixed enums, never from request data.

pub mod traces;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use tuning::histogram::{DURATION_SECONDS, Histogram, LATENCY_SECONDS, SIZE_BYTES, label_value};

/// Start logging: JSON lines when stderr is not a terminal, pretty otherwise. `RUST_LOG`
/// filters (default `info`).
pub fn init_logging() {
    use std::io::IsTerminal as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::io::stderr().is_terminal() {
        b.init();
    } else {
        b.json().flatten_event(true).init();
    }
}

/// Outcomes of a client connection or request, for `trimtab_dataplane_connections_total`.
pub const OUTCOMES: [&str; 6] = [
    "ok",
    "upstream_error",
    "client_error",
    "refused",
    "timeout",
    "proxy_closed",
];
/// Protocols, for labels.
pub const PROTOCOLS: [&str; 4] = ["http", "websocket", "upgrade", "tcp"];
/// What protocol detection found on a connection.
pub const DETECTED: [&str; 4] = ["http1", "h2", "tls", "tcp"];
/// Why protocol detection refused a connection.
pub const DETECT_REFUSALS: [&str; 7] = [
    "closed",
    "untrusted_proxy",
    "bad_proxy",
    "bad_client_hello",
    "unknown_sni",
    "unrecognized",
    "io",
];
/// Upstream error kinds: no connection could be made, the pool was at its limit, or a request
/// failed on a connection (new or reused from the pool).
pub const UPSTREAM_ERRORS: [&str; 3] = ["connect", "saturated", "send"];
/// Age buckets of the pooled connection a request failed on (`none`: there was no connection).
pub const CONN_AGES: [&str; 5] = ["none", "lt1s", "lt10s", "lt60s", "ge60s"];

fn age_bucket(age: Option<std::time::Duration>) -> usize {
    match age.map(|a| a.as_secs_f64()) {
        None => 0,
        Some(s) if s < 1.0 => 1,
        Some(s) if s < 10.0 => 2,
        Some(s) if s < 60.0 => 3,
        Some(_) => 4,
    }
}

/// Every metric of the data plane.
#[derive(Debug)]
pub struct Metrics {
    /// Client connections open now.
    pub active_connections: AtomicI64,
    /// Upgraded (WebSocket / tunnel) connections open now.
    pub active_upgraded: AtomicI64,
    /// Client connections open now by the connection worker serving them (the first
    /// `workers` entries are rendered).
    pub worker_connections: [AtomicI64; crate::config::MAX_WORKERS],
    /// How many connection workers run (set at start).
    pub workers: std::sync::atomic::AtomicUsize,
    /// Finished requests/connections by protocol × outcome.
    pub finished: [[AtomicU64; OUTCOMES.len()]; PROTOCOLS.len()],
    /// Connections refused at the limit.
    pub refused_limit: AtomicU64,
    /// Requests refused as malformed (400/431) by the proxy.
    pub refused_bad_request: AtomicU64,
    /// CONNECT requests to destinations not on the allow-list (or with CONNECT off).
    pub refused_connect: AtomicU64,
    /// Connections by detected protocol.
    pub detected: [AtomicU64; DETECTED.len()],
    /// Connections refused during detection, by reason.
    pub detect_refused: [AtomicU64; DETECT_REFUSALS.len()],
    /// HTTP/1.1 connections upgraded to h2c.
    pub h2c_upgrades: AtomicU64,
    /// Connections that arrived with a PROXY protocol header.
    pub proxy_headers: AtomicU64,
    /// Keep-alive comments sent on quiet event streams.
    pub sse_pings: AtomicU64,
    /// Event streams ended by the idle timeout.
    pub sse_idle_closes: AtomicU64,
    /// Upstream errors by kind × reused (0 new, 1 reused) × connection age bucket.
    pub upstream_errors: [[[AtomicU64; CONN_AGES.len()]; 2]; UPSTREAM_ERRORS.len()],
    /// Idempotent requests retried after a reused connection failed before sending.
    pub retries: AtomicU64,
    /// Requests the plain HTTP/1.1 path served ([`crate::h1`]).
    pub h1_plain: AtomicU64,
    /// HTTP/1.1 connections the plain path handed to hyper.
    pub h1_handoffs: AtomicU64,
    /// Requests sent on a reused pooled connection.
    pub pool_reused: AtomicU64,
    /// Requests sent on a new connection.
    pub pool_new: AtomicU64,
    /// Dead peers detected.
    pub dead_peers: AtomicU64,
    /// Idle timeouts fired.
    pub idle_timeouts: AtomicU64,
    /// Peers closed for not reading (stall limit).
    pub stalled_closes: AtomicU64,
    /// Bytes forwarded, client→upstream and upstream→client (upgraded connections).
    pub bytes: [AtomicU64; 2],
    /// Messages forwarded, client→upstream and upstream→client.
    pub messages: [AtomicU64; 2],
    /// Seconds reads were paused by backpressure (microseconds, rendered as seconds).
    pub paused_us: AtomicU64,
    /// Settings values clamped onto their grid.
    pub settings_clamped: AtomicU64,
    /// Profiles handed to the profile sink, and dropped because it was full.
    pub profiles_emitted: AtomicU64,
    /// Profiles dropped.
    pub profiles_dropped: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const Z: AtomicU64 = AtomicU64::new(0);
#[allow(clippy::declare_interior_mutable_const)]
const ZROW: [AtomicU64; OUTCOMES.len()] = [Z; OUTCOMES.len()];
#[allow(clippy::declare_interior_mutable_const)]
const ZAGES: [AtomicU64; CONN_AGES.len()] = [Z; CONN_AGES.len()];
#[allow(clippy::declare_interior_mutable_const)]
const ZREUSED: [[AtomicU64; CONN_AGES.len()]; 2] = [ZAGES; 2];

impl Metrics {
    /// All zero.
    pub const fn new() -> Metrics {
        Metrics {
            active_connections: AtomicI64::new(0),
            active_upgraded: AtomicI64::new(0),
            worker_connections: [const { AtomicI64::new(0) }; crate::config::MAX_WORKERS],
            workers: std::sync::atomic::AtomicUsize::new(0),
            finished: [ZROW; PROTOCOLS.len()],
            refused_limit: Z,
            refused_bad_request: Z,
            refused_connect: Z,
            detected: [Z; DETECTED.len()],
            detect_refused: [Z; DETECT_REFUSALS.len()],
            h2c_upgrades: Z,
            proxy_headers: Z,
            sse_pings: Z,
            sse_idle_closes: Z,
            upstream_errors: [ZREUSED; UPSTREAM_ERRORS.len()],
            retries: Z,
            h1_plain: Z,
            h1_handoffs: Z,
            pool_reused: Z,
            pool_new: Z,
            dead_peers: Z,
            idle_timeouts: Z,
            stalled_closes: Z,
            bytes: [Z; 2],
            messages: [Z; 2],
            paused_us: Z,
            settings_clamped: Z,
            profiles_emitted: Z,
            profiles_dropped: Z,
        }
    }

    /// Count a finished request or connection.
    pub fn finish(&self, protocol: &str, outcome: &str) {
        let p = PROTOCOLS.iter().position(|x| *x == protocol).unwrap_or(0);
        let o = OUTCOMES.iter().position(|x| *x == outcome).unwrap_or(0);
        self.finished[p][o].fetch_add(1, Ordering::Relaxed);
    }

    /// Count an upstream error: its kind, whether the connection came from the pool, and the
    /// connection's age (`None` when there was no connection).
    pub fn upstream_error(&self, kind: &str, reused: bool, age: Option<std::time::Duration>) {
        if let Some(i) = UPSTREAM_ERRORS.iter().position(|x| *x == kind) {
            self.upstream_errors[i][usize::from(reused)][age_bucket(age)]
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count a detected protocol (a label of [`DETECTED`]).
    pub fn detected(&self, kind: &str) {
        if let Some(i) = DETECTED.iter().position(|x| *x == kind) {
            self.detected[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count a refusal during detection (a label of [`DETECT_REFUSALS`]).
    pub fn detect_refused(&self, reason: &str) {
        if let Some(i) = DETECT_REFUSALS.iter().position(|x| *x == reason) {
            self.detect_refused[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Render in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(4096);
        let g = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let one = |s: &mut String, name: &str, kind: &str, help: &str, v: String| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        };
        one(
            &mut s,
            "trimtab_dataplane_active_connections",
            "gauge",
            "Client connections open now.",
            self.active_connections.load(Ordering::Relaxed).to_string(),
        );
        one(
            &mut s,
            "trimtab_dataplane_active_upgraded_connections",
            "gauge",
            "WebSocket and tunnel connections open now.",
            self.active_upgraded.load(Ordering::Relaxed).to_string(),
        );
        let _ = writeln!(
            s,
            "# HELP trimtab_dataplane_worker_connections Client connections open now, by the worker thread serving them.\n# TYPE trimtab_dataplane_worker_connections gauge"
        );
        let workers = self.workers.load(Ordering::Relaxed);
        for (i, n) in self.worker_connections.iter().take(workers).enumerate() {
            let _ = writeln!(
                s,
                "trimtab_dataplane_worker_connections{{worker=\"{i}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        let _ = writeln!(
            s,
            "# HELP trimtab_dataplane_finished_total Finished requests and upgraded connections by protocol and outcome.\n# TYPE trimtab_dataplane_finished_total counter"
        );
        for (pi, p) in PROTOCOLS.iter().enumerate() {
            for (oi, o) in OUTCOMES.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "trimtab_dataplane_finished_total{{protocol=\"{p}\",outcome=\"{o}\"}} {}",
                    g(&self.finished[pi][oi])
                );
            }
        }
        let _ = writeln!(
            s,
            "# HELP trimtab_dataplane_upstream_errors_total Upstream failures by kind.\n# TYPE trimtab_dataplane_upstream_errors_total counter"
        );
        for (i, k) in UPSTREAM_ERRORS.iter().enumerate() {
            for (r, reused) in ["false", "true"].iter().enumerate() {
                for (a, age) in CONN_AGES.iter().enumerate() {
                    let v = g(&self.upstream_errors[i][r][a]);
                    // Only the combinations that can happen: no connection, no age.
                    if (k == &"send") == (a == 0) || (k != &"send" && r == 1) {
                        continue;
                    }
                    let _ = writeln!(
                        s,
                        "trimtab_dataplane_upstream_errors_total{{kind=\"{k}\",reused=\"{reused}\",age=\"{age}\"}} {v}"
                    );
                }
            }
        }
        let _ = writeln!(
            s,
            "# HELP trimtab_dataplane_refused_total Connections and requests refused by the proxy.\n# TYPE trimtab_dataplane_refused_total counter"
        );
        let _ = writeln!(
            s,
            "trimtab_dataplane_refused_total{{reason=\"connection_limit\"}} {}",
            g(&self.refused_limit)
        );
        let _ = writeln!(
            s,
            "trimtab_dataplane_refused_total{{reason=\"bad_request\"}} {}",
            g(&self.refused_bad_request)
        );
        let _ = writeln!(
            s,
            "trimtab_dataplane_refused_total{{reason=\"connect_not_allowed\"}} {}",
            g(&self.refused_connect)
        );
        let _ = writeln!(
            s,
            "# HELP trimtab_dataplane_detected_total Connections by the protocol detected from their first bytes.\n# TYPE trimtab_dataplane_detected_total counter"
        );
        for (i, k) in DETECTED.iter().enumerate() {
            let _ = writeln!(
                s,
                "trimtab_dataplane_detected_total{{protocol=\"{k}\"}} {}",
                g(&self.detected[i])
            );
        }
        let _ = writeln!(
            s,
            "# HELP trimtab_dataplane_detect_refused_total Connections refused during protocol detection, by reason.\n# TYPE trimtab_dataplane_detect_refused_total counter"
        );
        for (i, k) in DETECT_REFUSALS.iter().enumerate() {
            let _ = writeln!(
                s,
                "trimtab_dataplane_detect_refused_total{{reason=\"{k}\"}} {}",
                g(&self.detect_refused[i])
            );
        }
        let _ = writeln!(
            s,
            "# HELP trimtab_dataplane_pool_requests_total Upstream HTTP requests by pooled connection reuse.\n# TYPE trimtab_dataplane_pool_requests_total counter"
        );
        let _ = writeln!(
            s,
            "trimtab_dataplane_pool_requests_total{{connection=\"reused\"}} {}",
            g(&self.pool_reused)
        );
        let _ = writeln!(
            s,
            "trimtab_dataplane_pool_requests_total{{connection=\"new\"}} {}",
            g(&self.pool_new)
        );
        let _ = writeln!(
            s,
            "# HELP trimtab_dataplane_bytes_total Bytes forwarded on upgraded connections.\n# TYPE trimtab_dataplane_bytes_total counter"
        );
        let _ = writeln!(
            s,
            "# HELP trimtab_dataplane_messages_total WebSocket messages forwarded.\n# TYPE trimtab_dataplane_messages_total counter"
        );
        for (i, d) in ["client_to_upstream", "upstream_to_client"]
            .iter()
            .enumerate()
        {
            let _ = writeln!(
                s,
                "trimtab_dataplane_bytes_total{{direction=\"{d}\"}} {}",
                g(&self.bytes[i])
            );
            let _ = writeln!(
                s,
                "trimtab_dataplane_messages_total{{direction=\"{d}\"}} {}",
                g(&self.messages[i])
            );
        }
        for (name, help, v) in [
            (
                "trimtab_dataplane_retries_total",
                "Idempotent requests retried once after a reused connection failed before sending.",
                &self.retries,
            ),
            (
                "trimtab_dataplane_http1_plain_requests_total",
                "HTTP/1.1 requests the proxy's own plain path forwarded.",
                &self.h1_plain,
            ),
            (
                "trimtab_dataplane_http1_handoffs_total",
                "HTTP/1.1 connections handed to hyper (an upgrade, CONNECT, a chunked body, HTTP/1.0, a head the plain path does not serve).",
                &self.h1_handoffs,
            ),
            (
                "trimtab_dataplane_h2c_upgrades_total",
                "HTTP/1.1 connections upgraded to HTTP/2 (Upgrade: h2c).",
                &self.h2c_upgrades,
            ),
            (
                "trimtab_dataplane_proxy_protocol_headers_total",
                "Connections that arrived with a PROXY protocol header from a trusted source.",
                &self.proxy_headers,
            ),
            (
                "trimtab_dataplane_sse_pings_total",
                "Keep-alive comments sent on quiet server-sent-event streams (ping_interval).",
                &self.sse_pings,
            ),
            (
                "trimtab_dataplane_sse_idle_closes_total",
                "Server-sent-event streams ended by the idle timeout.",
                &self.sse_idle_closes,
            ),
            (
                "trimtab_dataplane_dead_peers_total",
                "Peers declared dead: missed pongs, unanswered keepalive probes (opaque tunnels), or an idle close a WebSocket client never answered.",
                &self.dead_peers,
            ),
            (
                "trimtab_dataplane_idle_timeouts_total",
                "Connections closed by the idle timeout.",
                &self.idle_timeouts,
            ),
            (
                "trimtab_dataplane_stalled_closes_total",
                "Peers closed for not reading within the stall limit.",
                &self.stalled_closes,
            ),
            (
                "trimtab_dataplane_settings_clamped_total",
                "Settings values moved onto their grid.",
                &self.settings_clamped,
            ),
            (
                "trimtab_dataplane_profiles_emitted_total",
                "Connection profiles handed to the profile writer.",
                &self.profiles_emitted,
            ),
            (
                "trimtab_dataplane_profiles_dropped_total",
                "Connection profiles dropped (queue and spool full).",
                &self.profiles_dropped,
            ),
        ] {
            one(&mut s, name, "counter", help, g(v).to_string());
        }
        one(
            &mut s,
            "trimtab_dataplane_backpressure_paused_seconds_total",
            "counter",
            "Time reads were paused because the other side was not accepting bytes.",
            format!("{:.6}", g(&self.paused_us) as f64 / 1e6),
        );
        let c = &crate::decisions::CACHE;
        let _ = writeln!(
            s,
            "# HELP trimtab_dataplane_decisions_total Decisions by where they came from in the decision cache.\n# TYPE trimtab_dataplane_decisions_total counter"
        );
        for (k, v) in [("hit", &c.hits), ("stale", &c.stale), ("miss", &c.misses)] {
            let _ = writeln!(
                s,
                "trimtab_dataplane_decisions_total{{cache=\"{k}\"}} {}",
                g(v)
            );
        }
        one(
            &mut s,
            "trimtab_dataplane_optimizer_errors_total",
            "counter",
            "Optimizer calls that failed or timed out.",
            g(&c.errors).to_string(),
        );
        let name = "trimtab_dataplane_optimizer_call_seconds";
        let _ = writeln!(
            s,
            "# HELP {name} Latency of calls to the optimizer (off the data path).\n# TYPE {name} histogram"
        );
        OPTIMIZER_CALLS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .render(&mut s, name, "");
        let w = &crate::profiles::WRITER;
        for (name, kind, help, v) in [
            (
                "trimtab_dataplane_profile_queue_depth",
                "gauge",
                "Profiles waiting for the writer.",
                &w.queue_depth,
            ),
            (
                "trimtab_dataplane_profile_spool_bytes",
                "gauge",
                "Bytes of profiles waiting in the spool for PostgreSQL.",
                &w.spool_bytes,
            ),
            (
                "trimtab_dataplane_profile_rows_written_total",
                "counter",
                "Profile rows written to PostgreSQL (replays included).",
                &w.rows_written,
            ),
            (
                "trimtab_dataplane_profile_rows_spooled_total",
                "counter",
                "Profile rows written to the spool.",
                &w.rows_spooled,
            ),
        ] {
            one(&mut s, name, kind, help, g(v).to_string());
        }
        let t = &traces::SPANS;
        for (name, help, v) in [
            (
                "trimtab_dataplane_spans_exported_total",
                "Spans the OTLP collector accepted.",
                &t.exported,
            ),
            (
                "trimtab_dataplane_spans_dropped_total",
                "Spans dropped because the export queue was full.",
                &t.dropped,
            ),
            (
                "trimtab_dataplane_spans_failed_total",
                "Spans lost because an export failed.",
                &t.failed,
            ),
        ] {
            one(&mut s, name, "counter", help, g(v).to_string());
        }
        CONNECTIONS.render(&mut s);
        HTTP.render(&mut s);
        s
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The process's metrics.
pub static METRICS: Metrics = Metrics::new();

/// Latency of the data plane's calls to the optimizer (off the data path), seconds.
pub static OPTIMIZER_CALLS: std::sync::LazyLock<Mutex<Histogram>> =
    std::sync::LazyLock::new(|| Mutex::new(Histogram::new(LATENCY_SECONDS)));

/// Upstream response time of HTTP requests by service.
#[derive(Debug)]
pub struct HttpLatency {
    series: Mutex<BTreeMap<String, Histogram>>,
}

/// The process's HTTP latency histograms.
pub static HTTP: HttpLatency = HttpLatency {
    series: Mutex::new(BTreeMap::new()),
};

impl HttpLatency {
    /// Count one request of `service` whose response head came after `seconds`.
    pub fn observe(&self, service: &str, seconds: f64) {
        let mut map = self.series.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = map.get_mut(service) {
            h.observe(seconds);
        } else {
            let mut h = Histogram::new(LATENCY_SECONDS);
            h.observe(seconds);
            map.insert(service.to_string(), h);
        }
    }

    /// Append the series in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let map = self
            .series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let name = "trimtab_dataplane_http_response_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} From forwarding an HTTP request to the upstream's response head.\n# TYPE {name} histogram"
        );
        for (svc, h) in &map {
            h.render(out, name, &format!("service=\"{}\"", label_value(svc)));
        }
    }
}

/// Close codes that get their own label value; any other code is `other`.
const CLOSE_CODES: [&str; 16] = [
    "1000", "1001", "1002", "1003", "1005", "1006", "1007", "1008", "1009", "1010", "1011", "1012",
    "1013", "1014", "1015", "none",
];

fn close_label(code: Option<u16>) -> &'static str {
    match code {
        None => "none",
        Some(c) => CLOSE_CODES
            .iter()
            .find(|l| l.parse::<u16>().ok() == Some(c))
            .copied()
            .unwrap_or("other"),
    }
}

/// The histograms and counters of one (service, protocol, mode).
#[derive(Debug, Clone)]
struct Series {
    duration: Histogram,
    dns: Histogram,
    connect: Histogram,
    upgrade: Histogram,
    /// client→upstream, upstream→client.
    first_message: [Histogram; 2],
    message_size: [Histogram; 2],
    /// Per-connection median ping round trip, client leg and upstream leg.
    ping_rtt: [Histogram; 2],
    closes: BTreeMap<&'static str, u64>,
    reasons: BTreeMap<&'static str, u64>,
}

impl Series {
    fn new() -> Series {
        let lat = || Histogram::new(LATENCY_SECONDS);
        Series {
            duration: Histogram::new(DURATION_SECONDS),
            dns: lat(),
            connect: lat(),
            upgrade: lat(),
            first_message: [lat(), lat()],
            message_size: [Histogram::new(SIZE_BYTES), Histogram::new(SIZE_BYTES)],
            ping_rtt: [lat(), lat()],
            closes: BTreeMap::new(),
            reasons: BTreeMap::new(),
        }
    }
}

type SeriesKey = (String, &'static str, &'static str);

/// Histograms of finished upgraded connections by service, protocol and mode, fed from each
/// connection's profile when it closes (one lock per connection, never per message).
#[derive(Debug)]
pub struct Connections {
    series: Mutex<BTreeMap<SeriesKey, Series>>,
}

/// The process's connection histograms.
pub static CONNECTIONS: Connections = Connections {
    series: Mutex::new(BTreeMap::new()),
};

fn us(v: Option<u64>) -> Option<f64> {
    v.map(|v| v as f64 / 1e6)
}

impl Connections {
    /// Count a finished connection.
    pub fn observe(&self, p: &tuning::Profile) {
        let key = (
            p.context.service.clone(),
            p.context.protocol.as_str(),
            p.decision.settings.mode.as_str(),
        );
        let mut map = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let s = map.entry(key).or_insert_with(Series::new);
        s.duration.observe(p.duration_us as f64 / 1e6);
        if let Some(v) = us(p.timings.dns_us) {
            s.dns.observe(v);
        }
        if let Some(v) = us(p.timings.connect_us) {
            s.connect.observe(v);
        }
        if let Some(v) = us(p.timings.upgrade_us) {
            s.upgrade.observe(v);
        }
        for (i, d) in [&p.client_to_upstream, &p.upstream_to_client]
            .into_iter()
            .enumerate()
        {
            if let Some(v) = us(d.first_message_us) {
                s.first_message[i].observe(v);
            }
            // The profile's log2 buckets ([2^(k-1), 2^k)) each fit inside one power-of-four
            // bucket here, so the counts move over exactly; the sum is the direction's bytes.
            for (k, n) in d.msg_sizes.0.iter().enumerate() {
                if *n > 0 {
                    let top = if k == 0 {
                        0.0
                    } else {
                        ((1u64 << k) - 1) as f64
                    };
                    s.message_size[i].observe_bucket(top, *n, 0.0);
                }
            }
            s.message_size[i].add_sum(d.bytes as f64);
        }
        for (i, ping) in [&p.ping_client, &p.ping_upstream].into_iter().enumerate() {
            if let Some(v) = us(ping.rtt_p50_us) {
                s.ping_rtt[i].observe(v);
            }
        }
        *s.closes.entry(close_label(p.close_code)).or_default() += 1;
        *s.reasons.entry(p.decision.reason.as_str()).or_default() += 1;
    }

    /// Append the series in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let map = self
            .series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let labels = |(svc, proto, mode): &SeriesKey| {
            format!(
                "service=\"{}\",protocol=\"{proto}\",mode=\"{mode}\"",
                label_value(svc)
            )
        };
        type Pick = fn(&Series) -> &Histogram;
        let hists: [(&str, &str, Pick); 4] = [
            (
                "trimtab_dataplane_connection_duration_seconds",
                "Life of finished WebSocket and tunnel connections.",
                |s| &s.duration,
            ),
            (
                "trimtab_dataplane_upstream_dns_seconds",
                "Upstream name resolution time per connection.",
                |s| &s.dns,
            ),
            (
                "trimtab_dataplane_upstream_connect_seconds",
                "Upstream TCP connect time per connection.",
                |s| &s.connect,
            ),
            (
                "trimtab_dataplane_upgrade_seconds",
                "From the client's upgrade request to the upstream's 101.",
                |s| &s.upgrade,
            ),
        ];
        for (name, help, pick) in hists {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for (k, s) in &map {
                pick(s).render(out, name, &labels(k));
            }
        }
        type PickDir = fn(&Series) -> &[Histogram; 2];
        let per_dir: [(&str, &str, &str, [&str; 2], PickDir); 3] = [
            (
                "trimtab_dataplane_first_message_seconds",
                "From the upgrade to the first message, per direction.",
                "direction",
                ["client_to_upstream", "upstream_to_client"],
                |s| &s.first_message,
            ),
            (
                "trimtab_dataplane_message_size_bytes",
                "WebSocket message sizes, per direction.",
                "direction",
                ["client_to_upstream", "upstream_to_client"],
                |s| &s.message_size,
            ),
            (
                "trimtab_dataplane_ping_rtt_seconds",
                "Median ping round trip of each connection, per leg.",
                "leg",
                ["client", "upstream"],
                |s| &s.ping_rtt,
            ),
        ];
        for (name, help, label, values, pick) in per_dir {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for (k, s) in &map {
                for (i, v) in values.iter().enumerate() {
                    pick(s)[i].render(out, name, &format!("{},{label}=\"{v}\"", labels(k)));
                }
            }
        }
        let _ = writeln!(
            out,
            "# HELP trimtab_dataplane_connection_closes_total Finished WebSocket and tunnel connections by close code.\n# TYPE trimtab_dataplane_connection_closes_total counter"
        );
        for (k, s) in &map {
            for (code, n) in &s.closes {
                let _ = writeln!(
                    out,
                    "trimtab_dataplane_connection_closes_total{{{},code=\"{code}\"}} {n}",
                    labels(k)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP trimtab_dataplane_connection_decisions_total Finished connections by the reason of the decision they ran with.\n# TYPE trimtab_dataplane_connection_decisions_total counter"
        );
        for (k, s) in &map {
            for (reason, n) in &s.reasons {
                let _ = writeln!(
                    out,
                    "trimtab_dataplane_connection_decisions_total{{{},reason=\"{reason}\"}} {n}",
                    labels(k)
                );
            }
        }
    }
}
