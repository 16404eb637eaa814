//! Latency summaries from HdrHistogram, for people and for machines.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::path::PathBuf;

/// Output options of every measuring mode.
#[derive(clap::Args, Debug, Clone)]
pub struct Outputs {
    /// Print one JSON object (one shape for every mode, so `compare` can
    /// set any two runs side by side).
    #[arg(long)]
    pub json: bool,
    /// Write the HdrHistogram percentile distribution here.
    #[arg(long)]
    pub hist: Option<PathBuf>,
    /// Draw the latency percentile curve (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

impl Outputs {
    /// Writes `--hist` (the distribution of `h`) and `--plot` (its curve,
    /// titled `title`, the line named `name`), where asked for.
    pub fn write_files(
        &self,
        h: &Histogram<u64>,
        title: &str,
        name: &str,
        curve: &[(f64, f64)],
    ) -> Result<(), String> {
        if let Some(p) = &self.hist {
            std::fs::write(p, distribution_text(h))
                .map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        }
        if let Some(p) = &self.plot {
            let svg = svg_plot(title, &[(name.to_string(), curve.to_vec())]);
            std::fs::write(p, svg).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
        }
        Ok(())
    }
}

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

/// Percentile points for plots and comparisons: (percentile, µs), with
/// percentiles spaced evenly on the "1/(1-p)" log axis up to 99.999%.
pub fn curve(h: &Histogram<u64>) -> Vec<(f64, f64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let steps = 200;
    for i in 0..=steps {
        // x = log10(1/(1-p)) from 0 to 5.
        let x = 5.0 * i as f64 / steps as f64;
        let p = 1.0 - 10f64.powf(-x);
        out.push((p * 100.0, h.value_at_quantile(p) as f64));
    }
    out
}

/// The HdrHistogram percentile distribution, in its usual text layout.
pub fn distribution_text(h: &Histogram<u64>) -> String {
    let mut s = String::from("       Value     Percentile TotalCount 1/(1-Percentile)\n\n");
    for v in h.iter_quantiles(1) {
        let p = v.quantile_iterated_to();
        let inv = if p < 1.0 {
            format!("{:.2}", 1.0 / (1.0 - p))
        } else {
            "inf".into()
        };
        s.push_str(&format!(
            "{:12.3} {:14.12} {:10} {:>14}\n",
            v.value_iterated_to() as f64,
            p,
            v.count_since_last_iteration(),
            inv
        ));
    }
    s.push_str(&format!(
        "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]\n#[Max     = {:12.3}, Total count    = {:12}]\n",
        h.mean(),
        h.stdev(),
        h.max() as f64,
        h.len()
    ));
    s
}

/// An SVG latency-by-percentile plot, HdrHistogram style: the x axis is
/// log(1/(1-p)) labelled 0%, 90%, 99%, 99.9%, ...; one line per series.
pub fn svg_plot(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let (w, h, ml, mr, mt, mb) = (900.0, 500.0, 80.0, 30.0, 40.0, 60.0);
    let pw = w - ml - mr;
    let ph = h - mt - mb;
    let ymax = series
        .iter()
        .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
        .fold(1.0f64, f64::max)
        * 1.05;
    let x_of = |pct: f64| {
        let p = (pct / 100.0).min(0.999_99);
        ml + pw * ((1.0 / (1.0 - p)).log10() / 5.0)
    };
    let y_of = |v: f64| mt + ph * (1.0 - v / ymax);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"#,
        w / 2.0,
        escape(title)
    );
    for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"]
        .iter()
        .enumerate()
    {
        let x = ml + pw * i as f64 / 5.0;
        s.push_str(&format!(
            r##"<line x1="{x}" y1="{mt}" x2="{x}" y2="{}" stroke="#ddd"/><text x="{x}" y="{}" text-anchor="middle">{label}</text>
"##,
            mt + ph,
            mt + ph + 18.0
        ));
    }
    for i in 0..=5 {
        let v = ymax * i as f64 / 5.0;
        let y = y_of(v);
        s.push_str(&format!(
            r##"<line x1="{ml}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{:.0}</text>
"##,
            ml + pw,
            ml - 6.0,
            y + 4.0,
            v
        ));
    }
    s.push_str(&format!(
        r#"<text x="{}" y="{}" text-anchor="middle">percentile</text>
<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">latency (µs)</text>
"#,
        ml + pw / 2.0,
        h - 12.0,
        mt + ph / 2.0,
        mt + ph / 2.0
    ));
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"];
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = colors[i % colors.len()];
        let path: Vec<String> = pts
            .iter()
            .map(|(p, v)| format!("{:.1},{:.1}", x_of(*p), y_of(*v)))
            .collect();
        s.push_str(&format!(
            r#"<polyline fill="none" stroke="{c}" stroke-width="2" points="{}"/>
<text x="{}" y="{}" fill="{c}">{}</text>
"#,
            path.join(" "),
            ml + 10.0,
            mt + 16.0 + 16.0 * i as f64,
            escape(name)
        ));
    }
    s.push_str("</svg>\n");
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod plot_tests {
    use super::*;

    #[test]
    fn curve_and_distribution_cover_the_tail() {
        let mut h = histogram();
        for v in 1..=100_000u64 {
            h.record(v).unwrap();
        }
        let c = curve(&h);
        assert_eq!(c.first().unwrap().0, 0.0);
        assert!(c.last().unwrap().0 > 99.998);
        assert!(c.windows(2).all(|w| w[1].1 >= w[0].1), "monotonic");
        let text = distribution_text(&h);
        assert!(text.contains("Total count    =       100000"));
        let svg = svg_plot("t <1>", &[("run".into(), c)]);
        assert!(svg.starts_with("<svg") && svg.contains("99.99%") && svg.contains("t &lt;1&gt;"));
    }
}
