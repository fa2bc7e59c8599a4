//! Benchmark 2: learned vs static, live.
//!
//! 1. The shipped defaults are the active model (a constant model), with 5 % exploration; a
//!    mixed workload (every archetype) runs through a real data plane and optimizer, and its
//!    profiles land in PostgreSQL.
//! 2. `trainer train` on that window: a candidate, and the best static config of its training
//!    rows.
//! 3. Two rollouts at 50 %, each with a fresh mixed workload run in pairs: every session runs
//!    twice at once with the same random draws, once as a client the rollout puts in the
//!    control and once as one it puts in the canary. Phase 1: the best static config (a
//!    constant model) as canary against the shipped defaults. Phase 2: the best static config
//!    becomes the active model, and the learned candidate rolls out against it.
//! 4. From the live profiles of those phases, over the complete pairs: per archetype and on
//!    the whole mix, the composite cost under the settings each connection ran with
//!    (`tuning::cost::cost_terms`: buffer memory-time, bytes on the wire, CPU, dead-peer
//!    detection delay, premature idle closes), canary against control with a bootstrap
//!    interval over pairs; pooled, each term and the p99 first-message latency.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use tuning::cost::{CostTerms, CostWeights, cost_terms};
use tuning::{Profile, Settings};

use crate::harness::{DataPlaneProc, OptimizerProc, http_json, scratch_dir};
use crate::workload::{Archetype, Paired, Workload, pair_of};

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
            compare: Duration::from_secs(120),
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

/// Register a constant model (every connection gets `s`) under `version`.
pub async fn register_constant(
    db: &sqlx::PgPool,
    version: &str,
    s: &Settings,
) -> anyhow::Result<()> {
    sqlx::query("insert into models (version, onnx, metadata) values ($1, $2, '{}')")
        .bind(version)
        .bind(tuning::onnx::export(&[], s, version))
        .execute(db)
        .await?;
    Ok(())
}

async fn drive(
    proxy: SocketAddr,
    p: &Params,
    d: Duration,
    seed: u64,
    paired: Option<Paired>,
) -> std::sync::Arc<crate::workload::Stats> {
    let stats = crate::workload::run(Workload {
        proxy,
        concurrency: p.concurrency,
        total: 1_000_000,
        duration: d,
        session: p.session,
        mix: Archetype::ALL.to_vec(),
        seed,
        paired,
    })
    .await;
    eprintln!("  workload: {stats:?}");
    stats
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

/// What a comparison phase ran: its window, and the message latencies the workload's clients
/// measured (µs, per client key).
#[derive(Debug)]
pub struct Phase {
    /// From the first paired session's start to the last one's end.
    pub window: trainer::Window,
    /// Per client key (see [`crate::workload::Latencies`]).
    pub latency_us: HashMap<String, Vec<u64>>,
}

/// One comparison phase: a rollout of `candidate` at 50 % against the active model while the
/// workload runs every session as a pair, one connection in each cohort (see
/// [`crate::workload::Paired`]).
pub async fn phase(
    db: &sqlx::PgPool,
    opt: SocketAddr,
    proxy: SocketAddr,
    candidate: &str,
    p: &Params,
    seed: u64,
) -> anyhow::Result<Phase> {
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
    let salt = r["salt"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("rollout without a salt: {r}"))? as u64;
    prime(db, proxy).await?;
    let since = Utc::now();
    let stats = drive(
        proxy,
        p,
        p.compare,
        seed,
        Some(Paired {
            salt,
            percent: 50.0,
        }),
    )
    .await;
    let until = Utc::now();
    api(opt, "POST", &format!("/v1/rollouts/{id}/abort"), None).await?;
    settle(db).await?;
    Ok(Phase {
        window: trainer::Window {
            since,
            until,
            service: None,
        },
        latency_us: stats.latency.take(),
    })
}

/// Short connections of every archetype until one of each was decided under the rollout:
/// the data plane answers a bucket's first connection after a quiet spell from its stale cached
/// answer (the data path never waits for the optimizer) and refreshes it meanwhile, so without
/// this the first connections of a phase would run under the previous phase's decisions.
async fn prime(db: &sqlx::PgPool, proxy: SocketAddr) -> anyhow::Result<()> {
    let one = |a: Archetype| {
        crate::workload::run(Workload {
            proxy,
            concurrency: 1,
            total: 1,
            duration: Duration::from_secs(5),
            // (an IoT session lasts ten of these, and must fit with 3 s to spare)
            session: Duration::from_millis(150),
            mix: vec![a],
            seed: 9,
            paired: None,
        })
    };
    for _ in 0..10 {
        let round = Utc::now();
        futures_util::future::join_all(Archetype::ALL.map(one)).await;
        // Once the round's profiles are written: were all of them decided in a cohort?
        let all = Archetype::ALL.len() as i64;
        let written = crate::harness::eventually(Duration::from_secs(5), || async {
            let (n, in_cohorts): (i64, i64) = sqlx::query_as(
                "select count(distinct service), count(distinct service) filter (where cohort <> 'none')
                   from profiles where started_at >= $1",
            )
            .bind(round)
            .fetch_one(db)
            .await
            .ok()?;
            (n == all).then_some(in_cohorts == all)
        })
        .await;
        if written == Some(true) {
            return Ok(());
        }
    }
    anyhow::bail!("the data plane did not decide under the rollout after 10 rounds of priming")
}

/// The three arms.
pub const ARMS: [&str; 3] = ["shipped defaults", "best static", "learned"];

/// The connections of one arm (in one archetype, or pooled) and what they cost.
#[derive(Debug, Default, Clone)]
pub struct Arm {
    costs: Vec<f64>,
    terms: CostTerms,
    premature: u64,
    first_message_us: Vec<u64>,
    /// The message latencies the workload measured on these connections (µs).
    pub message_us: Vec<u64>,
}

impl Arm {
    fn add(&mut self, p: &Profile, w: &CostWeights, latency_us: &HashMap<String, Vec<u64>>) {
        let t = cost_terms(p, &p.decision.settings, w);
        self.costs.push(t.total());
        self.terms.add(&t);
        self.premature += u64::from(t.premature_close > 0.0);
        if let Some(us) = p.upstream_to_client.first_message_us {
            self.first_message_us.push(us);
        }
        if let Some(v) = p
            .context
            .client_key
            .as_ref()
            .and_then(|k| latency_us.get(k))
        {
            self.message_us.extend_from_slice(v);
        }
    }
    fn merge(&mut self, o: &Arm) {
        self.costs.extend_from_slice(&o.costs);
        self.terms.add(&o.terms);
        self.premature += o.premature;
        self.first_message_us.extend_from_slice(&o.first_message_us);
        self.message_us.extend_from_slice(&o.message_us);
    }
    fn mean(&self) -> f64 {
        self.costs.iter().sum::<f64>() / self.costs.len().max(1) as f64
    }
    fn p99_first_ms(&self) -> f64 {
        p99_ms(&self.first_message_us)
    }
    /// The 99th percentile of the workload's message latencies, ms (NaN without any).
    pub fn p99_message_ms(&self) -> f64 {
        p99_ms(&self.message_us)
    }
}

fn p99_ms(v: &[u64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * 0.99).round() as usize] as f64 / 1000.0
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Canary against control over pairs of connections that ran the same traffic: the change
/// `Σ canary / Σ control - 1` and its 95 % bootstrap interval, resampling pairs within each
/// group (each group is an archetype: resampling within them keeps the mix as it ran).
pub fn paired_change(groups: &[&[(f64, f64)]], rounds: usize) -> (f64, (f64, f64)) {
    type Pair = (f64, f64);
    let add = |(a, b): Pair, (c, d): Pair| (a + c, b + d);
    let (control, canary) = groups
        .iter()
        .flat_map(|g| g.iter().copied())
        .fold((0.0, 0.0), add);
    if control == 0.0 {
        return (f64::NAN, (f64::NAN, f64::NAN));
    }
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let mut sum = (0.0, 0.0);
        for g in groups.iter().filter(|g| !g.is_empty()) {
            for _ in 0..g.len() {
                sum = add(sum, g[(xorshift(&mut rng) % g.len() as u64) as usize]);
            }
        }
        out.push(sum.1 / sum.0 - 1.0);
    }
    out.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| out[((out.len() - 1) as f64 * q).round() as usize];
    (canary / control - 1.0, (at(0.025), at(0.975)))
}

/// The pairs of one comparison phase.
#[derive(Debug, Default)]
pub struct Compared {
    /// Per archetype, the control's and the canary's connections of its complete pairs (pair
    /// `i` at index `i` on both sides).
    pub by_archetype: BTreeMap<String, [Arm; 2]>,
    /// Pairs left out: one of the two explored (ran a neighbour of its arm's choice).
    pub explored: usize,
    /// Pairs left out: a connection missing, or decided by another model than its arm's (at
    /// a phase's start the data plane's cache may still answer from the previous phase).
    pub incomplete: usize,
    /// Why, for the first few incomplete pairs.
    pub why_incomplete: Vec<String>,
}

impl Compared {
    fn incomplete(&mut self, why: String) {
        self.incomplete += 1;
        if self.why_incomplete.len() < 8 {
            self.why_incomplete.push(why);
        }
    }

    /// Per archetype: the `(control, canary)` composite cost of each complete pair.
    pub fn pairs(&self) -> BTreeMap<String, Vec<(f64, f64)>> {
        self.by_archetype
            .iter()
            .map(|(svc, [c, k])| {
                let v = c.costs.iter().copied().zip(k.costs.iter().copied());
                (svc.clone(), v.collect())
            })
            .collect()
    }

    /// The control's and the canary's connections of every archetype, pooled.
    pub fn pooled(&self) -> [Arm; 2] {
        let mut out = [Arm::default(), Arm::default()];
        for arms in self.by_archetype.values() {
            out[0].merge(&arms[0]);
            out[1].merge(&arms[1]);
        }
        out
    }
}

/// Pair up the connections of a paired phase by client key, and cost them.
pub async fn compare(
    db: &sqlx::PgPool,
    phase: &Phase,
    control_model: &str,
    canary_model: &str,
) -> anyhow::Result<Compared> {
    let weights = CostWeights::default();
    // pair → [control, canary]
    let mut by_pair: BTreeMap<String, [Vec<Profile>; 2]> = BTreeMap::new();
    for pr in trainer::load(db, &phase.window).await? {
        let Some(pair) = pr.context.client_key.as_deref().and_then(pair_of) else {
            continue;
        };
        let side = usize::from(pr.decision.cohort == tuning::Cohort::Canary);
        by_pair.entry(pair.to_string()).or_default()[side].push(pr);
    }
    let mut out = Compared::default();
    for (pair, [control, canary]) in by_pair {
        let ([c], [k]) = (control.as_slice(), canary.as_slice()) else {
            let side = |v: &[Profile]| -> Vec<String> {
                v.iter()
                    .map(|p| format!("{} at {}", p.context.service, p.started_at.format("%T%.3f")))
                    .collect()
            };
            out.incomplete(format!(
                "{pair}: control {:?}, canary {:?}",
                side(&control),
                side(&canary)
            ));
            continue;
        };
        if c.decision.model_version.as_deref() != Some(control_model)
            || k.decision.model_version.as_deref() != Some(canary_model)
            || c.context.service != k.context.service
        {
            let d = |p: &Profile| {
                format!(
                    "{} {:?} {:?} at {}",
                    p.context.service,
                    p.decision.reason,
                    p.decision.model_version,
                    p.started_at.format("%T%.3f")
                )
            };
            out.incomplete(format!("{pair}: control {}, canary {}", d(c), d(k)));
            continue;
        }
        if c.decision.explored || k.decision.explored {
            out.explored += 1;
            continue;
        }
        let arms = out
            .by_archetype
            .entry(c.context.service.clone())
            .or_default();
        arms[0].add(c, &weights, &phase.latency_us);
        arms[1].add(k, &weights, &phase.latency_us);
    }
    Ok(out)
}

fn change_cell((m, (lo, hi)): (f64, (f64, f64))) -> String {
    format!(
        "{:+.1}% [{:+.1}, {:+.1}]",
        m * 100.0,
        lo * 100.0,
        hi * 100.0
    )
}

/// A phase's table: per archetype and on the whole mix, control and canary mean cost over the
/// complete pairs and the paired change; returns the per-archetype changes.
fn report_phase(out: &mut String, c: &Compared, names: [&str; 2]) {
    use std::fmt::Write as _;
    let _ = writeln!(
        out,
        "{:<12}{:>7}{:>18}{:>18}{:>32}{:>20}",
        "archetype",
        "pairs",
        names[0],
        names[1],
        format!("{} vs {}", names[1], names[0]),
        "p99 message, ms"
    );
    let pairs = c.pairs();
    let row = |out: &mut String, name: &str, arms: &[Arm; 2], change: (f64, (f64, f64))| {
        let ms = |arm: &Arm| {
            let v = arm.p99_message_ms();
            if v.is_nan() {
                "-".to_string()
            } else {
                format!("{v:.2}")
            }
        };
        let _ = writeln!(
            out,
            "{name:<12}{:>7}{:>18.0}{:>18.0}{:>32}{:>20}",
            arms[0].costs.len(),
            arms[0].mean(),
            arms[1].mean(),
            change_cell(change),
            format!("{} / {}", ms(&arms[0]), ms(&arms[1]))
        );
    };
    let mut changes = Vec::new();
    for a in Archetype::ALL {
        let svc = a.route().trim_start_matches('/');
        match (c.by_archetype.get(svc), pairs.get(svc)) {
            (Some(arms), Some(v)) if !v.is_empty() => {
                let ch = paired_change(&[v], 2000);
                changes.push(ch.0);
                row(out, svc, arms, ch);
            }
            _ => {
                let _ = writeln!(out, "{svc:<12}{:>7}", 0);
            }
        }
    }
    let groups: Vec<&[(f64, f64)]> = pairs.values().map(Vec::as_slice).collect();
    row(out, "whole mix", &c.pooled(), paired_change(&groups, 2000));
    let _ = writeln!(
        out,
        "mean of the per-archetype changes: {:+.1}% ({} archetypes); pairs left out: {} explored, {} incomplete",
        changes.iter().sum::<f64>() / changes.len().max(1) as f64 * 100.0,
        changes.len(),
        c.explored,
        c.incomplete
    );
    for why in &c.why_incomplete {
        let _ = writeln!(out, "  incomplete: {why}");
    }
    let _ = writeln!(
        out,
        "cost terms per archetype, mean per connection of the pairs above, {} / {}:",
        names[0], names[1]
    );
    let _ = write!(out, "{:<12}", "archetype");
    for name in [
        "memory-time",
        "CPU",
        "bytes on the wire",
        "dead-peer delay",
        "premature closes",
        "composite",
    ] {
        let _ = write!(out, "{name:>22}");
    }
    out.push('\n');
    for (svc, arms) in &c.by_archetype {
        let _ = write!(out, "{svc:<12}");
        for (_, f) in TERMS.iter().take(6) {
            let per = |a: &Arm| f(a) / a.costs.len().max(1) as f64;
            let _ = write!(
                out,
                "{:>22}",
                format!("{:.1} / {:.1}", per(&arms[0]), per(&arms[1]))
            );
        }
        out.push('\n');
    }
}

type Term = (&'static str, fn(&Arm) -> f64);

/// The cost terms as the report names them (the first six are means per connection).
const TERMS: [Term; 7] = [
    ("buffer memory-time", |a| a.terms.buffer_memory),
    ("CPU (syscalls, pings, deflate, parsing)", |a| a.terms.cpu),
    ("bytes on the wire", |a| a.terms.wire),
    ("dead-peer detection delay", |a| a.terms.dead_peer_delay),
    ("premature idle closes", |a| a.terms.premature_close),
    ("composite", |a| a.terms.total()),
    ("premature idle closes (count)", |a| a.premature as f64),
];

/// An optimizer with the shipped defaults as its active model (a constant model), an echo
/// upstream, and a data plane routing every archetype to it, profiles into `db`.
pub async fn start(
    db: &sqlx::PgPool,
    db_url: &str,
) -> anyhow::Result<(OptimizerProc, DataPlaneProc)> {
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
    Ok((opt, dp))
}

/// Run the whole benchmark on a fresh, migrated database; returns the printed report.
pub async fn run(db_url: &str, db: &sqlx::PgPool, p: Params) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    let (opt, dp) = start(db, db_url).await?;
    eprintln!("collecting profiles under the shipped defaults with 5 % exploration");
    let since = Utc::now();
    drive(dp.proxy, &p, p.collect, 1, None).await;
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

    eprintln!("phase 1: best static (canary) against the shipped defaults (control), paired");
    let w1 = phase(db, opt.addr, dp.proxy, "best-static", &p, 2).await?;
    let p1 = compare(db, &w1, "shipped-defaults", "best-static").await?;
    // The learned candidate is measured against the best static config directly: that config
    // becomes the active model (the control), and the candidate rolls out against it.
    api(
        opt.addr,
        "POST",
        "/v1/models/best-static/activate",
        Some(json!({"comment": "benchmark: the best static config as the control"})),
    )
    .await?;
    eprintln!("phase 2: learned (canary) against the best static config (control), paired");
    let w2 = phase(db, opt.addr, dp.proxy, &trained.version, &p, 3).await?;
    let p2 = compare(db, &w2, "best-static", &trained.version).await?;

    let _ = writeln!(
        out,
        "\n== live composite cost per connection (CPU-µs equivalents), mean over pairs of connections that ran the\n   same traffic side by side, one in each cohort; change = Σ canary / Σ control - 1 [95 % bootstrap over pairs]"
    );
    let _ = writeln!(
        out,
        "\n-- phase 1: best static (canary) vs shipped defaults (control)"
    );
    report_phase(&mut out, &p1, [ARMS[0], ARMS[1]]);
    let _ = writeln!(
        out,
        "\n-- phase 2: learned (canary) vs best static (control)"
    );
    report_phase(&mut out, &p2, [ARMS[1], ARMS[2]]);
    let (pooled1, pooled2) = (p1.pooled(), p2.pooled());
    let pooled = [&pooled1[0], &pooled2[0], &pooled2[1]];
    let _ = writeln!(
        out,
        "\n== pooled cost terms, mean per connection (the paired connections; shipped defaults from phase 1, the\n   others from phase 2)"
    );
    let _ = writeln!(
        out,
        "{:<34}{:>18}{:>18}{:>18}",
        "term", ARMS[0], ARMS[1], ARMS[2]
    );
    let per = |a: &Arm, v: f64| v / a.costs.len().max(1) as f64;
    for (name, f) in TERMS {
        let _ = write!(out, "{name:<34}");
        for a in pooled {
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
    for a in pooled {
        let _ = write!(out, "{:>18.2}", a.p99_first_ms());
    }
    out.push('\n');
    let _ = write!(out, "{:<34}", "p99 message latency (ms)");
    for a in pooled {
        let _ = write!(out, "{:>18.2}", a.p99_message_ms());
    }
    out.push('\n');
    drop(dp);
    drop(opt);
    Ok(out)
}
