//! A synthetic profile table whose right policy is known, for tests, the demo and benchmarks.

use chrono::Utc;
use tuning::ClientClass;

/// Three services whose right settings differ: bulk (large incompressible messages),
/// chat (small compressible messages, long idle gaps) and iot (tiny messages, peers that
/// vanish). Deterministic noise from a fixed seed.
pub async fn insert(db: &sqlx::PgPool, n: usize) -> Result<(), sqlx::Error> {
    let mut rng: u64 = 42;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let t0 = Utc::now() - chrono::Duration::hours(2);
    for i in 0..n {
        let kind = i % 3;
        let jitter = next() % 100;
        let (service, class, ua_class) = match kind {
            0 => ("bulk", "/download", ClientClass::Server),
            1 => ("chat", "/ws", ClientClass::Browser),
            _ => ("iot", "/telemetry", ClientClass::Device),
        };
        let mut c2u = vec![0i64; tuning::profile::HIST_BUCKETS];
        let mut u2c = vec![0i64; tuning::profile::HIST_BUCKETS];
        let (c_msgs, c_size, u_msgs, u_size, gap_ms, secs, s_in, s_out, dead) = match kind {
            0 => (
                5,
                100,
                500 + jitter,
                180_000,
                500,
                60,
                50_000,
                49_000,
                false,
            ),
            1 => (
                200 + jitter,
                300,
                200 + jitter,
                400,
                200_000,
                1200,
                40_000,
                8_000,
                false,
            ),
            _ => (30, 40, 2, 20, 40_000, 1200, 0, 0, true), // devices vanish
        };
        c2u[tuning::Hist::bucket(c_size)] = c_msgs as i64;
        u2c[tuning::Hist::bucket(u_size)] = u_msgs as i64;
        sqlx::query(
            "insert into profiles (connection_id, dataplane_id, started_at, ended_at, duration_us, service, route,
               protocol, offers_deflate, client_class, client_region, hour_of_week, buffer_size, ping_interval_s,
               idle_timeout_s, compression, mode, reason, cohort, propensity,
               c2u_bytes, c2u_messages, c2u_msg_size_hist, c2u_read_size_hist, c2u_gap_ms_hist, c2u_max_gap_ms,
               u2c_bytes, u2c_messages, u2c_msg_size_hist, u2c_read_size_hist, u2c_gap_ms_hist, u2c_max_gap_ms,
               u2c_sampled_in, u2c_sampled_out, closed_by, dead_peer, close_code)
             values (gen_random_uuid(), 'syn', $1, $1, $2, $3, $4, 'websocket', true, $5, 'eu', 10, 16384, 30,
               300, false, 'zero_copy', 'default', 'none', 1,
               $6, $7, $8, '{}', '{}', $9, $10, $11, $12, '{}', '{}', $9, $13, $14, 'client', $15, $16)",
        )
        .bind(t0 + chrono::Duration::seconds(i as i64))
        .bind((secs * 1_000_000) as i64)
        .bind(service)
        .bind(class)
        .bind(ua_class.as_str())
        .bind((c_msgs * c_size) as i64)
        .bind(c_msgs as i64)
        .bind(&c2u)
        .bind(gap_ms as i64)
        .bind((u_msgs * u_size) as i64)
        .bind(u_msgs as i64)
        .bind(&u2c)
        .bind(s_in as i64)
        .bind(s_out as i64)
        .bind(dead)
        .bind(if dead { 1006 } else { 1000 })
        .execute(db)
        .await?;
    }
    Ok(())
}
