//! `trainer <command>`

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};

/// trimtab's trainer.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Count the profiles of a window, per service and decision reason.
    Summary {
        /// Window start (RFC 3339); default 24 hours ago.
        #[arg(long)]
        since: Option<DateTime<Utc>>,
        /// Window end (RFC 3339); default now.
        #[arg(long)]
        until: Option<DateTime<Utc>>,
        /// Only this service.
        #[arg(long)]
        service: Option<String>,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let db = sqlx::PgPool::connect(&args.database_url)
        .await
        .context("connecting to PostgreSQL")?;
    match args.command {
        Command::Summary {
            since,
            until,
            service,
        } => {
            let until = until.unwrap_or_else(Utc::now);
            let since = since.unwrap_or(until - chrono::Duration::hours(24));
            let rows = trainer::summarize(&db, since, until, service.as_deref()).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!("{:<24} {:>12}  by reason", "service", "connections");
                for r in rows {
                    println!("{:<24} {:>12}  {}", r.service, r.connections, r.by_reason);
                }
            }
        }
    }
    Ok(())
}
