//! `hiccup`: what the platform alone does to latency (jHiccup's idea).
//!
//! One thread per listed core spins reading the monotonic clock. Whenever two
//! readings are further apart than `--resolution`, the thread was not running
//! (the hypervisor took the vCPU, an interrupt storm, another task), and the
//! gap is recorded. Nothing else runs in the measurement, so these stalls
//! are a floor no program on those cores can go below.
//!
//! The stalls are then turned into the latency a *zero-cost* service would
//! show under the e2e harness's open-loop schedule: a message due at `t`
//! inside a stall `[s, s + len)` cannot be handled before `s + len`. Messages
//! due outside every stall count as the histogram's lowest value (1 µs).
//! Stalls of all listed cores are merged, since a message needs every core
//! on its path (broker and harness). That gives a same-machine, same-time
//! baseline for `e2e` percentiles: the broker's own cost is what lies above it.

use crate::net::{parse_duration, NetReport};
use crate::report::{self, Percentiles};
use clap::Args;
use std::time::{Duration, Instant};

#[derive(Args, Debug, Clone)]
pub struct HiccupArgs {
    /// Cores to measure, comma separated (default: every core).
    #[arg(long)]
    pub cores: Option<String>,
    /// Measured time.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Rate of the zero-cost open-loop schedule (msgs/s), as in `e2e --rate`.
    #[arg(long, default_value_t = 10_000.0)]
    pub rate: f64,
    /// Clock gaps shorter than this are not stalls (µs).
    #[arg(long, default_value_t = 20)]
    pub resolution_us: u64,
    /// Sleep this long between clock readings instead of spinning (µs), as
    /// jHiccup does: a stall is then a wake-up later than asked for. A
    /// spinning vCPU may be descheduled by the host more often than one
    /// that idles, like a broker between requests; sleeping measures that
    /// case, at a coarser grain.
    #[arg(long)]
    pub sleep_us: Option<u64>,
    #[command(flatten)]
    pub out: report::Outputs,
}

/// A stall: offset from the start of the measurement and length, in ns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stall {
    pub at: u64,
    pub len: u64,
}

fn parse_cores(s: Option<&str>) -> Result<Vec<usize>, String> {
    match s {
        None => {
            let n = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
            Ok((0..n).collect())
        }
        Some(s) => s
            .split(',')
            .map(|c| {
                c.trim()
                    .parse::<usize>()
                    .map_err(|_| format!("--cores: '{c}' is not a core number"))
            })
            .collect(),
    }
}

/// Spins (or sleeps `sleep` at a time) on the current thread for `dur`,
/// returning the stalls seen.
fn spin(start: Instant, dur: Duration, resolution: Duration, sleep: Duration) -> Vec<Stall> {
    let mut stalls = Vec::new();
    let mut last = Instant::now();
    loop {
        if !sleep.is_zero() {
            std::thread::sleep(sleep);
        }
        let now = Instant::now();
        let gap = (now - last).saturating_sub(sleep);
        if gap > resolution {
            stalls.push(Stall {
                at: (last - start + sleep).as_nanos() as u64,
                len: gap.as_nanos() as u64,
            });
        }
        last = now;
        if now - start >= dur {
            return stalls;
        }
    }
}

/// Merges overlapping stalls (of several cores) into disjoint ones, sorted.
pub fn merge(mut stalls: Vec<Stall>) -> Vec<Stall> {
    stalls.sort();
    let mut out: Vec<Stall> = Vec::with_capacity(stalls.len());
    for s in stalls {
        match out.last_mut() {
            Some(l) if s.at <= l.at + l.len => {
                let end = (l.at + l.len).max(s.at + s.len);
                l.len = end - l.at;
            }
            _ => out.push(s),
        }
    }
    out
}

/// Latency (µs) a zero-cost service would show for an open-loop schedule of
/// `rate` msgs/s over `dur` under these (merged, sorted) stalls.
pub fn zero_cost_latency(
    stalls: &[Stall],
    dur: Duration,
    rate: f64,
) -> hdrhistogram::Histogram<u64> {
    let mut h = report::histogram();
    let period = 1e9 / rate;
    let n = (dur.as_secs_f64() * rate) as u64;
    let mut i = 0usize;
    for k in 0..n {
        let t = (k as f64 * period) as u64;
        while i < stalls.len() && stalls[i].at + stalls[i].len <= t {
            i += 1;
        }
        let wait_ns = match stalls.get(i) {
            Some(s) if s.at <= t => s.at + s.len - t,
            _ => 0,
        };
        h.saturating_record((wait_ns / 1000).max(1));
    }
    h
}

pub fn run(a: HiccupArgs) -> Result<(), String> {
    if !a.rate.is_finite() || a.rate <= 0.0 {
        return Err("--rate must be positive".into());
    }
    let cores = parse_cores(a.cores.as_deref())?;
    let resolution = Duration::from_micros(a.resolution_us.max(1));
    if !a.out.json {
        eprintln!(
            "measuring stalls on cores {cores:?} for {:?} ...",
            a.duration
        );
    }
    let start = Instant::now() + Duration::from_millis(20);
    let threads: Vec<_> = cores
        .iter()
        .map(|&c| {
            let dur = a.duration;
            let sleep = Duration::from_micros(a.sleep_us.unwrap_or(0));
            std::thread::spawn(move || {
                crate::net::pin_to(Some(c), false);
                if !sleep.is_zero() {
                    // SAFETY: prctl with PR_SET_TIMERSLACK takes a plain
                    // integer; 1 ns asks for wake-ups as exact as the timer
                    // allows, so the default 50 µs slack is not counted.
                    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
                }
                while Instant::now() < start {
                    std::hint::spin_loop();
                }
                (c, spin(start, dur, resolution, sleep))
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut per_core = serde_json::Map::new();
    let mut gaps = report::histogram();
    for t in threads {
        let (c, stalls) = t.join().map_err(|_| "a measuring thread panicked")?;
        let lost: u64 = stalls.iter().map(|s| s.len).sum();
        let over = |us: u64| stalls.iter().filter(|s| s.len > us * 1000).count();
        let max = stalls.iter().map(|s| s.len).max().unwrap_or(0);
        per_core.insert(
            c.to_string(),
            serde_json::json!({
                "stalls": stalls.len(),
                "over_100us": over(100),
                "over_1ms": over(1000),
                "over_5ms": over(5000),
                "max_us": max / 1000,
                "lost_pct": lost as f64 / a.duration.as_nanos() as f64 * 100.0,
            }),
        );
        for s in &stalls {
            gaps.saturating_record((s.len / 1000).max(1));
        }
        all.extend(stalls);
    }
    let merged = merge(all);
    let h = zero_cost_latency(&merged, a.duration, a.rate);
    let r = NetReport {
        mode: "hiccup".into(),
        msgs_per_s: a.rate,
        mib_per_s: 0.0,
        messages: h.len(),
        seconds: a.duration.as_secs_f64(),
        errors: 0,
        latency_us: Percentiles::of(&h),
        ack_latency_us: None,
        broker_produce_latency_us: None,
        line_rate_fraction: None,
        settings: serde_json::json!({
            "cores": cores,
            "rate": a.rate,
            "resolution_us": a.resolution_us,
            "sleep_us": a.sleep_us,
            "per_core": per_core,
        }),
        percentiles: report::curve(&h),
    };
    let title = format!(
        "shoal-perf hiccup: zero-cost service at {:.0} msgs/s",
        a.rate
    );
    a.out.write_files(&h, &title, "hiccup", &r.percentiles)?;
    if a.out.json {
        println!("{}", serde_json::to_string(&r).map_err(|e| e.to_string())?);
    } else {
        println!(
            "shoal-perf hiccup  cores {cores:?}, {:.1} s, stalls > {} µs",
            a.duration.as_secs_f64(),
            a.resolution_us
        );
        for (c, v) in &per_core {
            println!(
                "  core {c}: {} stalls, {} > 100 µs, {} > 1 ms, {} > 5 ms, max {} µs, {:.2} % of the time lost",
                v["stalls"], v["over_100us"], v["over_1ms"], v["over_5ms"], v["max_us"],
                v["lost_pct"].as_f64().unwrap_or(0.0)
            );
        }
        println!("  stall length {}", Percentiles::of(&gaps).table_row());
        println!(
            "  zero-cost service at {:.0} msgs/s, open loop: {}",
            a.rate,
            r.latency_us.table_row()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_joins_overlaps_and_sorts() {
        let s = |at, len| Stall { at, len };
        let m = merge(vec![s(50, 10), s(0, 10), s(5, 10), s(60, 5), s(100, 1)]);
        assert_eq!(m, vec![s(0, 15), s(50, 15), s(100, 1)]);
    }

    #[test]
    fn zero_cost_latency_counts_waits_inside_stalls() {
        // 1000 msgs/s for 1 s: one every 1 ms. One 10 ms stall starting at
        // 100.5 ms covers messages due at 101..=110 ms, which wait until
        // 110.5 ms: 9.5, 8.5, ..., 0.5 ms.
        let stalls = vec![Stall {
            at: 100_500_000,
            len: 10_000_000,
        }];
        let h = zero_cost_latency(&stalls, Duration::from_secs(1), 1000.0);
        assert_eq!(h.len(), 1000);
        assert_eq!(h.count_between(2, 100_000), 10);
        let max = h.max();
        assert!((9_490..=9_510).contains(&max), "{max}");
        // 990 messages never waited.
        assert_eq!(h.count_between(0, 1), 990);
    }

    #[test]
    fn no_stalls_no_wait() {
        let h = zero_cost_latency(&[], Duration::from_millis(100), 10_000.0);
        assert_eq!(h.len(), 1000);
        assert_eq!(h.max(), 1);
    }

    #[test]
    fn cores_parse() {
        assert!(parse_cores(Some("0,x")).is_err());
        assert_eq!(parse_cores(Some("1, 0")).unwrap(), vec![1, 0]);
        assert!(!parse_cores(None).unwrap().is_empty());
    }
}
