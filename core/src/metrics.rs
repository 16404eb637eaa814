//! Per-shard counters and latency buckets. Each shard owns its own
//! (plain `Cell`s: no atomics on the data path); the Metrics API sums them
//! over shards.

use std::cell::Cell;
use std::time::Duration;

/// Upper bounds (µs) of the broker's latency buckets; a last bucket holds
/// everything slower.
pub const LATENCY_BOUNDS_US: [u64; 17] = [
    10, 25, 50, 75, 100, 150, 200, 300, 500, 750, 1_000, 2_000, 5_000, 10_000, 50_000, 100_000,
    1_000_000,
];

/// Metric names of the produce latency buckets, cumulative like
/// Prometheus' `le` buckets: `_le_<bound>` counts requests at or under it,
/// `_count` counts them all, `_sum` adds up their microseconds. Made once
/// from [`LATENCY_BOUNDS_US`], so names and bounds cannot drift apart.
static PRODUCE_LATENCY_NAMES: std::sync::LazyLock<Vec<&'static str>> =
    std::sync::LazyLock::new(|| bucket_names("produce_latency_us"));

fn bucket_names(prefix: &str) -> Vec<&'static str> {
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    LATENCY_BOUNDS_US
        .iter()
        .map(|b| leak(format!("{prefix}_le_{b}")))
        .chain([
            leak(format!("{prefix}_count")),
            leak(format!("{prefix}_sum")),
        ])
        .collect()
}

/// A latency distribution in fixed buckets: cheap to record on the data
/// path, and (unlike percentiles) summable over shards and subtractable
/// between two reads, so a benchmark can take the distribution of just its
/// measured window.
#[derive(Default)]
pub struct LatencyBuckets {
    /// Requests per bucket (not cumulative); the last one is over every
    /// bound.
    counts: [Cell<u64>; LATENCY_BOUNDS_US.len() + 1],
    sum_us: Cell<u64>,
}

impl LatencyBuckets {
    pub fn record(&self, d: Duration) {
        let us = d.as_micros() as u64;
        let i = LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        add(&self.counts[i], 1);
        add(&self.sum_us, us);
    }

    /// Appends the cumulative counts, then the sum, under `names` (from
    /// [`bucket_names`]).
    fn snapshot_into(&self, names: &[&'static str], out: &mut Vec<(&'static str, u64)>) {
        let mut cumulative = 0;
        for (name, c) in names.iter().zip(&self.counts) {
            cumulative += c.get();
            out.push((name, cumulative));
        }
        out.push((names[self.counts.len()], self.sum_us.get()));
    }
}

/// Per-shard counters (exported summed over shards by the Metrics API).
#[derive(Default)]
pub struct Metrics {
    pub produce_requests: Cell<u64>,
    pub produce_bytes: Cell<u64>,
    pub fetch_requests: Cell<u64>,
    /// Log bytes sent in fetch and push responses.
    pub fetch_bytes: Cell<u64>,
    /// Of those, bytes sent with sendfile (never through user space).
    pub zero_copy_bytes: Cell<u64>,
    /// Of those, bytes pushed through a user-space write to wait for a full
    /// socket (one byte per stall).
    pub copied_bytes: Cell<u64>,
    /// Log bytes read from the tail cache (memory) rather than the segment
    /// file, for fetches and pushes at the end of a log.
    pub tail_cache_bytes: Cell<u64>,
    pub cross_shard_requests: Cell<u64>,
    pub connections_accepted: Cell<u64>,
    pub connections_open: Cell<u64>,
    /// Connections refused at `connections_max` (with a
    /// `TooManyConnections` error frame).
    pub connections_refused: Cell<u64>,
    /// Failed accepts (e.g. out of file descriptors).
    pub accept_errors: Cell<u64>,
    /// Connections closed because their outbound data made no progress
    /// for `slow_consumer_timeout_ms`.
    pub slow_consumers_closed: Cell<u64>,
    /// Connections closed because a frame did not complete within
    /// `request_timeout_ms`.
    pub request_timeouts: Cell<u64>,
    /// Times a connection stopped reading because the shard's budget for
    /// partial frames (`partial_frames_bytes_max`) was spent.
    pub recv_budget_waits: Cell<u64>,
    /// Bytes of receive buffers beyond their base size, now (a gauge).
    pub recv_buffer_bytes: Cell<u64>,
    pub errors: Cell<u64>,
    /// Produce requests, from the decoded request to its response written
    /// (acknowledgement wait included).
    pub produce_latency: LatencyBuckets,
}

pub fn add(c: &Cell<u64>, v: u64) {
    c.set(c.get() + v);
}

pub fn sub(c: &Cell<u64>, v: u64) {
    debug_assert!(c.get() >= v, "gauge below zero");
    c.set(c.get().saturating_sub(v));
}

impl Metrics {
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let mut v = vec![
            ("produce_requests", self.produce_requests.get()),
            ("produce_bytes", self.produce_bytes.get()),
            ("fetch_requests", self.fetch_requests.get()),
            ("fetch_bytes", self.fetch_bytes.get()),
            ("zero_copy_bytes", self.zero_copy_bytes.get()),
            ("copied_bytes", self.copied_bytes.get()),
            ("tail_cache_bytes", self.tail_cache_bytes.get()),
            ("cross_shard_requests", self.cross_shard_requests.get()),
            ("connections_accepted", self.connections_accepted.get()),
            ("connections_open", self.connections_open.get()),
            ("connections_refused", self.connections_refused.get()),
            ("accept_errors", self.accept_errors.get()),
            ("slow_consumers_closed", self.slow_consumers_closed.get()),
            ("request_timeouts", self.request_timeouts.get()),
            ("recv_budget_waits", self.recv_budget_waits.get()),
            ("recv_buffer_bytes", self.recv_buffer_bytes.get()),
            ("errors", self.errors.get()),
        ];
        self.produce_latency
            .snapshot_into(&PRODUCE_LATENCY_NAMES, &mut v);
        v
    }
}

/// Lets a repeated warning through at most once per period, counting what
/// it held back, so a flood (a full fd table, thousands of timeouts) costs
/// one log line per period instead of one per event. Owned by one core.
pub struct LogLimiter {
    period: Duration,
    last: Cell<Option<std::time::Instant>>,
    held_back: Cell<u64>,
}

impl LogLimiter {
    pub const fn new(period: Duration) -> LogLimiter {
        LogLimiter {
            period,
            last: Cell::new(None),
            held_back: Cell::new(0),
        }
    }

    /// `Some(n)` if a line may be logged now (`n` events were held back
    /// since the last one), `None` if this one is held back.
    pub fn allow(&self) -> Option<u64> {
        let now = crate::rt::now();
        if self.last.get().is_some_and(|t| now - t < self.period) {
            self.held_back.set(self.held_back.get() + 1);
            return None;
        }
        self.last.set(Some(now));
        Some(self.held_back.replace(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limiter_lets_one_line_through_per_period() {
        let l = LogLimiter::new(Duration::from_secs(3600));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        let l2 = LogLimiter::new(Duration::ZERO);
        assert_eq!(l2.allow(), Some(0));
        assert_eq!(l2.allow(), Some(0));
    }
}
