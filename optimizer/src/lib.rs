//! `optimizer`: serves per-connection decisions to the data planes over HTTP, backed by
//! PostgreSQL (the system of record) and ONNX models run with ONNX Runtime.

pub mod api;
pub mod config;
pub mod inference;

use std::future::Future;
use std::sync::Arc;

use sqlx::postgres::PgPoolOptions;

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

/// Serve the API on an already-bound listener until `shutdown` resolves.
pub async fn run(
    listener: tokio::net::TcpListener,
    config: Config,
    db: sqlx::PgPool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = api::AppState {
        config: Arc::new(config),
        db,
    };
    axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

pub use config::Config;
