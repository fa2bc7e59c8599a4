//! Cheap fixed-size per-connection statistics, updated on the data path without allocating.

use std::time::Instant;

use tuning::DirectionStats;

/// Statistics of one direction while the connection lives.
#[derive(Debug, Clone)]
pub struct DirStats {
    /// What ends up in the profile.
    pub s: DirectionStats,
    origin: Instant,
    last_msg: Option<Instant>,
}

impl DirStats {
    /// Start counting; `origin` is the moment the connection was upgraded.
    pub fn new(origin: Instant) -> DirStats {
        DirStats {
            s: DirectionStats::default(),
            origin,
            last_msg: None,
        }
    }

    /// Bytes arrived in one read.
    #[inline]
    pub fn on_read(&mut self, n: usize) {
        self.s.bytes += n as u64;
        self.s.read_sizes.record(n as u64);
    }

    /// A complete message of `size` bytes passed at `now`.
    #[inline]
    pub fn on_message(&mut self, size: u64, now: Instant) {
        self.s.messages += 1;
        self.s.msg_sizes.record(size);
        match self.last_msg {
            Some(l) => {
                let gap = now.saturating_duration_since(l).as_millis() as u64;
                self.s.gaps_ms.record(gap);
                self.s.max_gap_ms = self.s.max_gap_ms.max(gap);
            }
            None => {
                let us = now.saturating_duration_since(self.origin).as_micros() as u64;
                self.s.first_message_us = Some(us);
                self.s.max_gap_ms = self.s.max_gap_ms.max(us / 1000);
            }
        }
        self.last_msg = Some(now);
    }

    /// A sampled message: `raw` bytes deflated to `compressed`.
    pub fn on_sample(&mut self, raw: u64, compressed: u64) {
        self.s.sampled_in += raw;
        self.s.sampled_out += compressed;
    }

    /// Close the books at `end`: the trailing silence counts toward the longest gap.
    pub fn finish(mut self, end: Instant) -> DirectionStats {
        let since = self.last_msg.unwrap_or(self.origin);
        let tail = end.saturating_duration_since(since).as_millis() as u64;
        self.s.max_gap_ms = self.s.max_gap_ms.max(tail);
        self.s
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
