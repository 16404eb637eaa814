//! Where the broker's threads run (T2): `--cores all` is the process's
//! affinity mask, `--core-plan` pins shards and the control thread, and a
//! plan the mask cannot honour is refused at start.

use shoal_tests::{allowed_cpus, set_affinity_on_exec, shoal_bin, thread_cpus, Broker};
use std::process::Command;

/// The allowed CPUs of the first thread of `pid` whose name starts with
/// `name` (glommio names a shard's threads `shard-<i>-<executor id>`).
fn cpus_of(pid: u32, name: &str) -> String {
    thread_cpus(pid)
        .into_iter()
        .find(|(n, _)| n.starts_with(name))
        .map(|(_, c)| c)
        .unwrap_or_else(|| panic!("no thread {name}: {:?}", thread_cpus(pid)))
}

/// Started under a mask of one CPU that is not CPU 0 (as `taskset -c 1`
/// does), `--cores all` runs its one shard on that CPU.
#[test]
fn cores_all_is_the_affinity_mask() {
    let allowed = allowed_cpus();
    let Some(&last) = allowed.last().filter(|&&c| c != 0) else {
        eprintln!("skipped: needs a CPU other than 0 in the affinity mask");
        return;
    };
    let mut b = Broker::start_custom(Some("all"), 1, &[], Some(&[last]));
    let pid = b.pid().expect("running");
    assert_eq!(cpus_of(pid, "shard-0"), last.to_string());
    let log = b.log_text();
    assert!(log.contains(&format!("shard_cores=[{last}]")), "{log}");
    assert!(b.terminate(), "clean exit: {}", b.log_text());
}

/// A plan's shard cores and control core are where the threads run, and
/// the start-up log reports the plan.
#[test]
fn a_core_plan_pins_shards_and_the_control_thread() {
    let allowed = allowed_cpus();
    if allowed.len() < 2 {
        eprintln!("skipped: needs two CPUs in the affinity mask");
        return;
    }
    let (control, shard) = (allowed[0], allowed[1]);
    let dir = tempfile::tempdir().expect("temp dir");
    let plan = dir.path().join("core-plan.toml");
    std::fs::write(
        &plan,
        format!(
            "# from shoal-tune\nmode = \"split\"\nshard_cores = [{shard}]\ncontrol_core = {control}\n\
             irq_cores = [{control}]\nrps_cores = [{shard}]\n\n[topology]\nsmt = false\n"
        ),
    )
    .expect("plan");
    let plan_arg = plan.to_string_lossy().into_owned();
    let mut b = Broker::start_custom(None, 1, &["--core-plan", &plan_arg], None);
    let pid = b.pid().expect("running");
    assert_eq!(cpus_of(pid, "shard-0"), shard.to_string());
    assert_eq!(cpus_of(pid, "signals"), control.to_string());
    let log = b.log_text();
    assert!(log.contains("core plan"), "{log}");
    assert!(
        log.contains(&format!("control_core=Some({control})")),
        "{log}"
    );
    assert!(b.terminate(), "clean exit: {}", b.log_text());
}

/// A plan naming a CPU outside the affinity mask, or given together with
/// `--cores`, stops the start with a message that says why.
#[test]
fn a_plan_the_mask_cannot_honour_is_refused() {
    let allowed = allowed_cpus();
    let dir = tempfile::tempdir().expect("temp dir");
    let plan = dir.path().join("core-plan.toml");
    let outside = allowed.last().copied().unwrap_or(0) + 1;
    std::fs::write(&plan, format!("shard_cores = [{outside}]\n")).expect("plan");
    let run = |extra: &[&str], mask: Option<Vec<usize>>| {
        let mut cmd = Command::new(shoal_bin());
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--core-plan")
            .arg(&plan)
            .args(extra);
        if let Some(m) = mask {
            set_affinity_on_exec(&mut cmd, m);
        }
        cmd.output().expect("run shoal")
    };
    let out = run(&[], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not in this process's affinity mask"), "{err}");

    let out = run(&["--cores", "0"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("not both"), "{err}");

    // A list naming a CPU outside the mask is refused the same way.
    let mut cmd = Command::new(shoal_bin());
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--cores", &outside.to_string()]);
    let out = cmd.output().expect("run shoal");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("affinity mask"), "{err}");
}
