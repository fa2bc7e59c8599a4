//! A Prometheus histogram (fixed bucket bounds, count, sum) and its text-format rendering,
//! shared by the data plane's and the optimizer's `/metrics`. Callers keep it behind a lock
//! that is taken once per connection or per request, never per message.

use std::fmt::Write as _;

/// Latency bounds, seconds: 100 µs to 10 s.
pub const LATENCY_SECONDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Connection duration bounds, seconds: 1 s to a day.
pub const DURATION_SECONDS: &[f64] = &[
    1.0, 10.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 43200.0, 86400.0,
];

/// Message size bounds, bytes: powers of four from 64 B to 16 MiB.
pub const SIZE_BYTES: &[f64] = &[
    64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0,
];

/// One histogram series.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts per bucket; the last one is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    /// An empty histogram with these upper bounds (ascending).
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    /// Count one value.
    pub fn observe(&mut self, v: f64) {
        self.observe_n(v, 1);
    }

    /// Count `n` values equal to `v` (their sum is `v * n`).
    pub fn observe_n(&mut self, v: f64, n: u64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i] += n;
        self.sum += v * n as f64;
    }

    /// Count `n` values in the bucket of `v` whose sum is `sum` (a pre-aggregated histogram).
    pub fn observe_bucket(&mut self, v: f64, n: u64, sum: f64) {
        let i = self.bounds.partition_point(|b| *b < v);
        self.counts[i] += n;
        self.sum += sum;
    }

    /// Add to the sum alone (the counts came through [`Histogram::observe_bucket`]).
    pub fn add_sum(&mut self, sum: f64) {
        self.sum += sum;
    }

    /// Values counted.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Sum of the values counted.
    pub fn sum(&self) -> f64 {
        self.sum
    }

    /// Append the series' sample lines: `name_bucket{labels,le=…}`, `name_sum`, `name_count`.
    /// `labels` is empty or a comma-separated list without braces.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c;
            let le = self
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let braces = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", self.sum);
        let _ = writeln!(out, "{name}_count{braces} {cumulative}");
    }
}

/// A label value made safe for the text format (quotes, backslashes and newlines escaped).
pub fn label_value(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_with_inclusive_bounds() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        h.observe(0.5);
        h.observe(1.0);
        h.observe(1.5);
        h.observe(9.0);
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert_eq!(
            out,
            "x_bucket{a=\"b\",le=\"1\"} 2\nx_bucket{a=\"b\",le=\"2\"} 3\nx_bucket{a=\"b\",le=\"+Inf\"} 4\nx_sum{a=\"b\"} 12\nx_count{a=\"b\"} 4\n"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
