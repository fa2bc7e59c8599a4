//! `trimtab-bench <benchmark>`: benchmarks that print their figures beside a baseline measured in
//! the same run. `./dev bench <benchmark>` builds in release and runs them.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use trimtab_tests::harness::DataPlaneProc;
use trimtab_tests::load::{latency, median, within, ws_churn, ws_round_trips};
use trimtab_tests::proxy_bench::Figure;
use trimtab_tests::upstream::spawn_echo;

#[derive(Debug, Parser)]
struct Args {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Debug, Subcommand)]
enum Bench {
    /// Proxy performance: direct vs trimtab zero_copy vs trimtab frame_aware vs nginx vs
    /// HAProxy, the same load client, medians of `runs`.
    Proxy {
        /// Repetitions (runs interleave the targets); medians are printed.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Idle WebSockets for the memory figure.
        #[arg(long, default_value_t = 9000)]
        idle_conns: usize,
        /// Which figures to measure (a quick check of one: `--figures memory`).
        #[arg(long, value_enum, value_delimiter = ',', default_values_t = Figure::ALL.to_vec())]
        figures: Vec<Figure>,
        /// Only the targets whose name contains one of these (direct, zero_copy,
        /// frame_aware, nginx, haproxy); all by default.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Learned vs static, live: collect profiles under the shipped defaults with 5 %
    /// exploration, train, roll out the best static config and the learned candidate at 50 %,
    /// compare the cohorts.
    Learn {
        /// Collection phase, seconds (180 s gives about 830 profiles, 166 of them held out;
        /// with 90 s the held-out window was too small for a steady balanced accuracy).
        #[arg(long, default_value_t = 180)]
        collect_s: u64,
        /// Each comparison phase, seconds (a chat session that idles long lasts up to 54 s, and
        /// only sessions that can end within the phase start).
        #[arg(long, default_value_t = 120)]
        compare_s: u64,
    },
    /// WebSocket round trips (64 B messages) against any echoing address, for profiling a
    /// proxy by hand (`perf`, `strace`) under the load of the benchmark's round-trip figure.
    Rtt {
        /// Where to connect (a proxy in front of `echo-server`, or the echo server itself).
        #[arg(long)]
        addr: SocketAddr,
        /// Connections at once.
        #[arg(long, default_value_t = 100)]
        conns: usize,
        /// Round trips per connection.
        #[arg(long, default_value_t = 2000)]
        per_conn: usize,
    },
    /// Serve the echo upstream on 127.0.0.1:PORT until killed (the proxy benchmark runs it in
    /// its own process).
    EchoServer {
        /// The port.
        #[arg(long)]
        port: u16,
    },
    /// Training time and peak memory on synthetic profile tables (load-only time beside it).
    Train {
        /// Table sizes.
        #[arg(long, value_delimiter = ',', default_values_t = [100_000usize, 1_000_000])]
        rows: Vec<usize>,
    },
    /// Profile rows/s into PostgreSQL (COPY writer vs row-by-row INSERT), and data-plane
    /// connection rate and latency with profiling on vs off vs direct.
    Profiles {
        /// Repetitions; medians are printed.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Synthetic profiles per writer run.
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
        /// Short connections per churn run.
        #[arg(long, default_value_t = 2_000)]
        conns: usize,
    },
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.bench {
        Bench::Profiles { runs, rows, conns } => profiles(runs, rows, conns).await,
        Bench::Train { rows } => train(rows).await,
        Bench::Proxy {
            runs,
            idle_conns,
            figures,
            only,
        } => proxy(runs, idle_conns, figures, &only).await,
        Bench::Learn {
            collect_s,
            compare_s,
        } => {
            let (url, pool) = fresh_database().await?;
            let p = trimtab_tests::learn_bench::Params {
                collect: Duration::from_secs(collect_s),
                compare: Duration::from_secs(compare_s),
                ..Default::default()
            };
            print!("{}", trimtab_tests::learn_bench::run(&url, &pool, p).await?);
            Ok(())
        }
        Bench::Rtt {
            addr,
            conns,
            per_conn,
        } => {
            let t = Instant::now();
            let l = latency(ws_round_trips(addr, conns, per_conn, 64).await?);
            let secs = t.elapsed().as_secs_f64();
            println!(
                "{conns} connections x {per_conn} round trips in {secs:.2} s: p50 {:.0} µs, p99 {:.0} µs, {:.0} round trips/s",
                l.p50.as_secs_f64() * 1e6,
                l.p99.as_secs_f64() * 1e6,
                (conns * per_conn) as f64 / secs
            );
            Ok(())
        }
        Bench::EchoServer { port } => {
            let l = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
            trimtab_tests::upstream::serve_echo(l).await;
            Ok(())
        }
    }
}

async fn proxy(
    runs: usize,
    idle_conns: usize,
    figures: Vec<Figure>,
    only: &[String],
) -> anyhow::Result<()> {
    use trimtab_tests::proxy_bench as pb;
    let (upstream, upstream_proc) = pb::spawn_upstream().await?;
    let params = pb::Params {
        idle_conns,
        figures: figures.leak(),
        upstream_pid: Some(upstream_proc.pid()),
        ..pb::Params::default()
    };
    // Fresh proxy processes for every run: memory growth is only meaningful in a process that
    // has not already grown (and kept) its heap for an earlier run's connections.
    let start = || async {
        let mut targets = vec![
            pb::direct(upstream),
            pb::trimtab(upstream, "zero_copy"),
            pb::trimtab(upstream, "frame_aware"),
        ];
        let mut skipped = Vec::new();
        for t in [pb::nginx(upstream).await, pb::haproxy(upstream).await] {
            match t {
                Ok(t) => targets.push(t),
                Err(why) => skipped.push(why),
            }
        }
        let wanted = |t: &pb::Target| {
            let name = t.name.to_lowercase();
            only.is_empty() || only.iter().any(|o| name.contains(&o.to_lowercase()))
        };
        targets.retain(wanted);
        (targets, skipped)
    };
    let (mut targets, skipped) = start().await;
    let memory = if params.figures.contains(&Figure::Memory) {
        format!("; {} idle WebSockets for memory", params.idle_conns)
    } else {
        String::new()
    };
    println!(
        "== proxy benchmark: {} targets, {runs} runs, medians (ratio to direct){memory}",
        targets.len(),
    );
    let mut results: Vec<Vec<pb::Figures>> = vec![Vec::new(); targets.len()];
    let mut failed: Vec<String> = Vec::new();
    for run in 0..runs {
        if run > 0 {
            drop(targets);
            targets = start().await.0;
        }
        for (i, t) in targets.iter().enumerate() {
            // A target that fails a run is reported and left out of that run's medians; the
            // other targets go on.
            match pb::run_once(t, &params).await {
                Ok(f) => {
                    // The upstream's open files after the run: connections a proxy left open
                    // would show here (and starve the next target of the 20,000 allowed).
                    let fds = std::fs::read_dir(format!("/proc/{}/fd", upstream_proc.pid()))
                        .map(|d| d.count())
                        .unwrap_or(0);
                    eprintln!(
                        "  run {} {} (upstream fds after: {fds}): {f:?}",
                        run + 1,
                        t.name
                    );
                    results[i].push(f);
                }
                Err(e) => {
                    eprintln!("  run {} {}: failed: {e:#}", run + 1, t.name);
                    failed.push(format!("{} (run {}): {e:#}", t.name, run + 1));
                }
            }
        }
    }
    anyhow::ensure!(
        results.iter().any(|r| !r.is_empty()),
        "every target failed every run: {failed:?}"
    );
    // A target that failed every run has no column (its failures are listed below the table).
    let kept: Vec<usize> = (0..targets.len())
        .filter(|i| !results[*i].is_empty())
        .collect();
    let names: Vec<String> = kept.iter().map(|i| targets[*i].name.clone()).collect();
    let figs: Vec<pb::Figures> = kept.iter().map(|i| pb::medians(&results[*i])).collect();
    print!("{}", pb::table(&names, &figs, params.figures));
    for s in skipped {
        println!("skipped: {s}");
    }
    for f in failed {
        println!("failed, left out of the medians: {f}");
    }
    Ok(())
}

async fn fresh_database() -> anyhow::Result<(String, sqlx::PgPool)> {
    let base = std::env::var("DATABASE_URL").context("DATABASE_URL (./dev sets it)")?;
    let admin = sqlx::PgPool::connect(&base).await?;
    let name = format!("trimtab_bench_{}", std::process::id());
    // Each run keeps its database for inspection until the next run, which drops it (one still
    // in use by a running benchmark refuses to be dropped and stays).
    let earlier: Vec<String> = sqlx::query_scalar(
        "select datname from pg_database where datname like 'trimtab\\_bench\\_%'",
    )
    .fetch_all(&admin)
    .await?;
    for db in earlier {
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(format!("drop database \"{db}\"")))
            .execute(&admin)
            .await
            && db == name
        {
            return Err(e.into());
        }
    }
    println!("database of this run (kept until the next benchmark): {name}");
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
        .execute(&admin)
        .await?;
    let (prefix, _) = base
        .rsplit_once('/')
        .context("DATABASE_URL has no database")?;
    let url = format!("{prefix}/{name}");
    let pool = sqlx::PgPool::connect(&url).await?;
    sqlx::migrate!("../migrations").run(&pool).await?;
    Ok((url, pool))
}

async fn profiles(runs: usize, rows: usize, conns: usize) -> anyhow::Result<()> {
    let (url, pool) = fresh_database().await?;
    println!("== profile writer: rows/s into PostgreSQL ({rows} rows per run, {runs} runs)");
    let mut copy_rates = Vec::new();
    let mut insert_rates = Vec::new();
    for run in 0..runs {
        sqlx::query("truncate profiles").execute(&pool).await?;
        let spool = trimtab_tests::harness::scratch_dir("bench-spool");
        let cfg = dataplane::profiles::WriterConfig {
            database_url: url.clone(),
            spool_dir: spool,
            spool_max_bytes: 1 << 30,
            queue_capacity: rows + 1,
            batch_rows: 1000,
            batch_interval: Duration::from_millis(100),
            write_timeout: Duration::from_secs(30),
            retention: None,
        };
        let written0 = dataplane::profiles::WRITER
            .rows_written
            .load(Ordering::Relaxed);
        let (sink, writer) = dataplane::profiles::start(cfg)?;
        let sample = dataplane::profiles::sample_profile();
        let t = Instant::now();
        for _ in 0..rows {
            let mut p = sample.clone();
            p.connection_id = uuid_v4();
            dataplane::source::ProfileSink::emit(&*sink, p);
        }
        within(Duration::from_secs(300), async {
            while dataplane::profiles::WRITER
                .rows_written
                .load(Ordering::Relaxed)
                - written0
                < rows as u64
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await?;
        let secs = t.elapsed().as_secs_f64();
        writer.finish(Duration::from_secs(5)).await;
        copy_rates.push(rows as f64 / secs);
        // Baseline in the same run: one INSERT per row, one connection.
        let n = (rows / 10).max(100);
        let t = Instant::now();
        for _ in 0..n {
            sqlx::query(
                "insert into profiles (connection_id, dataplane_id, started_at, ended_at, duration_us, service, route,
                   protocol, offers_deflate, client_class, client_region, hour_of_week, buffer_size, ping_interval_s,
                   idle_timeout_s, compression, mode, reason, cohort, propensity, c2u_msg_size_hist, c2u_read_size_hist,
                   c2u_gap_ms_hist, u2c_msg_size_hist, u2c_read_size_hist, u2c_gap_ms_hist, closed_by)
                 values ($1, 'bench', now(), now(), 1, 's', '/r', 'websocket', false, 'other', 'unknown', 0, 16384, 30,
                   300, false, 'zero_copy', 'default', 'none', 1, '{}', '{}', '{}', '{}', '{}', '{}', 'client')",
            )
            .bind(uuid_v4())
            .execute(&pool)
            .await?;
        }
        insert_rates.push(n as f64 / t.elapsed().as_secs_f64());
        eprintln!(
            "  run {}: COPY writer {:.0} rows/s, INSERT per row {:.0} rows/s",
            run + 1,
            copy_rates[run],
            insert_rates[run]
        );
    }
    let (c, i) = (median(copy_rates), median(insert_rates));
    println!("{:<34} {:>12} {:>8}", "", "rows/s", "ratio");
    println!(
        "{:<34} {:>12.0} {:>8}",
        "INSERT per row (baseline)", i, "1.00x"
    );
    println!(
        "{:<34} {:>12.0} {:>7.2}x",
        "trimtab profile writer (COPY)",
        c,
        c / i
    );

    println!();
    println!(
        "== data plane with profiling on vs off ({conns} short WebSocket connections per run; 64 B round trips on 10 connections)"
    );
    let echo = spawn_echo().await;
    // The data planes skip the per-connection log line here, so only the profile path differs.
    // SAFETY: set before any other thread reads the environment of this process.
    unsafe {
        std::env::set_var(
            "TRIMTAB_TEST_LOG",
            "warn,dataplane=info,dataplane::source=warn",
        )
    };
    let spool = trimtab_tests::harness::scratch_dir("bench-spool-dp");
    let on = DataPlaneProc::start(&dp_config(echo, Some((&url, &spool))));
    let off = DataPlaneProc::start(&dp_config(echo, None));
    let targets: [(&str, SocketAddr); 3] = [
        ("direct (no proxy)", echo),
        ("trimtab, profiling off", off.proxy),
        ("trimtab, profiling on", on.proxy),
    ];
    let mut churn: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut p50: Vec<Vec<f64>> = vec![Vec::new(); 3];
    for run in 0..runs {
        for (i, (_, addr)) in targets.iter().enumerate() {
            let rate = within(Duration::from_secs(120), ws_churn(*addr, conns, 16)).await??;
            let rtt =
                within(Duration::from_secs(120), ws_round_trips(*addr, 10, 500, 64)).await??;
            let l = latency(rtt);
            churn[i].push(rate);
            p50[i].push(l.p50.as_secs_f64() * 1e6);
        }
        eprintln!("  run {} done", run + 1);
    }
    // Every connection through the profiling data plane becomes a row (churn + round-trip ones).
    let expected = (runs * (conns.div_ceil(16) * 16 + 10)) as i64;
    let t = Instant::now();
    let mut stored = 0i64;
    while t.elapsed() < Duration::from_secs(30) {
        stored =
            sqlx::query_scalar("select count(*) from profiles where dataplane_id = 'bench-on'")
                .fetch_one(&pool)
                .await?;
        if stored >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let base_rate = median(churn[0].clone());
    let base_p50 = median(p50[0].clone());
    println!(
        "{:<26} {:>14} {:>8} {:>14} {:>8}",
        "", "connections/s", "ratio", "RTT p50 (µs)", "ratio"
    );
    for (i, (name, _)) in targets.iter().enumerate() {
        let r = median(churn[i].clone());
        let l = median(p50[i].clone());
        println!(
            "{:<26} {:>14.0} {:>7.2}x {:>14.0} {:>7.2}x",
            name,
            r,
            r / base_rate,
            l,
            l / base_p50
        );
    }
    println!("profile rows stored by the profiling data plane: {stored} of {expected} connections");
    Ok(())
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

async fn train(sizes: Vec<usize>) -> anyhow::Result<()> {
    println!("== trainer: load only vs load + label + fit + evaluate + export (release build)");
    println!(
        "{:>10} {:>12} {:>16} {:>8} {:>16}",
        "rows", "load (s)", "train total (s)", "ratio", "peak RSS (MiB)"
    );
    for n in sizes {
        let (_url, pool) = fresh_database().await?;
        trainer::synthetic::insert(&pool, n).await?;
        let w = trainer::Window {
            since: chrono::Utc::now() - chrono::Duration::days(3650),
            until: chrono::Utc::now() + chrono::Duration::seconds(1),
            service: None,
        };
        let t = Instant::now();
        let rows = trainer::load(&pool, &w).await?.len();
        let load = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let trained = trainer::train(&pool, &w, trainer::learn::TrainParams::default()).await?;
        let total = t.elapsed().as_secs_f64();
        println!(
            "{:>10} {:>12.2} {:>16.2} {:>7.1}x {:>16.0}",
            rows,
            load,
            total,
            total / load,
            peak_rss_mib()
        );
        let acc: Vec<String> = trained
            .report
            .targets
            .iter()
            .map(|t| format!("{} {:.3}", t.target, t.balanced_accuracy))
            .collect();
        eprintln!("  balanced accuracy: {}", acc.join(", "));
        pool.close().await;
    }
    Ok(())
}

fn dp_config(echo: SocketAddr, profiles: Option<(&str, &std::path::Path)>) -> String {
    let (id, section) = match profiles {
        Some((url, spool)) => (
            "bench-on",
            format!(
                "[profiles]\ndatabase_url = \"{url}\"\nspool_dir = \"{}\"\n",
                spool.display()
            ),
        ),
        None => ("bench-off", String::new()),
    };
    format!(
        r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
dataplane_id = "{id}"
{section}
[services.echo]
upstreams = ["{echo}"]
routes = [{{ path_prefix = "/" }}]
"#
    )
}

fn uuid_v4() -> uuid::Uuid {
    uuid::Uuid::new_v4()
}
