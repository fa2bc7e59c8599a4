//! Observability end to end: `/metrics` of a data plane that carried real traffic, and of an
//! optimizer that served decisions, pass `promtool check metrics` (Debian's prometheus package),
//! and the histograms count what happened.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use trimtab_tests::harness::{
    DataPlaneProc, OptimizerProc, database_url_of, eventually, http_json,
};
use trimtab_tests::upstream::spawn_echo;

/// `promtool check metrics` on `text`; its complaints when it refuses.
fn promtool(text: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("promtool (./dev installs the prometheus package): {e}"))?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

async fn metrics_text(admin: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.expect("admin");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// Every `trimtab_<prefix>…` metric the Grafana dashboard (`dashboards/trimtab.json`) queries,
/// by family name (`_bucket`, `_sum`, `_count` taken off).
fn dashboard_metrics(prefix: &str) -> Vec<String> {
    let path = tuning::checkout_path("dashboards/trimtab.json");
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    let mut out = Vec::new();
    for panel in d["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            for (i, _) in expr.match_indices(prefix) {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suf| name.strip_suffix(suf))
                    .unwrap_or(&name)
                    .to_string();
                out.push(family);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Every metric the dashboard queries is one this service exports.
fn assert_dashboard_matches(text: &str, prefix: &str) {
    let wanted = dashboard_metrics(prefix);
    assert!(wanted.len() > 5, "{wanted:?}");
    for m in wanted {
        assert!(
            text.contains(&format!("# TYPE {m} ")),
            "the dashboard queries {m}, which /metrics does not export"
        );
    }
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn dataplane_metrics_pass_promtool_and_histograms_count_the_traffic() {
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&format!(
        r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
dataplane_id = "metrics-test"
[services.dead]
upstreams = ["127.0.0.1:1"]
routes = [{{ path_prefix = "/dead" }}]
[services.echo]
upstreams = ["{echo}"]
routes = [{{ path_prefix = "/" }}]
settings = {{ mode = "frame_aware" }}
"#
    ));
    let mut ws = trimtab_tests::load::connect(dp.proxy, "/chat")
        .await
        .expect("ws");
    for i in 0..20 {
        ws.send(Message::text(format!("message {i}")))
            .await
            .expect("send");
        ws.next().await.expect("echo").expect("ok");
    }
    ws.close(None).await.expect("close");
    while ws.next().await.is_some() {}
    let mut tcp = tokio::net::TcpStream::connect(dp.proxy).await.expect("tcp");
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        tcp.write_all(b"GET /plain HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut r = Vec::new();
        tcp.read_to_end(&mut r).await.expect("read");
        assert!(r.starts_with(b"HTTP/1.1 200"));
        let mut tcp = tokio::net::TcpStream::connect(dp.proxy).await.expect("tcp");
        tcp.write_all(b"GET /dead HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut r = Vec::new();
        tcp.read_to_end(&mut r).await.expect("read");
        assert!(
            r.starts_with(b"HTTP/1.1 502"),
            "{}",
            String::from_utf8_lossy(&r)
        );
    }
    let labels = r#"service="echo",protocol="websocket",mode="frame_aware""#;
    let text = eventually(Duration::from_secs(5), || async {
        let t = metrics_text(dp.admin).await;
        value(
            &t,
            &format!("trimtab_dataplane_connection_duration_seconds_count{{{labels}}}"),
        )
        .is_some_and(|v| v == 1.0)
        .then_some(t)
    })
    .await
    .expect("the connection is counted");
    promtool(&text).unwrap_or_else(|e| panic!("promtool refused the data plane's metrics: {e}"));
    assert_dashboard_matches(&text, "trimtab_dataplane_");
    let c2u = format!(
        "trimtab_dataplane_message_size_bytes_count{{{labels},direction=\"client_to_upstream\"}}"
    );
    assert_eq!(value(&text, &c2u), Some(20.0), "{c2u}");
    let small = format!(
        "trimtab_dataplane_message_size_bytes_bucket{{{labels},direction=\"upstream_to_client\",le=\"64\"}}"
    );
    assert_eq!(value(&text, &small), Some(20.0), "{small}");
    assert_eq!(
        value(
            &text,
            &format!("trimtab_dataplane_connection_closes_total{{{labels},code=\"1005\"}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            &format!("trimtab_dataplane_upgrade_seconds_count{{{labels}}}")
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            "trimtab_dataplane_http_response_seconds_count{service=\"echo\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            "trimtab_dataplane_upstream_errors_total{kind=\"connect\",reused=\"false\",age=\"none\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            "trimtab_dataplane_upstream_errors_total{kind=\"send\",reused=\"true\",age=\"ge60s\"}"
        ),
        Some(0.0)
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn optimizer_metrics_pass_promtool_and_time_decisions(pool: sqlx::PgPool) {
    let url = database_url_of(&pool).await;
    let opt = OptimizerProc::start(
        r#"
listen = "127.0.0.1:0"
rollout_tick_ms = 200
[[tokens]]
name = "dp"
role = "reader"
token = "reader-token-metrics"
[[tokens]]
name = "ops"
role = "admin"
token = "admin-token-metrics"
"#,
        &url,
    );
    let ctx = serde_json::json!({"service": "chat", "route": "/", "protocol": "websocket",
        "offers_deflate": false, "client_class": "browser", "client_region": "eu", "hour_of_week": 5});
    for _ in 0..3 {
        let (st, _) = http_json(
            opt.addr,
            "POST",
            "/v1/decisions",
            Some("reader-token-metrics"),
            Some(&ctx),
        )
        .await;
        assert_eq!(st, 200);
    }
    let text = metrics_text(opt.addr).await;
    promtool(&text).unwrap_or_else(|e| panic!("promtool refused the optimizer's metrics: {e}"));
    assert_dashboard_matches(&text, "trimtab_optimizer_");
    assert_eq!(
        value(&text, "trimtab_optimizer_decide_seconds_count"),
        Some(3.0)
    );
    assert_eq!(value(&text, "trimtab_optimizer_rollout_percent"), Some(0.0));
    // With a rollout whose first step has been judged (too few connections: it waits), the
    // rollout gauges and gate values are there, and still pass promtool.
    sqlx::query("insert into models (version, onnx, metadata) values ('m1', $1, '{}')")
        .bind(tuning::onnx::export(
            &[],
            &tuning::Settings::default(),
            "m1",
        ))
        .execute(&pool)
        .await
        .expect("model");
    let (st, r) = http_json(
        opt.addr,
        "POST",
        "/v1/rollouts",
        Some("admin-token-metrics"),
        Some(&serde_json::json!({"candidate": "m1", "steps": [25, 100], "step_duration": "1s"})),
    )
    .await;
    assert_eq!(st, 201, "{r}");
    let text = eventually(Duration::from_secs(10), || async {
        let t = metrics_text(opt.addr).await;
        t.contains("trimtab_optimizer_rollout_gate{cohort=\"canary\"")
            .then_some(t)
    })
    .await
    .expect("gate values after the first judgement");
    promtool(&text).unwrap_or_else(|e| panic!("promtool refused the optimizer's metrics: {e}"));
    assert_eq!(
        value(&text, "trimtab_optimizer_rollout_percent"),
        Some(25.0)
    );
    assert_eq!(value(&text, "trimtab_optimizer_rollout_step"), Some(0.0));
}

/// A local OTLP/HTTP receiver: every span posted to `/v1/traces` (JSON), flattened.
async fn otlp_receiver() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    use http_body_util::BodyExt;
    let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let keep = spans.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else {
                continue;
            };
            let spans = keep.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let spans = spans.clone();
                        async move {
                            let ok = req.uri().path() == "/v1/traces"
                                && req.headers()["content-type"] == "application/json";
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            let v: serde_json::Value = body
                                .ok()
                                .and_then(|b| serde_json::from_slice(&b).ok())
                                .unwrap_or_default();
                            for rs in v["resourceSpans"].as_array().into_iter().flatten() {
                                assert_eq!(
                                    rs["resource"]["attributes"][0]["value"]["stringValue"],
                                    "trimtab-dataplane"
                                );
                                for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
                                    for sp in ss["spans"].as_array().into_iter().flatten() {
                                        spans.lock().expect("spans").push(sp.clone());
                                    }
                                }
                            }
                            let mut r = http::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from_static(b"{}"),
                            ));
                            if !ok {
                                *r.status_mut() = http::StatusCode::BAD_REQUEST;
                            }
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, spans)
}

/// An upstream that accepts one generic upgrade, hands over the request head it received,
/// answers 101 and closes.
async fn capturing_upstream() -> (std::net::SocketAddr, tokio::sync::oneshot::Receiver<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.expect("accept");
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.expect("read");
            assert!(n > 0, "closed before the head ended");
            head.extend_from_slice(&buf[..n]);
        }
        let _ = tx.send(String::from_utf8_lossy(&head).to_string());
        s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x-test\r\n\r\n",
        )
        .await
        .expect("write");
        let _ = s.shutdown().await;
        while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    });
    (addr, rx)
}

fn traceparent_of(text: &str) -> (String, String) {
    let line = text
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("traceparent:"))
        .unwrap_or_else(|| panic!("no traceparent in\n{text}"));
    let v: Vec<&str> = line["traceparent:".len()..].trim().split('-').collect();
    (v[1].to_string(), v[2].to_string())
}

#[tokio::test]
async fn trace_context_reaches_upstreams_and_spans_reach_an_otlp_receiver() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (otlp, spans) = otlp_receiver().await;
    let echo = spawn_echo().await;
    let (raw, head_rx) = capturing_upstream().await;
    let dp = DataPlaneProc::start(&format!(
        r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
dataplane_id = "trace-test"
[tracing]
otlp_endpoint = "http://{otlp}"
batch_interval = "100ms"
[services.raw]
upstreams = ["{raw}"]
routes = [{{ path_prefix = "/raw" }}]
[services.echo]
upstreams = ["{echo}"]
routes = [{{ path_prefix = "/" }}]
"#
    ));
    let (t1, p1) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let (t2, p2) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");

    // HTTP: the upstream sees the caller's trace under the proxy's span.
    let mut s = tokio::net::TcpStream::connect(dp.proxy).await.expect("tcp");
    s.write_all(
        format!("GET /headers HTTP/1.1\r\nHost: t\r\nConnection: close\r\ntraceparent: 00-{t1}-{p1}-01\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    let mut got = String::new();
    s.read_to_string(&mut got).await.expect("read");
    let body = &got[got.find("\r\n\r\n").expect("head") + 4..];
    let json_start = body.find('{').expect("json");
    let seen: serde_json::Value =
        serde_json::from_str(&body[json_start..=body.rfind('}').expect("json")]).expect("json");
    let tp = seen["traceparent"][0]
        .as_str()
        .expect("traceparent upstream");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts[1], t1, "{tp}");
    assert_ne!(parts[2], p1, "the proxy's own span is the parent: {tp}");
    let http_span_id = parts[2].to_string();

    // Upgrade: the same on the upgrade request.
    let mut s = tokio::net::TcpStream::connect(dp.proxy).await.expect("tcp");
    s.write_all(
        format!("GET /raw/x HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: x-test\r\ntraceparent: 00-{t2}-{p2}-01\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    let head = tokio::time::timeout(Duration::from_secs(5), head_rx)
        .await
        .expect("upstream saw the upgrade")
        .expect("head");
    let (trace, upgrade_span_id) = traceparent_of(&head);
    assert_eq!(trace, t2);
    assert_ne!(upgrade_span_id, p2);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(
        rest.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
    drop(s);

    // A WebSocket without a caller trace: a new trace, first messages as events.
    let mut ws = trimtab_tests::load::connect(dp.proxy, "/ws")
        .await
        .expect("ws");
    ws.send(Message::text("hello")).await.expect("send");
    ws.next().await.expect("echo").expect("ok");
    ws.close(None).await.expect("close");
    while ws.next().await.is_some() {}

    let all = eventually(Duration::from_secs(10), || async {
        let v = spans.lock().expect("spans").clone();
        let names: Vec<&str> = v.iter().filter_map(|s| s["name"].as_str()).collect();
        (names.contains(&"GET echo")
            && names.contains(&"upgrade raw")
            && names.contains(&"websocket echo"))
        .then_some(v)
    })
    .await
    .unwrap_or_else(|| panic!("spans: {:#?}", spans.lock().expect("spans")));
    let find = |name: &str| {
        all.iter()
            .find(|s| s["name"] == name)
            .cloned()
            .expect("span")
    };
    let http = find("GET echo");
    assert_eq!(http["traceId"], t1);
    assert_eq!(http["parentSpanId"], p1);
    assert_eq!(http["spanId"], http_span_id.as_str());
    assert_eq!(http["kind"], 2);
    let up = find("upgrade raw");
    assert_eq!(up["traceId"], t2);
    assert_eq!(up["parentSpanId"], p2);
    assert_eq!(up["spanId"], upgrade_span_id.as_str());
    let children: Vec<&str> = all
        .iter()
        .filter(|s| s["parentSpanId"] == upgrade_span_id.as_str())
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert!(
        children.contains(&"upstream.connect") && children.contains(&"upgrade"),
        "{children:?}"
    );
    let ws_span = find("websocket echo");
    assert_eq!(ws_span["traceId"].as_str().map(str::len), Some(32));
    assert!(ws_span.get("parentSpanId").is_none(), "{ws_span}");
    let events: Vec<&str> = ws_span["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(
        events,
        [
            "first_message.client_to_upstream",
            "first_message.upstream_to_client"
        ]
    );
    let start: u128 = ws_span["startTimeUnixNano"]
        .as_str()
        .expect("start")
        .parse()
        .expect("n");
    let end: u128 = ws_span["endTimeUnixNano"]
        .as_str()
        .expect("end")
        .parse()
        .expect("n");
    assert!(end > start);
    let text = metrics_text(dp.admin).await;
    assert_eq!(
        value(&text, "trimtab_dataplane_spans_dropped_total"),
        Some(0.0)
    );
    assert_eq!(
        value(&text, "trimtab_dataplane_spans_failed_total"),
        Some(0.0)
    );
}

/// Connections spread over the workers in turn, and each worker's gauge counts the ones it
/// serves, back to zero when they close.
#[tokio::test]
async fn each_worker_counts_the_connections_it_serves() {
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&super::config(echo, "zero_copy", "", "workers = 2"));
    let gauges = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with("trimtab_dataplane_worker_connections{"))
            .map(str::to_string)
            .collect()
    };
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut ws = trimtab_tests::load::connect(dp.proxy, "/held")
            .await
            .expect("ws");
        ws.send(Message::text("hi")).await.expect("send");
        ws.next().await.expect("echo").expect("ok");
        held.push(ws);
    }
    let text = metrics_text(dp.admin).await;
    promtool(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(
        gauges(&text),
        [
            "trimtab_dataplane_worker_connections{worker=\"0\"} 2",
            "trimtab_dataplane_worker_connections{worker=\"1\"} 2",
        ],
        "{text}"
    );
    for mut ws in held {
        ws.close(None).await.expect("close");
        while ws.next().await.is_some() {}
    }
    let zero = eventually(Duration::from_secs(10), || async {
        let g = gauges(&metrics_text(dp.admin).await);
        g.iter().all(|l| l.ends_with(" 0")).then_some(g)
    })
    .await;
    assert!(zero.is_some(), "gauges never returned to zero");
}
