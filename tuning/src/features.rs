//! The feature encoder: a [`ConnectionContext`] plus aggregates of *earlier* profiles → a
//! fixed-length `f32` vector. The trainer and the optimizer both call [`encode`], so training
//! and serving cannot disagree on a feature; the schema hash in every model's metadata proves
//! which encoder a model was trained with.

use serde::{Deserialize, Serialize};

use crate::context::{ClientClass, ConnectionContext, Protocol};
use crate::hash::{stable_hash, unit};

/// Version tag mixed into the schema hash; bump it when the meaning of a feature changes.
/// (The number of earlier profiles is deliberately not a feature: it grows without bound, so
/// its value at serving time is never one the trees saw in training.)
pub const SCHEMA_VERSION: &str = "trimtab-features-v2";
/// Number of one-hot buckets the service name is hashed into.
pub const SERVICE_BUCKETS: usize = 16;
/// Value of an aggregate that is unknown (no earlier profiles).
pub const MISSING: f32 = -1.0;

/// Aggregates of earlier profiles for the same service / route / client class.
/// Each is optional: a new service has none. Never computed from the connection being decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ContextAggregates {
    /// Number of earlier profiles these aggregates summarise.
    pub n: u64,
    /// Median message size, bytes.
    pub msg_size_p50: Option<f64>,
    /// 95th percentile message size, bytes.
    pub msg_size_p95: Option<f64>,
    /// Messages per second, both directions.
    pub msg_rate: Option<f64>,
    /// 95th percentile inter-message gap, milliseconds.
    pub gap_p95_ms: Option<f64>,
    /// Sampled deflate output / input (1.0 = incompressible).
    pub compress_ratio: Option<f64>,
    /// Median ping RTT, microseconds.
    pub rtt_p50_us: Option<f64>,
    /// Median connection duration, seconds.
    pub duration_p50_s: Option<f64>,
    /// Share of connections that ended abnormally (1006, 1011, errors).
    pub abnormal_close_share: Option<f64>,
}

/// The names of the features, in vector order.
pub fn feature_names() -> Vec<String> {
    let mut v: Vec<String> = Protocol::ALL
        .iter()
        .map(|p| format!("proto_{}", p.as_str()))
        .collect();
    v.push("has_subprotocol".into());
    v.push("offers_deflate".into());
    v.extend(
        ClientClass::ALL
            .iter()
            .map(|c| format!("class_{}", c.as_str())),
    );
    v.extend(["how_sin", "how_cos", "hour_of_day", "is_weekend"].map(String::from));
    v.extend((0..SERVICE_BUCKETS).map(|i| format!("service_bucket_{i}")));
    v.extend(["route_hash", "region_hash"].map(String::from));
    v.extend(
        [
            "agg_msg_size_p50_log2",
            "agg_msg_size_p95_log2",
            "agg_msg_rate_log2",
            "agg_gap_p95_ms_log2",
            "agg_compress_ratio",
            "agg_rtt_p50_us_log2",
            "agg_duration_p50_s_log2",
            "agg_abnormal_close_share",
        ]
        .map(String::from),
    );
    v
}

/// Length of every feature vector.
pub fn feature_len() -> usize {
    feature_names().len()
}

/// The schema hash: changes whenever a feature is added, removed, reordered or redefined.
pub fn schema_hash() -> String {
    let names = feature_names().join(",");
    format!(
        "{:016x}",
        stable_hash(&[SCHEMA_VERSION.as_bytes(), names.as_bytes()])
    )
}

fn log2p(v: Option<f64>) -> f32 {
    match v {
        Some(x) if x.is_finite() && x >= 0.0 => (x + 1.0).log2() as f32,
        _ => MISSING,
    }
}

fn raw(v: Option<f64>) -> f32 {
    match v {
        Some(x) if x.is_finite() => x as f32,
        _ => MISSING,
    }
}

/// Encode a context and its aggregates. The output has [`feature_len`] entries.
pub fn encode(ctx: &ConnectionContext, agg: &ContextAggregates) -> Vec<f32> {
    let mut v = Vec::with_capacity(feature_len());
    v.extend(
        Protocol::ALL
            .iter()
            .map(|p| f32::from(u8::from(*p == ctx.protocol))),
    );
    v.push(f32::from(u8::from(ctx.subprotocol.is_some())));
    v.push(f32::from(u8::from(ctx.offers_deflate)));
    v.extend(
        ClientClass::ALL
            .iter()
            .map(|c| f32::from(u8::from(*c == ctx.client_class))),
    );
    let how = f32::from(ctx.hour_of_week % 168);
    let angle = how / 168.0 * std::f32::consts::TAU;
    v.push(angle.sin());
    v.push(angle.cos());
    v.push(f32::from(ctx.hour_of_week % 24));
    v.push(f32::from(u8::from(ctx.hour_of_week >= 5 * 24)));
    let bucket = (stable_hash(&[ctx.service.as_bytes()]) % SERVICE_BUCKETS as u64) as usize;
    v.extend((0..SERVICE_BUCKETS).map(|i| f32::from(u8::from(i == bucket))));
    v.push(unit(stable_hash(&[ctx.service.as_bytes(), ctx.route.as_bytes()])) as f32);
    v.push(unit(stable_hash(&[ctx.client_region.as_bytes()])) as f32);
    v.push(log2p(agg.msg_size_p50));
    v.push(log2p(agg.msg_size_p95));
    v.push(log2p(agg.msg_rate));
    v.push(log2p(agg.gap_p95_ms));
    v.push(raw(agg.compress_ratio));
    v.push(log2p(agg.rtt_p50_us));
    v.push(log2p(agg.duration_p50_s));
    v.push(raw(agg.abnormal_close_share));
    debug_assert_eq!(v.len(), feature_len());
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ConnectionContext {
        ConnectionContext {
            service: "chat".into(),
            route: "/ws".into(),
            protocol: Protocol::Websocket,
            subprotocol: Some("chat.v1".into()),
            offers_deflate: true,
            client_class: ClientClass::Browser,
            client_region: "eu".into(),
            hour_of_week: 130,
            client_key: Some("user-1".into()),
        }
    }

    #[test]
    fn vector_has_schema_length_and_one_hots() {
        let v = encode(&ctx(), &ContextAggregates::default());
        let names = feature_names();
        assert_eq!(v.len(), names.len());
        let at = |n: &str| v[names.iter().position(|x| x == n).unwrap()];
        assert_eq!(at("proto_websocket"), 1.0);
        assert_eq!(at("proto_http"), 0.0);
        assert_eq!(at("offers_deflate"), 1.0);
        assert_eq!(at("class_browser"), 1.0);
        assert_eq!(at("is_weekend"), 1.0);
        assert_eq!(at("hour_of_day"), 10.0);
        assert_eq!(at("agg_msg_size_p50_log2"), MISSING);
        let service_hot: f32 = names
            .iter()
            .zip(&v)
            .filter(|(n, _)| n.starts_with("service_bucket_"))
            .map(|(_, x)| *x)
            .sum();
        assert_eq!(service_hot, 1.0);
    }

    #[test]
    fn aggregates_are_log_scaled() {
        let agg = ContextAggregates {
            n: 10,
            msg_size_p50: Some(1023.0),
            compress_ratio: Some(0.25),
            ..ContextAggregates::default()
        };
        let v = encode(&ctx(), &agg);
        let names = feature_names();
        let at = |n: &str| v[names.iter().position(|x| x == n).unwrap()];
        assert_eq!(at("agg_msg_size_p50_log2"), 10.0);
        assert_eq!(at("agg_compress_ratio"), 0.25);
    }

    #[test]
    fn client_key_does_not_change_features() {
        let mut other = ctx();
        other.client_key = Some("user-2".into());
        let agg = ContextAggregates::default();
        assert_eq!(encode(&ctx(), &agg), encode(&other, &agg));
    }

    #[test]
    fn schema_hash_is_stable_and_hex() {
        let h = schema_hash();
        assert_eq!(h.len(), 16);
        assert_eq!(h, schema_hash());
    }
}
