//! Groups in a cluster (real ZooKeeper, three real brokers): the
//! coordinator is the leader of the group's `__shoal_groups` partition, so
//! kill -9 of its broker moves coordination with leadership, and the new
//! coordinator has every acknowledged commit and the members with their
//! assignment. A follower builds the checkpoints and ships them to the
//! leader, which cuts its log below them.

use shoal_tests::groupraw::*;
use shoal_tests::meta::{create_topic, try_metadata};
use shoal_tests::{eventually, Broker, ZooKeeper};
use shoal_wire::group::{coordinator_partition, GROUPS_TOPIC};
use std::collections::BTreeMap;
use std::time::Duration;

const TOML: &str = "zk_session_timeout_ms = 1500\ngroup_partitions = 2\n\
                    group_checkpoint_records = 300\ngroup_segment_bytes = 1048576\n";

fn cluster(zk: &ZooKeeper) -> Vec<Broker> {
    (1..=3u32)
        .map(|id| {
            let cores = if id % 2 == 0 { "1" } else { "0" };
            Broker::start_member(cores, &zk.connect(), id, TOML, &[])
        })
        .collect()
}

/// The broker leading `group`'s coordinator partition, per any live
/// broker's metadata.
fn coordinator_broker(ports: &[u16], group: &str) -> Option<u32> {
    ports.iter().find_map(|&p| {
        let m = try_metadata(p)?;
        let parts = &m.topics.iter().find(|t| t.0 == GROUPS_TOPIC)?.1;
        let part = &parts[coordinator_partition(group, parts.len() as u32) as usize];
        (!part.offline).then_some(part.leader)
    })
}

#[test]
fn the_coordinator_fails_over_with_its_offsets_and_members() {
    let zk = ZooKeeper::start();
    let mut brokers = cluster(&zk);
    let ports: Vec<u16> = brokers.iter().map(|b| b.port).collect();
    eventually(Duration::from_secs(15), "three brokers", || {
        try_metadata(ports[0]).is_some_and(|m| m.brokers.len() == 3)
    });
    let (code, msg) = create_topic(ports[0], "t", 6, 3);
    assert_eq!(code, 0, "{msg}");
    let g = "billing";
    let a = join(ports[0], g, "t", 20_000);
    assert_eq!(a.assignment.len(), 6);
    // Commits acknowledged by the coordinator (acks=all on the groups log).
    let mut acked = BTreeMap::new();
    for round in 1..=20i64 {
        let offs: Vec<(&str, u32, i64)> = (0..6)
            .map(|p| ("t", p, round * 10 + i64::from(p)))
            .collect();
        let (code, msg) = commit(ports[0], g, &a.member_id, a.epoch, &offs);
        assert_eq!(code, 0, "{msg}");
        for (_, p, o) in offs {
            acked.insert(("t".to_string(), p), o);
        }
    }
    // Replicated groups log: RF 3 on three live brokers.
    let m = try_metadata(ports[0]).expect("metadata");
    let gl = m.topic(GROUPS_TOPIC);
    assert!(gl.iter().all(|p| p.replicas.len() == 3), "{gl:?}");
    let old = coordinator_broker(&ports, g).expect("a coordinator");
    brokers[old as usize - 1].kill9();
    let live: Vec<u16> = brokers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i as u32 + 1 != old)
        .map(|(_, b)| b.port)
        .collect();
    eventually(Duration::from_secs(20), "a new coordinator", || {
        coordinator_broker(&live, g).is_some_and(|b| b != old)
    });
    // Every acknowledged commit is there.
    let got = fetch_offsets(live[0], g);
    assert_eq!(got, acked, "offsets after the coordinator's broker died");
    // The member is known to the new coordinator, with its partitions.
    let a2 = again(live[0], g, &a, &a.assignment).expect("the member carries on");
    assert_eq!(a2.assignment, a.assignment);
    let offs: Vec<(&str, u32, i64)> = (0..6).map(|p| ("t", p, 1000)).collect();
    assert_eq!(commit(live[0], g, &a.member_id, a2.epoch, &offs).0, 0);
    assert!(fetch_offsets(live[0], g).values().all(|&o| o == 1000));
}

#[test]
fn a_follower_checkpoints_and_the_leader_cuts_its_log() {
    let zk = ZooKeeper::start();
    let brokers = cluster(&zk);
    let ports: Vec<u16> = brokers.iter().map(|b| b.port).collect();
    eventually(Duration::from_secs(15), "three brokers", || {
        try_metadata(ports[0]).is_some_and(|m| m.brokers.len() == 3)
    });
    let (code, msg) = create_topic(ports[0], "t", 4, 3);
    assert_eq!(code, 0, "{msg}");
    let g = "audit";
    // 1 KiB of metadata per commit fills the 1 MiB segments quickly.
    let meta = "m".repeat(1000);
    let mut n = 0i64;
    let mut last = BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let p = loop {
        n += 1;
        let part = (n % 4) as u32;
        let (code, msg, _) = group_call(ports[0], g, || {
            commit_frame(g, "", -1, &[("t", part, n)], &meta)
        });
        assert_eq!(code, 0, "commit {n}: {msg}");
        last.insert(("t".to_string(), part), n);
        if n % 50 == 0 {
            let m = try_metadata(ports[0]).expect("metadata");
            let parts = m.topic(GROUPS_TOPIC);
            let p = coordinator_partition(g, parts.len() as u32);
            // The leader's own view of its log start.
            let leader = coordinator_broker(&ports, g).expect("leader") as usize;
            if groups_log_starts(brokers[leader - 1].port)[p as usize] > 0 {
                break p;
            }
        }
        if std::time::Instant::now() > deadline {
            let lines: Vec<String> = brokers
                .iter()
                .flat_map(|b| {
                    b.log_text()
                        .lines()
                        .filter(|l| {
                            l.contains("checkpoint") || l.contains("WARN") || l.contains("segment")
                        })
                        .map(str::to_string)
                        .collect::<Vec<_>>()
                })
                .collect();
            let files: Vec<Vec<String>> = brokers
                .iter()
                .map(|b| {
                    let d = b
                        .data_dir()
                        .join("topics")
                        .join(format!("{GROUPS_TOPIC}-0"));
                    let mut v: Vec<String> = std::fs::read_dir(&d)
                        .map(|r| {
                            r.flatten()
                                .map(|e| {
                                    format!(
                                        "{:?} {}",
                                        e.file_name(),
                                        e.metadata().map_or(0, |m| m.len())
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    v.sort();
                    v
                })
                .collect();
            panic!("no checkpoint cut the leader's log after {n} commits: {files:#?} {lines:#?}");
        }
    };
    let leader = coordinator_broker(&ports, g).expect("leader") as usize;
    let shipped = brokers
        .iter()
        .enumerate()
        .filter(|(i, _)| i + 1 != leader)
        .any(|(_, b)| {
            b.log_text()
                .contains("group checkpoint shipped to the leader")
        });
    assert!(shipped, "a follower shipped the checkpoint");
    assert!(
        !brokers[leader - 1]
            .log_text()
            .contains("group checkpoint taken by the leader itself"),
        "the leader never stopped to snapshot"
    );
    let dir = brokers[leader - 1]
        .data_dir()
        .join("topics")
        .join(format!("{GROUPS_TOPIC}-{p}"));
    assert!(
        dir.join("groups.ckpt").exists(),
        "the leader keeps the follower's checkpoint"
    );
    assert_eq!(fetch_offsets(ports[0], g), last);
}

#[test]
fn a_replica_back_after_the_log_was_cut_takes_the_leaders_checkpoint() {
    let zk = ZooKeeper::start();
    let mut brokers = cluster(&zk);
    let ports: Vec<u16> = brokers.iter().map(|b| b.port).collect();
    eventually(Duration::from_secs(15), "three brokers", || {
        try_metadata(ports[0]).is_some_and(|m| m.brokers.len() == 3)
    });
    for t in ["t", "u"] {
        let (code, msg) = create_topic(ports[0], t, 4, 3);
        assert_eq!(code, 0, "{msg}");
    }
    let g = "ledger";
    let mut last = BTreeMap::new();
    let mut commit_one = |port: u16, topic: &str, n: i64, meta: &str| {
        let part = (n % 4) as u32;
        let (code, msg, _) = group_call(port, g, || {
            commit_frame(g, "", -1, &[(topic, part, n)], meta)
        });
        assert_eq!(code, 0, "commit {n}: {msg}");
        last.insert((topic.to_string(), part), n);
    };
    // Commits of "t" only before the cut: after it, only a checkpoint
    // holds them.
    for n in 1..=20 {
        commit_one(ports[0], "t", n, "");
    }
    let leader = coordinator_broker(&ports, g).expect("leader");
    let m = try_metadata(ports[0]).expect("metadata");
    let parts = m.topic(GROUPS_TOPIC);
    let p = coordinator_partition(g, parts.len() as u32);
    let away = *parts[p as usize]
        .replicas
        .iter()
        .find(|&&r| r != leader)
        .expect("a follower");
    brokers[away as usize - 1].kill9();
    let live: Vec<u16> = (1..=3u32)
        .filter(|&i| i != away)
        .map(|i| brokers[i as usize - 1].port)
        .collect();
    // While it is down, a checkpoint cuts the leader's log.
    let meta = "m".repeat(1000);
    let mut n = 20;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        n += 1;
        commit_one(live[0], "u", n, &meta);
        if n % 50 == 0 && groups_log_starts(brokers[leader as usize - 1].port)[p as usize] > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint cut the log"
        );
    }
    // Back: it starts over at the leader's log start with the leader's
    // checkpoint, and rejoins the in-sync set.
    brokers[away as usize - 1].restart();
    eventually(
        Duration::from_secs(60),
        "the returned replica in sync",
        || {
            try_metadata(live[0])
                .is_some_and(|m| m.topic(GROUPS_TOPIC)[p as usize].isr.contains(&away))
        },
    );
    assert!(
        brokers[away as usize - 1]
            .log_text()
            .contains("kept the leader's group checkpoint before starting over"),
        "the replica took the leader's checkpoint"
    );
    // The only replica left: it coordinates, with every acknowledged commit.
    for i in (1..=3u32).filter(|&i| i != away) {
        brokers[i as usize - 1].kill9();
    }
    let back = brokers[away as usize - 1].port;
    eventually(
        Duration::from_secs(30),
        "the returned replica leads",
        || coordinator_broker(&[back], g) == Some(away),
    );
    assert_eq!(fetch_offsets(back, g), last);
}

/// A `shoal consume --group` process against a bootstrap list, printing
/// into a file.
struct CliMember {
    child: std::process::Child,
    out: std::path::PathBuf,
}

impl CliMember {
    fn start(bootstrap: &str, dir: &std::path::Path, name: &str) -> CliMember {
        let out = dir.join(format!("{name}.out"));
        let child = std::process::Command::new(shoal_tests::shoal_bin())
            .args(["--broker", bootstrap, "--discovery-cache", "off"])
            .args([
                "consume",
                "orders",
                "--group",
                "billing",
                "--from-beginning",
            ])
            .args(["--session-timeout-ms", "3000"])
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&out).expect("out file"))
            .stderr(std::fs::File::create(dir.join(format!("{name}.err"))).expect("err file"))
            .spawn()
            .expect("spawn a member");
        CliMember { child, out }
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// SIGTERM: commit what was printed, leave, exit 0.
    fn stop(mut self) -> bool {
        // SAFETY: signals our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for CliMember {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn produce_cli(bootstrap: &str, range: std::ops::Range<u32>) {
    use std::io::Write;
    let mut child = std::process::Command::new(shoal_tests::shoal_bin())
        .args(["--broker", bootstrap, "--discovery-cache", "off"])
        .args(["produce", "orders", "--acks", "all"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn produce");
    let lines: String = range.map(|i| format!("m{i}\n")).collect();
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(lines.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("produce ran");
    assert!(
        out.status.success(),
        "produce: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn member_processes_ride_out_the_coordinators_death() {
    let zk = ZooKeeper::start();
    let mut brokers = cluster(&zk);
    let ports: Vec<u16> = brokers.iter().map(|b| b.port).collect();
    eventually(Duration::from_secs(15), "three brokers", || {
        try_metadata(ports[0]).is_some_and(|m| m.brokers.len() == 3)
    });
    let (code, msg) = create_topic(ports[0], "orders", 6, 3);
    assert_eq!(code, 0, "{msg}");
    let all: Vec<String> = brokers.iter().map(|b| b.addr()).collect();
    produce_cli(&all.join(","), 0..300);
    let dir = tempfile::tempdir().expect("temp dir");
    let members = [
        CliMember::start(&all.join(","), dir.path(), "a"),
        CliMember::start(&all.join(","), dir.path(), "b"),
    ];
    let seen = |members: &[CliMember]| -> std::collections::BTreeSet<String> {
        members.iter().flat_map(CliMember::lines).collect()
    };
    eventually(Duration::from_secs(60), "the first 300 consumed", || {
        seen(&members).len() == 300
    });
    let dead = coordinator_broker(&ports, "billing").expect("a coordinator");
    brokers[dead as usize - 1].kill9();
    let live: Vec<String> = (1..=3u32)
        .filter(|&i| i != dead)
        .map(|i| brokers[i as usize - 1].addr())
        .collect();
    produce_cli(&live.join(","), 300..600);
    eventually(Duration::from_secs(90), "every message consumed", || {
        seen(&members).len() == 600
    });
    let want: std::collections::BTreeSet<String> = (0..600).map(|i| format!("m{i}")).collect();
    assert_eq!(seen(&members), want);
    for m in members {
        assert!(m.stop(), "a member exits cleanly on SIGTERM");
    }
}
