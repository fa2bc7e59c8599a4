//! Benchmark 2: learned vs static, live.
//!
//! 1. The shipped defaults are the active model (a constant model), with 5 % exploration; a
//!    mixed workload (every archetype) runs through a real data plane and optimizer, and its
//!    profiles land in PostgreSQL.
//! 2. `trainer train` on that window: a candidate, and the best static config of its training
//!    rows.
//! 3. Two rollouts at 50 %, each with a fresh mixed workload: the best static config (a constant
//!    model) as canary against the shipped defaults as control, then the learned candidate
//!    against the same control. Cohorts split by client, side by side in the same run.
//! 4. From the live profiles of those phases: per archetype and pooled, the cost terms under the
//!    settings each connection ran with (`tuning::cost::cost_terms`: buffer memory-time, bytes on
//!    the wire, CPU, dead-peer detection delay, premature idle closes), p99 first-message latency,
//!    and the composite cost; learned against the best static config with a bootstrap interval.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use tuning::cost::{CostTerms, CostWeights, cost_terms};
use tuning::{Profile, Settings};

use crate::harness::{DataPlaneProc, OptimizerProc, http_json, scratch_dir};
use crate::workload::{Archetype, Workload};

const ADMIN: &str = "bench-admin-token";
const READER: &str = "bench-reader-token";

/// Lengths of the phases.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// Collection phase.
    pub collect: Duration,
    /// Each comparison phase.
    pub compare: Duration,
    /// Connections open at once.
    pub concurrency: usize,
    /// Life of one connection.
    pub session: Duration,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            collect: Duration::from_secs(180),
            compare: Duration::from_secs(90),
            concurrency: 32,
            session: Duration::from_secs(6),
        }
    }
}

fn optimizer_config() -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
exploration_share = 0.05
[[tokens]]
name = "bench"
role = "admin"
token = "{ADMIN}"
[[tokens]]
name = "dataplane"
role = "reader"
token = "{READER}"
"#
    )
}

fn dataplane_config(echo: SocketAddr, optimizer: SocketAddr, db: &str) -> String {
    let mut services = String::new();
    for a in Archetype::ALL {
        let name = a.route().trim_start_matches('/');
        services.push_str(&format!(
            "[services.{name}]\nupstreams = [\"{echo}\"]\nroutes = [{{ path_prefix = \"{}\" }}]\n",
            a.route()
        ));
    }
    format!(
        r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
dataplane_id = "bench-learn"
client_key_header = "x-client-id"
[optimizer]
url = "http://{optimizer}"
token = "{READER}"
[profiles]
database_url = "{db}"
spool_dir = "{}"
batch_interval = "200ms"
[regions]
loopback = ["127.0.0.0/8"]
{services}"#,
        scratch_dir("learn-spool").display()
    )
}

async fn api(
    opt: SocketAddr,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let (st, v) = http_json(opt, method, path, Some(ADMIN), body.as_ref()).await;
    anyhow::ensure!((200..300).contains(&st), "{method} {path}: {st} {v}");
    Ok(v)
}

async fn register_constant(db: &sqlx::PgPool, version: &str, s: &Settings) -> anyhow::Result<()> {
    sqlx::query("insert into models (version, onnx, metadata) values ($1, $2, '{}')")
        .bind(version)
        .bind(tuning::onnx::export(&[], s, version))
        .execute(db)
        .await?;
    Ok(())
}

async fn drive(proxy: SocketAddr, p: &Params, d: Duration, seed: u64) {
    let stats = crate::workload::run(Workload {
        proxy,
        concurrency: p.concurrency,
        total: 1_000_000,
        duration: d,
        session: p.session,
        mix: Archetype::ALL.to_vec(),
        seed,
    })
    .await;
    eprintln!("  workload: {stats:?}");
}

/// Wait until no new profile has arrived for a second (the writer flushed the phase).
async fn settle(db: &sqlx::PgPool) -> anyhow::Result<()> {
    let mut last = -1i64;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let n: i64 = sqlx::query_scalar("select count(*) from profiles")
            .fetch_one(db)
            .await?;
        if n == last {
            return Ok(());
        }
        last = n;
    }
    Ok(())
}

/// One comparison phase: a rollout of `candidate` at 50 % while the workload runs. Returns the
/// phase's window.
async fn phase(
    db: &sqlx::PgPool,
    opt: SocketAddr,
    proxy: SocketAddr,
    candidate: &str,
    p: &Params,
    seed: u64,
) -> anyhow::Result<trainer::Window> {
    let r = api(
        opt,
        "POST",
        "/v1/rollouts",
        Some(
            json!({"candidate": candidate, "steps": [50, 100], "step_duration": "1h",
                    "min_connections": 1}),
        ),
    )
    .await?;
    let id = r["id"].as_i64().unwrap_or_default();
    // The data plane revalidates its cached answers about every second.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let since = Utc::now();
    drive(proxy, p, p.compare, seed).await;
    let until = Utc::now();
    api(opt, "POST", &format!("/v1/rollouts/{id}/abort"), None).await?;
    settle(db).await?;
    Ok(trainer::Window {
        since,
        until,
        service: None,
    })
}

/// The three arms.
pub const ARMS: [&str; 3] = ["shipped defaults", "best static", "learned"];

/// The connections of one arm (in one archetype or stratum) and what they cost.
#[derive(Debug, Default, Clone)]
pub struct Arm {
    costs: Vec<f64>,
    terms: CostTerms,
    premature: u64,
    first_message_us: Vec<u64>,
}

impl Arm {
    /// An arm of connections with these composite costs (for checking the comparisons).
    pub fn of_costs(costs: Vec<f64>) -> Arm {
        Arm {
            costs,
            ..Arm::default()
        }
    }

    fn add(&mut self, p: &Profile, w: &CostWeights) {
        let t = cost_terms(p, &p.decision.settings, w);
        self.costs.push(t.total());
        self.terms.add(&t);
        self.premature += u64::from(t.premature_close > 0.0);
        if let Some(us) = p.upstream_to_client.first_message_us {
            self.first_message_us.push(us);
        }
    }
    fn mean(&self) -> f64 {
        if self.costs.is_empty() {
            f64::NAN
        } else {
            self.costs.iter().sum::<f64>() / self.costs.len() as f64
        }
    }
    fn p99_first_ms(&self) -> f64 {
        let mut v = self.first_message_us.clone();
        v.sort_unstable();
        if v.is_empty() {
            return f64::NAN;
        }
        v[((v.len() - 1) as f64 * 0.99).round() as usize] as f64 / 1000.0
    }
}

/// A 95 % bootstrap interval of `mean(a) / mean(b) - 1`.
fn bootstrap_ratio(a: &[f64], b: &[f64], rounds: usize) -> (f64, f64) {
    if a.is_empty() || b.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || xorshift(&mut rng);
    let mut out = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let ma: f64 = (0..a.len())
            .map(|_| a[(next() % a.len() as u64) as usize])
            .sum::<f64>()
            / a.len() as f64;
        let mb: f64 = (0..b.len())
            .map(|_| b[(next() % b.len() as u64) as usize])
            .sum::<f64>()
            / b.len() as f64;
        out.push(ma / mb - 1.0);
    }
    out.sort_by(|x, y| x.total_cmp(y));
    let at = |q: f64| out[((out.len() - 1) as f64 * q).round() as usize];
    (at(0.025), at(0.975))
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// The mean cost of each arm (keyed `(stratum, arm)`, arms as in [`ARMS`]) on a common mix of
/// strata (`weights` by stratum, summing to 1), and a 95 % bootstrap interval of
/// `learned / best static - 1` on that mix, resampling within each stratum: the arms' own mixes
/// differ by chance (cohorts split by client), and one costly stratum would otherwise decide
/// the figure.
pub fn mix_adjusted(
    arms: &BTreeMap<(String, usize), Arm>,
    weights: &BTreeMap<String, f64>,
    rounds: usize,
) -> ([f64; 3], (f64, f64)) {
    let mean_of = |arm: usize, pick: &mut dyn FnMut(&[f64]) -> f64| {
        weights
            .iter()
            .map(|(svc, w)| {
                arms.get(&(svc.clone(), arm))
                    .filter(|a| !a.costs.is_empty())
                    .map_or(0.0, |a| w * pick(&a.costs))
            })
            .sum::<f64>()
    };
    let plain = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let means = [
        mean_of(0, &mut |v| plain(v)),
        mean_of(1, &mut |v| plain(v)),
        mean_of(2, &mut |v| plain(v)),
    ];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut ratios = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let mut resample = |v: &[f64]| {
            (0..v.len())
                .map(|_| v[(xorshift(&mut rng) % v.len() as u64) as usize])
                .sum::<f64>()
                / v.len() as f64
        };
        let l = mean_of(2, &mut resample);
        let st = mean_of(1, &mut resample);
        ratios.push(l / st - 1.0);
    }
    ratios.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| ratios[((ratios.len() - 1) as f64 * q).round() as usize];
    (means, (at(0.025), at(0.975)))
}

/// The suffix of the stratum of connections whose client vanished.
const GONE: &str = "/vanished";

/// A connection's stratum: its archetype, and whether its client vanished without a close.
fn stratum(service: &str, gone: bool) -> String {
    if gone {
        format!("{service}{GONE}")
    } else {
        service.to_string()
    }
}

/// The strata of `counts` that all three arms have, with their counts as shares summing to 1
/// (a stratum missing from an arm cannot be compared, and is left out rather than counted as
/// costing nothing).
pub fn common_strata(
    arms: &BTreeMap<(String, usize), Arm>,
    counts: BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    let kept: BTreeMap<String, f64> = counts
        .into_iter()
        .filter(|(k, _)| {
            (0..ARMS.len()).all(|i| {
                arms.get(&(k.clone(), i))
                    .is_some_and(|a| !a.costs.is_empty())
            })
        })
        .collect();
    let total: f64 = kept.values().sum();
    kept.into_iter().map(|(k, v)| (k, v / total)).collect()
}

/// Learned against best static within archetype `svc`: the arms' means and the interval (as
/// [`mix_adjusted`]) with its strata weighted by their share among that archetype's connections
/// in all arms; `None` when no stratum of it is in every arm.
fn within_archetype(
    strata: &BTreeMap<(String, usize), Arm>,
    svc: &str,
    rounds: usize,
) -> Option<([f64; 3], (f64, f64))> {
    let mut counts: BTreeMap<String, f64> = BTreeMap::new();
    for ((k, _), a) in strata {
        if k == svc || k.strip_suffix(GONE) == Some(svc) {
            *counts.entry(k.clone()).or_default() += a.costs.len() as f64;
        }
    }
    let w = common_strata(strata, counts);
    (!w.is_empty()).then(|| mix_adjusted(strata, &w, rounds))
}

/// Run the whole benchmark on a fresh, migrated database; returns the printed report.
pub async fn run(db_url: &str, db: &sqlx::PgPool, p: Params) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    let opt = OptimizerProc::start(&optimizer_config(), db_url);
    register_constant(db, "shipped-defaults", &Settings::default()).await?;
    api(
        opt.addr,
        "POST",
        "/v1/models/shipped-defaults/activate",
        Some(json!({"comment": "benchmark: the shipped defaults as the active model"})),
    )
    .await?;
    let echo = crate::upstream::spawn_echo().await;
    // SAFETY: set before the child is spawned; nothing else reads it concurrently.
    unsafe {
        std::env::set_var(
            "TRIMTAB_TEST_LOG",
            "warn,dataplane=info,dataplane::source=warn",
        )
    };
    let dp = DataPlaneProc::start(&dataplane_config(echo, opt.addr, db_url));
    tokio::time::sleep(Duration::from_secs(2)).await;

    eprintln!("collecting profiles under the shipped defaults with 5 % exploration");
    let since = Utc::now();
    drive(dp.proxy, &p, p.collect, 1).await;
    settle(db).await?;
    let window = trainer::Window {
        since,
        until: Utc::now(),
        service: None,
    };
    eprintln!("training");
    // A live window may hold a grid value as the best choice of only a row or two: learn from
    // them rather than refuse (the CLI's default refuses classes with fewer than 3 rows).
    let params = trainer::learn::TrainParams {
        min_class_rows: 1,
        ..Default::default()
    };
    let trained = trainer::train(db, &window, params).await?;
    let report = &trained.report;
    let _ = writeln!(
        out,
        "== training: {} rows for training, {} held out; model {}",
        report.train_rows, report.test_rows, trained.version
    );
    for t in &report.targets {
        let _ = writeln!(
            out,
            "   {:<14} balanced accuracy {:.3}  macro-F1 {:.3}",
            t.target, t.balanced_accuracy, t.macro_f1
        );
    }
    let best = report.best_static;
    let _ = writeln!(
        out,
        "   best static config of the training rows: {}",
        serde_json::to_string(&best)?
    );
    register_constant(db, "best-static", &best).await?;

    eprintln!("phase 1: best static (canary) against the shipped defaults (control)");
    let w1 = phase(db, opt.addr, dp.proxy, "best-static", &p, 2).await?;
    eprintln!("phase 2: learned (canary) against the shipped defaults (control)");
    let w2 = phase(db, opt.addr, dp.proxy, &trained.version, &p, 3).await?;

    let weights = CostWeights::default();
    let mut arms: BTreeMap<(String, usize), Arm> = BTreeMap::new();
    // The same connections by stratum: archetype, and whether the client went away without a
    // close (the workload's vanishing devices, one in five by chance). Such a connection costs
    // the dead-peer delay, thousands of times an ordinary one, so a few more of them in one arm
    // would decide that archetype's comparison; the comparison weighs the strata alike.
    let mut strata: BTreeMap<(String, usize), Arm> = BTreeMap::new();
    let mut pooled: Vec<Arm> = vec![Arm::default(); 3];
    let mut explored = 0usize;
    // Each connection counts for the arm whose model decided it: at a phase's start the data
    // plane's decision cache may still answer from the previous phase's model for a moment.
    for (w, canary_arm, canary_model) in [
        (&w1, 1usize, "best-static"),
        (&w2, 2usize, trained.version.as_str()),
    ] {
        for pr in trainer::load(db, w).await? {
            // The data plane keeps exploring (5 %) while the arms run: those connections ran a
            // neighbour of the arm's choice, not the arm's policy, and are left out of every arm
            // (a random draw per connection, so leaving them out biases no arm).
            if pr.decision.explored {
                explored += 1;
                continue;
            }
            let model = pr.decision.model_version.as_deref();
            let arm = match pr.decision.cohort {
                tuning::Cohort::Canary if model == Some(canary_model) => canary_arm,
                tuning::Cohort::Control if model == Some("shipped-defaults") => 0,
                _ => continue,
            };
            arms.entry((pr.context.service.clone(), arm))
                .or_default()
                .add(&pr, &weights);
            let gone = pr.error_class.as_deref() == Some("client_gone");
            strata
                .entry((stratum(&pr.context.service, gone), arm))
                .or_default()
                .add(&pr, &weights);
            pooled[arm].add(&pr, &weights);
        }
    }
    let _ = writeln!(
        out,
        "\n== live composite cost per connection (CPU-µs equivalents; mean, n), and learned vs best static (95 % bootstrap;\n   connections whose client vanished weighted alike in every arm; {explored} explored connections left out)"
    );
    let _ = writeln!(
        out,
        "{:<12}{:>22}{:>22}{:>22}{:>30}",
        "archetype", ARMS[0], ARMS[1], ARMS[2], "learned vs best static"
    );
    let cell = |a: Option<&Arm>| {
        a.map_or("-".to_string(), |a| {
            format!("{:.0} (n={})", a.mean(), a.costs.len())
        })
    };
    let vs_archetype = |svc: &str| {
        within_archetype(&strata, svc, 2000).map_or("-".to_string(), |(m, (lo, hi))| {
            format!(
                "{:+.1}% [{:+.1}, {:+.1}]",
                (m[2] / m[1] - 1.0) * 100.0,
                lo * 100.0,
                hi * 100.0
            )
        })
    };
    let vs = |l: Option<&Arm>, s: Option<&Arm>| match (l, s) {
        (Some(l), Some(s)) => {
            let (lo, hi) = bootstrap_ratio(&l.costs, &s.costs, 2000);
            format!(
                "{:+.1}% [{:+.1}, {:+.1}]",
                (l.mean() / s.mean() - 1.0) * 100.0,
                lo * 100.0,
                hi * 100.0
            )
        }
        _ => "-".into(),
    };
    for a in Archetype::ALL {
        let svc = a.route().trim_start_matches('/').to_string();
        let get = |i: usize| arms.get(&(svc.clone(), i));
        let _ = writeln!(
            out,
            "{:<12}{:>22}{:>22}{:>22}{:>30}",
            svc,
            cell(get(0)),
            cell(get(1)),
            cell(get(2)),
            vs_archetype(&svc)
        );
    }
    let _ = writeln!(
        out,
        "{:<12}{:>22}{:>22}{:>22}{:>30}",
        "pooled",
        cell(Some(&pooled[0])),
        cell(Some(&pooled[1])),
        cell(Some(&pooled[2])),
        vs(Some(&pooled[2]), Some(&pooled[1]))
    );
    // The same comparison on one archetype mix for every arm (the share of each archetype
    // among all compared connections), and the plain mean of the per-archetype changes.
    let mut mix: BTreeMap<String, f64> = BTreeMap::new();
    for ((k, _), a) in &strata {
        *mix.entry(k.clone()).or_default() += a.costs.len() as f64;
    }
    let (adjusted, (lo, hi)) = mix_adjusted(&strata, &common_strata(&strata, mix), 2000);
    let _ = writeln!(
        out,
        "{:<12}{:>22.0}{:>22.0}{:>22.0}{:>30}",
        "mix-adjusted",
        adjusted[0],
        adjusted[1],
        adjusted[2],
        format!(
            "{:+.1}% [{:+.1}, {:+.1}]",
            (adjusted[2] / adjusted[1] - 1.0) * 100.0,
            lo * 100.0,
            hi * 100.0
        )
    );
    let services: std::collections::BTreeSet<&String> = arms.keys().map(|(svc, _)| svc).collect();
    let changes: Vec<f64> = services
        .into_iter()
        .filter_map(|svc| within_archetype(&strata, svc, 1).map(|(m, _)| m[2] / m[1] - 1.0))
        .collect();
    let _ = writeln!(
        out,
        "mean of the per-archetype changes, learned vs best static: {:+.1}% ({} archetypes)",
        changes.iter().sum::<f64>() / changes.len().max(1) as f64 * 100.0,
        changes.len()
    );
    let _ = writeln!(
        out,
        "\n== pooled cost terms, mean per connection (live profiles, the settings each ran with)"
    );
    let _ = writeln!(
        out,
        "{:<34}{:>18}{:>18}{:>18}",
        "term", ARMS[0], ARMS[1], ARMS[2]
    );
    type Term = (&'static str, fn(&Arm) -> f64);
    let per = |a: &Arm, v: f64| v / a.costs.len().max(1) as f64;
    let terms: [Term; 7] = [
        ("buffer memory-time", |a| a.terms.buffer_memory),
        ("CPU (syscalls, pings, deflate, parsing)", |a| a.terms.cpu),
        ("bytes on the wire", |a| a.terms.wire),
        ("dead-peer detection delay", |a| a.terms.dead_peer_delay),
        ("premature idle closes", |a| a.terms.premature_close),
        ("composite", |a| a.terms.total()),
        ("premature idle closes (count)", |a| a.premature as f64),
    ];
    for (name, f) in terms {
        let _ = write!(out, "{name:<34}");
        for a in &pooled {
            let v = if name.ends_with("(count)") {
                f(a)
            } else {
                per(a, f(a))
            };
            let _ = write!(out, "{v:>18.1}");
        }
        out.push('\n');
    }
    let _ = write!(out, "{:<34}", "p99 first message (ms)");
    for a in &pooled {
        let _ = write!(out, "{:>18.2}", a.p99_first_ms());
    }
    out.push('\n');
    drop(dp);
    drop(opt);
    Ok(out)
}
