//! The learning loop end to end: the real `trainer` binary learns from a profile table whose
//! right policy is known and registers a candidate; the real optimizer validates it (ONNX
//! Runtime) and, once activated, decides exactly that policy.

use serde_json::json;
use trimtab_tests::harness::{OptimizerProc, bin_dir, database_url_of, http_json};

#[sqlx::test(migrations = "../migrations")]
async fn a_trained_candidate_loads_in_the_optimizer_and_decides_the_known_policy(
    pool: sqlx::PgPool,
) {
    let url = database_url_of(&pool).await;
    trainer::synthetic::insert(&pool, 900)
        .await
        .expect("synthetic profiles");
    let out = tokio::process::Command::new(bin_dir().join("trainer"))
        .args(["--json", "train"])
        .env("DATABASE_URL", &url)
        .output()
        .await
        .expect("run trainer");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");
    let version = t["version"].as_str().expect("version").to_string();
    for target in t["report"]["targets"].as_array().expect("targets") {
        assert!(
            target["balanced_accuracy"].as_f64() >= Some(0.9),
            "{target}"
        );
    }
    let opt = OptimizerProc::start(
        "listen = \"127.0.0.1:0\"\nexploration_share = 0.0\n[[tokens]]\nname = \"ops\"\nrole = \"admin\"\ntoken = \"admin-token-learn\"\n",
        &url,
    );
    let (st, m) = http_json(
        opt.addr,
        "POST",
        &format!("/v1/models/{version}/activate"),
        Some("admin-token-learn"),
        None,
    )
    .await;
    assert_eq!(st, 200, "{m}");
    let ctx = |service: &str, route: &str, class: &str| {
        json!({"service": service, "route": route, "protocol": "websocket", "offers_deflate": true,
               "client_class": class, "client_region": "eu", "hour_of_week": 10})
    };
    let decide = |c: serde_json::Value| {
        let addr = opt.addr;
        async move {
            let (st, d) = http_json(
                addr,
                "POST",
                "/v1/decisions",
                Some("admin-token-learn"),
                Some(&c),
            )
            .await;
            assert_eq!(st, 200, "{d}");
            assert_eq!(d["decision"]["reason"], "model", "{d}");
            d["decision"]["settings"].clone()
        }
    };
    // The known policy: per service, the hindsight-best settings of its profiles (they agree
    // within a service by construction of the synthetic table).
    let profiles = trainer::load(
        &pool,
        &trainer::Window {
            since: chrono::Utc::now() - chrono::Duration::days(1),
            until: chrono::Utc::now(),
            service: None,
        },
    )
    .await
    .expect("profiles");
    let w = tuning::cost::CostWeights::default();
    for (service, route, class) in [
        ("bulk", "/download", "server"),
        ("chat", "/ws", "browser"),
        ("iot", "/telemetry", "device"),
    ] {
        let mut counts: std::collections::HashMap<String, usize> = Default::default();
        for p in profiles.iter().filter(|p| p.context.service == service) {
            let o = tuning::cost::oracle(p, &w);
            *counts
                .entry(serde_json::to_string(&o).expect("json"))
                .or_default() += 1;
        }
        let (best, n) = counts.into_iter().max_by_key(|(_, n)| *n).expect("rows");
        let expected: serde_json::Value = serde_json::from_str(&best).expect("json");
        let got = decide(ctx(service, route, class)).await;
        assert_eq!(got, expected, "{service}: model vs the policy of {n} rows");
    }
    // and the policies differ between services, so the model really told them apart
    let a = decide(ctx("bulk", "/download", "server")).await;
    let b = decide(ctx("iot", "/telemetry", "device")).await;
    assert_ne!(a, b);
}

/// The learned-vs-static benchmark compares cohorts over pairs of connections that ran the
/// same traffic: pairs whose two sides cost the same come out at no change however much the
/// pairs differ from each other, and a canary cheaper by a tenth in every pair at -10 %.
#[test]
fn the_learn_bench_compares_cohorts_pair_by_pair() {
    use trimtab_tests::learn_bench::paired_change;
    // Vanished devices cost two thousand times a healthy one; both sides of a pair vanish.
    let same: Vec<(f64, f64)> = (0..40)
        .map(|i| {
            if i % 5 == 0 {
                (60_000.0, 60_000.0)
            } else {
                (30.0 + i as f64, 30.0 + i as f64)
            }
        })
        .collect();
    let (m, (lo, hi)) = paired_change(&[&same], 500);
    assert!(
        m.abs() < 1e-12 && lo.abs() < 1e-12 && hi.abs() < 1e-12,
        "{m} [{lo}, {hi}]"
    );
    let cheaper: Vec<(f64, f64)> = same.iter().map(|&(c, _)| (c, c * 0.9)).collect();
    let (m, (lo, hi)) = paired_change(&[&cheaper], 500);
    assert!((m + 0.1).abs() < 1e-9 && (lo + 0.1).abs() < 1e-9 && (hi + 0.1).abs() < 1e-9);
    // On a mix, the costly archetype weighs by its cost: halving a cheap one moves little.
    let cheap: Vec<(f64, f64)> = vec![(10.0, 5.0); 20];
    let costly: Vec<(f64, f64)> = vec![(10_000.0, 10_000.0); 20];
    let (m, (lo, hi)) = paired_change(&[&cheap, &costly], 500);
    assert!((m - (-100.0 / 200_200.0)).abs() < 1e-12, "{m}");
    assert!(lo <= m && m <= hi, "{m} [{lo}, {hi}]");
    // no pairs: no figure
    assert!(paired_change(&[&[]], 10).0.is_nan());
}

/// A paired workload under a rollout: each session runs as two connections at once, one from
/// a client in the control and one from a client in the canary, with the same traffic; the
/// learn bench's `compare` finds the pairs in the live profiles.
#[sqlx::test(migrations = "../migrations")]
async fn a_paired_workload_runs_each_session_once_in_each_cohort(pool: sqlx::PgPool) {
    use std::time::Duration;
    use trimtab_tests::learn_bench::{self, Params};
    let url = trimtab_tests::harness::database_url_of(&pool).await;
    let (opt, dp) = learn_bench::start(&pool, &url).await.expect("start");
    let candidate = tuning::Settings {
        buffer_size: 16 << 10,
        ..Default::default()
    };
    learn_bench::register_constant(&pool, "candidate", &candidate)
        .await
        .expect("register");
    let p = Params {
        compare: Duration::from_secs(8),
        concurrency: 12,
        session: Duration::from_secs(1),
        ..Params::default()
    };
    let w = learn_bench::phase(&pool, opt.addr, dp.proxy, "candidate", &p, 5)
        .await
        .expect("phase");
    let c = learn_bench::compare(&pool, &w, "shipped-defaults", "candidate")
        .await
        .expect("compare");
    let by_archetype = c.pairs();
    let pairs: usize = by_archetype.values().map(Vec::len).sum();
    assert!(pairs >= 15, "{pairs} pairs; {c:?}");
    assert!(
        by_archetype.len() >= 5,
        "archetypes {:?}",
        by_archetype.keys()
    );
    // The clients measured their messages' latency on both sides of every archetype's pairs
    // (pushes one way, the rest round trips), and none took anywhere near a second.
    for (svc, arms) in &c.by_archetype {
        for arm in arms {
            let p99 = arm.p99_message_ms();
            assert!(p99 > 0.0 && p99 < 1000.0, "{svc}: p99 {p99} ms");
        }
    }
    // Primed: the phase's first connections are decided under the rollout too.
    assert!(c.incomplete <= 2, "{:#?}", c.why_incomplete);
    // Both sides of a pair sent the same messages.
    type Row = (String, String, i64);
    let rows: Vec<Row> = sqlx::query_as(
        "select client_key, cohort, c2u_messages from profiles where started_at >= $1 and started_at < $2",
    )
    .bind(w.window.since)
    .bind(w.window.until)
    .fetch_all(&pool)
    .await
    .expect("rows");
    let mut by: std::collections::BTreeMap<String, Vec<(String, i64)>> = Default::default();
    for (key, cohort, sent) in rows {
        let pair = trimtab_tests::workload::pair_of(&key)
            .expect("a pair's key")
            .to_string();
        by.entry(pair).or_default().push((cohort, sent));
    }
    let complete: Vec<_> = by.values().filter(|v| v.len() == 2).collect();
    assert!(complete.len() >= pairs, "{by:?}");
    for v in &complete {
        let mut cohorts: Vec<&str> = v.iter().map(|(c, _)| c.as_str()).collect();
        cohorts.sort_unstable();
        assert_eq!(cohorts, ["canary", "control"], "{v:?}");
    }
    let same = complete.iter().filter(|v| v[0].1 == v[1].1).count();
    assert!(
        same * 10 >= complete.len() * 9,
        "{same} of {} pairs sent alike: {complete:?}",
        complete.len()
    );
}

/// One chat session in three idles long once, 6 to 8 session lengths (36–48 s at the
/// benchmark's 6 s sessions: past a 30 s idle timeout, inside a 60 s one), and its life
/// includes it; no other archetype idles long.
#[test]
fn one_chat_session_in_three_idles_past_a_30_s_timeout() {
    use std::time::Duration;
    use trimtab_tests::workload::Archetype;
    let session = Duration::from_secs(6);
    let mut long = 0;
    for seed in 1..=3000u64 {
        for a in Archetype::ALL {
            let idle = a.long_idle(session, seed);
            assert_eq!(
                a.long_idle(session, seed),
                idle,
                "drawn from the seed alone"
            );
            let base = a.life(session, seed) - idle.unwrap_or_default();
            match idle {
                Some(d) => {
                    assert_eq!(a, Archetype::Chat);
                    assert!(
                        d >= Duration::from_secs(36) && d <= Duration::from_secs(48),
                        "{d:?}"
                    );
                    assert_eq!(base, session);
                    long += 1;
                }
                None => assert_eq!(base, a.life(session, seed)),
            }
        }
    }
    assert!(
        (900..1100).contains(&long),
        "{long} of 3000 chat sessions idle long"
    );
}

/// One IoT device in five vanishes, 2 to 7 session lengths into its ten-length life (12–42 s
/// at the benchmark's 6 s sessions); no other archetype vanishes.
#[test]
fn one_iot_device_in_five_vanishes_early_in_its_life() {
    use std::time::Duration;
    use trimtab_tests::workload::Archetype;
    let session = Duration::from_secs(6);
    let mut vanish = 0;
    for seed in 1..=3000u64 {
        for a in Archetype::ALL {
            let v = a.vanishes_after(session, seed);
            assert_eq!(
                v,
                a.vanishes_after(session, seed),
                "drawn from the seed alone"
            );
            if let Some(d) = v {
                assert_eq!(a, Archetype::Iot);
                assert!(
                    d >= Duration::from_secs(12) && d <= Duration::from_secs(42),
                    "{d:?}"
                );
                assert!(d < a.life(session, seed));
                vanish += 1;
            }
        }
    }
    assert!(
        (500..700).contains(&vanish),
        "{vanish} of 3000 devices vanish"
    );
}
