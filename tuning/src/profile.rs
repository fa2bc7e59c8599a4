//! The profile: one row per connection, written when it closes. The trainer learns from these,
//! the rollout gates compare them, operators query them.
//!
//! Statistics are fixed-size (log2 histograms, min/max) so the data plane updates them without
//! allocating per message.

use serde::{Deserialize, Serialize};

use crate::context::ConnectionContext;
use crate::decision::Decision;

/// Number of buckets of every histogram.
pub const HIST_BUCKETS: usize = 24;

/// A log2 histogram: bucket 0 counts zeros, bucket `i` counts values in `[2^(i-1), 2^i)`, the
/// last bucket everything from `2^(HIST_BUCKETS-2)` up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Hist(pub [u64; HIST_BUCKETS]);

impl Hist {
    /// The bucket a value falls in.
    #[inline]
    pub fn bucket(v: u64) -> usize {
        ((u64::BITS - v.leading_zeros()) as usize).min(HIST_BUCKETS - 1)
    }

    /// Count one value.
    #[inline]
    pub fn record(&mut self, v: u64) {
        self.0[Self::bucket(v)] += 1;
    }

    /// Total count.
    pub fn count(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The upper bound of the bucket holding quantile `q` (0–1), or `None` when empty.
    pub fn quantile_upper(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in self.0.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(if i == 0 { 0 } else { (1u64 << i) - 1 });
            }
        }
        None
    }

    /// The histogram as a vector, for SQL arrays.
    pub fn to_vec(&self) -> Vec<i64> {
        self.0.iter().map(|c| *c as i64).collect()
    }

    /// Rebuild from a SQL array (missing buckets are zero, extra ones are added to the last).
    pub fn from_slice(v: &[i64]) -> Hist {
        let mut h = Hist::default();
        for (i, c) in v.iter().enumerate() {
            h.0[i.min(HIST_BUCKETS - 1)] += (*c).max(0) as u64;
        }
        h
    }
}

/// Traffic statistics for one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DirectionStats {
    /// Payload-carrying bytes forwarded (frame headers included in `zero_copy`).
    pub bytes: u64,
    /// Complete data messages (WebSocket text/binary, reassembled).
    pub messages: u64,
    /// Message sizes, bytes.
    pub msg_sizes: Hist,
    /// Sizes of the reads that carried them, bytes.
    pub read_sizes: Hist,
    /// Gaps between consecutive messages, milliseconds.
    pub gaps_ms: Hist,
    /// Longest gap without a message, milliseconds.
    pub max_gap_ms: u64,
    /// Bytes of the sampled messages fed to deflate.
    pub sampled_in: u64,
    /// Bytes deflate produced for them.
    pub sampled_out: u64,
    /// Time from the upgrade to the first message, microseconds.
    pub first_message_us: Option<u64>,
}

/// Ping round trips observed by the proxy on one leg.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PingStats {
    /// Pings sent.
    pub sent: u64,
    /// Pongs received in answer.
    pub answered: u64,
    /// Pings that got no pong in time.
    pub missed: u64,
    /// RTT minimum, microseconds.
    pub rtt_min_us: Option<u64>,
    /// RTT median (bucket upper bound), microseconds.
    pub rtt_p50_us: Option<u64>,
    /// RTT 99th percentile (bucket upper bound), microseconds.
    pub rtt_p99_us: Option<u64>,
    /// RTT maximum, microseconds.
    pub rtt_max_us: Option<u64>,
}

/// Who ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClosedBy {
    /// The client closed (or went away).
    Client,
    /// The upstream closed (or went away).
    Upstream,
    /// The proxy closed: idle timeout, dead peer, shutdown, limits.
    Proxy,
}

impl ClosedBy {
    /// The name used in JSON, SQL and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ClosedBy::Client => "client",
            ClosedBy::Upstream => "upstream",
            ClosedBy::Proxy => "proxy",
        }
    }
}

/// Timings of the connection's set-up, microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Timings {
    /// Upstream name resolution.
    pub dns_us: Option<u64>,
    /// Upstream TCP connect.
    pub connect_us: Option<u64>,
    /// Upstream TLS handshake, when used.
    pub tls_us: Option<u64>,
    /// From the client's request head to the 101 sent back.
    pub upgrade_us: Option<u64>,
}

/// One connection, summarised.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Unique per connection; the key that makes spool replays idempotent.
    pub connection_id: uuid::Uuid,
    /// Which data plane carried it.
    pub dataplane_id: String,
    /// When the connection was accepted.
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// How long it lived, microseconds.
    pub duration_us: u64,
    /// Decision-time context.
    pub context: ConnectionContext,
    /// The decision applied (its settings are the settings used).
    pub decision: Decision,
    /// Set-up timings.
    pub timings: Timings,
    /// Client → upstream.
    pub client_to_upstream: DirectionStats,
    /// Upstream → client.
    pub upstream_to_client: DirectionStats,
    /// Pings toward the client.
    pub ping_client: PingStats,
    /// Pings toward the upstream.
    pub ping_upstream: PingStats,
    /// Total time reads were paused by backpressure, milliseconds.
    pub paused_ms: u64,
    /// Most bytes held in the proxy for this connection at once.
    pub peak_buffered_bytes: u64,
    /// Who ended it.
    pub closed_by: ClosedBy,
    /// WebSocket close code, when there was one.
    pub close_code: Option<u16>,
    /// WebSocket close reason, when there was one.
    pub close_reason: Option<String>,
    /// Error class when it ended with an error (e.g. `upstream_connect`, `client_reset`).
    pub error_class: Option<String>,
    /// A peer was declared dead: it missed enough pongs (or keepalive probes), or a WebSocket
    /// client never answered the proxy's idle-timeout close.
    pub dead_peer: bool,
    /// Our idle timeout closed it (the idle-time label is censored).
    pub idle_timeout_fired: bool,
}

impl Profile {
    /// A profile of a connection that carried nothing yet (started now, closed by the client
    /// with 1000); fill in the rest.
    pub fn new(context: ConnectionContext, decision: Decision) -> Profile {
        Profile {
            connection_id: uuid::Uuid::nil(),
            dataplane_id: String::new(),
            started_at: chrono::Utc::now(),
            duration_us: 0,
            context,
            decision,
            timings: Timings::default(),
            client_to_upstream: DirectionStats::default(),
            upstream_to_client: DirectionStats::default(),
            ping_client: PingStats::default(),
            ping_upstream: PingStats::default(),
            paused_ms: 0,
            peak_buffered_bytes: 0,
            closed_by: ClosedBy::Client,
            close_code: Some(1000),
            close_reason: None,
            error_class: None,
            dead_peer: false,
            idle_timeout_fired: false,
        }
    }
}

/// A minimal profile for unit tests: a browser WebSocket to service `s`, one second long.
#[cfg(test)]
pub(crate) fn test_profile() -> Profile {
    use crate::{ClientClass, Protocol, Reason, Settings};
    let mut p = Profile::new(
        ConnectionContext {
            service: "s".into(),
            route: "/".into(),
            protocol: Protocol::Websocket,
            subprotocol: None,
            offers_deflate: false,
            client_class: ClientClass::Browser,
            client_region: "eu".into(),
            hour_of_week: 0,
            client_key: None,
        },
        Decision::fixed(Settings::default(), Reason::Default),
    );
    p.duration_us = 1_000_000;
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_log2() {
        assert_eq!(Hist::bucket(0), 0);
        assert_eq!(Hist::bucket(1), 1);
        assert_eq!(Hist::bucket(2), 2);
        assert_eq!(Hist::bucket(3), 2);
        assert_eq!(Hist::bucket(4), 3);
        assert_eq!(Hist::bucket(1023), 10);
        assert_eq!(Hist::bucket(1024), 11);
        assert_eq!(Hist::bucket(u64::MAX), HIST_BUCKETS - 1);
    }

    #[test]
    fn quantiles_use_bucket_upper_bounds() {
        let mut h = Hist::default();
        assert_eq!(h.quantile_upper(0.5), None);
        for _ in 0..90 {
            h.record(100); // bucket 7: [64, 128)
        }
        for _ in 0..10 {
            h.record(5000); // bucket 13: [4096, 8192)
        }
        assert_eq!(h.count(), 100);
        assert_eq!(h.quantile_upper(0.5), Some(127));
        assert_eq!(h.quantile_upper(0.95), Some(8191));
        assert_eq!(Hist::from_slice(&h.to_vec()), h);
    }
}
