//! Rollouts end to end with real traffic through a running data plane: a bad candidate is rolled
//! back automatically; a good one is promoted through every step, across an optimizer restart.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use trimtab_tests::harness::{
    DataPlaneProc, OptimizerProc, database_url_of, eventually, http_json, scratch_dir,
};
use trimtab_tests::upstream::spawn_echo;

const ADMIN: &str = "admin-token-rollout";
const READER: &str = "reader-token-rollout";

fn optimizer_config() -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
rollout_tick_ms = 200
exploration_share = 0.0
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
dataplane_id = "rollout-test"
client_key_header = "x-client-id"
[optimizer]
url = "http://{optimizer}"
token = "{READER}"
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

/// A session as client `client`: one message, `idle` of silence, one more message, close.
/// Returns false when the proxy closed it first.
async fn session(proxy: SocketAddr, client: &str, idle: Duration) -> bool {
    let tcp = TcpStream::connect(proxy).await.expect("connect");
    let mut req = format!("ws://{proxy}/ws")
        .into_client_request()
        .expect("req");
    req.headers_mut()
        .insert("x-client-id", client.parse().expect("hv"));
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp)
        .await
        .expect("handshake");
    ws.send(Message::text("a")).await.expect("send");
    ws.next().await.expect("echo").expect("ok");
    if !idle.is_zero() {
        // Silent but alive: the proxy's pings are answered (tungstenite does, while read).
        let quiet = async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    _ => return,
                }
            }
        };
        if tokio::time::timeout(idle, quiet).await.is_ok() {
            while ws.next().await.is_some() {}
            return false;
        }
    }
    if ws.send(Message::text("b")).await.is_err() {
        return false;
    }
    let ok = matches!(ws.next().await, Some(Ok(Message::Text(_))));
    let _ = ws.close(None).await;
    while ws.next().await.is_some() {}
    ok
}

async fn register(pool: &sqlx::PgPool, version: &str, settings: tuning::Settings) {
    sqlx::query("insert into models (version, onnx, metadata) values ($1, $2, '{}')")
        .bind(version)
        .bind(tuning::onnx::export(&[], &settings, version))
        .execute(pool)
        .await
        .expect("register");
}

async fn rollout_state(opt: SocketAddr, id: i64) -> serde_json::Value {
    http_json(
        opt,
        "GET",
        &format!("/v1/rollouts/{id}"),
        Some(READER),
        None,
    )
    .await
    .1
}

/// Make sure the data plane has the optimizer's answer (with the rollout) cached.
async fn warm(pool: &sqlx::PgPool, proxy: SocketAddr) {
    eventually(Duration::from_secs(10), || async {
        session(proxy, "warm-up", Duration::ZERO).await;
        let n: i64 = sqlx::query_scalar("select count(*) from profiles where cohort <> 'none'")
            .fetch_one(pool)
            .await
            .expect("count");
        (n > 0).then_some(())
    })
    .await
    .expect("the data plane picked up the rollout");
}

#[sqlx::test(migrations = "../migrations")]
async fn a_bad_candidate_is_rolled_back_automatically(pool: sqlx::PgPool) {
    let url = database_url_of(&pool).await;
    let opt = OptimizerProc::start(&optimizer_config(), &url);
    // Bad for this idle-heavy workload: a 30 s idle timeout where sessions pause for 31 s.
    let bad = tuning::Settings {
        idle_timeout: 30,
        ..tuning::Settings::default()
    };
    register(&pool, "bad-1", bad).await;
    let (st, r) = http_json(
        opt.addr,
        "POST",
        "/v1/rollouts",
        Some(ADMIN),
        Some(
            &json!({"candidate": "bad-1", "steps": [50, 100], "step_duration": "15s",
                      "min_connections": 3}),
        ),
    )
    .await;
    assert_eq!(st, 201, "{r}");
    let id = r["id"].as_i64().expect("id");
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&dp_config(echo, opt.addr, &url));
    warm(&pool, dp.proxy).await;
    let mut tasks = Vec::new();
    for i in 0..24 {
        let proxy = dp.proxy;
        tasks.push(tokio::spawn(async move {
            session(proxy, &format!("client-{i}"), Duration::from_secs(31)).await
        }));
    }
    let mut completed = 0;
    for t in tasks {
        if t.await.expect("session") {
            completed += 1;
        }
    }
    assert!(
        completed > 0 && completed < 24,
        "both cohorts: {completed} of 24 completed"
    );
    let state = eventually(Duration::from_secs(20), || async {
        let r = rollout_state(opt.addr, id).await;
        (r["state"] != "canary").then_some(r)
    })
    .await
    .expect("the controller judged the step");
    assert_eq!(state["state"], "rolled_back", "{state}");
    assert!(
        state["state_reason"]
            .as_str()
            .unwrap_or("")
            .contains("replay_cost"),
        "{state}"
    );
    let (_, m) = http_json(opt.addr, "GET", "/v1/models/bad-1", Some(READER), None).await;
    assert_eq!(
        m["status"], "candidate",
        "a rolled-back candidate never goes live"
    );
    // Every canary connection was cut by the candidate's idle timeout, no control one was
    // (once all 24 sessions are profiled: the gate may judge before the last ones land).
    eventually(Duration::from_secs(10), || async {
        let n: i64 =
            sqlx::query_scalar("select count(*) from profiles where client_key like 'client-%'")
                .fetch_one(&pool)
                .await
                .expect("count");
        (n == 24).then_some(())
    })
    .await
    .expect("every session profiled");
    let by: Vec<(String, bool)> = sqlx::query_as(
        "select cohort, bool_and(idle_timeout_fired) from profiles where client_key like 'client-%' group by cohort order by cohort",
    )
    .fetch_all(&pool)
    .await
    .expect("cohorts");
    assert_eq!(by, vec![("canary".into(), true), ("control".into(), false)]);
}

#[sqlx::test(migrations = "../migrations")]
async fn a_good_candidate_is_promoted_through_every_step_across_an_optimizer_restart(
    pool: sqlx::PgPool,
) {
    let url = database_url_of(&pool).await;
    let mut opt = OptimizerProc::start(&optimizer_config(), &url);
    register(&pool, "good-1", tuning::Settings::default()).await;
    let (st, r) = http_json(
        opt.addr,
        "POST",
        "/v1/rollouts",
        Some(ADMIN),
        Some(
            &json!({"candidate": "good-1", "steps": [25, 50, 100], "step_duration": "2s",
                      "min_connections": 3}),
        ),
    )
    .await;
    assert_eq!(st, 201, "{r}");
    let id = r["id"].as_i64().expect("id");
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&dp_config(echo, opt.addr, &url));
    warm(&pool, dp.proxy).await;
    let traffic = {
        let proxy = dp.proxy;
        tokio::spawn(async move {
            for i in 0..2000 {
                session(proxy, &format!("client-{}", i % 24), Duration::ZERO).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    // Wait for the first step to pass, then restart the optimizer: the controller carries on.
    let after_first = eventually(Duration::from_secs(30), || async {
        let r = rollout_state(opt.addr, id).await;
        (r["step_index"].as_i64() >= Some(1) || r["state"] != "canary").then_some(r)
    })
    .await
    .expect("the first step passed");
    assert_eq!(after_first["state"], "canary", "{after_first}");
    opt.kill();
    let opt2 = OptimizerProc::start(&optimizer_config(), &url);
    let done = eventually(Duration::from_secs(40), || async {
        let r = rollout_state(opt2.addr, id).await;
        (r["state"] != "canary").then_some(r)
    })
    .await
    .expect("the rollout finished");
    traffic.abort();
    assert_eq!(done["state"], "promoted", "{done}");
    let (_, m) = http_json(opt2.addr, "GET", "/v1/models/good-1", Some(READER), None).await;
    assert_eq!(m["status"], "active");
    let (_, log) = http_json(opt2.addr, "GET", "/v1/audit", Some(READER), None).await;
    let actions: Vec<&str> = log
        .as_array()
        .expect("audit")
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(actions.contains(&"rollout.promoted"), "{actions:?}");
    assert!(actions.contains(&"rollout.step"), "{actions:?}");
}

#[sqlx::test(migrations = "../migrations")]
async fn the_shadow_phase_logs_the_candidates_choice_beside_the_applied_one(pool: sqlx::PgPool) {
    let url = database_url_of(&pool).await;
    let opt = OptimizerProc::start(&optimizer_config(), &url);
    let candidate = tuning::Settings {
        buffer_size: 65536,
        ..tuning::Settings::default()
    };
    register(&pool, "shadow-1", candidate).await;
    let (st, r) = http_json(
        opt.addr,
        "POST",
        "/v1/rollouts",
        Some(ADMIN),
        Some(&json!({"candidate": "shadow-1", "shadow_share": 1.0, "step_duration": "10m"})),
    )
    .await;
    assert_eq!(st, 201, "{r}");
    assert_eq!(r["state"], "shadow");
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&dp_config(echo, opt.addr, &url));
    warm(&pool, dp.proxy).await;
    for i in 0..5 {
        session(dp.proxy, &format!("client-{i}"), Duration::ZERO).await;
    }
    let rows: Vec<(String, i32, Option<serde_json::Value>)> = eventually(Duration::from_secs(5), || async {
        let r: Vec<(String, i32, Option<serde_json::Value>)> = sqlx::query_as(
            "select cohort, buffer_size, shadow_settings from profiles where client_key like 'client-%'",
        )
        .fetch_all(&pool)
        .await
        .expect("rows");
        (r.len() >= 5).then_some(r)
    })
    .await
    .expect("profiles");
    for (cohort, applied, shadow) in &rows {
        // nothing of the candidate is applied: every connection is control, with its own buffer
        assert_eq!(cohort, "control");
        assert_eq!(*applied, 16384);
        let shadow = shadow.as_ref().expect("the candidate's choice is logged");
        assert_eq!(shadow["buffer_size"], 65536, "{shadow}");
    }
}
