//! Latency summaries from HdrHistogram, for people and for machines.

use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub p9999: f64,
    pub max: f64,
}

/// A histogram of microseconds: 1 µs to 1 hour, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid")
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let q = |p: f64| h.value_at_quantile(p) as f64;
        Percentiles {
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
            p999: q(0.999),
            p9999: q(0.9999),
            max: h.max() as f64,
        }
    }

    pub fn table_row(&self) -> String {
        format!(
            "p50 {:>8.0}  p90 {:>8.0}  p99 {:>8.0}  p99.9 {:>8.0}  p99.99 {:>8.0}  max {:>8.0}  (µs)",
            self.p50, self.p90, self.p99, self.p999, self.p9999, self.max
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn percentiles_follow_the_distribution() {
        let mut h = histogram();
        for v in 1..=10_000u64 {
            h.record(v).unwrap();
        }
        let p = Percentiles::of(&h);
        assert!((p.p50 - 5000.0).abs() < 10.0);
        assert!((p.p99 - 9900.0).abs() < 20.0);
        assert!((p.p999 - 9990.0).abs() < 20.0);
        assert_eq!(p.max, 10_007.0_f64.min(h.max() as f64));
        let json = serde_json::to_value(p).unwrap();
        for k in ["p50", "p90", "p99", "p999", "p9999", "max"] {
            assert!(json.get(k).is_some(), "{k}");
        }
    }
}
