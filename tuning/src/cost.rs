//! The replay cost model and the hindsight labels it defines.
//!
//! Most of what makes a setting right is a property of the traffic, which a profile records
//! whatever settings were in force: message sizes, gaps, bytes, compressibility, how the
//! connection ended. Replaying a profile under each grid value of one target (the other settings
//! fixed) gives that value's cost. The [`oracle`] is the cheapest combination, found one target at
//! a time from the settings the connection ran with until none changes; each target's **label**
//! is its value there. Costs are in one
//! unit, *CPU-microsecond equivalents*, with every weight in [`CostWeights`] (the trainer's
//! config can change them; the defaults are documented beside each field):
//!
//! | target | terms |
//! |---|---|
//! | `buffer_size` | read syscalls (`⌈size / buffer⌉` per message) + buffer memory-time (pooled: only while a message is in flight; held for the whole connection when compression runs, under tungstenite) |
//! | `ping_interval` | pings sent (two legs) + dead-peer detection delay (3 intervals or the idle timeout, whichever is sooner; "off" = the idle timeout) for connections whose peer died |
//! | `idle_timeout` | a premature close (a gap longer than the timeout: the client must reconnect) + memory held by a connection whose peer vanished (until the timeout) |
//! | `compression` | deflate CPU per byte + deflate context memory-time, against bytes saved on the wire (sampled ratio, server → client); nothing for a client that offered no permessage-deflate |
//! | `mode` | per-message parsing of `frame_aware`, which compression requires (and with it held buffers) |
//!
//! Censoring: when our own idle timeout closed a connection, its real idle gap is unknown beyond
//! that timeout; every longer timeout is then scored as if the gap had ended right after it
//! (no premature close) and the timeout used as premature. Labels of such rows lean long, never
//! short. Not so for a peer that died or vanished (`dead_peer`: it missed its pongs, or never
//! answered the idle close; or its stream ended with no close frame, or failed): the silence
//! that ended it was no gap of a live client, so a timeout is premature only if it is shorter
//! than the largest gap between its messages (from the gap histogram).

use serde::{Deserialize, Serialize};

use crate::profile::{HIST_BUCKETS, Hist, Profile};
use crate::settings::{
    BUFFER_SIZES, IDLE_TIMEOUTS, MISSED_PONGS_FOR_DEAD_PEER, Mode, PING_INTERVALS, Settings, Target,
};

/// Weights of the cost terms, in CPU-microsecond equivalents.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CostWeights {
    /// One read/copy syscall (default 1.5 µs).
    pub syscall: f64,
    /// One KiB of memory held for one second (default 0.5).
    pub kib_second: f64,
    /// One proxy-originated ping and its pong on one leg (default 4).
    pub ping: f64,
    /// One second a dead peer goes undetected (default 2000: resources and a stale client).
    pub dead_peer_second: f64,
    /// One premature close: a reconnect, a handshake, a user-visible hiccup (default 200 000).
    pub premature_close: f64,
    /// Deflating one KiB (default 20: zlib at level 6 runs at roughly 50 MB/s per core).
    pub deflate_kib: f64,
    /// Sending one KiB to a client (default 100: egress price and the client's time on slow
    /// links both make a KiB on the wire worth far more than a microsecond of CPU).
    pub wire_kib: f64,
    /// Deflate context memory per connection, KiB (default 64).
    pub deflate_context_kib: f64,
    /// Parsing one message in `frame_aware` (default 1).
    pub frame_message: f64,
}

impl Default for CostWeights {
    fn default() -> Self {
        CostWeights {
            syscall: 1.5,
            kib_second: 0.5,
            ping: 4.0,
            dead_peer_second: 2000.0,
            premature_close: 200_000.0,
            deflate_kib: 20.0,
            wire_kib: 100.0,
            deflate_context_kib: 64.0,
            frame_message: 1.0,
        }
    }
}

/// A representative value of histogram bucket `i` (its midpoint; 0 for bucket 0).
fn bucket_mid(i: usize) -> f64 {
    if i == 0 {
        0.0
    } else {
        let lo = (1u64 << (i - 1)) as f64;
        let hi = if i == HIST_BUCKETS - 1 {
            lo * 2.0
        } else {
            (1u64 << i) as f64
        };
        (lo + hi) / 2.0
    }
}

fn reads_for(h: &Hist, buffer: u32) -> f64 {
    h.0.iter()
        .enumerate()
        .map(|(i, c)| *c as f64 * (bucket_mid(i) / f64::from(buffer)).ceil().max(1.0))
        .sum()
}

fn seconds(p: &Profile) -> f64 {
    p.duration_us as f64 / 1e6
}

fn abnormal(p: &Profile) -> bool {
    p.dead_peer
        || matches!(p.close_code, Some(1006))
        || p.error_class
            .as_deref()
            .is_some_and(|e| e.ends_with("_dead") || e.ends_with("_io") || e.ends_with("_gone"))
}

/// Sampled compressed/raw ratio of the server → client direction, if sampled.
pub fn compress_ratio(p: &Profile) -> Option<f64> {
    let d = &p.upstream_to_client;
    (d.sampled_in > 0).then(|| d.sampled_out as f64 / d.sampled_in as f64)
}

/// The replay cost of `p` had it run with `s`, term by term (each in CPU-µs equivalents).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CostTerms {
    /// Buffer memory held over time (KiB·s × weight).
    pub buffer_memory: f64,
    /// Read syscalls, pings, deflate and per-message parsing: the proxy's CPU.
    pub cpu: f64,
    /// Bytes on the wire (both directions, after compression toward the client).
    pub wire: f64,
    /// How long a dead peer went undetected, and the memory it held until then.
    pub dead_peer_delay: f64,
    /// A premature idle close (a gap longer than the idle timeout).
    pub premature_close: f64,
}

impl CostTerms {
    /// The composite cost: the sum of the terms.
    pub fn total(&self) -> f64 {
        self.buffer_memory + self.cpu + self.wire + self.dead_peer_delay + self.premature_close
    }

    /// Term-wise sum.
    pub fn add(&mut self, o: &CostTerms) {
        self.buffer_memory += o.buffer_memory;
        self.cpu += o.cpu;
        self.wire += o.wire;
        self.dead_peer_delay += o.dead_peer_delay;
        self.premature_close += o.premature_close;
    }
}

/// The replay cost of `p` had it run with `s`.
pub fn replay_cost(p: &Profile, s: &Settings, w: &CostWeights) -> f64 {
    cost_terms(p, s, w).total()
}

/// [`replay_cost`], term by term.
pub fn cost_terms(p: &Profile, s: &Settings, w: &CostWeights) -> CostTerms {
    let mut t = CostTerms::default();
    let secs = seconds(p);
    let dirs = [&p.client_to_upstream, &p.upstream_to_client];
    let messages: f64 = dirs.iter().map(|d| d.messages as f64).sum();
    let bytes: f64 = dirs.iter().map(|d| d.bytes as f64).sum();
    // buffer_size: syscalls and memory
    let reads: f64 = dirs
        .iter()
        .map(|d| reads_for(&d.msg_sizes, s.buffer_size))
        .sum();
    let kib = f64::from(s.buffer_size) / 1024.0;
    let compressing = s.compression && p.context.offers_deflate;
    let held_s = if s.mode == Mode::FrameAware && compressing {
        // deflate runs under tungstenite: its read and write buffers on both legs for the
        // whole connection
        4.0 * secs
    } else {
        // pooled (`zero_copy`, and `frame_aware` between two sockets): a buffer per direction
        // only while a message is in flight (~50 µs each)
        messages * 50e-6
    };
    t.cpu += reads * w.syscall;
    t.buffer_memory += kib * held_s * w.kib_second;
    // ping_interval: pings, and how long a dead peer stays undetected
    if s.ping_interval > 0 {
        t.cpu += 2.0 * (secs / f64::from(s.ping_interval)).floor() * w.ping;
    }
    if abnormal(p) {
        // A dead peer's connection goes silent, so the idle timeout finds it too: pings only
        // help when three intervals are shorter.
        let detect = if s.ping_interval > 0 {
            f64::from((s.ping_interval * MISSED_PONGS_FOR_DEAD_PEER).min(s.idle_timeout))
        } else {
            f64::from(s.idle_timeout)
        };
        t.dead_peer_delay += detect * w.dead_peer_second;
    }
    // idle_timeout: premature closes, and memory held by a vanished peer
    let gap_s = if abnormal(p) {
        // The silence before a peer died or vanished is no gap a live peer left: the largest
        // gap between messages (its histogram bucket's midpoint), without the tail.
        dirs.iter()
            .filter_map(|d| d.gaps_ms.0.iter().rposition(|c| *c > 0))
            .map(bucket_mid)
            .fold(0.0, f64::max)
            / 1e3
    } else {
        p.client_to_upstream
            .max_gap_ms
            .max(p.upstream_to_client.max_gap_ms) as f64
            / 1e3
    };
    let used = p.decision.settings.idle_timeout;
    // A dead peer's connection closed by the idle timeout is not censored: its peer was gone.
    let premature = if p.idle_timeout_fired && !abnormal(p) {
        // censored: the gap was at least `used`
        s.idle_timeout <= used
    } else {
        gap_s > f64::from(s.idle_timeout)
    };
    if premature {
        t.premature_close += w.premature_close;
    }
    if p.dead_peer {
        t.dead_peer_delay += f64::from(s.idle_timeout) * 8.0 * w.kib_second;
    }
    // compression: CPU and context memory against wire bytes saved (server -> client); only
    // for a client that offered permessage-deflate — for any other the data plane cannot
    // compress, and `compression = true` runs as plain `frame_aware`.
    let out_kib = p.upstream_to_client.bytes as f64 / 1024.0;
    let all_kib = bytes / 1024.0;
    let wire_kib = if compressing {
        let ratio = compress_ratio(p).unwrap_or(1.0).min(1.0);
        t.cpu += out_kib * w.deflate_kib;
        t.buffer_memory += w.deflate_context_kib * secs * w.kib_second;
        all_kib - out_kib + out_kib * ratio
    } else {
        all_kib
    };
    t.wire += wire_kib * w.wire_kib;
    // mode: parsing every message in frame_aware
    if s.mode == Mode::FrameAware {
        t.cpu += messages * w.frame_message;
    }
    t
}

/// The cheapest class of one target, the other settings as in `base` (compression and mode are
/// judged together: compression needs `frame_aware`); ties go to the first class.
fn cheapest(p: &Profile, target: Target, base: Settings, w: &CostWeights) -> Settings {
    let candidates: Vec<Settings> = match target {
        Target::BufferSize => BUFFER_SIZES
            .iter()
            .map(|b| Settings {
                buffer_size: *b,
                ..base
            })
            .collect(),
        Target::PingInterval => PING_INTERVALS
            .iter()
            .map(|v| Settings {
                ping_interval: *v,
                ..base
            })
            .collect(),
        Target::IdleTimeout => IDLE_TIMEOUTS
            .iter()
            .map(|v| Settings {
                idle_timeout: *v,
                ..base
            })
            .collect(),
        Target::Compression | Target::Mode => vec![
            Settings {
                compression: false,
                mode: Mode::ZeroCopy,
                ..base
            },
            Settings {
                compression: false,
                mode: Mode::FrameAware,
                ..base
            },
            Settings {
                compression: true,
                mode: Mode::FrameAware,
                ..base
            },
        ],
    };
    candidates
        .iter()
        .map(|c| (replay_cost(p, c, w), *c))
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map_or(base, |(_, c)| c)
}

/// The hindsight label of one target: its class in the [`oracle`].
pub fn label(p: &Profile, target: Target, w: &CostWeights) -> usize {
    target.class_of(&oracle(p, w))
}

/// The cheapest settings for a profile in hindsight, every target together: from the settings
/// the connection ran with, each target in turn takes its cheapest class given the others, until
/// none changes. The targets interact — whether pings find a dead peer sooner depends on the
/// idle timeout, which a silent dead connection also runs into — so each label is its target's
/// value in this joint choice, not its best with the others as they happened to be.
pub fn oracle(p: &Profile, w: &CostWeights) -> Settings {
    let mut s = p.decision.settings;
    // Each pass lowers the cost or stops; a few passes settle (two in practice).
    for _ in 0..6 {
        let before = s;
        for t in Target::ALL {
            s = cheapest(p, t, s, w);
        }
        if s == before {
            break;
        }
    }
    s.clamp().0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DirectionStats;

    fn profile(secs: u64, f: impl FnOnce(&mut Profile)) -> Profile {
        let mut p = crate::profile::test_profile();
        p.context.offers_deflate = true;
        p.duration_us = secs * 1_000_000;
        f(&mut p);
        p
    }

    fn traffic(d: &mut DirectionStats, n: u64, size: u64) {
        d.messages += n;
        d.bytes += n * size;
        for _ in 0..n {
            d.msg_sizes.record(size);
        }
    }

    const W: CostWeights = CostWeights {
        syscall: 1.5,
        kib_second: 0.5,
        ping: 4.0,
        dead_peer_second: 2000.0,
        premature_close: 200_000.0,
        deflate_kib: 20.0,
        wire_kib: 100.0,
        deflate_context_kib: 64.0,
        frame_message: 1.0,
    };

    #[test]
    fn bulk_transfer_wants_big_buffers() {
        let p = profile(60, |p| traffic(&mut p.upstream_to_client, 2000, 200_000));
        assert_eq!(BUFFER_SIZES[label(&p, Target::BufferSize, &W)], 256 << 10);
    }

    #[test]
    fn small_chatty_messages_want_small_buffers() {
        let p = profile(600, |p| {
            traffic(&mut p.client_to_upstream, 500, 200);
            traffic(&mut p.upstream_to_client, 500, 300);
        });
        assert_eq!(BUFFER_SIZES[label(&p, Target::BufferSize, &W)], 4 << 10);
    }

    #[test]
    fn long_idle_gaps_want_a_longer_timeout_than_the_gap() {
        let p = profile(1800, |p| {
            traffic(&mut p.client_to_upstream, 10, 100);
            p.client_to_upstream.max_gap_ms = 200_000; // 200 s
        });
        assert_eq!(IDLE_TIMEOUTS[label(&p, Target::IdleTimeout, &W)], 300);
        let short = profile(100, |p| {
            traffic(&mut p.client_to_upstream, 100, 100);
            p.client_to_upstream.max_gap_ms = 5_000;
            p.dead_peer = true; // a vanished client: shorter is cheaper
        });
        assert_eq!(IDLE_TIMEOUTS[label(&short, Target::IdleTimeout, &W)], 30);
    }

    #[test]
    fn a_dead_peer_the_idle_timeout_found_is_not_censored() {
        // A device that sent every 45 s, then went silent: the 120 s timeout closed it and it
        // never answered the close.
        let dead = profile(400, |p| {
            traffic(&mut p.client_to_upstream, 6, 20);
            for _ in 0..5 {
                p.client_to_upstream.gaps_ms.record(45_000);
            }
            p.client_to_upstream.max_gap_ms = 120_000; // the silence before the close
            p.decision.settings.idle_timeout = 120;
            p.decision.settings.ping_interval = 0;
            p.idle_timeout_fired = true;
            p.dead_peer = true;
        });
        // The shortest timeout above its gaps, and pings that find it sooner still.
        let best = oracle(&dead, &W);
        assert_eq!((best.idle_timeout, best.ping_interval), (60, 15));
        // The same profile from a live client (it answered the close) is censored: longer.
        let live = Profile {
            dead_peer: false,
            ..dead.clone()
        };
        assert!(oracle(&live, &W).idle_timeout > 120);
        // A device whose stream ended with no close frame after 200 s of silence: that silence
        // is no gap of a live client either (before, it labelled the timeout 300 s).
        let gone = profile(400, |p| {
            traffic(&mut p.client_to_upstream, 6, 20);
            for _ in 0..5 {
                p.client_to_upstream.gaps_ms.record(45_000);
            }
            p.client_to_upstream.max_gap_ms = 200_000;
            p.close_code = Some(1006);
            p.error_class = Some("client_gone".into());
        });
        assert_eq!(oracle(&gone, &W).idle_timeout, 60);
    }

    #[test]
    fn a_censored_idle_close_labels_longer_than_the_timeout_used() {
        let p = profile(400, |p| {
            traffic(&mut p.client_to_upstream, 3, 100);
            p.idle_timeout_fired = true;
            p.decision.settings.idle_timeout = 300;
            p.client_to_upstream.max_gap_ms = 300_000;
        });
        assert_eq!(IDLE_TIMEOUTS[label(&p, Target::IdleTimeout, &W)], 900);
    }

    #[test]
    fn compressible_traffic_wants_compression_and_frame_aware() {
        let p = profile(300, |p| {
            traffic(&mut p.upstream_to_client, 3000, 4000);
            p.upstream_to_client.sampled_in = 40_000;
            p.upstream_to_client.sampled_out = 6_000;
        });
        let s = oracle(&p, &W);
        assert!(s.compression);
        assert_eq!(s.mode, Mode::FrameAware);
        let incompressible = profile(300, |p| {
            traffic(&mut p.upstream_to_client, 3000, 4000);
            p.upstream_to_client.sampled_in = 40_000;
            p.upstream_to_client.sampled_out = 39_500;
        });
        let s = oracle(&incompressible, &W);
        assert!(!s.compression);
        assert_eq!(s.mode, Mode::ZeroCopy);
        // The same compressible traffic from a client that offered no deflate: nothing to gain.
        let mut not_offered = p.clone();
        not_offered.context.offers_deflate = false;
        let s = oracle(&not_offered, &W);
        assert!(!s.compression);
        assert_eq!(s.mode, Mode::ZeroCopy);
    }

    #[test]
    fn pings_pay_only_when_peers_die() {
        let healthy = profile(3600, |p| traffic(&mut p.client_to_upstream, 100, 100));
        assert_eq!(PING_INTERVALS[label(&healthy, Target::PingInterval, &W)], 0);
        // A peer that dies on a connection whose idle gaps need a long idle timeout: pings find
        // it in 45 s instead of 300.
        let dying = profile(3600, |p| {
            traffic(&mut p.client_to_upstream, 100, 100);
            // a dead peer's gaps are read from the histogram (the largest gap is the silence)
            p.client_to_upstream.gaps_ms.record(200_000);
            p.client_to_upstream.max_gap_ms = 200_000;
            p.dead_peer = true;
        });
        assert_eq!(PING_INTERVALS[label(&dying, Target::PingInterval, &W)], 15);
        assert_eq!(IDLE_TIMEOUTS[label(&dying, Target::IdleTimeout, &W)], 300);
        // With short gaps the labels are judged together: a 30 s idle timeout finds the dead
        // peer first, so pings only cost (one target at a time, from the 300 s timeout it ran
        // with, would have labelled pings 15 and the timeout 30: a pair that pays for pings the
        // timeout makes useless).
        let short_gaps = profile(3600, |p| {
            traffic(&mut p.client_to_upstream, 100, 100);
            p.decision.settings.idle_timeout = 300;
            p.dead_peer = true;
        });
        let o = oracle(&short_gaps, &W);
        assert_eq!((o.ping_interval, o.idle_timeout), (0, 30));
        // Under a 30 s idle timeout, which finds the silent dead peer before three 15 s
        // intervals pass, pings only cost: the delay is the timeout's either way.
        let with = |ping_interval, idle_timeout| {
            let s = Settings {
                ping_interval,
                idle_timeout,
                ..dying.decision.settings
            };
            cost_terms(&dying, &s, &W).dead_peer_delay
        };
        assert_eq!(with(15, 30), with(0, 30));
        assert!(with(15, 300) < with(0, 300));
    }

    #[test]
    fn oracle_settings_are_valid() {
        let p = profile(10, |p| traffic(&mut p.client_to_upstream, 5, 50));
        assert_eq!(oracle(&p, &W).validate(), Ok(()));
        assert_eq!(CostWeights::default(), W);
    }
}
