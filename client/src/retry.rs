//! How requests to a partition are retried through a failover (L3).
//!
//! A request that failed retriably (`NotLeader`, `LeaderNotAvailable`,
//! `NotEnoughReplicas`, a stale leader epoch, a refused connect, a
//! connection lost mid-request, no answer in time) is sent again after
//! the client re-learned where the partition's leader is: at once when a
//! `NotLeader` named a leader elsewhere, else after a backoff that doubles
//! from `backoff` to `backoff_max`, each wait drawn between half and all of
//! it so that clients a failover hit together do not retry together.
//! Retrying stops after `retries` attempts or once `timeout` has passed;
//! then the last error is the answer.

use std::time::{Duration, Instant};

/// Retries in a row that go out at once (a `NotLeader` naming another
/// leader) before the backoff applies anyway: two brokers that each name
/// the other must not make a busy loop.
const AT_ONCE_IN_A_ROW_MAX: u32 = 3;

/// How a partition's requests are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts after the first, at most.
    pub retries: u32,
    /// First wait between attempts; it doubles per attempt.
    pub backoff: Duration,
    /// Longest wait between attempts.
    pub backoff_max: Duration,
    /// No attempt starts once this has passed since the first failure
    /// (or since the deadline's start given to [`Retrier::until`]).
    pub timeout: Duration,
}

/// The retry state of one request (or of one partition of a consumer,
/// across its polls).
#[derive(Debug, Clone)]
pub struct Retrier {
    policy: RetryPolicy,
    /// Set by the first failure unless given.
    deadline: Option<Instant>,
    attempts: u32,
    backoff: Duration,
    at_once_in_a_row: u32,
}

impl Retrier {
    /// A retrier whose `timeout` runs from the first failure.
    pub fn new(policy: RetryPolicy) -> Retrier {
        Retrier {
            policy,
            deadline: None,
            attempts: 0,
            backoff: policy.backoff,
            at_once_in_a_row: 0,
        }
    }

    /// A retrier that gives up at `deadline` (a producer's batch: its
    /// delivery timeout runs from when it was sealed).
    pub fn until(policy: RetryPolicy, deadline: Instant) -> Retrier {
        Retrier {
            deadline: Some(deadline),
            ..Retrier::new(policy)
        }
    }

    /// After a failed attempt: how long to wait before the next one, or
    /// `None` to give up. `at_once`: the failure named where to go (a
    /// leader hint), so waiting would only add latency.
    pub fn next_wait(&mut self, at_once: bool) -> Option<Duration> {
        let now = Instant::now();
        let deadline = *self.deadline.get_or_insert(now + self.policy.timeout);
        if self.attempts >= self.policy.retries || now >= deadline {
            return None;
        }
        self.attempts += 1;
        if at_once && self.at_once_in_a_row < AT_ONCE_IN_A_ROW_MAX {
            self.at_once_in_a_row += 1;
            return Some(Duration::ZERO);
        }
        self.at_once_in_a_row = 0;
        let wait = jitter(self.backoff);
        let cap = self.policy.backoff_max.max(self.policy.backoff);
        self.backoff = self.backoff.saturating_mul(2).min(cap);
        Some(wait.min(deadline - now))
    }

    /// Failed attempts so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }
}

/// A wait between half and all of `d`.
fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    let spread = u64::try_from((d - half).as_micros()).unwrap_or(u64::MAX);
    half + Duration::from_micros(rand::random::<u64>() % spread.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(retries: u32, timeout: Duration) -> RetryPolicy {
        RetryPolicy {
            retries,
            backoff: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            timeout,
        }
    }

    /// Waits double from the first backoff up to the cap, each somewhere
    /// between half and all of its step.
    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let mut r = Retrier::new(policy(u32::MAX, Duration::from_secs(3600)));
        let steps_ms = [50u64, 100, 200, 400, 800, 1000, 1000];
        for step in steps_ms {
            let w = r.next_wait(false).expect("within the limits");
            let step = Duration::from_millis(step);
            assert!(w >= step / 2 && w <= step, "{w:?} for a step of {step:?}");
        }
        assert_eq!(r.attempts(), 7);
    }

    /// A hint retries at once, but not forever in a row.
    #[test]
    fn at_once_retries_are_bounded_in_a_row() {
        let mut r = Retrier::new(policy(u32::MAX, Duration::from_secs(3600)));
        for _ in 0..AT_ONCE_IN_A_ROW_MAX {
            assert_eq!(r.next_wait(true), Some(Duration::ZERO));
        }
        assert!(r.next_wait(true).expect("a wait") > Duration::ZERO);
        assert_eq!(r.next_wait(true), Some(Duration::ZERO));
    }

    /// Both the attempt count and the deadline end the retries.
    #[test]
    fn retries_stop_at_the_count_or_the_deadline() {
        let mut r = Retrier::new(policy(2, Duration::from_secs(3600)));
        assert!(r.next_wait(false).is_some());
        assert!(r.next_wait(false).is_some());
        assert_eq!(r.next_wait(false), None);
        let mut r = Retrier::until(
            policy(u32::MAX, Duration::from_secs(3600)),
            Instant::now() + Duration::from_millis(30),
        );
        let w = r.next_wait(false).expect("before the deadline");
        assert!(
            w <= Duration::from_millis(30),
            "{w:?}: capped at the deadline"
        );
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(r.next_wait(true), None);
    }
}
