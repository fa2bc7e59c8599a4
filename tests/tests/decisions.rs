//! Decisions end to end: the real optimizer and data plane over a real PostgreSQL. Overrides and
//! the kill switch reach the data plane within about a second; an unreachable optimizer never
//! delays a connection.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use trimtab_tests::harness::{
    DataPlaneProc, OptimizerProc, database_url_of, eventually, http_json, scratch_dir,
};
use trimtab_tests::upstream::spawn_echo;

const ADMIN: &str = "admin-token-e2e";
const READER: &str = "reader-token-e2e";

fn optimizer_config() -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
[[tokens]]
name = "ops"
role = "admin"
token = "{ADMIN}"
[[tokens]]
name = "dataplane"
role = "reader"
token = "{READER}"
"#
    )
}

fn dp_config(echo: SocketAddr, optimizer: SocketAddr, db: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
dataplane_id = "decisions-test"
[optimizer]
url = "http://{optimizer}"
token = "{READER}"
timeout = "5s"
[profiles]
database_url = "{db}"
spool_dir = "{}"
batch_interval = "100ms"
[services.chat]
upstreams = ["{echo}"]
routes = [{{ path_prefix = "/" }}]
"#,
        scratch_dir("spool").display()
    )
}

/// One short WebSocket session; returns how long the handshake took.
async fn session(proxy: SocketAddr) -> Duration {
    let t = Instant::now();
    let tcp = TcpStream::connect(proxy).await.expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{proxy}/ws"), tcp)
        .await
        .expect("handshake");
    let took = t.elapsed();
    ws.send(Message::text("hi")).await.expect("send");
    ws.next().await.expect("echo").expect("ok");
    ws.close(None).await.expect("close");
    while ws.next().await.is_some() {}
    took
}

/// Open sessions until the newest profile row satisfies `want`; returns (reason, idle_timeout).
async fn until_profile(
    pool: &sqlx::PgPool,
    proxy: SocketAddr,
    within: Duration,
    want: impl Fn(&str, i32) -> bool,
) -> Option<(String, i32)> {
    eventually(within, || async {
        session(proxy).await;
        let row: Option<(String, i32)> = sqlx::query_as(
            "select reason, idle_timeout_s from profiles order by written_at desc, started_at desc limit 1",
        )
        .fetch_optional(pool)
        .await
        .expect("query");
        row.filter(|(r, i)| want(r, *i))
    })
    .await
}

#[sqlx::test(migrations = "../migrations")]
async fn overrides_and_the_kill_switch_reach_the_data_plane_within_about_a_second(
    pool: sqlx::PgPool,
) {
    let url = database_url_of(&pool).await;
    let opt = OptimizerProc::start(&optimizer_config(), &url);
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&dp_config(echo, opt.addr, &url));
    // The first connection of a bucket is decided at once from static settings (fallback),
    // the next ones by the optimizer (default).
    let got = until_profile(&pool, dp.proxy, Duration::from_secs(10), |r, _| {
        r == "default"
    })
    .await;
    assert!(got.is_some(), "the cache never filled\n{}", dp.log_text());
    let first: String =
        sqlx::query_scalar("select reason from profiles order by started_at limit 1")
            .fetch_one(&pool)
            .await
            .expect("first");
    assert_eq!(first, "fallback");
    // An override through the API...
    let (st, o) = http_json(
        opt.addr,
        "PUT",
        "/v1/overrides",
        Some(ADMIN),
        Some(&json!({"service": "chat", "settings": {"idle_timeout": "15m"}, "comment": "e2e"})),
    )
    .await;
    assert_eq!(st, 201, "{o}");
    let t = Instant::now();
    let got = until_profile(&pool, dp.proxy, Duration::from_secs(10), |r, i| {
        r == "override" && i == 900
    })
    .await;
    assert!(got.is_some(), "override never applied");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(4), "override took {took:?}");
    // ...and the kill switch over it.
    let (st, _) = http_json(opt.addr, "POST", "/v1/kill-switch", Some(ADMIN), None).await;
    assert_eq!(st, 200);
    let got = until_profile(&pool, dp.proxy, Duration::from_secs(10), |r, i| {
        r == "kill_switch" && i == 300
    })
    .await;
    assert!(got.is_some(), "kill switch never applied");
    // The reader token may not change anything.
    let (st, _) = http_json(opt.addr, "DELETE", "/v1/kill-switch", Some(READER), None).await;
    assert_eq!(st, 403);
}

#[sqlx::test(migrations = "../migrations")]
async fn an_unreachable_or_silent_optimizer_never_delays_a_connection(pool: sqlx::PgPool) {
    let url = database_url_of(&pool).await;
    // A listener that accepts and never answers: the worst optimizer.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&dp_config(echo, silent_addr, &url));
    let mut worst = Duration::ZERO;
    for _ in 0..10 {
        worst = worst.max(session(dp.proxy).await);
    }
    // The optimizer call times out after 5 s: a data plane that waited for it could not finish
    // a handshake in under a second.
    assert!(worst < Duration::from_secs(1), "a handshake took {worst:?}");
    let reasons: Vec<String> = eventually(Duration::from_secs(5), || async {
        let r: Vec<String> = sqlx::query_scalar("select reason from profiles")
            .fetch_all(&pool)
            .await
            .expect("reasons");
        (r.len() == 10).then_some(r)
    })
    .await
    .expect("ten profiles");
    assert!(reasons.iter().all(|r| r == "fallback"), "{reasons:?}");
}

#[sqlx::test(migrations = "../migrations")]
async fn an_activated_model_decides_connections_with_logged_exploration(pool: sqlx::PgPool) {
    let url = database_url_of(&pool).await;
    let opt = OptimizerProc::start(
        &format!("exploration_share = 0.5\n{}", optimizer_config()),
        &url,
    );
    // A model as the trainer registers one: a candidate row with ONNX bytes. This one sends
    // every connection of the test to 64 KiB buffers and a 15-minute idle timeout.
    let target = tuning::Settings {
        buffer_size: 65536,
        idle_timeout: 900,
        ..tuning::Settings::default()
    };
    let onnx = tuning::onnx::export(&[], &target, "e2e-1");
    sqlx::query("insert into models (version, onnx, metadata) values ('e2e-1', $1, '{}')")
        .bind(onnx)
        .execute(&pool)
        .await
        .expect("register");
    let (st, m) = http_json(
        opt.addr,
        "POST",
        "/v1/models/e2e-1/activate",
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(st, 200, "{m}");
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&dp_config(echo, opt.addr, &url));
    let got = until_profile(&pool, dp.proxy, Duration::from_secs(10), |r, _| {
        r == "model"
    })
    .await;
    assert!(got.is_some(), "no model decision reached the data plane");
    for _ in 0..40 {
        session(dp.proxy).await;
    }
    type Row = (String, Option<String>, f32, bool, String);
    let rows: Vec<Row> = eventually(Duration::from_secs(5), || async {
        let r: Vec<Row> = sqlx::query_as(
            "select reason, model_version, propensity, explored,
                    concat_ws(',', buffer_size, ping_interval_s, idle_timeout_s, compression, mode)
               from profiles where reason = 'model'",
        )
        .fetch_all(&pool)
        .await
        .expect("rows");
        (r.len() >= 40).then_some(r)
    })
    .await
    .expect("forty model decisions");
    let explored = rows.iter().filter(|r| r.3).count();
    assert!(
        explored > 5 && explored < rows.len() - 5,
        "explored {explored} of {}",
        rows.len()
    );
    let model_choice = "65536,30,900,f,zero_copy";
    for (_, version, propensity, explored, settings) in &rows {
        assert_eq!(version.as_deref(), Some("e2e-1"));
        if *explored {
            assert!(*propensity < 0.5, "{propensity}");
            assert_ne!(settings, model_choice, "explored like the model: {rows:?}");
        } else {
            assert!((propensity - 0.5).abs() < 1e-6, "{propensity}");
            assert_eq!(settings, model_choice);
        }
    }
}
