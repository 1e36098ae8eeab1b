//! A node's traffic counters and its call latency histogram: plain atomics,
//! updated by the connection drivers, read by [`crate::Node::stats`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Traffic counters kept by the connection drivers.
#[derive(Default)]
pub(crate) struct Metrics {
    /// Calls and one-way messages written to peers.
    pub calls_out: AtomicU64,
    /// Frame bytes received (bodies, without the transport's own framing).
    pub bytes_in: AtomicU64,
    /// Frame bytes sent (bodies, without the transport's own framing).
    pub bytes_out: AtomicU64,
    /// Round trips of calls this node made.
    pub latency: Histogram,
}

impl Metrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Round-trip times of calls (request written to reply read), in
/// microseconds, as seen by the calling node.
///
/// Quantiles come from a log-linear histogram (eight buckets per power of
/// two), so they are within 12.5% of the true value; `min`, `max` and `avg`
/// are exact.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Calls measured.
    pub count: u64,
    /// Fastest.
    pub min_us: f64,
    /// Mean.
    pub avg_us: f64,
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Slowest.
    pub max_us: f64,
}

/// Values below this are counted exactly; above it, 8 buckets per power
/// of two.
const LINEAR: u64 = 16;
const SUB_BITS: u32 = 3;
const SUB: u64 = 1 << SUB_BITS;
/// Enough buckets for any u64 nanosecond count.
const BUCKETS: usize = LINEAR as usize + (64 - 4) * SUB as usize;

/// A lock-free histogram of durations in nanoseconds.
pub(crate) struct Histogram {
    count: AtomicU64,
    sum_ns: AtomicU64,
    min_ns: AtomicU64,
    max_ns: AtomicU64,
    buckets: Box<[AtomicU64]>,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
            min_ns: AtomicU64::new(u64::MAX),
            max_ns: AtomicU64::new(0),
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket_of(v: u64) -> usize {
    if v < LINEAR {
        return v as usize;
    }
    let e = 63 - v.leading_zeros(); // >= 4
    let sub = (v >> (e - SUB_BITS)) & (SUB - 1);
    LINEAR as usize + (e as usize - 4) * SUB as usize + sub as usize
}

/// The smallest and largest value that land in bucket `i`.
fn bucket_range(i: usize) -> (u64, u64) {
    if i < LINEAR as usize {
        return (i as u64, i as u64);
    }
    let j = i - LINEAR as usize;
    let e = (j / SUB as usize) as u32 + 4;
    let sub = (j % SUB as usize) as u64;
    let width = 1u64 << (e - SUB_BITS);
    let lo = (1u64 << e) + sub * width;
    (lo, lo.saturating_add(width - 1))
}

impl Histogram {
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.min_ns.fetch_min(ns, Ordering::Relaxed);
        self.max_ns.fetch_max(ns, Ordering::Relaxed);
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn summary(&self) -> LatencySummary {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let count: u64 = counts.iter().sum();
        if count == 0 {
            return LatencySummary::default();
        }
        let min = self.min_ns.load(Ordering::Relaxed);
        let max = self.max_ns.load(Ordering::Relaxed).max(min);
        let quantile = |q: f64| -> f64 {
            let rank = ((q * count as f64).ceil() as u64).clamp(1, count);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    let (lo, hi) = bucket_range(i);
                    let mid = lo / 2 + hi / 2;
                    return mid.clamp(min, max) as f64;
                }
            }
            max as f64
        };
        let us = |ns: f64| ns / 1_000.0;
        LatencySummary {
            count,
            min_us: us(min as f64),
            avg_us: us(self.sum_ns.load(Ordering::Relaxed) as f64 / count as f64),
            p50_us: us(quantile(0.50)),
            p99_us: us(quantile(0.99)),
            max_us: us(max as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_every_value_in_order() {
        let mut last = 0;
        for v in (0..5_000u64).chain([u64::MAX / 2, u64::MAX]) {
            let b = bucket_of(v);
            assert!(b < BUCKETS, "{v} -> {b}");
            assert!(b >= last, "buckets must not go backwards at {v}");
            last = b;
            let (lo, hi) = bucket_range(b);
            assert!(lo <= v && v <= hi, "{v} not in bucket {b} = {lo}..={hi}");
        }
    }

    #[test]
    fn quantiles_within_an_eighth() {
        let h = Histogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert_eq!(s.min_us, 1.0);
        assert_eq!(s.max_us, 1000.0);
        assert!((s.avg_us - 500.5).abs() < 0.01, "{s:?}");
        assert!((s.p50_us - 500.0).abs() <= 500.0 / 8.0, "{s:?}");
        assert!((s.p99_us - 990.0).abs() <= 990.0 / 8.0, "{s:?}");
    }

    #[test]
    fn empty_is_all_zero() {
        assert_eq!(Histogram::default().summary(), LatencySummary::default());
    }
}
