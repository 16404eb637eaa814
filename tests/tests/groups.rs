//! Consumer groups through the `shoal` CLI against a real broker: members
//! as separate `shoal consume --group` processes share a topic's
//! partitions, a member killed with SIGKILL is replaced by the others
//! without losing a message, SIGTERM commits what was printed and leaves,
//! and `group list | describe | reset-offsets` show and move the offsets.

use serde_json::Value;
use shoal_tests::{eventually, shoal_bin, two_shards, Broker};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn shoal(b: &Broker, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(shoal_bin())
        .arg("--broker")
        .arg(b.addr())
        .args(["--discovery-cache", "off"])
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shoal");
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.as_bytes())
            .expect("write stdin");
    }
    let out = child.wait_with_output().expect("shoal ran");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn produce(b: &Broker, topic: &str, range: std::ops::Range<u32>) {
    let lines: String = range.map(|i| format!("m{i}\n")).collect();
    let (ok, _, err) = shoal(b, &["produce", topic, "--acks", "all"], Some(&lines));
    assert!(ok, "produce: {err}");
}

fn create_topic(b: &Broker, topic: &str, partitions: u32) {
    let p = partitions.to_string();
    let (ok, _, err) = shoal(b, &["topic", "create", topic, "--partitions", &p], None);
    assert!(ok, "create: {err}");
}

/// A `shoal consume --group` process printing into a file.
struct Member {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Member {
    fn start(b: &Broker, dir: &std::path::Path, name: &str, topic: &str, group: &str) -> Member {
        let out = dir.join(format!("{name}.out"));
        let err = dir.join(format!("{name}.err"));
        let child = Command::new(shoal_bin())
            .arg("--broker")
            .arg(b.addr())
            .args(["--discovery-cache", "off"])
            .args(["consume", topic, "--group", group, "--from-beginning"])
            .args(["--session-timeout-ms", "2000"])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("out file"))
            .stderr(std::fs::File::create(&err).expect("err file"))
            .spawn()
            .expect("spawn a member");
        Member { child, out, err }
    }

    fn lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status (None if it did not exit in time).
    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: signalling a child process this test started.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        for _ in 0..300 {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn describe(b: &Broker, group: &str) -> Value {
    let (ok, out, err) = shoal(b, &["group", "describe", group, "--json"], None);
    assert!(ok, "describe: {err}");
    serde_json::from_str(&out).expect("one JSON object")
}

/// [`describe`], `Null` while the group does not exist yet (its members
/// are still joining).
fn describe_soon(b: &Broker, group: &str) -> Value {
    let (ok, out, err) = shoal(b, &["group", "describe", group, "--json"], None);
    if !ok {
        assert!(err.contains("no group"), "describe: {err}");
        return Value::Null;
    }
    serde_json::from_str(&out).expect("one JSON object")
}

/// (member id, its assignment) of each member.
fn assignments(d: &Value) -> BTreeMap<String, BTreeSet<u64>> {
    d["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            let parts = m["assignment"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|tp| tp["partition"].as_u64())
                .collect();
            (
                m["member_id"].as_str().unwrap_or_default().to_string(),
                parts,
            )
        })
        .collect()
}

fn all_lines(members: &[&Member]) -> Vec<String> {
    members.iter().flat_map(|m| m.lines()).collect()
}

fn expected(range: std::ops::Range<u32>) -> BTreeSet<String> {
    range.map(|i| format!("m{i}")).collect()
}

/// Three member processes split six partitions two each, without overlap;
/// every message reaches one of them. After one is killed with SIGKILL
/// its partitions go to the other two once its session expires, and they
/// resume from its last commit: nothing produced is lost. SIGTERM makes
/// the others commit and leave: the group ends empty with no lag.
#[test]
fn members_share_partitions_and_replace_a_killed_one() {
    let b = Broker::start(two_shards());
    create_topic(&b, "events", 6);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut m: Vec<Member> = (0..3)
        .map(|i| Member::start(&b, dir.path(), &format!("m{i}"), "events", "workers"))
        .collect();
    eventually(
        Duration::from_secs(30),
        "three members, two partitions each",
        || {
            let a = assignments(&describe_soon(&b, "workers"));
            a.len() == 3 && a.values().all(|p| p.len() == 2)
        },
    );
    let a = assignments(&describe(&b, "workers"));
    let union: BTreeSet<u64> = a.values().flatten().copied().collect();
    assert_eq!(union, (0..6).collect(), "{a:?}");

    produce(&b, "events", 0..600);
    eventually(Duration::from_secs(30), "every message printed", || {
        let got: BTreeSet<String> = all_lines(&m.iter().collect::<Vec<_>>())
            .into_iter()
            .collect();
        got == expected(0..600)
    });
    let before = all_lines(&m.iter().collect::<Vec<_>>());
    assert_eq!(before.len(), 600, "no duplicates in a steady group");
    for x in &m {
        assert!(
            !x.lines().is_empty(),
            "every member read something: {}",
            x.stderr()
        );
    }

    m[0].kill9();
    produce(&b, "events", 600..1200);
    eventually(Duration::from_secs(30), "two members take over", || {
        let a = assignments(&describe(&b, "workers"));
        a.len() == 2 && a.values().map(BTreeSet::len).sum::<usize>() == 6
    });
    eventually(
        Duration::from_secs(30),
        "every message printed after the kill",
        || {
            let got: BTreeSet<String> = all_lines(&m.iter().collect::<Vec<_>>())
                .into_iter()
                .collect();
            got.is_superset(&expected(0..1200))
        },
    );

    for x in &mut m[1..] {
        let status = x.terminate().expect("exits after SIGTERM");
        assert!(status.success(), "{status}: {}", x.stderr());
    }
    let d = describe(&b, "workers");
    assert_eq!(d["state"], "empty", "{d}");
    for p in d["partitions"].as_array().expect("partitions") {
        assert_eq!(p["lag"], 0, "{d}");
    }
}

/// `--count` stops a member after N lines and commits exactly what it
/// printed: the next member of the group prints the rest, no line twice.
/// A member stopped with SIGTERM exits 0, commits, and leaves the group.
#[test]
fn commits_cover_exactly_what_was_printed() {
    let b = Broker::start(two_shards());
    create_topic(&b, "orders", 3);
    produce(&b, "orders", 0..100);
    let consume = |n: &str| {
        shoal(
            &b,
            &[
                "consume",
                "orders",
                "--group",
                "billing",
                "--from-beginning",
                "--count",
                n,
            ],
            None,
        )
    };
    let (ok, first, err) = consume("40");
    assert!(ok, "{err}");
    let (ok, second, err) = consume("60");
    assert!(ok, "{err}");
    let first: Vec<&str> = first.lines().collect();
    let second: Vec<&str> = second.lines().collect();
    assert_eq!((first.len(), second.len()), (40, 60));
    let all: BTreeSet<String> = first.iter().chain(&second).map(|s| s.to_string()).collect();
    assert_eq!(all, expected(0..100), "each line exactly once");

    let d = describe(&b, "billing");
    assert_eq!(d["state"], "empty");
    assert_eq!(d["members"].as_array().map(Vec::len), Some(0));
    for p in d["partitions"].as_array().expect("partitions") {
        assert_eq!(p["lag"], 0, "{d}");
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let mut follower = Member::start(&b, dir.path(), "f", "orders", "billing");
    eventually(Duration::from_secs(20), "the member joined", || {
        describe_soon(&b, "billing")["members"]
            .as_array()
            .map(Vec::len)
            == Some(1)
    });
    produce(&b, "orders", 100..110);
    eventually(Duration::from_secs(20), "new lines printed", || {
        follower.lines().len() == 10
    });
    assert_eq!(
        follower.lines().into_iter().collect::<BTreeSet<_>>(),
        expected(100..110),
        "only what came after the commits"
    );
    let status = follower.terminate().expect("exits after SIGTERM");
    assert!(status.success(), "{status}: {}", follower.stderr());
    let d = describe(&b, "billing");
    assert_eq!(d["members"].as_array().map(Vec::len), Some(0), "left: {d}");
    let committed: u64 = d["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .filter_map(|p| p["committed"].as_u64())
        .sum();
    assert_eq!(committed, 110);
}

/// `group reset-offsets` is refused while the group has a member, and
/// otherwise moves every partition's committed offset: to the log start,
/// to the end, or to a given offset kept within the log.
#[test]
fn reset_offsets_moves_an_empty_group_only() {
    let b = Broker::start(two_shards());
    create_topic(&b, "audit", 2);
    produce(&b, "audit", 0..20);
    let (ok, _, err) = shoal(
        &b,
        &[
            "consume",
            "audit",
            "--group",
            "ops",
            "--from-beginning",
            "--count",
            "20",
        ],
        None,
    );
    assert!(ok, "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let mut member = Member::start(&b, dir.path(), "m", "audit", "ops");
    eventually(Duration::from_secs(20), "the member joined", || {
        describe_soon(&b, "ops")["members"].as_array().map(Vec::len) == Some(1)
    });
    let (ok, _, err) = shoal(
        &b,
        &[
            "group",
            "reset-offsets",
            "ops",
            "--topic",
            "audit",
            "--to-earliest",
        ],
        None,
    );
    assert!(!ok);
    assert!(err.contains("active members"), "{err}");
    assert!(member.terminate().is_some_and(|s| s.success()));

    let (ok, out, err) = shoal(
        &b,
        &[
            "group",
            "reset-offsets",
            "ops",
            "--topic",
            "audit",
            "--to-earliest",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 2, "{out}");
    let committed = |d: &Value| -> Vec<u64> {
        d["partitions"]
            .as_array()
            .expect("partitions")
            .iter()
            .map(|p| p["committed"].as_u64().expect("committed"))
            .collect()
    };
    assert_eq!(committed(&describe(&b, "ops")), [0, 0]);
    let (ok, again, err) = shoal(
        &b,
        &["consume", "audit", "--group", "ops", "--count", "20"],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(
        again.lines().collect::<BTreeSet<_>>().len(),
        20,
        "read again from the start"
    );

    let (ok, _, err) = shoal(
        &b,
        &[
            "group",
            "reset-offsets",
            "ops",
            "--topic",
            "audit",
            "--to-offset",
            "3",
        ],
        None,
    );
    assert!(ok, "{err}");
    assert_eq!(committed(&describe(&b, "ops")), [3, 3]);
    let (ok, _, err) = shoal(
        &b,
        &[
            "group",
            "reset-offsets",
            "ops",
            "--topic",
            "audit",
            "--to-offset",
            "999",
        ],
        None,
    );
    assert!(ok, "{err}");
    let d = describe(&b, "ops");
    let ends: Vec<u64> = d["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| p["log_end_offset"].as_u64().expect("end"))
        .collect();
    assert_eq!(committed(&d), ends, "kept within the log");
    let (ok, _, err) = shoal(
        &b,
        &[
            "group",
            "reset-offsets",
            "ops",
            "--topic",
            "audit",
            "--to-latest",
        ],
        None,
    );
    assert!(ok, "{err}");

    let (ok, out, _) = shoal(&b, &["group", "list"], None);
    assert!(ok && out.contains("ops\tstate=empty\tmembers=0"), "{out}");
    let (ok, out, _) = shoal(&b, &["group", "list", "--json"], None);
    assert!(ok);
    let v: Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(v["groups"][0]["group"], "ops");
    let (ok, _, err) = shoal(&b, &["group", "describe", "nobody"], None);
    assert!(!ok && err.contains("no group"), "{err}");
}

/// Removes `member` from `group` as if it had left (a leave sent on its
/// behalf at the coordinator): its next heartbeat meets UnknownMemberId.
fn evict(port: u16, group: &str, member: &str) {
    use shoal_tests::{meta, raw};
    use shoal_wire::fb;
    use shoal_wire::group::{coordinator_partition, GROUPS_TOPIC};
    let frame = || {
        raw::request(1, fb::RequestBody::GroupHeartbeatRequest, |fbb| {
            let g = fbb.create_string(group);
            let m = fbb.create_string(member);
            fb::GroupHeartbeatRequest::create(
                fbb,
                &fb::GroupHeartbeatRequestArgs {
                    group: Some(g),
                    member_id: Some(m),
                    member_epoch: -1,
                    ..Default::default()
                },
            )
            .as_union_value()
        })
    };
    eventually(
        Duration::from_secs(20),
        "the coordinator takes the leave",
        || {
            let Some(m) = meta::try_metadata(port) else {
                return false;
            };
            let parts = m.topic(GROUPS_TOPIC);
            let part = &parts[coordinator_partition(group, parts.len() as u32) as usize];
            let leader = if m.cluster.is_empty() {
                m.brokers[0].0
            } else {
                part.leader
            };
            meta::try_call(m.shard_port(leader, part.shard), frame()).is_some_and(|h| {
                flatbuffers::root::<fb::Response>(&h).is_ok_and(|r| r.error_code() == 0)
            })
        },
    );
}

/// The library: a second member takes half the partitions only after the
/// first reported them revoked (never both reading one), events reach the
/// listeners in that order, commits are visible to `fetch_committed`, a
/// member removed behind its back reports its partitions lost and joins
/// again by itself, and `close` hands its partitions back to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_rebalances_without_overlap_and_rejoins_after_a_loss() {
    use shoal_client::{
        Client, ClientConfig, DiscoveryCache, GroupConfig, GroupConsumer, OffsetReset,
        RebalanceEvent,
    };
    use std::sync::{Arc, Mutex};

    let b = Broker::start(two_shards());
    create_topic(&b, "jobs", 4);
    produce(&b, "jobs", 0..40);
    let addr = b.addr();
    let connect = || {
        Client::connect_with_config(
            &addr,
            ClientConfig {
                discovery_cache: DiscoveryCache::from_setting("off"),
                ..ClientConfig::default()
            },
        )
    };
    let config = GroupConfig {
        offset_reset: OffsetReset::Earliest,
        session_timeout: Duration::from_secs(2),
        ..GroupConfig::default()
    };
    let events: Arc<Mutex<Vec<(&str, RebalanceEvent)>>> = Arc::default();
    let listener = |name: &'static str| {
        let events = events.clone();
        move |e| events.lock().expect("events").push((name, e))
    };
    let mut a = GroupConsumer::subscribe(
        connect().await.expect("connect"),
        "lib",
        &["jobs"],
        config.clone(),
    )
    .await
    .expect("a joins");
    a.set_rebalance_listener(listener("a"));
    let mut got = BTreeSet::new();
    for _ in 0..100 {
        for r in a.poll().await.expect("poll a") {
            got.insert(String::from_utf8(r.value.unwrap_or_default()).expect("utf-8"));
        }
        if got.len() == 40 {
            break;
        }
    }
    assert_eq!(got, expected(0..40));
    assert_eq!(a.assignment().len(), 4);
    a.commit().await.expect("commit");
    let committed = connect()
        .await
        .expect("connect")
        .fetch_committed("lib", &["jobs"])
        .await
        .expect("fetch committed");
    assert_eq!(committed.values().sum::<u64>(), 40, "{committed:?}");

    let mut c = GroupConsumer::subscribe(
        connect().await.expect("connect"),
        "lib",
        &["jobs"],
        config.clone(),
    )
    .await
    .expect("c joins");
    c.set_rebalance_listener(listener("c"));
    for _ in 0..100 {
        a.poll().await.expect("poll a");
        c.poll().await.expect("poll c");
        let (sa, sc): (BTreeSet<_>, BTreeSet<_>) = (
            a.assignment().into_iter().collect(),
            c.assignment().into_iter().collect(),
        );
        assert!(sa.is_disjoint(&sc), "{sa:?} and {sc:?}");
        if sa.len() == 2 && sc.len() == 2 {
            break;
        }
    }
    assert_eq!((a.assignment().len(), c.assignment().len()), (2, 2));
    {
        let ev = events.lock().expect("events");
        let kinds: Vec<(&str, &str, usize)> = ev
            .iter()
            .map(|(who, e)| match e {
                RebalanceEvent::Assigned(v) => (*who, "assigned", v.len()),
                RebalanceEvent::Revoked(v) => (*who, "revoked", v.len()),
                RebalanceEvent::Lost(v) => (*who, "lost", v.len()),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                ("a", "assigned", 4),
                ("a", "revoked", 2),
                ("c", "assigned", 2)
            ]
        );
    }

    let (member, _) = c.member().expect("a member");
    evict(b.port, "lib", &member);
    let mut lost = false;
    for _ in 0..100 {
        a.poll().await.expect("poll a");
        c.poll().await.expect("poll c");
        lost |=
            events.lock().expect("events").iter().any(|(who, e)| {
                *who == "c" && matches!(e, RebalanceEvent::Lost(v) if v.len() == 2)
            });
        if lost && c.member().is_some_and(|(id, _)| id != member) && c.assignment().len() == 2 {
            break;
        }
    }
    assert!(lost, "c reported its partitions lost");
    assert!(
        c.member().is_some_and(|(id, _)| id != member),
        "c joined again"
    );
    assert_eq!((a.assignment().len(), c.assignment().len()), (2, 2));

    c.close().await.expect("c leaves");
    for _ in 0..100 {
        a.poll().await.expect("poll a");
        if a.assignment().len() == 4 {
            break;
        }
    }
    assert_eq!(a.assignment().len(), 4, "a took c's partitions back");
    a.close().await.expect("a leaves");
    let groups = connect()
        .await
        .expect("connect")
        .list_groups()
        .await
        .expect("list");
    assert_eq!(groups.len(), 1);
    assert_eq!((groups[0].group.as_str(), groups[0].members), ("lib", 0));
}
