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

/// The window of profiles a command works on.
#[derive(Debug, clap::Args)]
struct WindowArgs {
    /// Window start (RFC 3339); default 7 days before --until (24 hours for `summary`).
    #[arg(long)]
    since: Option<DateTime<Utc>>,
    /// Window end (RFC 3339); default now.
    #[arg(long)]
    until: Option<DateTime<Utc>>,
    /// Only this service.
    #[arg(long)]
    service: Option<String>,
}

impl WindowArgs {
    fn window(self, default_span: chrono::Duration) -> trainer::Window {
        let until = self.until.unwrap_or_else(Utc::now);
        trainer::Window {
            since: self.since.unwrap_or(until - default_span),
            until,
            service: self.service,
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Insert a synthetic profile table whose right policy is known (three services), for
    /// trying the trainer without traffic.
    Synthetic {
        /// Rows to insert.
        #[arg(long, default_value_t = 3000)]
        rows: usize,
    },
    /// Evaluate a registered model on a window (through ONNX Runtime).
    Evaluate {
        /// The model's registry version.
        #[arg(long)]
        model: String,
        #[command(flatten)]
        window: WindowArgs,
    },
    /// Write a window of profiles with their features and labels as Parquet or CSV.
    Export {
        #[command(flatten)]
        window: WindowArgs,
        /// parquet or csv.
        #[arg(long, value_parser = ["parquet", "csv"], default_value = "parquet")]
        format: String,
        /// Output file.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Learn from a window of profiles and register the model as a candidate.
    Train {
        #[command(flatten)]
        window: WindowArgs,
        /// Trees per target: 1 fits one tree on every row and feature; more fit a random
        /// forest (bootstrap samples, a share of the features each) that votes.
        #[arg(long, default_value_t = 25)]
        trees: usize,
        /// Share of the features each tree of a forest may split on.
        #[arg(long, default_value_t = 0.5)]
        feature_share: f64,
        /// Deepest tree.
        #[arg(long, default_value_t = 8)]
        max_depth: usize,
        /// Least total row weight in a leaf (row weights run from 1 to 16).
        #[arg(long, default_value_t = 32.0)]
        min_leaf_weight: f32,
        /// Share of the window (the latest rows) held out for evaluation.
        #[arg(long, default_value_t = 0.2)]
        test_share: f64,
    },
    /// Count the profiles of a window, per service and decision reason.
    Summary {
        #[command(flatten)]
        window: WindowArgs,
    },
}

const WEEK: chrono::Duration = chrono::Duration::days(7);

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let db = sqlx::PgPool::connect(&args.database_url)
        .await
        .context("connecting to PostgreSQL")?;
    match args.command {
        Command::Synthetic { rows } => {
            trainer::synthetic::insert(&db, rows).await?;
            println!("inserted {rows} synthetic profiles (services bulk, chat, iot)");
        }
        Command::Evaluate { model, window } => {
            let w = window.window(WEEK);
            let report =
                trainer::evaluate_model(&db, &model, &w, trainer::learn::TrainParams::default())
                    .await?;
            let t = trainer::Trained {
                version: model,
                report,
                onnx_bytes: 0,
            };
            if args.json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!(
                    "evaluated model {} on the latest {} rows of the window (the {} before them feed the aggregates)",
                    t.version, t.report.test_rows, t.report.train_rows
                );
                print_report(&t.report);
            }
        }
        Command::Export {
            window,
            format,
            out,
        } => {
            let w = window.window(WEEK);
            let weights = tuning::cost::CostWeights::default();
            let d = trainer::learn::dataset(trainer::load(&db, &w).await?, &weights)?;
            let mut df = trainer::export::frame(&d, &weights)?;
            let f = if format == "csv" {
                trainer::export::Format::Csv
            } else {
                trainer::export::Format::Parquet
            };
            trainer::export::write(&mut df, &out, f)?;
            println!(
                "wrote {} rows × {} columns to {}",
                df.height(),
                df.width(),
                out.display()
            );
        }
        Command::Train {
            window,
            trees,
            feature_share,
            max_depth,
            min_leaf_weight,
            test_share,
        } => {
            let w = window.window(WEEK);
            let params = trainer::learn::TrainParams {
                trees,
                feature_share,
                max_depth,
                min_leaf_weight,
                test_share,
                ..Default::default()
            };
            let bar = indicatif::ProgressBar::new_spinner();
            if args.json {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            bar.set_message(format!(
                "training on profiles from {} to {}",
                w.since, w.until
            ));
            let t = trainer::train_with_progress(&db, &w, params, &|step| {
                bar.set_message(step.to_string())
            })
            .await;
            bar.finish_and_clear();
            let t = t?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&t)?);
            } else {
                println!(
                    "registered candidate {} ({} bytes of ONNX); {} rows trained, {} held out",
                    t.version, t.onnx_bytes, t.report.train_rows, t.report.test_rows
                );
                print_report(&t.report);
            }
        }
        Command::Summary { window } => {
            let w = window.window(chrono::Duration::hours(24));
            let rows = trainer::summarize(&db, w.since, w.until, w.service.as_deref()).await?;
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

fn print_report(r: &trainer::learn::Report) {
    println!(
        "\n{:<16} {:>18} {:>10}",
        "target", "balanced accuracy", "macro F1"
    );
    for x in &r.targets {
        println!(
            "{:<16} {:>18.3} {:>10.3}",
            x.target, x.balanced_accuracy, x.macro_f1
        );
    }
    println!(
        "\n{:<24} {:>16}",
        "policy (held-out rows)", "mean replay cost"
    );
    for c in &r.costs {
        println!("{:<24} {:>16.1}", c.policy, c.mean_cost);
    }
    println!(
        "share of the best-static-to-oracle gap closed: {:.1} %",
        r.gap_closed * 100.0
    );
    println!(
        "\n{:<16} {:>6} {:>14} {:>26}",
        "service", "rows", "saving/conn", "95 % CI (bootstrap)"
    );
    for s in &r.services {
        println!(
            "{:<16} {:>6} {:>14.1} {:>12.1} .. {:<12.1}",
            s.service, s.rows, s.saving, s.ci95.0, s.ci95.1
        );
    }
}
