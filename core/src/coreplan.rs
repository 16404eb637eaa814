//! Where the broker's threads run (T2): the CPUs the process may use, the
//! core plan `tuning/shoal-tune core-plan` writes, and pinning.
//!
//! - `--cores all` means the CPUs of the process's affinity mask
//!   (`sched_getaffinity`, as `taskset` or a cgroup cpuset sets it), never
//!   CPUs 0..N: started under `taskset -c 1`, the one shard runs on CPU 1.
//! - `--core-plan FILE` runs shard `i` on the plan's `shard_cores[i]`; when
//!   the plan names a `control_core`, every thread that is not a shard
//!   (signals, metrics, and whatever starts from the main thread later) is
//!   pinned there, off the shard cores. The plan's other keys (`irq_cores`,
//!   `rps_cores`, `[topology]`) are for the tuners and the start-up report.
//!
//! Every core a plan or a list names must be in the affinity mask: a plan
//! made for another mask is refused at start rather than half applied.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A core plan as `shoal-tune core-plan` writes it (TOML).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct CorePlan {
    /// CPU of shard `i` at index `i`.
    pub shard_cores: Vec<usize>,
    /// Where the threads that are not shards run (none: they float).
    #[serde(default)]
    pub control_core: Option<usize>,
    /// Where the tuners sent NIC and disk interrupts (reported only).
    #[serde(default)]
    pub irq_cores: Vec<usize>,
    /// `split` or `shared` (reported only).
    #[serde(default)]
    pub mode: Option<String>,
    /// The file it was read from.
    #[serde(skip)]
    pub path: PathBuf,
}

impl CorePlan {
    /// Reads and checks a plan against the CPUs this process may use.
    pub fn load(path: &Path) -> Result<CorePlan> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("read core plan {}", path.display()), e))?;
        let mut plan = CorePlan::parse(&text)
            .map_err(|m| Error::Config(format!("core plan {}: {m}", path.display())))?;
        plan.path = path.to_path_buf();
        let allowed = allowed_cpus()?;
        plan.check(&allowed)
            .map_err(|m| Error::Config(format!("core plan {}: {m}", path.display())))?;
        Ok(plan)
    }

    pub fn parse(text: &str) -> std::result::Result<CorePlan, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// The plan fits `allowed` (the affinity mask): shards on distinct
    /// allowed CPUs, the control core allowed.
    pub fn check(&self, allowed: &[usize]) -> std::result::Result<(), String> {
        if self.shard_cores.is_empty() {
            return Err("shard_cores is empty".into());
        }
        let mut seen = self.shard_cores.clone();
        seen.sort_unstable();
        seen.dedup();
        if seen.len() != self.shard_cores.len() {
            return Err("shard_cores names a CPU twice".into());
        }
        let outside: Vec<usize> = self
            .shard_cores
            .iter()
            .chain(&self.control_core)
            .copied()
            .filter(|c| !allowed.contains(c))
            .collect();
        if !outside.is_empty() {
            return Err(format!(
                "CPUs {outside:?} are not in this process's affinity mask {} \
                 (make the plan under the same taskset or cpuset as the broker)",
                format_cpus(allowed)
            ));
        }
        Ok(())
    }
}

/// The CPUs this process may run on, ascending (its affinity mask).
pub fn allowed_cpus() -> Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most size_of::<cpu_set_t>() bytes
    // into the set we pass; pid 0 is the calling thread.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(Error::io(
            "read the CPU affinity mask",
            std::io::Error::last_os_error(),
        ));
    }
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: CPU_ISSET reads the set, for CPU numbers inside it.
    let cpus: Vec<usize> = (0..max)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect();
    if cpus.is_empty() {
        return Err(Error::Config("the CPU affinity mask is empty".into()));
    }
    Ok(cpus)
}

/// Pins the calling thread (and so every thread it starts afterwards) to
/// `cpu`.
pub fn pin_current_thread(cpu: usize) -> Result<()> {
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    if cpu >= max {
        return Err(Error::Config(format!("CPU {cpu} is beyond {max}")));
    }
    // SAFETY: cpu_set_t is plain data; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu < the set's size (checked above).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: sched_setaffinity reads the set we pass; pid 0 is the calling
    // thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(Error::io(
            format!("pin the control thread to CPU {cpu}"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Where shards run, from the flags (`--cores`, `--core-plan`) if either
/// is given, else from the file (`cores`, `core_plan`), else `all`: a plan's
/// cores, or the core list. A plan and a list at the same level are
/// refused, since which one should win would be a guess.
pub fn resolve(
    flags: (Option<String>, Option<PathBuf>),
    file: (Option<String>, Option<PathBuf>),
) -> Result<(Vec<usize>, Option<CorePlan>)> {
    let (cores, plan) = match flags {
        (None, None) => file,
        given => given,
    };
    match (cores, plan) {
        (Some(_), Some(_)) => Err(Error::Config(
            "give the cores or a core plan, not both (--cores / cores and --core-plan / core_plan)"
                .into(),
        )),
        (None, Some(p)) => {
            let plan = CorePlan::load(&p)?;
            Ok((plan.shard_cores.clone(), Some(plan)))
        }
        (c, None) => Ok((
            crate::config::parse_cores(c.as_deref().unwrap_or("all"))?,
            None,
        )),
    }
}

/// Pins this thread to the plan's control core, if it names one, and
/// reports where every thread runs. Call first, from the thread that will
/// start the others.
pub fn apply_and_report(cores: &[usize], plan: Option<&CorePlan>) -> Result<()> {
    let allowed = allowed_cpus()?;
    match plan {
        None => tracing::info!(
            shard_cores = ?cores,
            affinity = %format_cpus(&allowed),
            "core placement: shards on the listed cores, other threads float"
        ),
        Some(plan) => {
            if let Some(c) = plan.control_core {
                pin_current_thread(c)?;
            }
            tracing::info!(
                plan = %plan.path.display(),
                mode = plan.mode.as_deref().unwrap_or("-"),
                shard_cores = ?plan.shard_cores,
                control_core = ?plan.control_core,
                irq_cores = ?plan.irq_cores,
                affinity = %format_cpus(&allowed),
                "core plan: shard i on shard_cores[i], other threads on control_core"
            );
        }
    }
    Ok(())
}

/// `0-3,6` for [0, 1, 2, 3, 6].
pub fn format_cpus(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAN: &str = r#"
# made by shoal-tune
mode = "split"
shard_cores = [5, 6, 7]
control_core = 12
irq_cores = [4, 12]
rps_cores = [5, 6, 7]
nic = "eth0"

[topology]
allowed = "0-15"
smt = true
"#;

    #[test]
    fn a_plan_from_shoal_tune_parses() {
        let p = CorePlan::parse(PLAN).expect("parse");
        assert_eq!(p.shard_cores, vec![5, 6, 7]);
        assert_eq!(p.control_core, Some(12));
        assert_eq!(p.irq_cores, vec![4, 12]);
        assert_eq!(p.mode.as_deref(), Some("split"));
        let all: Vec<usize> = (0..16).collect();
        assert!(p.check(&all).is_ok());
    }

    #[test]
    fn a_plan_outside_the_mask_or_repeating_a_core_is_refused() {
        let p = CorePlan::parse(PLAN).expect("parse");
        let e = p.check(&[0, 1, 5, 6, 7]).unwrap_err();
        assert!(e.contains("[12]"), "{e}");
        let twice = CorePlan::parse("shard_cores = [1, 1]").expect("parse");
        assert!(twice.check(&[0, 1]).is_err());
        let none = CorePlan::parse("shard_cores = []").expect("parse");
        assert!(none.check(&[0, 1]).is_err());
        assert!(CorePlan::parse("control_core = 1").is_err());
        assert!(CorePlan::parse("shard_cores = [\"x\"]").is_err());
    }

    #[test]
    fn the_mask_is_what_all_means() {
        let mask = allowed_cpus().expect("mask");
        assert_eq!(
            crate::config::parse_cores("all").expect("all"),
            mask,
            "all = the affinity mask"
        );
        assert_eq!(format_cpus(&[0, 1, 2, 3, 6, 8, 9]), "0-3,6,8-9");
    }

    #[test]
    fn cores_and_a_plan_at_one_level_are_refused_and_flags_win() {
        let both = (Some("0".to_string()), Some(PathBuf::from("/nonexistent")));
        let e = resolve(both.clone(), (None, None)).unwrap_err();
        assert!(e.to_string().contains("not both"), "{e}");
        assert!(resolve((None, None), both).is_err());
        // A flag list wins over the file's plan, which is then not read.
        let first = allowed_cpus().expect("mask")[0];
        let (cores, plan) = resolve(
            (Some(first.to_string()), None),
            (None, Some(PathBuf::from("/nonexistent"))),
        )
        .expect("flag wins");
        assert_eq!(cores, vec![first]);
        assert!(plan.is_none());
    }
}
