//! A cluster of real brokers around a real ZooKeeper, all processes on
//! 127.0.0.1 (issue 10): registration, duplicate ids, the controller and
//! its failover, placement, metadata from any broker, `NotLeader`
//! redirection, a killed broker leaving and coming back, faults.
//!
//! Each test starts its own ZooKeeper and brokers on free ports, so the
//! tests run in parallel. Session timeouts are short (1.5 s) to keep the
//! wall time small.

use shoal_tests::meta::{call, create_topic, metadata};
use shoal_tests::{eventually, raw, three_brokers, Broker, ZooKeeper};
use shoal_wire::fb;
use std::time::Duration;

/// The session timeout `three_brokers` gives its brokers.
const SESSION_MS: u64 = 1500;

/// Produces one small batch to `topic`/`partition` at `port`; returns the
/// error code, message and leader hint (broker, port).
fn produce(port: u16, topic: &str, partition: u32) -> (u16, String, Option<(i32, u16)>) {
    let h = call(
        port,
        raw::request_with(
            1,
            fb::RequestBody::ProduceRequest,
            |fbb| {
                let t = fbb.create_string(topic);
                fb::ProduceRequest::create(
                    fbb,
                    &fb::ProduceRequestArgs {
                        topic: Some(t),
                        partition,
                        acks: fb::Acks::Leader,
                        timeout_ms: 10_000,
                        topic_id: 0,
                    },
                )
                .as_union_value()
            },
            &raw::batch(-1, 0, 3, 32),
        ),
    );
    let r = flatbuffers::root::<fb::Response>(&h).expect("response");
    let hint = r.leader_hint().map(|h| (h.broker_id(), h.port()));
    (
        r.error_code(),
        r.error_message().unwrap_or_default().to_string(),
        hint,
    )
}

fn by_id(brokers: &[Broker], id: u32) -> &Broker {
    &brokers[id as usize - 1]
}

/// Every broker registers and every broker's metadata lists all three; a
/// fourth broker with a taken id refuses to start, naming the problem;
/// links form one per pair.
#[test]
fn brokers_register_and_duplicate_ids_are_refused() {
    let zk = ZooKeeper::start();
    let brokers = three_brokers(&zk, &[]);
    for b in &brokers {
        eventually(Duration::from_secs(10), "all brokers in metadata", || {
            metadata(b.port).ids() == vec![1, 2, 3]
        });
    }
    let m = metadata(brokers[0].port);
    assert_eq!(m.cluster, "default");
    assert!((1..=3).contains(&m.controller), "{m:?}");
    for (id, port, shard_ports, _) in &m.brokers {
        assert_eq!(*port, by_id(&brokers, *id).port);
        assert_eq!(shard_ports, &vec![port + 1]);
    }
    let (ok, err, _) = Broker::run_to_exit(
        "0",
        &["--zookeeper", &zk.connect(), "--broker-id", "2"],
        Duration::from_secs(20),
    );
    assert!(!ok, "a second broker 2 started: {err}");
    assert!(err.contains("broker id 2 is already registered"), "{err}");
    // The one refused did not take broker 2's place.
    assert_eq!(metadata(brokers[1].port).ids(), vec![1, 2, 3]);
    // One link per pair: the lower id dials, so broker 1 opened two, 2 one.
    eventually(Duration::from_secs(5), "links", || {
        brokers
            .iter()
            .all(|b| b.log_text().matches("link to broker open").count() == 2)
    });
}

/// kill -9 of the controller: another broker takes over within the
/// session timeout (plus detection), with a higher epoch, and topic
/// creation works through any broker.
#[test]
fn controller_fails_over_and_topics_can_still_be_created() {
    let zk = ZooKeeper::start();
    let mut brokers = three_brokers(&zk, &[]);
    let first = eventually(Duration::from_secs(10), "a controller", || {
        metadata(brokers[0].port).controller > 0
    });
    let _ = first;
    let old = metadata(brokers[0].port).controller as u32;
    assert_eq!(create_topic(brokers[2].port, "before", 3, 1).0, 0);
    brokers[old as usize - 1].kill9();
    let survivor = brokers
        .iter()
        .find(|b| b.pid().is_some())
        .expect("survivor")
        .port;
    let took = eventually(
        Duration::from_millis(SESSION_MS * 4),
        "a new controller",
        || {
            let c = metadata(survivor).controller;
            c > 0 && c as u32 != old
        },
    );
    eprintln!("new controller after {took:?} (session timeout {SESSION_MS} ms)");
    for b in brokers.iter().filter(|b| b.pid().is_some()) {
        let (code, msg) = create_topic(b.port, &format!("after-{}", b.port), 2, 1);
        assert_eq!(code, 0, "{msg}");
    }
    let m = metadata(survivor);
    assert!(!m.ids().contains(&old));
    assert_eq!(m.topic(&format!("after-{survivor}")).len(), 2);
    // A partition whose only replica was on the dead broker is offline
    // (no in-sync replica to elect), the others are not.
    let parts = m.topic("before");
    for p in &parts {
        assert_eq!(p.offline, p.replicas == vec![old], "{parts:?}");
    }
}

/// Partitions and replicas spread evenly over brokers (leaders too), on
/// different racks where racks are set; each broker holds exactly its
/// replicas on disk; a replication factor above the live brokers is
/// refused.
#[test]
fn placement_spreads_replicas_and_leaders() {
    let zk = ZooKeeper::start();
    let brokers = three_brokers(&zk, &["a", "a", "b"]);
    let port = brokers[0].port;
    eventually(Duration::from_secs(10), "brokers", || {
        metadata(port).ids().len() == 3
    });
    let (code, msg) = create_topic(port, "spread", 6, 2);
    assert_eq!(code, 0, "{msg}");
    let parts = metadata(brokers[1].port).topic("spread");
    assert_eq!(parts.len(), 6);
    let mut leaders = [0; 4];
    let mut replicas = [0; 4];
    for (i, p) in parts.iter().enumerate() {
        assert_eq!(p.replicas.len(), 2, "{p:?}");
        assert_ne!(p.replicas[0], p.replicas[1], "{p:?}");
        assert_eq!(p.leader, p.replicas[0], "preferred leader leads: {p:?}");
        assert_eq!(p.isr.len(), 2);
        assert!(!p.offline);
        // Rack-aware: broker 3 (rack b) is in every partition.
        assert!(
            p.replicas.contains(&3),
            "partition {i} not on both racks: {p:?}"
        );
        leaders[p.leader as usize] += 1;
        for r in &p.replicas {
            replicas[*r as usize] += 1;
        }
    }
    assert_eq!(&leaders[1..], &[2, 2, 2], "{parts:?}");
    assert_eq!(replicas.iter().sum::<i32>(), 12);
    for b in 1..=3u32 {
        let mut on_disk: Vec<String> =
            std::fs::read_dir(by_id(&brokers, b).data_dir().join("topics"))
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
        on_disk.sort();
        let mut want: Vec<String> = parts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.replicas.contains(&b))
            .map(|(i, _)| format!("spread-{i}"))
            .collect();
        want.sort();
        assert_eq!(on_disk, want, "broker {b}");
    }
    let (code, msg) = create_topic(port, "too-wide", 1, 4);
    assert_eq!(code, 14, "{msg}");
    assert!(msg.contains("needs 4 live brokers; 3 are live"), "{msg}");
    let (code, _) = create_topic(brokers[2].port, "spread", 1, 1);
    assert_eq!(code, 13, "an existing name is TopicExists");
}

/// A produce sent to a broker that does not lead the partition gets
/// NotLeader with the leader's id and owning shard's port; sent there it
/// is accepted.
#[test]
fn not_leader_names_the_leader() {
    let zk = ZooKeeper::start();
    let brokers = three_brokers(&zk, &[]);
    let port = brokers[0].port;
    eventually(Duration::from_secs(10), "brokers", || {
        metadata(port).ids().len() == 3
    });
    assert_eq!(create_topic(port, "t", 3, 1).0, 0);
    let m = metadata(port);
    for (p, part) in m.topic("t").iter().enumerate() {
        let leader_port = m.shard_port(part.leader, part.shard);
        for b in &brokers {
            let (code, msg, hint) = produce(b.port + 1, "t", p as u32);
            if b.port + 1 == leader_port {
                assert_eq!(code, 0, "{msg}");
            } else {
                assert_eq!(code, 36, "NotLeader expected: {msg}");
                assert_eq!(hint, Some((part.leader as i32, leader_port)), "{msg}");
            }
        }
    }
}

/// kill -9 of a broker: it leaves the cluster within the session timeout
/// (its partitions offline); restarted, it comes back with its data and
/// its partitions serve again; the others dropped and re-opened their
/// links to it.
#[test]
fn a_killed_broker_leaves_and_comes_back() {
    let zk = ZooKeeper::start();
    let mut brokers = three_brokers(&zk, &[]);
    let port = brokers[0].port;
    eventually(Duration::from_secs(10), "brokers", || {
        metadata(port).ids().len() == 3
    });
    assert_eq!(create_topic(port, "t", 3, 1).0, 0);
    let m = metadata(port);
    let (p3, part3) = m
        .topic("t")
        .into_iter()
        .enumerate()
        .find(|(_, p)| p.leader == 3)
        .expect("a partition led by broker 3");
    let (code, msg, _) = produce(m.shard_port(3, part3.shard), "t", p3 as u32);
    assert_eq!(code, 0, "{msg}");
    brokers[2].kill9();
    let took = eventually(
        Duration::from_millis(SESSION_MS * 4),
        "broker 3 gone from metadata",
        || metadata(port).ids() == vec![1, 2],
    );
    eprintln!("broker 3 left after {took:?}");
    // Its only replica is gone: offline (the controller may still be
    // writing that down a moment after the membership changed).
    eventually(Duration::from_secs(5), "the partition offline", || {
        metadata(port).topic("t")[p3].offline
    });
    let (code, _, _) = produce(port + 1, "t", p3 as u32);
    assert_eq!(code, 37, "LeaderNotAvailable while its leader is down");
    brokers[2].restart();
    eventually(Duration::from_secs(10), "broker 3 back", || {
        metadata(port).ids() == vec![1, 2, 3]
    });
    // Back as its leader: writes are taken once it has heard from
    // ZooKeeper what it leads (NotLeader, retriable, until then).
    eventually(
        Duration::from_secs(10),
        "the partition writable again",
        || {
            let m = metadata(brokers[1].port);
            let part = &m.topic("t")[p3];
            !part.offline && produce(m.shard_port(3, part.shard), "t", p3 as u32).0 == 0
        },
    );
    // Broker 1 dials broker 3: a new link to the new incarnation.
    eventually(Duration::from_secs(5), "link re-opened", || {
        brokers[0]
            .log_text()
            .matches("link to broker open peer=3")
            .count()
            >= 2
    });
}

/// ZooKeeper unreachable at start: a clear error after a bounded wait,
/// not a hang.
#[test]
fn zookeeper_unreachable_at_start_is_a_clear_error() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let (ok, err, took) = Broker::run_to_exit(
        "0",
        &[
            "--zookeeper",
            &format!("127.0.0.1:{port}"),
            "--broker-id",
            "1",
        ],
        Duration::from_secs(30),
    );
    assert!(!ok);
    assert!(err.contains("ZooKeeper"), "{err}");
    assert!(took < Duration::from_secs(20), "{took:?}");
    let (ok, err, _) = Broker::run_to_exit(
        "0",
        &["--zookeeper", "127.0.0.1:2181"],
        Duration::from_secs(10),
    );
    assert!(!ok);
    assert!(err.contains("--broker-id"), "{err}");
}

/// ZooKeeper goes away and comes back (kill -9, restart on its data): the
/// brokers keep serving what they lead meanwhile, and afterwards are all
/// registered again and the cluster takes topic changes.
#[test]
fn brokers_survive_a_zookeeper_restart() {
    let mut zk = ZooKeeper::start();
    let brokers = three_brokers(&zk, &[]);
    let port = brokers[0].port;
    eventually(Duration::from_secs(10), "brokers", || {
        metadata(port).ids().len() == 3
    });
    assert_eq!(create_topic(port, "t", 3, 1).0, 0);
    let m = metadata(port);
    zk.kill9();
    // Serving goes on while ZooKeeper is away.
    for (p, part) in m.topic("t").iter().enumerate() {
        let (code, msg, _) = produce(m.shard_port(part.leader, part.shard), "t", p as u32);
        assert_eq!(code, 0, "{msg}");
    }
    std::thread::sleep(Duration::from_millis(SESSION_MS * 2));
    zk.restart();
    for b in &brokers {
        eventually(Duration::from_secs(20), "all registered again", || {
            let m = metadata(b.port);
            m.ids() == vec![1, 2, 3] && m.controller > 0
        });
    }
    eventually(
        Duration::from_secs(10),
        "topic creation works again",
        || create_topic(brokers[1].port, "after", 2, 1).0 == 0,
    );
}

/// A malformed node in ZooKeeper is reported and ignored; the brokers keep
/// serving and other topics are unaffected.
#[test]
fn malformed_nodes_are_reported_not_fatal() {
    let zk = ZooKeeper::start();
    let brokers = three_brokers(&zk, &[]);
    let port = brokers[0].port;
    eventually(Duration::from_secs(10), "brokers", || {
        metadata(port).ids().len() == 3
    });
    zk_create(&zk, "/shoal/default/topics/garbage", b"{not json");
    assert_eq!(create_topic(port, "good", 2, 1).0, 0);
    eventually(Duration::from_secs(5), "malformed node reported", || {
        brokers[0]
            .log_text()
            .contains("malformed ZooKeeper node /shoal/default/topics/garbage")
    });
    let m = metadata(brokers[2].port);
    assert!(m.topics.iter().all(|t| t.0 != "garbage"), "{m:?}");
    assert_eq!(m.topic("good").len(), 2);
}

/// Writes a node with ZooKeeper's own CLI client (what an operator
/// mistake would look like).
fn zk_create(zk: &ZooKeeper, path: &str, data: &[u8]) {
    let out = std::process::Command::new("java")
        .args([
            "-cp",
            "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar",
            "org.apache.zookeeper.ZooKeeperMain",
            "-server",
            &zk.connect(),
            "create",
            path,
            std::str::from_utf8(data).unwrap(),
        ])
        .output()
        .expect("run ZooKeeperMain");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A topic deleted through any broker is gone from every broker's
/// metadata and disk; a broker that was down during the deletion drops
/// its replicas when it comes back.
#[test]
fn deleted_topics_are_removed_everywhere_even_from_a_broker_that_was_down() {
    let zk = ZooKeeper::start();
    let mut brokers = three_brokers(&zk, &[]);
    let port = brokers[0].port;
    eventually(Duration::from_secs(10), "brokers", || {
        metadata(port).ids().len() == 3
    });
    assert_eq!(create_topic(port, "gone", 3, 2).0, 0);
    assert_eq!(create_topic(port, "kept", 3, 1).0, 0);
    let dirs = |b: &Broker, prefix: &str| -> usize {
        std::fs::read_dir(b.data_dir().join("topics"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                    .count()
            })
            .unwrap_or(0)
    };
    assert_eq!(brokers.iter().map(|b| dirs(b, "gone-")).sum::<usize>(), 6);
    assert!(dirs(&brokers[2], "gone-") > 0);
    assert!(brokers[2].terminate());
    eventually(Duration::from_secs(5), "broker 3 left", || {
        metadata(port).ids().len() == 2
    });
    let h = call(
        brokers[1].port,
        raw::request(1, fb::RequestBody::DeleteTopicRequest, |fbb| {
            let n = fbb.create_string("gone");
            fb::DeleteTopicRequest::create(fbb, &fb::DeleteTopicRequestArgs { name: Some(n) })
                .as_union_value()
        }),
    );
    let r = flatbuffers::root::<fb::Response>(&h).unwrap();
    assert_eq!(r.error_code(), 0, "{:?}", r.error_message());
    for b in &brokers[..2] {
        assert_eq!(dirs(b, "gone-"), 0);
        assert!(metadata(b.port).topics.iter().all(|t| t.0 != "gone"));
    }
    brokers[2].restart();
    eventually(Duration::from_secs(10), "broker 3 back", || {
        metadata(port).ids().len() == 3
    });
    assert_eq!(
        dirs(&brokers[2], "gone-"),
        0,
        "stale replicas dropped on return"
    );
    assert!(metadata(brokers[2].port)
        .topics
        .iter()
        .all(|t| t.0 != "gone"));
    assert_eq!(metadata(brokers[2].port).topic("kept").len(), 3);
}
