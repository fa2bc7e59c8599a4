//! `trainer`: learns per-connection settings from profiles. Reads a window of profiles from
//! PostgreSQL, builds features (`tuning`'s encoder and aggregates) and hindsight labels
//! (`tuning::cost`), fits one decision tree per target ([`learn`]), evaluates on the later part of
//! the window against the baselines, exports ONNX (`tuning::onnx`) and registers a candidate.
//! Nothing goes live from here: a rollout or an audited activation does that.

pub mod export;
pub mod learn;
pub mod synthetic;

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
    /// No model with that version in the registry.
    #[error("no model {0:?} in the registry")]
    UnknownModel(String),
    /// The model could not be loaded or run.
    #[error("{0}")]
    Model(String),
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

/// Evaluate a registered model (any model with the contract: trained here or exported from a
/// notebook) on a window: the same report as training's, on the later part of the window, with
/// the baselines fitted on the earlier part.
pub async fn evaluate_model(
    db: &sqlx::PgPool,
    version: &str,
    w: &Window,
    params: learn::TrainParams,
) -> Result<learn::Report, TrainerError> {
    params.clone().check()?;
    let bytes: Option<Vec<u8>> = sqlx::query_scalar("select onnx from models where version = $1")
        .bind(version)
        .fetch_optional(db)
        .await?;
    let bytes = bytes.ok_or_else(|| TrainerError::UnknownModel(version.to_string()))?;
    let rt =
        tuning::runtime::Runtime::init(None).map_err(|e| TrainerError::Model(e.to_string()))?;
    let model = tuning::runtime::LoadedModel::load(rt, version, &bytes)
        .map_err(|e| TrainerError::Model(e.to_string()))?;
    let data = learn::dataset(load(db, w).await?, &params.weights)?;
    let n = data.len();
    let train = n - ((n as f64) * params.test_share).round() as usize;
    if train < 10 || n - train < 5 {
        return Err(learn::LearnError::Data(format!(
            "{n} rows are too few: at least 10 before and 5 in the evaluated part are needed"
        ))
        .into());
    }
    let mut predicted = Vec::with_capacity(n - train);
    for chunk in (train..n).collect::<Vec<_>>().chunks(1024) {
        let rows: Vec<Vec<f32>> = chunk.iter().map(|r| data.x.row(*r).to_vec()).collect();
        let labels = model
            .labels(&rows)
            .map_err(|e| TrainerError::Model(e.to_string()))?;
        for (k, r) in chunk.iter().enumerate() {
            let mut s = data.profiles[*r].decision.settings;
            for (ti, t) in tuning::Target::ALL.iter().enumerate() {
                t.set_class(&mut s, labels[ti][k].max(0) as usize);
            }
            predicted.push(s.clamp().0);
        }
    }
    Ok(learn::evaluate(&params, &data, train, &predicted)?)
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
    train_with_progress(db, w, params, &|_| {}).await
}

/// [`train`], telling `progress` which step it is on (for a progress display).
pub async fn train_with_progress(
    db: &sqlx::PgPool,
    w: &Window,
    params: learn::TrainParams,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Trained, TrainerError> {
    let checked = params.clone().check()?;
    progress("loading profiles");
    let profiles = load(db, w).await?;
    progress(&format!(
        "features and labels for {} profiles",
        profiles.len()
    ));
    let data = learn::dataset(profiles, &params.weights)?;
    progress("fitting and evaluating");
    let (fitted, report) = learn::fit_and_evaluate(&checked, &data)?;
    progress("exporting and registering");
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
        "trees": params.trees,
        "feature_share": params.feature_share,
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

    fn window() -> Window {
        Window {
            since: Utc::now() - chrono::Duration::hours(3),
            until: Utc::now(),
            service: None,
        }
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn training_recovers_the_right_policy_and_beats_the_best_static_config(db: sqlx::PgPool) {
        synthetic::insert(&db, 600).await.unwrap();
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
        synthetic::insert(&db, 300).await.unwrap();
        let profiles = load(&db, &window()).await.unwrap();
        let data = learn::dataset(profiles, &tuning::cost::CostWeights::default()).unwrap();
        for t in tuning::Target::ALL {
            let (linfa_tree, tree) = learn::fit_tree(
                data.x.view(),
                &data.labels(t).unwrap(),
                &data.weights(t).unwrap(),
                8,
                1.0,
            )
            .unwrap();
            let theirs = linfa_tree.predict(&data.x);
            for (r, x) in data.x.rows().into_iter().enumerate() {
                assert_eq!(tree.predict(&x.to_vec()), theirs[r], "{} row {r}", t.name());
            }
        }
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn a_registered_model_is_evaluated_through_onnx_runtime_like_at_training(
        db: sqlx::PgPool,
    ) {
        synthetic::insert(&db, 600).await.unwrap();
        let t = train(&db, &window(), learn::TrainParams::default())
            .await
            .unwrap();
        let r = evaluate_model(&db, &t.version, &window(), learn::TrainParams::default())
            .await
            .unwrap();
        // ONNX Runtime's predictions give the same figures as the fitted trees did.
        for (a, b) in r.targets.iter().zip(&t.report.targets) {
            assert_eq!(a.confusion, b.confusion, "{}", a.target);
        }
        let cost = |r: &learn::Report| r.costs[0].mean_cost;
        assert!((cost(&r) - cost(&t.report)).abs() < 1e-6);
        let e = evaluate_model(&db, "nope", &window(), learn::TrainParams::default())
            .await
            .unwrap_err();
        assert_eq!(e.to_string(), "no model \"nope\" in the registry");
    }

    #[sqlx::test(migrations = "../migrations")]
    async fn refusals_are_clear(db: sqlx::PgPool) {
        let e = train(&db, &window(), learn::TrainParams::default())
            .await
            .unwrap_err();
        assert!(e.to_string().starts_with("no profiles between"), "{e}");
        let mut w = window();
        w.service = Some("nope".into());
        synthetic::insert(&db, 30).await.unwrap();
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
        let p = learn::TrainParams {
            min_leaf_weight: 0.5,
            ..Default::default()
        };
        assert_eq!(
            p.check().unwrap_err().to_string(),
            "min_leaf_weight = 0.5 must be a number of at least 1"
        );
        let p = learn::TrainParams {
            trees: 0,
            ..Default::default()
        };
        assert_eq!(
            p.check().unwrap_err().to_string(),
            "trees = 0 must be between 1 and 256"
        );
        let p = learn::TrainParams {
            feature_share: 1.5,
            ..Default::default()
        };
        assert_eq!(
            p.check().unwrap_err().to_string(),
            "feature_share = 1.5 must be above 0 and at most 1"
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
