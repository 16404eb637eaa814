//! Per-shard counters and latency buckets. Each shard owns its own
//! (plain `Cell`s: no atomics on the data path); the Metrics API sums them
//! over shards, and `GET /metrics` ([`crate::prometheus`]) shows them per
//! shard from a [`ShardScrape`] each shard takes of itself.

use crate::limits::APPEND_CLOCK_SLOTS;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::time::{Duration, Instant};

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

    /// The counts per bucket (not cumulative) and the sum, to send to
    /// another core.
    pub fn histogram(&self) -> Histogram {
        Histogram {
            counts: std::array::from_fn(|i| self.counts[i].get()),
            sum_us: self.sum_us.get(),
        }
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

/// A copy of [`LatencyBuckets`]: requests per bucket of
/// [`LATENCY_BOUNDS_US`] (not cumulative; the last is over every bound) and
/// their sum in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Histogram {
    pub counts: [u64; LATENCY_BOUNDS_US.len() + 1],
    pub sum_us: u64,
}

impl Histogram {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Slots of the per-API counters, indexed by the flatbuffers union tag of
/// the request (or response) body.
pub const API_SLOTS: usize = 32;
/// Slots of the error counters, indexed by wire error code (a larger code
/// counts in the last).
pub const ERROR_CODE_SLOTS: usize = 64;

const _: () = assert!((shoal_wire::fb::RequestBody::ENUM_MAX as usize) < API_SLOTS);
const _: () = assert!((shoal_wire::fb::ResponseBody::ENUM_MAX as usize) < API_SLOTS);

/// A fixed row of counters, indexed by a small number (an API, an error
/// code).
pub struct Counters<const N: usize>([Cell<u64>; N]);

impl<const N: usize> Default for Counters<N> {
    fn default() -> Self {
        Counters(std::array::from_fn(|_| Cell::new(0)))
    }
}

impl<const N: usize> Counters<N> {
    /// Adds `v` at `i` (beyond the row: at its last slot).
    pub fn add(&self, i: usize, v: u64) {
        add(&self.0[i.min(N - 1)], v);
    }

    pub fn values(&self) -> [u64; N] {
        std::array::from_fn(|i| self.0[i].get())
    }
}

/// When the newest batches of each local partition were appended, to time
/// a batch from its append to its send to a consumer (the e2e histogram).
/// A ring of the last [`APPEND_CLOCK_SLOTS`] appends per partition: a
/// reader at the tail finds its batch there; one catching up does not, and
/// is not timed (its wait is its own lag, not the broker's latency).
#[derive(Default)]
pub struct AppendClocks {
    by_topic: RefCell<HashMap<String, HashMap<u32, AppendClock>>>,
}

struct AppendClock {
    /// (end offset of a batch, when it was appended), oldest overwritten.
    ring: [(u64, Option<Instant>); APPEND_CLOCK_SLOTS],
    next: usize,
}

impl AppendClocks {
    /// Records that a batch ending before `end_offset` was appended `at`.
    pub fn appended(&self, topic: &str, partition: u32, end_offset: u64, at: Instant) {
        let mut by_topic = self.by_topic.borrow_mut();
        if !by_topic.contains_key(topic) {
            by_topic.insert(topic.to_string(), HashMap::new());
        }
        let Some(parts) = by_topic.get_mut(topic) else {
            return;
        };
        let clock = parts.entry(partition).or_insert_with(|| AppendClock {
            ring: [(0, None); APPEND_CLOCK_SLOTS],
            next: 0,
        });
        clock.ring[clock.next] = (end_offset, Some(at));
        clock.next = (clock.next + 1) % APPEND_CLOCK_SLOTS;
    }

    /// When the batch ending before `end_offset` was appended, if it is
    /// among the newest.
    pub fn appended_at(&self, topic: &str, partition: u32, end_offset: u64) -> Option<Instant> {
        let by_topic = self.by_topic.borrow();
        let clock = by_topic.get(topic)?.get(&partition)?;
        clock
            .ring
            .iter()
            .find(|(end, at)| *end == end_offset && at.is_some())
            .and_then(|(_, at)| *at)
    }

    /// Forgets a deleted topic (a new one of that name starts at offset 0).
    pub fn forget(&self, topic: &str) {
        self.by_topic.borrow_mut().remove(topic);
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
    /// Of those, bytes sent through a user-space write: on a plaintext
    /// connection one byte per stall of a full socket; on a TLS connection
    /// every byte (read into memory to be encrypted: no kTLS here).
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
    /// Offset commits acknowledged by this shard's group coordinators
    /// (partitions committed).
    pub group_offset_commits: Cell<u64>,
    /// Members that joined, left, or were removed when their session ran
    /// out.
    pub group_joins: Cell<u64>,
    pub group_leaves: Cell<u64>,
    pub group_sessions_expired: Cell<u64>,
    /// Group checkpoints this shard kept (its own, or a follower's).
    pub group_checkpoints: Cell<u64>,
    /// SCRAM exchanges that succeeded, and that failed (wrong password,
    /// unknown user, malformed or replayed message).
    pub auth_successes: Cell<u64>,
    pub auth_failures: Cell<u64>,
    /// Requests refused because no ACL allowed them (or sent before
    /// authenticating).
    pub authorization_denials: Cell<u64>,
    /// Connections on a TLS port refused before they were served: a failed
    /// or timed-out handshake, plaintext, an unusable client certificate.
    pub tls_handshake_failures: Cell<u64>,
    /// Produce requests, from the decoded request to its response written
    /// (acknowledgement wait included).
    pub produce_latency: LatencyBuckets,
    /// Fetch requests, from the decoded request to its response written
    /// (a long-poll's wait for data included).
    pub fetch_latency: LatencyBuckets,
    /// Batches from their append to the end of their send to a consumer
    /// (fetch or push), for consumers at the tail; see [`AppendClocks`].
    pub e2e_latency: LatencyBuckets,
    pub append_clocks: AppendClocks,
    /// Requests by API (request body tag).
    pub requests_by_api: Counters<API_SLOTS>,
    /// Bytes of request frames received, by API (request body tag).
    pub request_bytes_by_api: Counters<API_SLOTS>,
    /// Bytes of response frames sent, log bytes included, by response body
    /// tag (error responses under tag 0).
    pub response_bytes_by_api: Counters<API_SLOTS>,
    /// Error responses by wire error code.
    pub errors_by_code: Counters<ERROR_CODE_SLOTS>,
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
            ("group_offset_commits", self.group_offset_commits.get()),
            ("group_joins", self.group_joins.get()),
            ("group_leaves", self.group_leaves.get()),
            ("group_sessions_expired", self.group_sessions_expired.get()),
            ("group_checkpoints", self.group_checkpoints.get()),
            ("auth_successes", self.auth_successes.get()),
            ("auth_failures", self.auth_failures.get()),
            ("authorization_denials", self.authorization_denials.get()),
            ("tls_handshake_failures", self.tls_handshake_failures.get()),
        ];
        self.produce_latency
            .snapshot_into(&PRODUCE_LATENCY_NAMES, &mut v);
        v
    }
}

/// One partition as a scrape shows it.
#[derive(Debug, Clone)]
pub struct PartitionScrape {
    pub topic: String,
    pub partition: u32,
    pub log_start_offset: u64,
    pub log_end_offset: u64,
    /// What fetches report as the high watermark (on a single broker, the
    /// log end).
    pub high_watermark: u64,
    pub size_bytes: u64,
}

/// Everything one shard shows to a scrape, taken on its own core and sent
/// to the one serving `GET /metrics`.
#[derive(Debug, Clone)]
pub struct ShardScrape {
    pub shard: usize,
    pub core: usize,
    /// The scalar counters and gauges, as [`Metrics::snapshot`] names them.
    pub counters: Vec<(&'static str, u64)>,
    pub requests_by_api: [u64; API_SLOTS],
    pub request_bytes_by_api: [u64; API_SLOTS],
    pub response_bytes_by_api: [u64; API_SLOTS],
    pub errors_by_code: [u64; ERROR_CODE_SLOTS],
    pub produce_latency: Histogram,
    pub fetch_latency: Histogram,
    pub e2e_latency: Histogram,
    pub partitions: Vec<PartitionScrape>,
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
