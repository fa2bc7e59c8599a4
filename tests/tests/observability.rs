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
}

#[sqlx::test(migrations = "../migrations")]
async fn optimizer_metrics_pass_promtool_and_time_decisions(pool: sqlx::PgPool) {
    let url = database_url_of(&pool).await;
    let opt = OptimizerProc::start(
        r#"
listen = "127.0.0.1:0"
[[tokens]]
name = "dp"
role = "reader"
token = "reader-token-metrics"
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
    assert_eq!(
        value(&text, "trimtab_optimizer_decide_seconds_count"),
        Some(3.0)
    );
    assert_eq!(value(&text, "trimtab_optimizer_rollout_percent"), Some(0.0));
}
