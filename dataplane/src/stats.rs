//! Cheap fixed-size per-connection statistics, updated on the data path without allocating.

use std::time::Instant;

use tuning::DirectionStats;
use tuning::profile::{HIST_BUCKETS, Hist};

/// Distinct buckets a histogram keeps inline before it moves to the heap.
const FEW: usize = 7;

/// A histogram with the profile's buckets and 32-bit counts, held by every live connection
/// (three per direction). While it has seen at most [`FEW`] distinct buckets (an idle
/// connection's, and most connections' sizes) the buckets and counts are kept inline in 40
/// bytes; beyond that, all buckets move to the heap. The full array inline was 96 bytes, six of
/// them per connection.
#[derive(Debug, Clone)]
pub(crate) enum Counts {
    Few {
        buckets: [u8; FEW],
        len: u8,
        counts: [u32; FEW],
    },
    All(Box<[u32; HIST_BUCKETS]>),
}

impl Counts {
    pub(crate) const fn new() -> Counts {
        Counts::Few {
            buckets: [0; FEW],
            len: 0,
            counts: [0; FEW],
        }
    }

    #[inline]
    pub(crate) fn record(&mut self, v: u64) {
        let b = Hist::bucket(v);
        match self {
            Counts::All(all) => all[b] = all[b].saturating_add(1),
            Counts::Few {
                buckets,
                len,
                counts,
            } => {
                let n = usize::from(*len);
                if let Some(i) = buckets[..n].iter().position(|x| usize::from(*x) == b) {
                    counts[i] = counts[i].saturating_add(1);
                } else if n < FEW {
                    buckets[n] = b as u8;
                    counts[n] = 1;
                    *len += 1;
                } else {
                    let mut all = Box::new([0u32; HIST_BUCKETS]);
                    for (k, c) in buckets.iter().zip(counts.iter()) {
                        all[usize::from(*k)] = *c;
                    }
                    all[b] = 1;
                    *self = Counts::All(all);
                }
            }
        }
    }

    pub(crate) fn widen(&self) -> Hist {
        let mut h = [0u64; HIST_BUCKETS];
        match self {
            Counts::All(all) => {
                for (o, c) in h.iter_mut().zip(all.iter()) {
                    *o = u64::from(*c);
                }
            }
            Counts::Few {
                buckets,
                len,
                counts,
            } => {
                let n = usize::from(*len);
                for (k, c) in buckets[..n].iter().zip(&counts[..n]) {
                    h[usize::from(*k)] = u64::from(*c);
                }
            }
        }
        Hist(h)
    }
}

/// Statistics of one direction while the connection lives.
#[derive(Debug, Clone)]
pub struct DirStats {
    /// Bytes read.
    pub bytes: u64,
    /// Complete messages.
    pub messages: u64,
    msg_sizes: Counts,
    read_sizes: Counts,
    gaps_ms: Counts,
    max_gap_ms: u64,
    sampled_in: u64,
    sampled_out: u64,
    /// Microseconds from `origin` to the first complete message ([`NONE`]: none yet).
    first_message_us: u64,
    /// Microseconds from `origin` to the last complete message ([`NONE`]: none yet).
    last_message_us: u64,
}

/// No message yet (the offsets above are kept as plain integers: 16 bytes less per direction
/// than two `Option`s).
const NONE: u64 = u64::MAX;

impl Default for DirStats {
    fn default() -> Self {
        DirStats::new()
    }
}

impl DirStats {
    /// Start counting. Times are given from the connection's origin (the moment it was
    /// upgraded), which the forwarder holds once for both directions.
    pub fn new() -> DirStats {
        DirStats {
            bytes: 0,
            messages: 0,
            msg_sizes: Counts::new(),
            read_sizes: Counts::new(),
            gaps_ms: Counts::new(),
            max_gap_ms: 0,
            sampled_in: 0,
            sampled_out: 0,
            first_message_us: NONE,
            last_message_us: NONE,
        }
    }

    /// Bytes arrived in one read.
    #[inline]
    pub fn on_read(&mut self, n: usize) {
        self.bytes += n as u64;
        self.read_sizes.record(n as u64);
    }

    /// A complete message of `size` bytes passed at `now`; `origin` as given to every call.
    #[inline]
    pub fn on_message(&mut self, size: u64, now: Instant, origin: Instant) {
        self.messages += 1;
        self.msg_sizes.record(size);
        let us = (now.saturating_duration_since(origin).as_micros() as u64).min(NONE - 1);
        if self.last_message_us == NONE {
            self.first_message_us = us;
            self.max_gap_ms = self.max_gap_ms.max(us / 1000);
        } else {
            let gap = us.saturating_sub(self.last_message_us) / 1000;
            self.gaps_ms.record(gap);
            self.max_gap_ms = self.max_gap_ms.max(gap);
        }
        self.last_message_us = us;
    }

    /// Bytes sampled for compressibility so far.
    pub fn sampled_in(&self) -> u64 {
        self.sampled_in
    }

    /// A sampled message: `raw` bytes deflated to `compressed`.
    pub fn on_sample(&mut self, raw: u64, compressed: u64) {
        self.sampled_in += raw;
        self.sampled_out += compressed;
    }

    /// Close the books at `end`: the trailing silence counts toward the longest gap.
    pub fn finish(self, end: Instant, origin: Instant) -> DirectionStats {
        let end_us = end.saturating_duration_since(origin).as_micros() as u64;
        let since = if self.last_message_us == NONE {
            0
        } else {
            self.last_message_us
        };
        let tail = end_us.saturating_sub(since) / 1000;
        DirectionStats {
            bytes: self.bytes,
            messages: self.messages,
            msg_sizes: self.msg_sizes.widen(),
            read_sizes: self.read_sizes.widen(),
            gaps_ms: self.gaps_ms.widen(),
            max_gap_ms: self.max_gap_ms.max(tail),
            sampled_in: self.sampled_in,
            sampled_out: self.sampled_out,
            first_message_us: (self.first_message_us != NONE).then_some(self.first_message_us),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn gaps_and_first_message_are_recorded() {
        let t0 = Instant::now();
        let mut d = DirStats::new();
        d.on_read(10);
        d.on_message(10, t0 + Duration::from_millis(5), t0);
        d.on_message(20, t0 + Duration::from_millis(105), t0);
        let s = d.finish(t0 + Duration::from_millis(1105), t0);
        assert_eq!(s.messages, 2);
        assert_eq!(s.bytes, 10);
        assert_eq!(s.first_message_us, Some(5000));
        assert_eq!(s.gaps_ms.count(), 1);
        assert_eq!(s.max_gap_ms, 1000);
    }

    /// Inline while few buckets are in use, on the heap beyond, and the same histogram either
    /// way as the profile's own.
    #[test]
    fn counts_move_to_the_heap_past_a_few_buckets_and_count_the_same() {
        assert!(std::mem::size_of::<Counts>() <= 40);
        let mut c = Counts::new();
        let mut h = Hist::default();
        let values = [0u64, 1, 1, 3, 100, 100, 5000, 1 << 20, 7, 7, 7];
        for (i, v) in values.iter().enumerate() {
            c.record(*v);
            h.record(*v);
            assert_eq!(c.widen().0, h.0, "after {} values", i + 1);
        }
        assert!(matches!(c, Counts::Few { len: 7, .. }));
        for v in [1u64 << 40, u64::MAX, 2, 1 << 30] {
            c.record(v);
            h.record(v);
        }
        assert!(matches!(c, Counts::All(_)));
        assert_eq!(c.widen().0, h.0);
    }
}
