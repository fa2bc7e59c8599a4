//! Aggregates of earlier profiles per (service, route, client class): the decision-time features
//! that describe the traffic a context usually carries. The trainer feeds rows in time order and
//! reads each row's aggregates *before* adding it (no leakage); the optimizer builds the same
//! aggregates from recent profiles. One implementation, so training and serving agree.

use std::collections::HashMap;

use crate::context::{ClientClass, ConnectionContext};
use crate::features::ContextAggregates;
use crate::profile::{Hist, Profile};

#[derive(Debug, Clone, Default)]
struct Acc {
    n: u64,
    msg_sizes: Hist,
    gaps_ms: Hist,
    durations_s: Hist,
    messages: u64,
    seconds: f64,
    sampled_in: u64,
    sampled_out: u64,
    abnormal: u64,
}

/// Running aggregates by context group.
#[derive(Debug, Clone, Default)]
pub struct Aggregator {
    groups: HashMap<(String, String, ClientClass), Acc>,
}

fn mid(upper: Option<u64>) -> Option<f64> {
    // bucket upper bound 2^i - 1 → the bucket's midpoint, 0.75 · 2^i
    upper.map(|u| if u == 0 { 0.0 } else { (u + 1) as f64 * 0.75 })
}

impl Aggregator {
    /// Add one finished connection.
    pub fn observe(&mut self, p: &Profile) {
        let c = &p.context;
        let a = self
            .groups
            .entry((c.service.clone(), c.route.clone(), c.client_class))
            .or_default();
        a.n += 1;
        for d in [&p.client_to_upstream, &p.upstream_to_client] {
            for (i, n) in d.msg_sizes.0.iter().enumerate() {
                a.msg_sizes.0[i] += n;
            }
            for (i, n) in d.gaps_ms.0.iter().enumerate() {
                a.gaps_ms.0[i] += n;
            }
            a.messages += d.messages;
        }
        a.gaps_ms.record(
            p.client_to_upstream
                .max_gap_ms
                .max(p.upstream_to_client.max_gap_ms),
        );
        let secs = p.duration_us as f64 / 1e6;
        a.seconds += secs;
        a.durations_s.record(secs as u64);
        a.sampled_in += p.upstream_to_client.sampled_in;
        a.sampled_out += p.upstream_to_client.sampled_out;
        if p.dead_peer || matches!(p.close_code, Some(1006 | 1011)) || p.error_class.is_some() {
            a.abnormal += 1;
        }
    }

    /// The aggregates of a context's group (all missing for a group never seen).
    pub fn get(&self, ctx: &ConnectionContext) -> ContextAggregates {
        let Some(a) = self
            .groups
            .get(&(ctx.service.clone(), ctx.route.clone(), ctx.client_class))
        else {
            return ContextAggregates::default();
        };
        ContextAggregates {
            n: a.n,
            msg_size_p50: mid(a.msg_sizes.quantile_upper(0.5)),
            msg_size_p95: mid(a.msg_sizes.quantile_upper(0.95)),
            msg_rate: (a.seconds > 0.0).then(|| a.messages as f64 / a.seconds),
            gap_p95_ms: mid(a.gaps_ms.quantile_upper(0.95)),
            compress_ratio: (a.sampled_in > 0).then(|| a.sampled_out as f64 / a.sampled_in as f64),
            rtt_p50_us: None,
            duration_p50_s: mid(a.durations_s.quantile_upper(0.5)),
            abnormal_close_share: Some(a.abnormal as f64 / a.n as f64),
        }
    }

    /// Number of groups seen.
    pub fn groups(&self) -> usize {
        self.groups.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_describe_earlier_rows_only() {
        let mut p = crate::profile::test_profile();
        p.upstream_to_client.messages = 10;
        for _ in 0..10 {
            p.upstream_to_client.msg_sizes.record(1000);
        }
        p.upstream_to_client.sampled_in = 1000;
        p.upstream_to_client.sampled_out = 250;
        p.duration_us = 10_000_000;
        let mut agg = Aggregator::default();
        assert_eq!(agg.get(&p.context), ContextAggregates::default());
        agg.observe(&p);
        let a = agg.get(&p.context);
        assert_eq!(a.n, 1);
        assert_eq!(a.msg_size_p50, Some(768.0));
        assert_eq!(a.compress_ratio, Some(0.25));
        assert_eq!(a.msg_rate, Some(1.0));
        let mut other = p.context.clone();
        other.client_class = ClientClass::Device;
        assert_eq!(agg.get(&other).n, 0);
    }
}
