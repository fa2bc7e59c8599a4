//! `optimizer`: serves per-connection decisions to the data planes over HTTP, backed by
//! PostgreSQL (the system of record) and ONNX models run with ONNX Runtime.

pub mod api;
pub mod auth;
pub mod config;
pub mod inference;
pub mod models;
pub mod rollout;
pub mod state;

use std::future::Future;
use std::sync::Arc;

use sqlx::postgres::PgPoolOptions;

/// Start logging: JSON lines when stderr is not a terminal, pretty otherwise; `RUST_LOG`
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

/// The migrations every service shares (`migrations/` at the workspace root).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Connect to PostgreSQL and apply the migrations.
pub async fn connect_and_migrate(url: &str, max: u32) -> anyhow::Result<sqlx::PgPool> {
    use anyhow::Context as _;
    let pool = PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(std::time::Duration::from_secs(5))
        .connect(url)
        .await
        .context("connecting to PostgreSQL")?;
    MIGRATOR.run(&pool).await.context("applying migrations")?;
    Ok(pool)
}

/// Build the shared state: resolve tokens, load the first snapshot, and keep it fresh in the
/// background (LISTEN/NOTIFY plus a poll every second).
pub async fn app_state(config: Config, db: sqlx::PgPool) -> anyhow::Result<api::AppState> {
    let tokens = config
        .tokens
        .iter()
        .enumerate()
        .map(|(i, t)| t.resolve(i))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    if tokens.is_empty() {
        tracing::warn!("no tokens configured: the API is open to anyone who can reach it");
    }
    let runtime = match inference::Runtime::init(config.onnxruntime_library.as_deref()) {
        Ok(rt) => Some(rt),
        Err(e) => {
            tracing::error!(error = %e, "ONNX Runtime unavailable: models are not served");
            None
        }
    };
    let mut st = state::State::with_runtime(runtime);
    if let (Some(path), Some(rt)) = (&config.shipped_model, runtime) {
        let loaded = std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                let version = format!(
                    "shipped:{}",
                    path.file_stem()
                        .map_or("model".into(), |s| s.to_string_lossy())
                );
                models::LoadedModel::load(rt, &version, &bytes).map_err(|e| e.to_string())
            });
        match loaded {
            Ok(m) => {
                tracing::info!(path = %path.display(), "shipped model loaded");
                st.shipped = Some(Arc::new(m));
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "shipped model unusable: static defaults")
            }
        }
    }
    let state = Arc::new(st);
    state.reload(&db).await?;
    state.refresh_aggregates(&db).await?;
    tokio::spawn(
        state
            .clone()
            .keep_fresh(db.clone(), std::time::Duration::from_secs(1)),
    );
    Ok(api::AppState {
        config: Arc::new(config),
        db,
        state,
        tokens: Arc::new(tokens),
        metrics: Arc::new(api::Metrics::default()),
    })
}

/// Start the rollout controller (it runs in whichever replica holds the advisory lock).
pub fn spawn_controller(state: &api::AppState) {
    let every = std::time::Duration::from_millis(state.config.rollout_tick_ms.max(50));
    tokio::spawn(rollout::controller(state.clone(), every));
}

/// Serve the API on an already-bound listener until `shutdown` resolves.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: api::AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

pub use config::Config;
