//! Profiles end to end: real connections through the real data plane become rows in a fresh,
//! migrated PostgreSQL database; an unreachable database and a killed data plane lose nothing.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use trimtab_tests::harness::{
    DataPlaneProc, Relay, database_url_of, eventually, metric, scratch_dir, url_via,
};
use trimtab_tests::upstream::spawn_echo;

/// (c2u_messages, u2c_messages, c2u_msg_size_hist, close_code, close_reason, closed_by,
/// client_region, mode, buffer_size)
type WsRow = (
    i64,
    i64,
    Vec<i64>,
    Option<i32>,
    Option<String>,
    String,
    String,
    String,
    i32,
);

fn config(echo: SocketAddr, mode: &str, db: &str, spool: &std::path::Path) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
dataplane_id = "profiles-test"
[regions]
loopback = ["127.0.0.0/8"]
[profiles]
database_url = "{db}"
spool_dir = "{}"
batch_interval = "100ms"
write_timeout = "2s"
[services.echo]
upstreams = ["{echo}"]
routes = [{{ path_prefix = "/" }}]
settings = {{ mode = "{mode}" }}
"#,
        spool.display()
    )
}

/// One WebSocket connection: `k` messages of `size` bytes each way, then close 1000 "done".
async fn ws_session(proxy: SocketAddr, k: usize, size: usize) {
    ws_sizes(proxy, &vec![size; k]).await
}

/// One WebSocket connection: a message of each size (one repeated byte) each way, one at a
/// time, then close 1000 "done".
async fn ws_sizes(proxy: SocketAddr, sizes: &[usize]) {
    let tcp = TcpStream::connect(proxy).await.expect("connect");
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{proxy}/p"), tcp)
        .await
        .expect("handshake");
    for &size in sizes {
        ws.send(Message::binary(vec![1u8; size]))
            .await
            .expect("send");
        let m = ws.next().await.expect("echo").expect("ok");
        assert_eq!(m.len(), size);
    }
    ws.close(Some(CloseFrame {
        code: 1000.into(),
        reason: "done".into(),
    }))
    .await
    .expect("close");
    while ws.next().await.is_some() {}
}

/// One generic-upgrade tunnel carrying `n` bytes each way.
async fn tunnel_session(proxy: SocketAddr, n: usize) {
    let mut s = TcpStream::connect(proxy).await.expect("connect");
    s.write_all(b"GET /t HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: x-echo\r\n\r\n")
        .await
        .expect("write");
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.expect("head");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    s.write_all(&vec![9u8; n]).await.expect("payload");
    s.shutdown().await.expect("fin");
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.expect("echo");
    assert_eq!(back.len(), n);
}

/// The host:port of a PostgreSQL URL, resolved.
async fn server_addr(url: &str) -> SocketAddr {
    let rest = url.split_once('@').map_or(url, |(_, r)| r);
    let hostport = rest.split('/').next().expect("host:port");
    tokio::net::lookup_host(hostport)
        .await
        .expect("resolve")
        .next()
        .expect("addr")
}

async fn count(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from profiles")
        .fetch_one(pool)
        .await
        .expect("count")
}

async fn wait_rows(pool: &sqlx::PgPool, n: i64, within: Duration) -> i64 {
    eventually(within, || async {
        let c = count(pool).await;
        (c >= n).then_some(c)
    })
    .await
    .unwrap_or(count(pool).await)
}

#[sqlx::test(migrations = "../migrations")]
async fn every_connection_becomes_one_row_with_exact_counts(pool: sqlx::PgPool) {
    let url = database_url_of(&pool).await;
    let echo = spawn_echo().await;
    for mode in ["zero_copy", "frame_aware"] {
        let before = count(&pool).await;
        let dp = DataPlaneProc::start(&config(echo, mode, &url, &scratch_dir("spool")));
        let n = 4;
        let mut tasks = Vec::new();
        for _ in 0..n {
            tasks.push(tokio::spawn(ws_session(dp.proxy, 10, 1000)));
            tasks.push(tokio::spawn(tunnel_session(dp.proxy, 5000)));
        }
        for t in tasks {
            t.await.expect("session");
        }
        let got = wait_rows(&pool, before + 2 * n, Duration::from_secs(10)).await;
        assert_eq!(got, before + 2 * n, "{mode}");
        let ws: Vec<WsRow> = sqlx::query_as(
            "select c2u_messages, u2c_messages, c2u_msg_size_hist, close_code, close_reason,
                        closed_by, client_region, mode, buffer_size
                   from profiles where protocol = 'websocket' and mode = $1",
        )
        .bind(mode)
        .fetch_all(&pool)
        .await
        .expect("ws rows");
        assert_eq!(ws.len(), n as usize, "{mode}");
        for r in &ws {
            assert_eq!((r.0, r.1), (10, 10), "{mode}: message counts");
            // 1000-byte messages fall in the log2 bucket [512, 1024): index 10.
            assert_eq!(r.2[10], 10, "{mode}: size histogram {:?}", r.2);
            assert_eq!(r.2.iter().sum::<i64>(), 10, "{mode}");
            assert_eq!(r.3, Some(1000), "{mode}: close code");
            assert_eq!(r.4.as_deref(), Some("done"), "{mode}: close reason");
            assert_eq!(r.5, "client", "{mode}");
            assert_eq!(r.6, "loopback", "{mode}: region from the CIDR table");
            assert_eq!(r.7, mode);
            assert_eq!(r.8, 16384);
        }
        // Compressibility is sampled in both modes (the payloads are one repeated byte).
        let samples: Vec<(i64, i64)> = sqlx::query_as(
            "select u2c_sampled_in, u2c_sampled_out from profiles where protocol = 'websocket' and mode = $1",
        )
        .bind(mode)
        .fetch_all(&pool)
        .await
        .expect("samples");
        for (raw, out) in &samples {
            assert!(*raw > 0 && *out * 4 < *raw, "{mode}: sampled {raw} → {out}");
        }
        let tunnels: Vec<(i64, i64, String)> = sqlx::query_as(
            "select c2u_bytes, u2c_bytes, reason from profiles where protocol = 'upgrade' and dataplane_id = 'profiles-test'
               order by written_at desc limit $1",
        )
        .bind(n)
        .fetch_all(&pool)
        .await
        .expect("tunnel rows");
        for t in &tunnels {
            assert_eq!((t.0, t.1), (5000, 5000), "{mode}: tunnel bytes");
            assert_eq!(t.2, "default");
        }
        let timings: (Option<i64>, Option<i64>, Option<i64>) = sqlx::query_as(
            "select max(connect_us), max(upgrade_us), max(c2u_first_message_us) from profiles where mode = $1",
        )
        .bind(mode)
        .fetch_one(&pool)
        .await
        .expect("timings");
        assert!(
            timings.0.is_some() && timings.1.is_some() && timings.2.is_some(),
            "{timings:?}"
        );
    }
}

/// A connection whose first message toward the client is tiny (an echoed ack) and whose later
/// ones are large and compressible is recorded as compressible: before, only the first read
/// (`zero_copy`) or message (`frame_aware`) of a short connection was deflated, so the tiny one
/// decided alone, and the dashboard archetype was compressed in one training run and not in
/// the next.
#[sqlx::test(migrations = "../migrations")]
async fn a_tiny_first_message_does_not_decide_compressibility(pool: sqlx::PgPool) {
    let url = database_url_of(&pool).await;
    let echo = spawn_echo().await;
    for mode in ["zero_copy", "frame_aware"] {
        let before = count(&pool).await;
        let dp = DataPlaneProc::start(&config(echo, mode, &url, &scratch_dir("spool")));
        let mut sizes = vec![9];
        sizes.extend([3000; 8]);
        ws_sizes(dp.proxy, &sizes).await;
        assert_eq!(
            wait_rows(&pool, before + 1, Duration::from_secs(10)).await,
            before + 1
        );
        let (raw, out): (i64, i64) =
            sqlx::query_as("select u2c_sampled_in, u2c_sampled_out from profiles where mode = $1")
                .bind(mode)
                .fetch_one(&pool)
                .await
                .expect("sample");
        assert!(
            raw >= 3000 && out * 10 < raw,
            "{mode}: sampled {raw} bytes, deflated to {out}"
        );
    }
}

#[sqlx::test(migrations = "../migrations")]
async fn an_unreachable_database_loses_no_profile_and_stores_each_once(pool: sqlx::PgPool) {
    let url = database_url_of(&pool).await;
    let pg = server_addr(&url).await;
    let relay = Relay::start(pg).await;
    let echo = spawn_echo().await;
    let dp = DataPlaneProc::start(&config(
        echo,
        "zero_copy",
        &url_via(&url, relay.addr),
        &scratch_dir("spool"),
    ));
    for _ in 0..5 {
        ws_session(dp.proxy, 3, 100).await;
    }
    assert_eq!(wait_rows(&pool, 5, Duration::from_secs(10)).await, 5);
    relay.set_up(false);
    for _ in 0..7 {
        ws_session(dp.proxy, 3, 100).await;
    }
    let spooled = eventually(Duration::from_secs(15), || async {
        metric(dp.admin, "trimtab_dataplane_profile_rows_spooled_total")
            .await
            .filter(|v| *v >= 7.0)
    })
    .await;
    assert_eq!(
        spooled,
        Some(7.0),
        "rows went to the spool\n{}",
        dp.log_text()
    );
    assert_eq!(
        count(&pool).await,
        5,
        "nothing new reached the database while it was cut off"
    );
    relay.set_up(true);
    assert_eq!(wait_rows(&pool, 12, Duration::from_secs(15)).await, 12);
    let distinct: i64 = sqlx::query_scalar("select count(distinct connection_id) from profiles")
        .fetch_one(&pool)
        .await
        .expect("distinct");
    assert_eq!(distinct, 12);
    assert_eq!(
        metric(dp.admin, "trimtab_dataplane_profiles_dropped_total").await,
        Some(0.0)
    );
}

#[sqlx::test(migrations = "../migrations")]
async fn a_killed_data_plane_replays_its_spool_after_restart_without_duplicates(
    pool: sqlx::PgPool,
) {
    let url = database_url_of(&pool).await;
    let pg = server_addr(&url).await;
    let relay = Relay::start(pg).await;
    relay.set_up(false);
    let echo = spawn_echo().await;
    let spool = scratch_dir("spool");
    let cfg = config(echo, "frame_aware", &url_via(&url, relay.addr), &spool);
    let mut dp = DataPlaneProc::start(&cfg);
    for _ in 0..6 {
        ws_session(dp.proxy, 2, 50).await;
    }
    let spooled = eventually(Duration::from_secs(15), || async {
        metric(dp.admin, "trimtab_dataplane_profile_rows_spooled_total")
            .await
            .filter(|v| *v >= 6.0)
    })
    .await;
    assert_eq!(spooled, Some(6.0));
    dp.signal("KILL");
    let _ = tokio::task::spawn_blocking(move || {
        dp.wait_exit(Duration::from_secs(5));
    })
    .await;
    assert_eq!(count(&pool).await, 0);
    relay.set_up(true);
    let dp2 = DataPlaneProc::start(&cfg);
    assert_eq!(wait_rows(&pool, 6, Duration::from_secs(15)).await, 6);
    // Give a duplicate every chance to appear, then check there is none.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&pool).await, 6);
    let spool_left = metric(dp2.admin, "trimtab_dataplane_profile_spool_bytes").await;
    assert_eq!(spool_left, Some(0.0));
}
