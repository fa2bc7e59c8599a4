//! Traces: W3C trace context on every proxied request, and one span per WebSocket or tunnel
//! connection (and per HTTP request) exported over OTLP/HTTP when configured.
//!
//! - **Propagation** (always on): a request with a valid `traceparent` continues that trace, any
//!   other request starts one; the upstream request carries `traceparent` with the proxy's own
//!   span id as the parent, and `tracestate` passes through untouched.
//! - **Spans** (when `[tracing] otlp_endpoint` is set; off by default): a connection's span is
//!   built from its profile when it closes — the upstream DNS, connect and TLS times and the
//!   upgrade become child spans, the first message of each direction an event — and handed to a
//!   bounded queue. A background task posts batches as OTLP/HTTP JSON to
//!   `<endpoint>/v1/traces`. The data path never waits: when the queue is full the span is
//!   dropped and counted (`trimtab_dataplane_spans_dropped_total`).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::sync::mpsc;

const TRACEPARENT: http::HeaderName = http::HeaderName::from_static("traceparent");

/// The W3C trace context of one request or connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace this request belongs to.
    pub trace_id: [u8; 16],
    /// The proxy's span for it.
    pub span_id: [u8; 8],
    /// The caller's span, when the request carried a valid `traceparent`.
    pub parent: Option<[u8; 8]>,
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
}

/// Append `bytes` as lower-case hex.
fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 0xf)]);
    }
}

fn hex(bytes: &[u8]) -> String {
    let mut v = Vec::with_capacity(bytes.len() * 2);
    push_hex(&mut v, bytes);
    String::from_utf8(v).expect("hex digits are ASCII")
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2
        || !s
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

/// Parse a `traceparent` value (W3C Trace Context level 1): trace id, parent span id, flags.
/// Version `ff`, all-zero ids, upper-case hex and wrong lengths are refused; a later version
/// is read by its first four fields, as the specification asks.
pub fn parse_traceparent(v: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let mut parts = v.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let span = parts.next()?;
    let flags = parts.next()?;
    let rest = parts.next();
    let version: [u8; 1] = unhex(version)?;
    if version[0] == 0xff || (version[0] == 0 && rest.is_some()) {
        return None;
    }
    let trace: [u8; 16] = unhex(trace)?;
    let span: [u8; 8] = unhex(span)?;
    let flags: [u8; 1] = unhex(flags)?;
    if trace == [0; 16] || span == [0; 8] {
        return None;
    }
    Some((trace, span, flags[0]))
}

/// Random trace and span ids from a per-thread splitmix64 generator seeded once from the OS:
/// ids need to be unpredictable enough not to collide, not cryptographic, and a getrandom(2)
/// call per request showed in the HTTP profile.
fn random<const N: usize>() -> [u8; N] {
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new({
            let u = uuid::Uuid::new_v4();
            u64::from_le_bytes(u.as_bytes()[..8].try_into().expect("8 bytes"))
        });
    }
    let mut out = [0u8; N];
    STATE.with(|s| {
        loop {
            for chunk in out.chunks_mut(8) {
                let mut z = s.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
                s.set(z);
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
            }
            if out != [0; N] {
                return out;
            }
        }
    })
}

impl TraceContext {
    /// Continue the request's trace (a valid `traceparent`), or start a new, sampled one.
    pub fn from_headers(h: &HeaderMap) -> TraceContext {
        TraceContext::from_traceparent(h.get(TRACEPARENT).and_then(|v| v.to_str().ok()))
    }

    /// As [`TraceContext::from_headers`], from the `traceparent` value if there is one.
    pub fn from_traceparent(v: Option<&str>) -> TraceContext {
        match v.and_then(parse_traceparent) {
            Some((trace_id, parent, flags)) => TraceContext {
                trace_id,
                span_id: random(),
                parent: Some(parent),
                flags,
            },
            None => TraceContext {
                trace_id: random(),
                span_id: random(),
                parent: None,
                flags: 1,
            },
        }
    }

    /// The `traceparent` value that names the proxy's span as the parent.
    pub fn traceparent(&self) -> HeaderValue {
        let mut v = Vec::with_capacity(55);
        v.extend_from_slice(b"00-");
        push_hex(&mut v, &self.trace_id);
        v.push(b'-');
        push_hex(&mut v, &self.span_id);
        v.push(b'-');
        push_hex(&mut v, &[self.flags]);
        HeaderValue::from_maybe_shared(Bytes::from(v)).expect("hex is a valid header value")
    }

    /// Put the proxy's `traceparent` on an upstream request (replacing the caller's).
    pub fn inject(&self, h: &mut HeaderMap) {
        h.insert(TRACEPARENT, self.traceparent());
    }

    /// The trace id in hex (for logs).
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }
}

/// Where spans go.
#[derive(Debug, Clone, PartialEq)]
pub struct TracingConfig {
    /// OTLP/HTTP endpoint (`http://host:4318`); spans are posted to `<endpoint>/v1/traces`.
    pub otlp_endpoint: String,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// Post a batch at least this often.
    pub batch_interval: Duration,
    /// Spans waiting at most (more are dropped and counted).
    pub queue_capacity: usize,
}

/// Spans exported, dropped (queue full) and failed (the collector refused or was away).
#[derive(Debug)]
pub struct SpanCounters {
    /// Spans posted and accepted.
    pub exported: AtomicU64,
    /// Spans dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Spans lost because a post failed.
    pub failed: AtomicU64,
}

/// The process's span counters.
pub static SPANS: SpanCounters = SpanCounters {
    exported: AtomicU64::new(0),
    dropped: AtomicU64::new(0),
    failed: AtomicU64::new(0),
};

static QUEUE: OnceLock<mpsc::Sender<Value>> = OnceLock::new();

/// Start the exporter (once per process; later calls keep the first). Must run inside tokio.
pub fn start(cfg: TracingConfig) {
    let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
    if QUEUE.set(tx).is_ok() {
        tokio::spawn(export(cfg, rx));
    }
}

/// Whether spans are exported.
pub fn enabled() -> bool {
    QUEUE.get().is_some()
}

fn nanos(t: chrono::DateTime<chrono::Utc>) -> String {
    t.timestamp_nanos_opt().unwrap_or_default().to_string()
}

fn attr(key: &str, v: Value) -> Value {
    let value = match v {
        Value::String(s) => json!({ "stringValue": s }),
        Value::Bool(b) => json!({ "boolValue": b }),
        Value::Number(n) if n.is_u64() || n.is_i64() => json!({ "intValue": n.to_string() }),
        Value::Number(n) => json!({ "doubleValue": n }),
        other => json!({ "stringValue": other.to_string() }),
    };
    json!({ "key": key, "value": value })
}

fn enqueue(span: Value) {
    if let Some(q) = QUEUE.get()
        && q.try_send(span).is_err()
    {
        SPANS.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

// OTLP span kinds and status codes.
const KIND_INTERNAL: u8 = 1;
const KIND_SERVER: u8 = 2;
const KIND_CLIENT: u8 = 3;
const STATUS_OK: u8 = 1;
const STATUS_ERROR: u8 = 2;

/// Export the span of a finished WebSocket or tunnel connection (a no-op when tracing is off).
pub fn connection(tc: &TraceContext, p: &tuning::Profile) {
    if !enabled() {
        return;
    }
    let start = p.started_at;
    let at = |us: u64| start + chrono::Duration::microseconds(us as i64);
    let end = at(p.duration_us);
    let t = &p.timings;
    let mut spans = Vec::new();
    let trace = hex(&tc.trace_id);
    let me = hex(&tc.span_id);
    let child = |name: &str, kind: u8, from: u64, to: u64| {
        json!({
            "traceId": trace, "spanId": hex(&random::<8>()), "parentSpanId": me,
            "name": name, "kind": kind,
            "startTimeUnixNano": nanos(at(from)), "endTimeUnixNano": nanos(at(to)),
        })
    };
    let dns = t.dns_us.unwrap_or(0);
    if let Some(d) = t.dns_us {
        spans.push(child("upstream.dns", KIND_INTERNAL, 0, d));
    }
    let connected = dns + t.connect_us.unwrap_or(0);
    if t.connect_us.is_some() {
        spans.push(child("upstream.connect", KIND_CLIENT, dns, connected));
    }
    if let Some(tls) = t.tls_us {
        spans.push(child(
            "upstream.tls",
            KIND_CLIENT,
            connected,
            connected + tls,
        ));
    }
    let upgraded = t.upgrade_us.unwrap_or(0);
    if t.upgrade_us.is_some() {
        spans.push(child("upgrade", KIND_CLIENT, 0, upgraded));
    }
    let mut events = Vec::new();
    for (name, d) in [
        ("first_message.client_to_upstream", &p.client_to_upstream),
        ("first_message.upstream_to_client", &p.upstream_to_client),
    ] {
        if let Some(us) = d.first_message_us {
            events.push(json!({ "timeUnixNano": nanos(at(upgraded + us)), "name": name }));
        }
    }
    let failed = p.error_class.is_some() || matches!(p.close_code, Some(1006 | 1011));
    let s = &p.decision.settings;
    let mut attributes = vec![
        attr("trimtab.connection_id", json!(p.connection_id.to_string())),
        attr("trimtab.service", json!(p.context.service)),
        attr("trimtab.route", json!(p.context.route)),
        attr("network.protocol.name", json!(p.context.protocol.as_str())),
        attr("trimtab.mode", json!(s.mode.as_str())),
        attr("trimtab.buffer_size", json!(s.buffer_size)),
        attr("trimtab.decision.reason", json!(p.decision.reason.as_str())),
        attr("trimtab.cohort", json!(p.decision.cohort.as_str())),
        attr(
            "trimtab.bytes.client_to_upstream",
            json!(p.client_to_upstream.bytes),
        ),
        attr(
            "trimtab.bytes.upstream_to_client",
            json!(p.upstream_to_client.bytes),
        ),
        attr("trimtab.closed_by", json!(p.closed_by.as_str())),
    ];
    if let Some(c) = p.close_code {
        attributes.push(attr("websocket.close_code", json!(c)));
    }
    if let Some(e) = &p.error_class {
        attributes.push(attr("error.type", json!(e)));
    }
    let mut span = json!({
        "traceId": trace, "spanId": me,
        "name": format!("{} {}", p.context.protocol.as_str(), p.context.service),
        "kind": KIND_SERVER,
        "startTimeUnixNano": nanos(start), "endTimeUnixNano": nanos(end),
        "attributes": attributes, "events": events,
        "status": { "code": if failed { STATUS_ERROR } else { STATUS_OK } },
    });
    if let Some(parent) = tc.parent {
        span["parentSpanId"] = json!(hex(&parent));
    }
    enqueue(span);
    for s in spans {
        enqueue(s);
    }
}

/// Export the span of an HTTP request, from its arrival to the upstream's response head, which
/// was `took` before now (a no-op when tracing is off).
pub fn request(
    tc: &TraceContext,
    service: &str,
    method: &http::Method,
    status: Option<u16>,
    took: Duration,
) {
    if !enabled() {
        return;
    }
    let started = chrono::Utc::now()
        - chrono::Duration::from_std(took).unwrap_or_else(|_| chrono::Duration::zero());
    let mut attributes = vec![
        attr("http.request.method", json!(method.as_str())),
        attr("trimtab.service", json!(service)),
    ];
    if let Some(s) = status {
        attributes.push(attr("http.response.status_code", json!(s)));
    }
    let failed = status.is_none_or(|s| s >= 500);
    let mut span = json!({
        "traceId": hex(&tc.trace_id), "spanId": hex(&tc.span_id),
        "name": format!("{} {service}", method.as_str()), "kind": KIND_SERVER,
        "startTimeUnixNano": nanos(started),
        "endTimeUnixNano": nanos(started + chrono::Duration::from_std(took).unwrap_or_default()),
        "attributes": attributes,
        "status": { "code": if failed { STATUS_ERROR } else { STATUS_OK } },
    });
    if let Some(parent) = tc.parent {
        span["parentSpanId"] = json!(hex(&parent));
    }
    enqueue(span);
}

async fn export(cfg: TracingConfig, mut rx: mpsc::Receiver<Value>) {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let url = format!("{}/v1/traces", cfg.otlp_endpoint.trim_end_matches('/'));
    let resource = json!({ "attributes": [attr("service.name", json!(cfg.service_name))] });
    let mut batch = Vec::new();
    loop {
        let first = rx.recv().await;
        let Some(first) = first else { return };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + cfg.batch_interval;
        while batch.len() < 512 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                Ok(None) | Err(_) => break,
            }
        }
        let n = batch.len() as u64;
        let body = json!({ "resourceSpans": [{
            "resource": resource,
            "scopeSpans": [{ "scope": { "name": "trimtab-dataplane" }, "spans": std::mem::take(&mut batch) }],
        }]});
        let req = http::Request::post(&url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())));
        let ok = match req {
            Ok(req) => {
                match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
                    Ok(Ok(resp)) => {
                        let status = resp.status();
                        let _ = resp.into_body().collect().await;
                        status.is_success()
                    }
                    _ => false,
                }
            }
            Err(_) => false,
        };
        if ok {
            SPANS.exported.fetch_add(n, Ordering::Relaxed);
        } else {
            SPANS.failed.fetch_add(n, Ordering::Relaxed);
            tracing::warn!(spans = n, endpoint = %url, "OTLP export failed; spans lost");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_parsed_as_the_specification_says() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (t, s, f) = parse_traceparent(ok).expect("valid");
        assert_eq!(hex(&t), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&s), "00f067aa0ba902b7");
        assert_eq!(f, 1);
        for bad in [
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        // a later version is read by its first four fields
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x")
                .is_some()
        );
    }

    #[test]
    fn a_request_continues_the_callers_trace_under_a_new_span() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let tc = TraceContext::from_headers(&h);
        assert_eq!(tc.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            tc.parent.map(|p| hex(&p)).as_deref(),
            Some("00f067aa0ba902b7")
        );
        let out = tc.traceparent();
        let (t, s, _) = parse_traceparent(out.to_str().unwrap()).unwrap();
        assert_eq!(t, tc.trace_id);
        assert_eq!(s, tc.span_id);
        assert_ne!(hex(&s), "00f067aa0ba902b7");
        // without a valid header: a new sampled trace
        let fresh = TraceContext::from_headers(&HeaderMap::new());
        assert_eq!(fresh.parent, None);
        assert_eq!(fresh.flags, 1);
    }
}
