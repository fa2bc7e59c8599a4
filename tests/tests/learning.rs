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

/// The learned-vs-static benchmark compares arms on one mix of strata: two arms whose
/// connections cost the same in each stratum come out equal even when one drew more of the
/// costly stratum (vanished clients), which the plain means do not.
#[test]
fn the_learn_bench_weighs_each_stratum_alike_in_every_arm() {
    use std::collections::BTreeMap;
    use trimtab_tests::learn_bench::{Arm, common_strata, mix_adjusted};
    let mut arms = BTreeMap::new();
    // arm 1 (best static): 1 vanished client in 10; arm 2 (learned): 4 in 10; same costs.
    for (arm, gone) in [(0usize, 2usize), (1, 1), (2, 4)] {
        arms.insert(
            ("iot".to_string(), arm),
            Arm::of_costs(vec![30.0; 10 - gone]),
        );
        arms.insert(
            ("iot/vanished".to_string(), arm),
            Arm::of_costs(vec![60_000.0; gone]),
        );
    }
    arms.insert(("feed/vanished".to_string(), 2), Arm::of_costs(vec![1.0]));
    let counts = BTreeMap::from([
        ("iot".to_string(), 23.0),
        ("iot/vanished".to_string(), 7.0),
        ("feed/vanished".to_string(), 1.0),
    ]);
    let w = common_strata(&arms, counts);
    assert_eq!(w.len(), 2, "a stratum some arm lacks is left out: {w:?}");
    assert!((w.values().sum::<f64>() - 1.0).abs() < 1e-9);
    let (means, (lo, hi)) = mix_adjusted(&arms, &w, 200);
    assert!((means[2] / means[1] - 1.0).abs() < 1e-9, "{means:?}");
    assert!(lo <= 1e-9 && hi >= -1e-9, "[{lo}, {hi}]");
    let plain = |gone: f64| (gone * 60_000.0 + (10.0 - gone) * 30.0) / 10.0;
    assert!(plain(4.0) / plain(1.0) > 3.0);
}
