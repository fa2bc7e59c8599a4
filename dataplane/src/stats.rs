//! Cheap fixed-size per-connection statistics, updated on the data path without allocating.

use std::time::Instant;

use tuning::DirectionStats;
use tuning::profile::{HIST_BUCKETS, Hist};

/// A histogram with the profile's buckets and 32-bit counts (half the size of [`Hist`]: it is
/// held by every live connection, three per direction).
#[derive(Debug, Clone, Copy)]
struct Counts([u32; HIST_BUCKETS]);

impl Counts {
    #[inline]
    fn record(&mut self, v: u64) {
        let b = &mut self.0[Hist::bucket(v)];
        *b = b.saturating_add(1);
    }

    fn widen(&self) -> Hist {
        Hist(self.0.map(u64::from))
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
    first_message_us: Option<u64>,
    origin: Instant,
    last_msg: Option<Instant>,
}

impl DirStats {
    /// Start counting; `origin` is the moment the connection was upgraded.
    pub fn new(origin: Instant) -> DirStats {
        let zero = Counts([0; HIST_BUCKETS]);
        DirStats {
            bytes: 0,
            messages: 0,
            msg_sizes: zero,
            read_sizes: zero,
            gaps_ms: zero,
            max_gap_ms: 0,
            sampled_in: 0,
            sampled_out: 0,
            first_message_us: None,
            origin,
            last_msg: None,
        }
    }

    /// Bytes arrived in one read.
    #[inline]
    pub fn on_read(&mut self, n: usize) {
        self.bytes += n as u64;
        self.read_sizes.record(n as u64);
    }

    /// A complete message of `size` bytes passed at `now`.
    #[inline]
    pub fn on_message(&mut self, size: u64, now: Instant) {
        self.messages += 1;
        self.msg_sizes.record(size);
        match self.last_msg {
            Some(l) => {
                let gap = now.saturating_duration_since(l).as_millis() as u64;
                self.gaps_ms.record(gap);
                self.max_gap_ms = self.max_gap_ms.max(gap);
            }
            None => {
                let us = now.saturating_duration_since(self.origin).as_micros() as u64;
                self.first_message_us = Some(us);
                self.max_gap_ms = self.max_gap_ms.max(us / 1000);
            }
        }
        self.last_msg = Some(now);
    }

    /// A sampled message: `raw` bytes deflated to `compressed`.
    pub fn on_sample(&mut self, raw: u64, compressed: u64) {
        self.sampled_in += raw;
        self.sampled_out += compressed;
    }

    /// Close the books at `end`: the trailing silence counts toward the longest gap.
    pub fn finish(self, end: Instant) -> DirectionStats {
        let since = self.last_msg.unwrap_or(self.origin);
        let tail = end.saturating_duration_since(since).as_millis() as u64;
        DirectionStats {
            bytes: self.bytes,
            messages: self.messages,
            msg_sizes: self.msg_sizes.widen(),
            read_sizes: self.read_sizes.widen(),
            gaps_ms: self.gaps_ms.widen(),
            max_gap_ms: self.max_gap_ms.max(tail),
            sampled_in: self.sampled_in,
            sampled_out: self.sampled_out,
            first_message_us: self.first_message_us,
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
        let mut d = DirStats::new(t0);
        d.on_read(10);
        d.on_message(10, t0 + Duration::from_millis(5));
        d.on_message(20, t0 + Duration::from_millis(105));
        let s = d.finish(t0 + Duration::from_millis(1105));
        assert_eq!(s.messages, 2);
        assert_eq!(s.bytes, 10);
        assert_eq!(s.first_message_us, Some(5000));
        assert_eq!(s.gaps_ms.count(), 1);
        assert_eq!(s.max_gap_ms, 1000);
    }
}
