//! `tuning/shoal-tune` against fake sysfs/procfs trees made in a temp dir:
//! check, apply, check again (nothing left to do), undo (every file exactly
//! as it was). Nothing here touches the machine's own settings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tuning/shoal-tune")
}

/// Runs shoal-tune with `args` against `root`; (exit code, stdout, stderr).
fn tune(root: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("python3")
        .arg(script())
        .args(args)
        .arg("--root")
        .arg(root)
        .output()
        .expect("run python3 tuning/shoal-tune");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn put(root: &Path, rel: &str, text: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, text).expect("write");
}

/// A machine as sysfs and procfs show it: `nodes` NUMA nodes of `cores`
/// physical cores of `threads` threads each (Linux numbering: the first
/// thread of every core, then the second ones), one NIC (`eth0`, on the
/// last node, 4 queues, 5 MSI interrupts) and one NVMe disk (2 interrupts).
fn fake_machine(nodes: usize, cores: usize, threads: usize, allowed: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let r = dir.path();
    let per_thread = nodes * cores;
    let ncpus = per_thread * threads;
    put(
        r,
        "sys/devices/system/cpu/online",
        &format!("0-{}\n", ncpus - 1),
    );
    for cpu in 0..ncpus {
        let core = cpu % per_thread;
        let node = core / cores;
        let siblings: Vec<String> = (0..threads)
            .map(|t| (core + t * per_thread).to_string())
            .collect();
        let t = format!("sys/devices/system/cpu/cpu{cpu}/topology");
        put(r, &format!("{t}/physical_package_id"), &format!("{node}\n"));
        put(r, &format!("{t}/core_id"), &format!("{}\n", core % cores));
        put(
            r,
            &format!("{t}/thread_siblings_list"),
            &format!("{}\n", siblings.join(",")),
        );
        let f = format!("sys/devices/system/cpu/cpu{cpu}/cpufreq");
        put(r, &format!("{f}/scaling_governor"), "powersave\n");
        put(
            r,
            &format!("{f}/scaling_available_governors"),
            "performance powersave\n",
        );
    }
    for node in 0..nodes {
        let cpus: Vec<String> = (0..ncpus)
            .filter(|c| (c % per_thread) / cores == node)
            .map(|c| c.to_string())
            .collect();
        put(
            r,
            &format!("sys/devices/system/node/node{node}/cpulist"),
            &format!("{}\n", cpus.join(",")),
        );
    }
    put(
        r,
        "proc/self/status",
        &format!("Name:\tpython3\nCpus_allowed_list:\t{allowed}\n"),
    );
    put(
        r,
        "proc/self/limits",
        "Limit                     Soft Limit           Hard Limit           Units     \n\
         Max locked memory         unlimited            unlimited            bytes     \n",
    );
    // The NIC: a PCI device with MSI interrupts 40-44, on the last node.
    let nic = "sys/devices/pci0000:00/0000:00:03.0";
    for irq in 40..45 {
        put(r, &format!("{nic}/msi_irqs/{irq}"), "msix\n");
        put(
            r,
            &format!("proc/irq/{irq}/smp_affinity_list"),
            &format!("0-{}\n", ncpus - 1),
        );
    }
    put(r, &format!("{nic}/numa_node"), &format!("{}\n", nodes - 1));
    std::fs::create_dir_all(r.join("sys/class/net/eth0")).expect("mkdir");
    std::os::unix::fs::symlink(r.join(nic), r.join("sys/class/net/eth0/device")).expect("link");
    std::fs::create_dir_all(r.join("sys/class/net/lo")).expect("mkdir");
    for q in 0..4 {
        let qd = "sys/class/net/eth0/queues";
        put(r, &format!("{qd}/rx-{q}/rps_cpus"), "00000000\n");
        put(r, &format!("{qd}/rx-{q}/rps_flow_cnt"), "0\n");
        put(r, &format!("{qd}/tx-{q}/xps_cpus"), "00000000\n");
    }
    // The disk.
    let disk = "sys/devices/pci0000:00/0000:00:04.0";
    for irq in 50..52 {
        put(r, &format!("{disk}/msi_irqs/{irq}"), "msix\n");
        put(
            r,
            &format!("proc/irq/{irq}/smp_affinity_list"),
            &format!("0-{}\n", ncpus - 1),
        );
    }
    std::fs::create_dir_all(r.join(format!("{disk}/nvme/nvme0"))).expect("mkdir");
    std::fs::create_dir_all(r.join("sys/block/nvme0n1/queue")).expect("mkdir");
    std::os::unix::fs::symlink(
        r.join(format!("{disk}/nvme/nvme0")),
        r.join("sys/block/nvme0n1/device"),
    )
    .expect("link");
    put(
        r,
        "sys/block/nvme0n1/queue/scheduler",
        "none [mq-deadline] kyber bfq \n",
    );
    put(r, "sys/block/nvme0n1/queue/rotational", "0\n");
    put(r, "sys/block/nvme0n1/queue/read_ahead_kb", "8192\n");
    put(r, "sys/block/nvme0n1/queue/rq_affinity", "1\n");
    // A loop device is not tuned.
    std::fs::create_dir_all(r.join("sys/block/loop0/queue")).expect("mkdir");
    put(r, "sys/block/loop0/queue/read_ahead_kb", "128\n");
    let thp = "sys/kernel/mm/transparent_hugepage";
    put(r, &format!("{thp}/enabled"), "[always] madvise never\n");
    put(
        r,
        &format!("{thp}/defrag"),
        "always defer defer+madvise [madvise] never\n",
    );
    put(r, "proc/sys/vm/swappiness", "60\n");
    for (k, v) in [
        ("net/core/somaxconn", "128\n"),
        ("net/ipv4/tcp_max_syn_backlog", "8192\n"),
        ("net/core/netdev_max_backlog", "1000\n"),
        ("net/core/rmem_max", "212992\n"),
        ("net/core/wmem_max", "212992\n"),
        ("net/ipv4/tcp_rmem", "4096\t131072\t6291456\n"),
        ("net/ipv4/tcp_wmem", "4096\t16384\t4194304\n"),
        ("net/core/busy_read", "0\n"),
        ("net/core/busy_poll", "0\n"),
        ("net/core/rps_sock_flow_entries", "0\n"),
    ] {
        put(r, &format!("proc/sys/{k}"), v);
    }
    dir
}

/// Every regular file under `root` and its bytes.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let e = e.expect("entry");
            let ty = e.file_type().expect("file type");
            if ty.is_dir() {
                stack.push(e.path());
            } else if ty.is_file() {
                let rel = e
                    .path()
                    .strip_prefix(root)
                    .expect("under root")
                    .to_path_buf();
                out.insert(rel, std::fs::read(e.path()).expect("read"));
            }
        }
    }
    out
}

fn read(root: &Path, rel: &str) -> String {
    std::fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn changes(stdout: &str) -> usize {
    if stdout.contains("nothing to do") {
        return 0;
    }
    stdout
        .lines()
        .find_map(|l| {
            l.split(" change(s) to make")
                .next()
                .filter(|_| l.contains("change(s) to make"))
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no summary line in:\n{stdout}"))
}

/// The whole cycle on a two-socket machine with SMT: the dry run changes
/// nothing; apply makes every change; a second check finds nothing to do;
/// undo puts every file back byte for byte and removes the plan.
#[test]
fn check_apply_check_undo_restores_every_file() {
    let m = fake_machine(2, 4, 2, "0-15");
    let r = m.path();
    let before = snapshot(r);

    let (code, out, err) = tune(r, &["all"]);
    assert_eq!(code, 0, "{out}{err}");
    let pending = changes(&out);
    assert!(pending > 30, "expected many changes, got {pending}:\n{out}");
    assert_eq!(snapshot(r), before, "a dry run changed files");

    let (code, out, err) = tune(r, &["all", "--script"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("#!/bin/sh"), "{out}");
    assert!(
        out.contains(&format!(
            "printf '%s\\n' performance > {}/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor",
            r.display()
        )),
        "{out}"
    );
    assert!(out.contains("was: powersave"), "{out}");
    assert_eq!(snapshot(r), before, "--script changed files");

    let (code, out, err) = tune(r, &["all", "--apply"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains(&format!("{pending} change(s) made")), "{out}");

    let (code, out, err) = tune(r, &["all"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(changes(&out), 0, "after apply:\n{out}");

    // What apply wrote, as the kernel would show it.
    assert_eq!(
        read(r, "sys/devices/system/cpu/cpu7/cpufreq/scaling_governor"),
        "performance\n"
    );
    assert_eq!(
        read(r, "sys/kernel/mm/transparent_hugepage/enabled"),
        "always [madvise] never\n"
    );
    assert_eq!(
        read(r, "sys/block/nvme0n1/queue/scheduler"),
        "[none] mq-deadline kyber bfq \n"
    );
    assert_eq!(
        read(r, "proc/sys/net/ipv4/tcp_rmem"),
        "4096\t131072\t16777216\n"
    );
    assert_eq!(
        read(r, "proc/sys/net/ipv4/tcp_max_syn_backlog"),
        "8192\n",
        "never lowered"
    );
    assert_eq!(read(r, "sys/block/nvme0n1/queue/read_ahead_kb"), "128\n");
    assert_eq!(read(r, "sys/block/loop0/queue/read_ahead_kb"), "128\n");

    // The plan: 8 physical cores, the NIC on node 1 (CPUs 4-7 and their
    // siblings 12-15): its first core (4, sibling 12) takes interrupts and
    // the control thread, shards run on one thread of every other core,
    // the NIC's node first.
    let plan = read(r, "etc/shoal/core-plan.toml");
    assert!(plan.contains("mode = \"split\""), "{plan}");
    assert!(
        plan.contains("shard_cores = [5, 6, 7, 0, 1, 2, 3]"),
        "{plan}"
    );
    assert!(plan.contains("control_core = 12"), "{plan}");
    assert!(plan.contains("irq_cores = [4, 12]"), "{plan}");
    assert!(plan.contains("numa_nodes = 2"), "{plan}");
    // Interrupts alternate over the IRQ core's two threads.
    assert_eq!(read(r, "proc/irq/40/smp_affinity_list"), "4\n");
    assert_eq!(read(r, "proc/irq/41/smp_affinity_list"), "12\n");
    assert_eq!(read(r, "proc/irq/50/smp_affinity_list"), "12\n");
    // Packets are steered to the shard cores; each shard core sends on
    // one transmit queue.
    assert_eq!(
        read(r, "sys/class/net/eth0/queues/rx-0/rps_cpus"),
        "000000ef\n"
    );
    assert_eq!(
        read(r, "sys/class/net/eth0/queues/tx-0/xps_cpus"),
        "00000021\n"
    );

    let (code, out, err) = tune(r, &["all", "--undo"]);
    assert_eq!(code, 0, "{out}{err}");
    let after = snapshot(r);
    for (path, bytes) in &before {
        assert_eq!(
            after
                .get(path)
                .map(|b| String::from_utf8_lossy(b).into_owned()),
            Some(String::from_utf8_lossy(bytes).into_owned()),
            "{} not restored",
            path.display()
        );
    }
    let extra: Vec<_> = after.keys().filter(|p| !before.contains_key(*p)).collect();
    assert!(extra.is_empty(), "left behind after undo: {extra:?}");
    let (_, out, _) = tune(r, &["all", "--undo"]);
    assert!(out.contains("nothing to undo"), "{out}");
}

/// Undo of one tuner leaves the others' changes (and their record) alone.
#[test]
fn undo_of_one_tuner_keeps_the_others() {
    let m = fake_machine(1, 2, 1, "0-1");
    let r = m.path();
    let (code, out, err) = tune(r, &["all", "--apply"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = tune(r, &["swappiness", "--undo"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(read(r, "proc/sys/vm/swappiness"), "60\n");
    assert_eq!(read(r, "proc/sys/net/core/somaxconn"), "4096\n");
    let (_, out, _) = tune(r, &["swappiness"]);
    assert_eq!(changes(&out), 1, "{out}");
    let (code, _, _) = tune(r, &["all", "--undo"]);
    assert_eq!(code, 0);
    assert_eq!(read(r, "proc/sys/net/core/somaxconn"), "128\n");
}

/// The plan covers only the CPUs of the affinity mask (as taskset or a
/// cgroup cpuset sets it), and a small machine shares its cores: shards on
/// all of them, interrupts spread over them, no control core of its own.
#[test]
fn the_plan_follows_the_affinity_mask() {
    let m = fake_machine(1, 4, 1, "2-3");
    let r = m.path();
    let (code, out, err) = tune(r, &["core-plan", "--apply"]);
    assert_eq!(code, 0, "{out}{err}");
    let plan = read(r, "etc/shoal/core-plan.toml");
    assert!(plan.contains("mode = \"shared\""), "{plan}");
    assert!(plan.contains("shard_cores = [2, 3]"), "{plan}");
    assert!(!plan.contains("control_core ="), "{plan}");
    assert!(plan.contains("allowed = \"2-3\""), "{plan}");
    // The IRQ tuner follows the plan file.
    let (code, out, err) = tune(r, &["irq", "--apply"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(read(r, "proc/irq/40/smp_affinity_list"), "2\n");
    assert_eq!(read(r, "proc/irq/41/smp_affinity_list"), "3\n");
}

/// memlock is checked, never changed: too low a limit is a warning with the
/// way to raise it, and no change is counted for it.
#[test]
fn memlock_is_checked_only() {
    let m = fake_machine(1, 2, 1, "0-1");
    let r = m.path();
    put(
        r,
        "proc/self/limits",
        "Max locked memory         8388608              8388608              bytes     \n",
    );
    let (code, out, err) = tune(r, &["memlock", "--apply"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("WARNING"), "{out}");
    assert!(out.contains("LimitMEMLOCK=infinity"), "{out}");
    assert!(out.contains("0 change(s) made"), "{out}");
}

/// A root that is not a directory, or a NIC that does not exist, is a clear
/// error (exit 2), not a traceback.
#[test]
fn bad_arguments_are_errors_not_tracebacks() {
    let m = fake_machine(1, 2, 1, "0-1");
    let (code, _, err) = tune(m.path(), &["rps", "--nic", "eth9"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no network interface eth9"), "{err}");
    assert!(!err.contains("Traceback"), "{err}");
    let (code, _, err) = tune(&m.path().join("nope"), &["thp"]);
    assert_eq!(code, 2, "{err}");
}
