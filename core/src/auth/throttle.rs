//! Slows password guessing: every failed SCRAM exchange from an address
//! makes the next exchanges from it wait, 100 ms after the first failure,
//! doubling per further failure up to 5 s; an address with no failure for
//! a minute starts over. Kept per shard (connections of one address land
//! on several shards through SO_REUSEPORT, so a guesser may get up to one
//! penalty per shard in parallel: a bound on the rate, not a lockout —
//! accounts are never locked, so nobody can lock a user out).
//!
//! The delay is taken before the server-first message and before a
//! failure is answered: a guesser learns nothing faster than the penalty.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

const PENALTY_FIRST: Duration = Duration::from_millis(100);
const PENALTY_MAX: Duration = Duration::from_secs(5);
/// Failures older than this are forgotten.
const FORGET_AFTER: Duration = Duration::from_secs(60);
/// Addresses tracked per shard (beyond it, the oldest half is dropped).
const ADDRESSES_MAX: usize = 10_000;

#[derive(Default)]
pub struct Throttle {
    by_addr: HashMap<IpAddr, (u32, Instant)>,
}

impl Throttle {
    /// How long an exchange from `addr` waits now.
    pub fn penalty(&self, addr: IpAddr, now: Instant) -> Duration {
        match self.by_addr.get(&addr) {
            Some(&(n, last)) if now.duration_since(last) < FORGET_AFTER && n > 0 => {
                let doublings = (n - 1).min(16);
                PENALTY_FIRST
                    .saturating_mul(1 << doublings)
                    .min(PENALTY_MAX)
            }
            _ => Duration::ZERO,
        }
    }

    pub fn failed(&mut self, addr: IpAddr, now: Instant) {
        if self.by_addr.len() >= ADDRESSES_MAX && !self.by_addr.contains_key(&addr) {
            self.by_addr
                .retain(|_, (_, last)| now.duration_since(*last) < FORGET_AFTER / 2);
            if self.by_addr.len() >= ADDRESSES_MAX {
                self.by_addr.clear();
            }
        }
        let e = self.by_addr.entry(addr).or_insert((0, now));
        if now.duration_since(e.1) >= FORGET_AFTER {
            e.0 = 0;
        }
        e.0 = e.0.saturating_add(1);
        e.1 = now;
    }

    pub fn succeeded(&mut self, addr: IpAddr) {
        self.by_addr.remove(&addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalty_grows_and_is_forgotten() {
        let mut t = Throttle::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let now = Instant::now();
        assert_eq!(t.penalty(a, now), Duration::ZERO);
        t.failed(a, now);
        assert_eq!(t.penalty(a, now), PENALTY_FIRST);
        t.failed(a, now);
        assert_eq!(t.penalty(a, now), PENALTY_FIRST * 2);
        for _ in 0..40 {
            t.failed(a, now);
        }
        assert_eq!(t.penalty(a, now), PENALTY_MAX);
        assert_eq!(t.penalty(b, now), Duration::ZERO);
        assert_eq!(t.penalty(a, now + FORGET_AFTER), Duration::ZERO);
        t.failed(a, now + FORGET_AFTER);
        assert_eq!(t.penalty(a, now + FORGET_AFTER), PENALTY_FIRST);
        t.succeeded(a);
        assert_eq!(t.penalty(a, now), Duration::ZERO);
    }
}
