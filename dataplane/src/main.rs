//! `dataplane --config dataplane.toml`

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use dataplane::{Config, DataPlane};

/// trimtab's data plane: a WebSocket/HTTP reverse proxy that profiles every connection.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short)]
    config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn load(path: &Path) -> anyhow::Result<Config> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Config::from_toml(&text).map_err(|errors| {
        anyhow::anyhow!(
            "invalid config {}:\n  {}",
            path.display(),
            errors.join("\n  ")
        )
    })
}

// The main runtime does the control work (accept, admin, decisions, profiles); connections run
// on the data plane's own worker threads (`workers`).
#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = load(&args.config)?;
    if args.check {
        println!("{}: ok", args.config.display());
        return Ok(());
    }
    dataplane::telemetry::init_logging();
    match dataplane::server::raise_nofile_limit() {
        Ok(n) => tracing::debug!(nofile = n, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open files limit"),
    }
    let mut listeners = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        let key = if i == 0 {
            "listen".to_string()
        } else {
            format!("listeners[{}].listen", i - 1)
        };
        let bound = tokio::net::TcpListener::bind(l.listen)
            .await
            .with_context(|| format!("binding {key} = {}", l.listen))?;
        listeners.push((l.name.clone(), bound));
    }
    let admin = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding admin_listen = {}", config.admin_listen))?;
    let mut bound = String::new();
    for (name, l) in &listeners {
        bound.push_str(&format!("{name}={} ", l.local_addr()?));
    }
    tracing::info!(
        proxy = %listeners[0].1.local_addr()?,
        admin = %admin.local_addr()?,
        listeners = bound.trim_end(),
        services = config.services.len(),
        "data plane listening"
    );
    let (sink, writer): (Arc<dyn dataplane::source::ProfileSink>, _) = match &config.profiles {
        Some(p) => {
            let (sink, writer) = dataplane::profiles::start(p.clone())
                .with_context(|| format!("opening the profile spool {}", p.spool_dir.display()))?;
            tracing::info!(spool = %p.spool_dir.display(), "profiles go to PostgreSQL");
            (sink, Some(writer))
        }
        None => {
            tracing::info!("no [profiles] section: profiles are only logged");
            (Arc::new(dataplane::source::LogSink), None)
        }
    };
    let source: Arc<dyn dataplane::source::SettingsSource> = match &config.optimizer {
        Some(o) => {
            tracing::info!(url = %o.url, "decisions from the optimizer");
            Arc::new(dataplane::decisions::OptimizerSource::new(o.clone()))
        }
        None => {
            tracing::info!("no [optimizer] section: every service's static settings");
            Arc::new(dataplane::source::StaticSettings)
        }
    };
    if let Some(t) = &config.tracing {
        tracing::info!(endpoint = %t.otlp_endpoint, "spans go to the OTLP collector");
        dataplane::telemetry::traces::start(t.clone());
    }
    let workers = config.workers;
    let dp = Arc::new(
        DataPlane::new(config, source, sink)
            .with_context(|| format!("starting {workers} connection workers"))?,
    );
    // SIGHUP: reload routes and services; a bad file is logged and the old config stays.
    {
        let dp = dp.clone();
        let path = args.config.clone();
        tokio::spawn(async move {
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .expect("SIGHUP handler");
            while hup.recv().await.is_some() {
                match load(&path) {
                    Ok(c) => dp.reload(c),
                    Err(e) => {
                        tracing::error!(error = %e, "reload refused; keeping the running config")
                    }
                }
            }
        });
    }
    dp.serve(listeners, admin, shutdown_signal()).await;
    if let Some(w) = writer {
        w.finish(std::time::Duration::from_secs(10)).await;
    }
    tracing::info!("data plane stopped");
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
