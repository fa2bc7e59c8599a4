//! Rollout cohorts and exploration draws: the one implementation the optimizer and every data
//! plane share, so that a decision made locally from a cached answer is the decision the
//! optimizer would have made.

use crate::hash::{stable_hash, unit};
use crate::settings::{Settings, Target};

/// Resolution of cohort points: 10 000 points, so percentages have two decimals.
pub const COHORT_POINTS: u32 = 10_000;

/// The client's point in `[0, COHORT_POINTS)` for a rollout salt. Stable for the same
/// (salt, service, client key); a different salt reshuffles everyone.
pub fn cohort_point(salt: u64, service: &str, client_key: &str) -> u32 {
    let h = stable_hash(&[
        &salt.to_le_bytes(),
        service.as_bytes(),
        client_key.as_bytes(),
    ]);
    (h % u64::from(COHORT_POINTS)) as u32
}

/// Whether a client is in the canary at `percent` (0–100). Sticky (same inputs, same answer)
/// and monotonic: raising the percentage never moves anyone out.
pub fn in_canary(salt: u64, service: &str, client_key: &str, percent: f64) -> bool {
    let threshold = (percent.clamp(0.0, 100.0) * f64::from(COHORT_POINTS) / 100.0).round() as u32;
    cohort_point(salt, service, client_key) < threshold
}

/// One valid move of exploration: a target and the neighbouring class it moves to.
fn moves(base: &Settings) -> Vec<(Target, usize)> {
    let mut out = Vec::new();
    for t in Target::ALL {
        let c = t.class_of(base);
        let mut neighbours = Vec::with_capacity(2);
        if c > 0 {
            neighbours.push(c - 1);
        }
        if c + 1 < t.classes() {
            neighbours.push(c + 1);
        }
        for n in neighbours {
            let mut s = *base;
            t.set_class(&mut s, n);
            if s.validate().is_ok() {
                out.push((t, n));
            }
        }
    }
    out
}

/// The outcome of [`explore`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Explored {
    /// The settings to apply.
    pub settings: Settings,
    /// Probability that this policy produces exactly these settings for this context.
    pub propensity: f32,
    /// Whether the settings differ from the policy's choice.
    pub explored: bool,
}

/// With probability `share`, move one setting of `base` to a neighbouring grid value (every
/// valid move equally likely); otherwise keep `base`. `draw` is a per-connection stable hash
/// (see [`connection_draw`]).
pub fn explore(base: Settings, share: f64, draw: u64) -> Explored {
    let share = share.clamp(0.0, 1.0);
    let ms = moves(&base);
    if share == 0.0 || ms.is_empty() {
        return Explored {
            settings: base,
            propensity: 1.0,
            explored: false,
        };
    }
    let u = unit(draw);
    if u >= share {
        return Explored {
            settings: base,
            propensity: (1.0 - share) as f32,
            explored: false,
        };
    }
    // Reuse the draw: u / share is uniform in [0, 1) given u < share.
    let idx = ((u / share) * ms.len() as f64) as usize;
    let (t, class) = ms[idx.min(ms.len() - 1)];
    let mut s = base;
    t.set_class(&mut s, class);
    Explored {
        settings: s,
        propensity: (share / ms.len() as f64) as f32,
        explored: true,
    }
}

/// The per-connection draw used for exploration.
pub fn connection_draw(exploration_salt: u64, connection_id: &uuid::Uuid) -> u64 {
    stable_hash(&[&exploration_salt.to_le_bytes(), connection_id.as_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::mix;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn canary_is_sticky_and_monotonic(salt: u64, service in "[a-z]{1,8}", key in "[a-z0-9]{1,12}",
                                          lo in 0.0f64..100.0, step in 0.0f64..100.0) {
            let hi = (lo + step).min(100.0);
            let a = in_canary(salt, &service, &key, lo);
            prop_assert_eq!(a, in_canary(salt, &service, &key, lo));
            if a {
                prop_assert!(in_canary(salt, &service, &key, hi));
            }
        }
    }

    #[test]
    fn canary_share_matches_percentage() {
        let n = 20_000;
        let inside = (0..n)
            .filter(|i| in_canary(42, "svc", &format!("client-{i}"), 25.0))
            .count();
        let share = inside as f64 / f64::from(n);
        assert!((share - 0.25).abs() < 0.02, "share {share}");
        assert!(!in_canary(42, "svc", "x", 0.0));
        assert!(in_canary(42, "svc", "x", 100.0));
    }

    #[test]
    fn exploration_rate_and_propensities_are_consistent() {
        let base = Settings::default();
        let n = 20_000u64;
        let mut explored = 0;
        for i in 0..n {
            let e = explore(base, 0.05, mix(i));
            assert!(e.settings.validate().is_ok());
            if e.explored {
                explored += 1;
                assert_ne!(e.settings, base);
                assert!(e.propensity < 0.05);
            } else {
                assert_eq!(e.settings, base);
                assert!((e.propensity - 0.95).abs() < 1e-6);
            }
        }
        let rate = f64::from(explored) / n as f64;
        assert!((rate - 0.05).abs() < 0.01, "rate {rate}");
        let none = explore(base, 0.0, 7);
        assert_eq!(
            (none.settings, none.propensity, none.explored),
            (base, 1.0, false)
        );
    }

    #[test]
    fn exploration_never_enables_compression_in_zero_copy() {
        for i in 0..5000u64 {
            let e = explore(Settings::default(), 1.0, mix(i));
            assert!(!(e.settings.compression && e.settings.mode == crate::Mode::ZeroCopy));
        }
    }
}
