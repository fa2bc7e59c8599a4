//! `trainer`: learns per-connection settings from profiles. Reads a window of profiles from
//! PostgreSQL, builds features (`tuning`'s encoder and aggregates) and hindsight labels
//! (`tuning::cost`), fits one decision tree per target ([`learn`]), evaluates on the later part of
//! the window against the baselines, exports ONNX (`tuning::onnx`) and registers a candidate.
//! Nothing goes live from here: a rollout or an audited activation does that.

pub mod learn;

use chrono::{DateTime, Utc};
use serde::Serialize;

/// Why the trainer refused to go on.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// The `profiles` table is missing.
    #[error(
        "the database has no `profiles` table: run the migrations first (start the optimizer or `./dev up`)"
    )]
    Unmigrated,
    /// No profiles in the window.
    #[error("no profiles between {since} and {until}{}", service.as_ref().map(|s| format!(" for service {s:?}")).unwrap_or_default())]
    EmptyWindow {
        /// Window start.
        since: DateTime<Utc>,
        /// Window end.
        until: DateTime<Utc>,
        /// Service filter.
        service: Option<String>,
    },
    /// The window is backwards.
    #[error("--since {since} is not before --until {until}")]
    BadWindow {
        /// Window start.
        since: DateTime<Utc>,
        /// Window end.
        until: DateTime<Utc>,
    },
    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Learning refused the data or the parameters.
    #[error("{0}")]
    Learn(#[from] learn::LearnError),
}

/// What to train on.
#[derive(Debug, Clone)]
pub struct Window {
    /// Start (inclusive).
    pub since: DateTime<Utc>,
    /// End (exclusive).
    pub until: DateTime<Utc>,
    /// Only this service.
    pub service: Option<String>,
}

async fn check_migrated(db: &sqlx::PgPool) -> Result<(), TrainerError> {
    let exists: Option<String> = sqlx::query_scalar("select to_regclass('public.profiles')::text")
        .fetch_one(db)
        .await?;
    if exists.is_none() {
        return Err(TrainerError::Unmigrated);
    }
    Ok(())
}

/// Load the profiles of a window in time order.
pub async fn load(db: &sqlx::PgPool, w: &Window) -> Result<Vec<tuning::Profile>, TrainerError> {
    if w.since >= w.until {
        return Err(TrainerError::BadWindow {
            since: w.since,
            until: w.until,
        });
    }
    check_migrated(db).await?;
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "select {} from profiles where started_at >= $1 and started_at < $2
           and ($3::text is null or service = $3) order by started_at, connection_id",
        tuning::sql::PROFILE_COLUMNS
    )))
    .bind(w.since)
    .bind(w.until)
    .bind(&w.service)
    .fetch_all(db)
    .await?;
    if rows.is_empty() {
        return Err(TrainerError::EmptyWindow {
            since: w.since,
            until: w.until,
            service: w.service.clone(),
        });
    }
    rows.iter()
        .map(|r| tuning::sql::profile_from_row(r).map_err(TrainerError::from))
        .collect()
}

/// A trained and registered candidate.
#[derive(Debug, Clone, Serialize)]
pub struct Trained {
    /// The registry version.
    pub version: String,
    /// The evaluation.
    pub report: learn::Report,
    /// Size of the ONNX model.
    pub onnx_bytes: usize,
}

/// Train on a window and register the model as a candidate.
pub async fn train(
    db: &sqlx::PgPool,
    w: &Window,
    params: learn::TrainParams,
) -> Result<Trained, TrainerError> {
    let checked = params.clone().check()?;
    let profiles = load(db, w).await?;
    let data = learn::dataset(profiles, &params.weights);
    let (fitted, report) = learn::fit_and_evaluate(&checked, &data)?;
    let version = format!("t{}", Utc::now().format("%Y%m%dT%H%M%S%3f"));
    let onnx = tuning::onnx::export(&fitted.models, &tuning::Settings::default(), &version);
    let metadata = serde_json::json!({
        "schema_hash": tuning::schema_hash(),
        "features": tuning::feature_names(),
        "contract": tuning::onnx::CONTRACT,
        "window": { "since": w.since, "until": w.until, "service": w.service },
        "rows": { "train": report.train_rows, "test": report.test_rows },
        "grids": {
            "buffer_size": tuning::settings::BUFFER_SIZES,
            "ping_interval": tuning::settings::PING_INTERVALS,
            "idle_timeout": tuning::settings::IDLE_TIMEOUTS,
        },
        "max_depth": params.max_depth,
    });
    sqlx::query(
        "insert into models (version, onnx, metadata, metrics, status) values ($1, $2, $3, $4, 'candidate')",
    )
    .bind(&version)
    .bind(&onnx)
    .bind(&metadata)
    .bind(serde_json::to_value(&report).unwrap_or_default())
    .execute(db)
    .await?;
    Ok(Trained {
        version,
        report,
        onnx_bytes: onnx.len(),
    })
}

/// Profile counts of one service in a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServiceSummary {
    /// The service.
    pub service: String,
    /// Connections profiled.
    pub connections: i64,
    /// Connections per decision reason.
    pub by_reason: serde_json::Value,
}

/// Summarise the profiles of a window, per service.
pub async fn summarize(
    db: &sqlx::PgPool,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    service: Option<&str>,
) -> Result<Vec<ServiceSummary>, TrainerError> {
    if since >= until {
        return Err(TrainerError::BadWindow { since, until });
    }
    let exists: Option<String> = sqlx::query_scalar("select to_regclass('public.profiles')::text")
        .fetch_one(db)
        .await?;
    if exists.is_none() {
        return Err(TrainerError::Unmigrated);
    }
    let rows: Vec<(String, i64, serde_json::Value)> = sqlx::query_as(
        "select service, sum(n)::bigint, jsonb_object_agg(reason, n)
           from (select service, reason, count(*) as n from profiles
                  where started_at >= $1 and started_at < $2 and ($3::text is null or service = $3)
                  group by service, reason) t
          group by service order by service",
    )
    .bind(since)
    .bind(until)
    .bind(service)
    .fetch_all(db)
    .await?;
    if rows.is_empty() {
        return Err(TrainerError::EmptyWindow {
            since,
            until,
            service: service.map(str::to_owned),
        });
    }
    Ok(rows
        .into_iter()
        .map(|(service, connections, by_reason)| ServiceSummary {
            service,
            connections,
            by_reason,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tuning::ClientClass;

    /// Three services whose right settings differ: bulk (large incompressible messages),
    /// chat (small compressible messages, long idle gaps) and iot (tiny messages, peers that
    /// vanish). Deterministic noise from a fixed seed.
    async fn synthetic(db: &sqlx::PgPool, n: usize) {
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
            .await
            .unwrap();
        }
    }

    fn window() -> Window {
        Window {
            since: Utc::now() - chrono::Duration::hours(3),
            until: Utc::now(),
            service: None,
        }
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn training_recovers_the_right_policy_and_beats_the_best_static_config(db: sqlx::PgPool) {
        synthetic(&db, 600).await;
        let t = train(&db, &window(), learn::TrainParams::default())
            .await
            .unwrap();
        for r in &t.report.targets {
            assert!(
                r.balanced_accuracy >= 0.9,
                "{}: {:.3} {:?}",
                r.target,
                r.balanced_accuracy,
                r.confusion
            );
        }
        let cost = |name: &str| {
            t.report
                .costs
                .iter()
                .find(|c| c.policy == name)
                .unwrap()
                .mean_cost
        };
        assert!(
            cost("model") < cost("best static config"),
            "{:?}",
            t.report.costs
        );
        assert!(
            cost("model") < cost("shipped defaults"),
            "{:?}",
            t.report.costs
        );
        assert!(cost("hindsight oracle") <= cost("model") + 1e-6);
        assert!(t.report.gap_closed > 0.9, "{}", t.report.gap_closed);
        assert_eq!(t.report.services.len(), 3);
        // registered as a candidate, never active
        let status: String = sqlx::query_scalar("select status from models where version = $1")
            .bind(&t.version)
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(status, "candidate");
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn the_exported_trees_predict_what_the_fitted_model_predicts(db: sqlx::PgPool) {
        use linfa::prelude::Predict as _;
        synthetic(&db, 300).await;
        let profiles = load(&db, &window()).await.unwrap();
        let data = learn::dataset(profiles, &tuning::cost::CostWeights::default());
        let xs = ndarray::Array2::from_shape_vec(
            (data.x.len(), tuning::feature_len()),
            data.x.iter().flatten().copied().collect(),
        )
        .unwrap();
        for (ti, t) in tuning::Target::ALL.iter().enumerate() {
            let (linfa_tree, tree) =
                learn::fit_tree(&data.x, &data.labels[ti], &data.weights[ti], 8).unwrap();
            let theirs = linfa_tree.predict(&xs);
            for (r, x) in data.x.iter().enumerate() {
                assert_eq!(tree.predict(x), theirs[r], "{} row {r}", t.name());
            }
        }
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn refusals_are_clear(db: sqlx::PgPool) {
        let e = train(&db, &window(), learn::TrainParams::default())
            .await
            .unwrap_err();
        assert!(e.to_string().starts_with("no profiles between"), "{e}");
        let mut w = window();
        w.service = Some("nope".into());
        synthetic(&db, 30).await;
        let e = train(&db, &w, learn::TrainParams::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("for service \"nope\""), "{e}");
        let mut back = window();
        std::mem::swap(&mut back.since, &mut back.until);
        assert!(matches!(
            train(&db, &back, learn::TrainParams::default()).await,
            Err(TrainerError::BadWindow { .. })
        ));
        let p = learn::TrainParams {
            max_depth: 0,
            ..Default::default()
        };
        assert_eq!(
            p.check().unwrap_err().to_string(),
            "max_depth = 0 must be between 1 and 32"
        );
        sqlx::query("drop table profiles cascade")
            .execute(&db)
            .await
            .unwrap();
        let e = train(&db, &window(), learn::TrainParams::default())
            .await
            .unwrap_err();
        assert!(matches!(e, TrainerError::Unmigrated), "{e}");
    }
}
