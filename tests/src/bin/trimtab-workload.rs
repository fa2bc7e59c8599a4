//! `trimtab-workload --proxy ADDR`: drive the workload archetypes through a data plane.

use std::time::Duration;

use clap::Parser;
use trimtab_tests::workload::{Archetype, Paired, Workload, run};

/// Real traffic through a running data plane, bounded in connections and time.
#[derive(Debug, Parser)]
struct Args {
    /// The data plane's proxy address.
    #[arg(long, default_value = "127.0.0.1:18080")]
    proxy: std::net::SocketAddr,
    /// Connections open at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Connections in all.
    #[arg(long, default_value_t = 100_000)]
    total: usize,
    /// Longest run, seconds.
    #[arg(long, default_value_t = 3600)]
    duration_s: u64,
    /// Life of one connection, seconds (scaled per archetype: bulk half of it, IoT ten times,
    /// reporting every 10/3 to 10 of it; at 6 s an IoT device reports every 20–60 s and a
    /// long chat idle lasts 36–48 s).
    #[arg(long, default_value_t = 6)]
    session_s: u64,
    /// Archetypes (chat, feed, bulk, iot, dashboard, terminal); default all.
    #[arg(long, value_delimiter = ',')]
    mix: Vec<String>,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run every session twice at once, one client in each cohort of the rollout with this
    /// salt (`salt` of `GET /v1/rollouts/{id}`), with the same traffic.
    #[arg(long)]
    pair_salt: Option<i64>,
    /// The rollout's canary percentage, for `--pair-salt`.
    #[arg(long, default_value_t = 50.0)]
    pair_percent: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.pair_salt.is_some() && !(a.pair_percent > 0.0 && a.pair_percent < 100.0) {
        anyhow::bail!(
            "--pair-percent = {}: a pair needs both cohorts, so it must be above 0 and below 100",
            a.pair_percent
        );
    }
    let mix = if a.mix.is_empty() {
        Archetype::ALL.to_vec()
    } else {
        a.mix
            .iter()
            .map(|m| {
                Archetype::parse(m).ok_or_else(|| anyhow::anyhow!("--mix: unknown archetype {m:?}"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?
    };
    let stats = run(Workload {
        proxy: a.proxy,
        concurrency: a.concurrency,
        total: a.total,
        duration: Duration::from_secs(a.duration_s),
        session: Duration::from_secs(a.session_s),
        mix,
        seed: a.seed,
        paired: a.pair_salt.map(|salt| Paired {
            salt: salt as u64,
            percent: a.pair_percent,
        }),
    })
    .await;
    eprintln!("workload done: {stats:?}");
    Ok(())
}
