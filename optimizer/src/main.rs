//! `optimizer --config optimizer.toml`

use anyhow::Context as _;
use clap::Parser;

/// trimtab's optimizer: decisions, overrides, rollouts and the model registry.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short)]
    config: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    optimizer::init_logging();
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    let config = optimizer::Config::from_toml(&text).map_err(|errors| {
        anyhow::anyhow!(
            "invalid config {}:\n  {}",
            args.config.display(),
            errors.join("\n  ")
        )
    })?;
    let url = config
        .database_url
        .clone()
        .or_else(|| std::env::var("DATABASE_URL").ok())
        .context("no database: set `database_url` in the config or DATABASE_URL")?;
    let runtime = optimizer::inference::Runtime::init(config.onnxruntime_library.as_deref())?;
    tracing::info!(library = %runtime.library.display(), "ONNX Runtime loaded");
    let db = optimizer::connect_and_migrate(&url, config.database_pool).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "optimizer listening");
    let state = optimizer::app_state(config, db).await?;
    optimizer::spawn_controller(&state);
    optimizer::run(listener, state, shutdown_signal()).await?;
    tracing::info!("optimizer stopped");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
