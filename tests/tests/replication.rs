//! Replication, acks=all and failover with real brokers around a real
//! ZooKeeper (issue 11), all processes on 127.0.0.1:
//! - kill -9 of the leader under continuous acks=all load, restarted,
//!   round after round: every acknowledged message is in the log exactly
//!   once at its acknowledged offset, and the replicas' logs are
//!   byte-identical up to the high watermark;
//! - a leader stopped (SIGSTOP) past its session timeout is replaced, and
//!   once it runs again acknowledges nothing sent to it, then follows;
//! - too few in-sync replicas refuse acks=all with NotEnoughReplicas, and
//!   consumers never see what the in-sync set does not hold.
//!
//! `SHOAL_KILL_ROUNDS` sets the number of kill rounds (10 by default; the
//! long run in `scripts/failover-rounds.sh` uses 50).

use shoal_tests::meta::{create_topic, metadata, try_metadata, try_metadata_at};
use shoal_tests::netns::Net;
use shoal_tests::{eventually, raw, shoal_bin, three_brokers, Broker, ZooKeeper};
use shoal_wire::batch::Batches;
use shoal_wire::fb;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOPIC_WAIT: Duration = Duration::from_secs(20);

/// The leader of partition 0 and the port of its owning shard, asked of
/// any of `ports` that answers.
fn leader_of(ports: &[u16], topic: &str) -> Option<(u32, u16, Vec<u32>, Vec<u32>)> {
    for &p in ports {
        let Some(m) = try_metadata(p) else {
            continue;
        };
        let Some(t) = m.topics.iter().find(|t| t.0 == topic) else {
            continue;
        };
        let part = t.1.first()?.clone();
        if part.offline {
            return None;
        }
        if !m.brokers.iter().any(|b| b.0 == part.leader) {
            continue;
        }
        let port = m.shard_port(part.leader, part.shard);
        return Some((part.leader, port, part.replicas, part.isr));
    }
    None
}

/// One produce request on its own connection: the base offset, or the
/// error code (u16::MAX: the connection failed or timed out) and message.
fn produce(
    port: u16,
    topic: &str,
    batch: &[u8],
    acks: fb::Acks,
    timeout: Duration,
) -> Result<u64, (u16, String)> {
    produce_at("127.0.0.1", port, topic, batch, acks, timeout)
}

fn produce_at(
    host: &str,
    port: u16,
    topic: &str,
    batch: &[u8],
    acks: fb::Acks,
    timeout: Duration,
) -> Result<u64, (u16, String)> {
    let frame = raw::request_with(
        1,
        fb::RequestBody::ProduceRequest,
        |fbb| {
            let t = fbb.create_string(topic);
            fb::ProduceRequest::create(
                fbb,
                &fb::ProduceRequestArgs {
                    topic: Some(t),
                    partition: 0,
                    acks,
                    timeout_ms: timeout.as_millis() as u32,
                    topic_id: 0,
                },
            )
            .as_union_value()
        },
        batch,
    );
    let io = |e: std::io::Error| (u16::MAX, e.to_string());
    let addr: std::net::SocketAddr = format!("{host}:{port}").parse().expect("an address");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(io)?;
    s.set_read_timeout(Some(timeout + Duration::from_secs(5)))
        .map_err(io)?;
    s.write_all(&frame).map_err(io)?;
    let mut buf = Vec::new();
    let h = raw::read_header(&mut s, &mut buf).ok_or((u16::MAX, "no answer".to_string()))?;
    let r = flatbuffers::root::<fb::Response>(&h).map_err(|e| (u16::MAX, e.to_string()))?;
    if r.error_code() != 0 {
        return Err((
            r.error_code(),
            r.error_message().unwrap_or_default().to_string(),
        ));
    }
    Ok(r.body_as_produce_response().expect("produce").base_offset())
}

/// A fetch of partition 0 of `topic` from `offset`.
fn fetch_request(topic: &str, offset: u64, max_bytes: u32) -> Vec<u8> {
    raw::request(1, fb::RequestBody::FetchRequest, |fbb| {
        let t = fbb.create_string(topic);
        fb::FetchRequest::create(
            fbb,
            &fb::FetchRequestArgs {
                topic: Some(t),
                offset,
                max_bytes,
                ..Default::default()
            },
        )
        .as_union_value()
    })
}

/// The high watermark a broker answers a fetch of `topic` with, if it
/// answers as the leader.
fn high_watermark(port: u16, topic: &str) -> Option<u64> {
    let h = shoal_tests::meta::try_call(port, fetch_request(topic, 0, 1))?;
    let r = flatbuffers::root::<fb::Response>(&h).ok()?;
    let f = r.body_as_fetch_response()?;
    // Any error (NotLeader from a broker that is no longer the leader) is
    // no answer.
    (r.error_code() == 0).then(|| f.high_watermark())
}

/// Every record of partition 0 readable from the leader at `port`, as
/// (offset, the sequence number its value starts with), and the high
/// watermark.
fn read_all(port: u16, topic: &str) -> (Vec<(u64, u64)>, u64) {
    read_all_at("127.0.0.1", port, topic)
}

fn read_all_at(host: &str, port: u16, topic: &str) -> (Vec<(u64, u64)>, u64) {
    let mut s = TcpStream::connect((host, port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = Vec::new();
    let mut offset = 0u64;
    loop {
        s.write_all(&fetch_request(topic, offset, 1 << 20)).unwrap();
        let mut buf = Vec::new();
        let (h, payload) = raw::read_frame(&mut s, &mut buf).expect("fetch answer");
        let r = flatbuffers::root::<fb::Response>(&h).expect("response");
        assert_eq!(r.error_code(), 0, "{:?}", r.error_message());
        let f = r.body_as_fetch_response().expect("fetch");
        for b in Batches::new(&payload, 8 << 20) {
            let (h, bytes) = b.expect("a valid batch");
            for (i, rec) in shoal_wire::batch::Records::new(bytes).enumerate() {
                let rec = rec.expect("a valid record");
                let v = rec.value.expect("a value");
                let seq: u64 = std::str::from_utf8(&v[..10])
                    .expect("digits")
                    .parse()
                    .expect("a number");
                let at = h.base_offset + i as u64;
                if at >= offset {
                    out.push((at, seq));
                }
            }
        }
        if f.next_offset() >= f.high_watermark() || f.next_offset() == offset {
            return (out, f.high_watermark());
        }
        offset = f.next_offset();
    }
}

/// The batches below `hw` in a replica's segment files, as stored.
fn stored_batches(broker: &Broker, topic: &str, hw: u64) -> Vec<Vec<u8>> {
    let dir = broker.data_dir().join("topics").join(format!("{topic}-0"));
    let mut logs: Vec<_> = std::fs::read_dir(&dir)
        .expect("partition dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    let mut out = Vec::new();
    for path in logs {
        let bytes = std::fs::read(&path).expect("segment");
        for b in Batches::new(&bytes, 8 << 20) {
            let Ok((h, bytes)) = b else { break };
            if h.batch_len == 0 || h.base_offset >= hw {
                break;
            }
            out.push(bytes.to_vec());
        }
    }
    out
}

struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(u64, u64)>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    /// An idempotent producer sending one-record batches with acks=all
    /// to the current leader, retrying each until it is acknowledged (the
    /// same producer id and sequence every time), and recording (sequence,
    /// acknowledged offset).
    fn start(ports: Vec<u16>, topic: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (s, a, topic) = (stop.clone(), acked.clone(), topic.to_string());
        let pid: i64 = rand::random::<u32>() as i64 + 1;
        let handle = std::thread::spawn(move || {
            let mut seq: i32 = 0;
            while !s.load(Ordering::SeqCst) {
                let batch = raw::batch(pid, seq, 1, 64);
                loop {
                    if s.load(Ordering::SeqCst) {
                        return;
                    }
                    let Some((_, port, _, _)) = leader_of(&ports, &topic) else {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    };
                    match produce(port, &topic, &batch, fb::Acks::All, Duration::from_secs(5)) {
                        Ok(base) => {
                            a.lock().unwrap().push((seq as u64, base));
                            break;
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
                seq += 1;
            }
        });
        Load {
            stop,
            acked,
            handle: Some(handle),
        }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    fn finish(mut self) -> Vec<(u64, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            h.join().expect("producer thread");
        }
        self.acked.lock().unwrap().clone()
    }
}

fn ports(brokers: &[Broker]) -> Vec<u16> {
    brokers.iter().map(|b| b.port).collect()
}

/// Three brokers, a topic of one partition on all three, every replica in
/// sync.
fn replicated_cluster(topic: &str, toml_extra: &str) -> (ZooKeeper, Vec<Broker>) {
    let zk = ZooKeeper::start();
    let brokers: Vec<Broker> = if toml_extra.is_empty() {
        three_brokers(&zk, &[])
    } else {
        (1..=3u32)
            .map(|id| {
                let cores = if id % 2 == 0 { "1" } else { "0" };
                let toml = format!("zk_session_timeout_ms = 1500\n{toml_extra}\n");
                Broker::start_member(cores, &zk.connect(), id, &toml, &[])
            })
            .collect()
    };
    eventually(Duration::from_secs(15), "three brokers", || {
        metadata(brokers[0].port).ids() == vec![1, 2, 3]
    });
    let (code, msg) = create_topic(brokers[0].port, topic, 1, 3);
    assert_eq!(code, 0, "{msg}");
    let p = ports(&brokers);
    eventually(TOPIC_WAIT, "all three replicas in sync", || {
        leader_of(&p, topic).is_some_and(|l| l.3.len() == 3)
    });
    (zk, brokers)
}

/// kill -9 of the leader under continuous acks=all load, then a restart,
/// round after round; afterwards every acknowledged message is in the log
/// exactly once at its acknowledged offset, and the three replicas store
/// the same bytes up to the high watermark. Prints the failover gaps.
#[test]
fn acknowledged_messages_survive_leader_kills() {
    let rounds: usize = std::env::var("SHOAL_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let topic = "acked";
    let (_zk, mut brokers) = replicated_cluster(topic, "");
    let p = ports(&brokers);
    let load = Load::start(p.clone(), topic);
    let mut gaps = Vec::new();
    for round in 0..rounds {
        let before = load.count();
        eventually(Duration::from_secs(30), "load flows", || {
            load.count() >= before + 20
        });
        let (leader, ..) = leader_of(&p, topic).expect("a leader");
        let victim = &mut brokers[leader as usize - 1];
        victim.kill9();
        let killed_at = Instant::now();
        let at_kill = load.count();
        eventually(
            Duration::from_secs(30),
            "a write acknowledged after the kill",
            || load.count() > at_kill + 1,
        );
        gaps.push(killed_at.elapsed());
        victim.restart();
        eventually(
            Duration::from_secs(60),
            "the restarted broker back in sync",
            || leader_of(&p, topic).is_some_and(|l| l.3.len() == 3),
        );
        eprintln!(
            "round {round}: killed broker {leader}, acks=all again after {:?}",
            gaps.last().unwrap()
        );
    }
    let acked = load.finish();
    let mut sorted = gaps.clone();
    sorted.sort();
    eprintln!(
        "failover gap (kill -9 to the next acks=all write) over {} rounds: min {:?} median {:?} max {:?}",
        sorted.len(),
        sorted.first(),
        sorted.get(sorted.len() / 2),
        sorted.last()
    );
    // A leader that has just taken over (the preferred one, back after
    // its restart) starts from the high watermark it knew as a follower
    // and moves it up as the followers fetch: what was acknowledged is
    // readable once it has. (A full-suite run failed with "message 1340
    // acknowledged at offset 1340 is not there", most likely read in that
    // window; the message did not say the mark then, it does now.) A
    // record that is lost never comes back, so waiting for the mark hides
    // nothing that the checks below look for.
    let acked_end = acked
        .iter()
        .map(|&(_, offset)| offset + 1)
        .max()
        .unwrap_or(0);
    let mut port = 0;
    eventually(
        Duration::from_secs(30),
        "a leader whose high watermark covers every acknowledged record",
        || {
            let Some((_, p, ..)) = leader_of(&p, topic) else {
                return false;
            };
            port = p;
            high_watermark(p, topic).is_some_and(|hw| hw >= acked_end)
        },
    );
    // Everything acknowledged, exactly once, where it was acknowledged.
    let (records, hw) = read_all(port, topic);
    let at: HashMap<u64, u64> = records.iter().copied().collect();
    let mut count: BTreeMap<u64, usize> = BTreeMap::new();
    for &(_, seq) in &records {
        *count.entry(seq).or_default() += 1;
    }
    for &(seq, offset) in &acked {
        assert_eq!(
            at.get(&offset),
            Some(&seq),
            "message {seq} acknowledged at offset {offset} is not there (high watermark {hw}, {} records read)",
            records.len()
        );
        assert_eq!(
            count.get(&seq),
            Some(&1),
            "message {seq} stored more than once"
        );
    }
    assert!(acked.len() > rounds * 20, "{} acknowledged", acked.len());
    // The replicas agree byte for byte up to the high watermark.
    eventually(
        Duration::from_secs(30),
        "replicas identical up to the high watermark",
        || {
            let a = stored_batches(&brokers[0], topic, hw);
            let b = stored_batches(&brokers[1], topic, hw);
            let c = stored_batches(&brokers[2], topic, hw);
            !a.is_empty() && a == b && b == c
        },
    );
    let truncations: usize = brokers
        .iter()
        .map(|b| {
            b.log_text()
                .matches("log diverges from the leader's: truncating")
                .count()
        })
        .sum();
    eprintln!(
        "{} acknowledged messages; {truncations} follower truncations by leader epoch",
        acked.len()
    );
    // Leadership went back to the preferred replica.
    eventually(
        Duration::from_secs(30),
        "the preferred replica leads",
        || leader_of(&p, topic).is_some_and(|(l, _, replicas, _)| Some(&l) == replicas.first()),
    );
}

/// A leader frozen past its session timeout is replaced; a write sent to
/// it while frozen is not acknowledged with acks=all once it runs again;
/// it then follows the new leader and holds what the new leader holds.
#[test]
fn a_frozen_leader_acknowledges_nothing_after_it_is_replaced() {
    let topic = "frozen";
    let (_zk, brokers) = replicated_cluster(topic, "");
    let p = ports(&brokers);
    let (old, old_port, ..) = leader_of(&p, topic).expect("a leader");
    let pid = 77;
    for seq in 0..5 {
        let b = raw::batch(pid, seq, 1, 64);
        produce(old_port, topic, &b, fb::Acks::All, Duration::from_secs(5)).expect("acked");
    }
    let old_pid = brokers[old as usize - 1].pid().expect("running") as i32;
    // SAFETY: signals our own child process by pid.
    unsafe { libc::kill(old_pid, libc::SIGSTOP) };
    let others: Vec<u16> = brokers
        .iter()
        .filter(|b| b.port != brokers[old as usize - 1].port)
        .map(|b| b.port)
        .collect();
    eventually(Duration::from_secs(20), "a new leader", || {
        leader_of(&others, topic).is_some_and(|l| l.0 != old)
    });
    // While it is frozen, a client sends it a write (the kernel queues it).
    let stale = std::thread::spawn(move || {
        let b = raw::batch(pid + 1, 0, 1, 64);
        produce(
            old_port,
            "frozen",
            &b,
            fb::Acks::All,
            Duration::from_secs(3),
        )
    });
    std::thread::sleep(Duration::from_millis(300));
    let (_, new_port, ..) = leader_of(&others, topic).expect("the new leader");
    for seq in 5..10 {
        let b = raw::batch(pid, seq, 1, 64);
        produce(new_port, topic, &b, fb::Acks::All, Duration::from_secs(5))
            .expect("the new leader acknowledges");
    }
    // SAFETY: as above.
    unsafe { libc::kill(old_pid, libc::SIGCONT) };
    let r = stale.join().expect("client thread");
    assert!(r.is_err(), "the deposed leader acknowledged a write: {r:?}");
    eventually(
        Duration::from_secs(30),
        "the old leader back in sync",
        || leader_of(&others, topic).is_some_and(|l| l.3.len() == 3),
    );
    let (_, port, ..) = leader_of(&p, topic).expect("a leader");
    let (records, _) = read_all(port, topic);
    let seqs: Vec<u64> = records.iter().map(|r| r.1).collect();
    assert_eq!(seqs, (0..10).collect::<Vec<u64>>(), "{records:?}");
}

/// With fewer in-sync replicas than min_insync_replicas, acks=all is
/// refused (nothing acknowledged) while acks=leader still works; and a
/// consumer never sees a message the in-sync set does not hold.
#[test]
fn too_few_in_sync_replicas_refuse_acks_all_and_hide_unreplicated_data() {
    let topic = "isr";
    // Followers leave the set only after a long lag, so a frozen one
    // stays in it (and holds the high watermark back).
    let (_zk, mut brokers) = replicated_cluster(topic, "replica_lag_max_ms = 60000");
    let p = ports(&brokers);
    let (leader, port, ..) = leader_of(&p, topic).expect("a leader");
    produce(
        port,
        topic,
        &raw::batch(-1, 0, 1, 64),
        fb::Acks::All,
        Duration::from_secs(5),
    )
    .expect("acked while all are in sync");
    // Freeze both followers: an acks=leader write is stored on the leader
    // only, and no consumer may see it.
    let followers: Vec<usize> = (0..3).filter(|&i| i as u32 + 1 != leader).collect();
    let pids: Vec<i32> = followers
        .iter()
        .map(|&i| brokers[i].pid().expect("running") as i32)
        .collect();
    for &pid in &pids {
        // SAFETY: signals our own child process by pid.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    }
    produce(
        port,
        topic,
        &raw::batch(-1, 1, 1, 64),
        fb::Acks::Leader,
        Duration::from_secs(5),
    )
    .expect("acks=leader needs no follower");
    std::thread::sleep(Duration::from_millis(500));
    let (records, hw) = read_all(port, topic);
    assert_eq!(hw, 1, "the high watermark waits for the followers");
    assert_eq!(records.iter().map(|r| r.1).collect::<Vec<_>>(), vec![0]);
    for &pid in &pids {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    }
    eventually(
        Duration::from_secs(20),
        "the write replicated and visible",
        || read_all(port, topic).1 == 2,
    );
    // Kill both followers: the controller drops them from the set, and
    // acks=all is refused.
    for &i in &followers {
        brokers[i].kill9();
    }
    eventually(
        Duration::from_secs(20),
        "the in-sync set shrinks to the leader",
        || leader_of(&[port_of(&brokers, leader)], topic).is_some_and(|l| l.3 == vec![leader]),
    );
    let r = produce(
        port,
        topic,
        &raw::batch(-1, 2, 1, 64),
        fb::Acks::All,
        Duration::from_secs(5),
    );
    match r {
        Err((38, msg)) => assert!(msg.contains("min_insync_replicas"), "{msg}"),
        other => panic!("expected NotEnoughReplicas, got {other:?}"),
    }
    produce(
        port,
        topic,
        &raw::batch(-1, 3, 1, 64),
        fb::Acks::Leader,
        Duration::from_secs(5),
    )
    .expect("acks=leader still works");
    // A follower returns: acks=all works again.
    brokers[followers[0]].restart();
    eventually(Duration::from_secs(30), "acks=all accepted again", || {
        produce(
            port,
            topic,
            &raw::batch(-1, 4, 1, 64),
            fb::Acks::All,
            Duration::from_secs(5),
        )
        .is_ok()
    });
}

fn port_of(brokers: &[Broker], id: u32) -> u16 {
    brokers[id as usize - 1].port
}

/// `shoal produce --acks all` through a kill -9 of the leader: it retries,
/// exits 0 with every line acknowledged, each stored once; `shoal consume`
/// reads them all back from the new leader.
#[test]
fn the_cli_produces_through_a_failover() {
    use std::process::{Command, Stdio};
    let topic = "cli";
    let (_zk, mut brokers) = replicated_cluster(topic, "");
    let p = ports(&brokers);
    let (leader, ..) = leader_of(&p, topic).expect("a leader");
    let entry = brokers
        .iter()
        .find(|b| b.port != port_of(&brokers, leader))
        .expect("a follower")
        .addr();
    let mut child = Command::new(shoal_bin())
        .args(["--broker", &entry, "produce", topic, "--acks", "all"])
        .env("SHOAL_DISCOVERY_CACHE", "off")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("shoal produce");
    let mut stdin = child.stdin.take().expect("stdin");
    let n = 300;
    for i in 0..n {
        writeln!(stdin, "line-{i:05}").expect("write a line");
        if i == n / 2 {
            brokers[leader as usize - 1].kill9();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(stdin);
    let out = child.wait_with_output().expect("produce exits");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(shoal_bin())
        .args([
            "--broker",
            &entry,
            "consume",
            topic,
            "--from-beginning",
            "--count",
            &n.to_string(),
        ])
        .env("SHOAL_DISCOVERY_CACHE", "off")
        .output()
        .expect("shoal consume");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let expect: Vec<String> = (0..n).map(|i| format!("line-{i:05}")).collect();
    assert_eq!(lines, expect, "every line once, in order");
}

/// A fetching consumer and a push subscription read on through a kill -9
/// of the leader: no error reaches the application, and each sees every
/// record exactly once, in order.
#[test]
fn consumers_and_subscriptions_resume_on_the_new_leader() {
    use shoal_client::{Client, ClientConfig, Consumer, ConsumerConfig, DiscoveryCache, StartAt};
    let topic = "readers";
    let (_zk, mut brokers) = replicated_cluster(topic, "");
    let p = ports(&brokers);
    let (_, port, ..) = leader_of(&p, topic).expect("a leader");
    let n = 400u64;
    for seq in 0..n / 2 {
        let b = raw::batch(3, seq as i32, 1, 64);
        produce(port, topic, &b, fb::Acks::All, Duration::from_secs(5)).expect("acked");
    }
    let addrs = brokers
        .iter()
        .map(Broker::addr)
        .collect::<Vec<_>>()
        .join(",");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = ClientConfig {
            discovery_cache: DiscoveryCache::Off,
            ..ClientConfig::default()
        };
        let client = Client::connect_with_config(&addrs, config).await.unwrap();
        let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
        consumer.assign(topic, 0, StartAt::Beginning).await.unwrap();
        let reader = Consumer::new(client, ConsumerConfig::default());
        let mut sub = reader
            .subscribe(topic, 0, StartAt::Beginning, 1 << 20)
            .await
            .unwrap();
        let seq_of = |v: &[u8]| -> u64 { std::str::from_utf8(&v[..10]).unwrap().parse().unwrap() };
        let (mut fetched, mut pushed) = (Vec::new(), Vec::new());
        let mut killed = false;
        let mut produced = n / 2;
        let deadline = Instant::now() + Duration::from_secs(60);
        while (fetched.len() as u64) < n || (pushed.len() as u64) < n {
            assert!(
                Instant::now() < deadline,
                "fetched {} pushed {}",
                fetched.len(),
                pushed.len()
            );
            if !killed && fetched.len() >= 100 && pushed.len() >= 100 {
                let (leader, ..) = leader_of(&p, topic).expect("a leader");
                brokers[leader as usize - 1].kill9();
                killed = true;
            }
            if killed && produced < n {
                let ps: Vec<u16> = brokers
                    .iter()
                    .filter(|b| b.pid().is_some())
                    .map(|b| b.port)
                    .collect();
                if let Some((_, port, ..)) = leader_of(&ps, topic) {
                    let b = raw::batch(3, produced as i32, 1, 64);
                    if produce(port, topic, &b, fb::Acks::All, Duration::from_secs(5)).is_ok() {
                        produced += 1;
                    }
                }
            }
            if (fetched.len() as u64) < n {
                let got = tokio::time::timeout(Duration::from_millis(200), consumer.poll()).await;
                if let Ok(r) = got {
                    for rec in r.expect("poll never fails through a failover") {
                        fetched.push(seq_of(rec.value.as_deref().unwrap()));
                    }
                }
            }
            if (pushed.len() as u64) < n {
                let got = tokio::time::timeout(Duration::from_millis(200), sub.next()).await;
                if let Ok(r) = got {
                    for rec in r
                        .expect("a subscription never fails through a failover")
                        .records
                    {
                        pushed.push(seq_of(rec.value.as_deref().unwrap()));
                    }
                }
            }
        }
        let expect: Vec<u64> = (0..n).collect();
        assert_eq!(
            fetched, expect,
            "the consumer saw each record once, in order"
        );
        assert_eq!(
            pushed, expect,
            "the subscription saw each record once, in order"
        );
    });
}

/// The leader of partition 0 as seen by members `ids` of a namespaced
/// cluster: (leader id, the port of its owning shard, isr).
fn leader_in(
    net: &Net,
    brokers: &[Broker],
    ids: &[usize],
    topic: &str,
) -> Option<(u32, u16, Vec<u32>)> {
    for &i in ids {
        let Some(m) = try_metadata_at(&net.ip(i), brokers[i - 1].port) else {
            continue;
        };
        let part = m.topics.iter().find(|t| t.0 == topic)?.1.first()?.clone();
        if part.offline || !m.brokers.iter().any(|b| b.0 == part.leader) {
            return None;
        }
        return Some((part.leader, m.shard_port(part.leader, part.shard), part.isr));
    }
    None
}

/// The leader cut off from ZooKeeper and from its followers (network
/// namespaces: its packets to them are dropped) while clients still reach
/// it: it acknowledges no acks=all write from then on, a new leader takes
/// over, and once healed the old leader truncates and follows; every
/// acknowledged write is there once and the replicas agree.
#[test]
fn a_leader_cut_off_from_zookeeper_and_its_followers_acknowledges_nothing() {
    let net = Net::new(3);
    let zk = ZooKeeper::start_on(&net.zk_host());
    let mut brokers: Vec<Broker> = (1..=3usize)
        .map(|i| {
            let cores = if i % 2 == 0 { "1" } else { "0" };
            let toml = "zk_session_timeout_ms = 1500\n";
            Broker::start_member_in(&net.ns(i), &net.ip(i), cores, &zk.connect(), i as u32, toml)
        })
        .collect();
    let all = [1usize, 2, 3];
    eventually(Duration::from_secs(15), "three brokers", || {
        try_metadata_at(&net.ip(1), brokers[0].port).is_some_and(|m| m.ids() == vec![1, 2, 3])
    });
    let topic = "cut";
    let frame = raw::request(1, fb::RequestBody::CreateTopicRequest, |fbb| {
        let n = fbb.create_string(topic);
        fb::CreateTopicRequest::create(
            fbb,
            &fb::CreateTopicRequestArgs {
                name: Some(n),
                partitions: 1,
                replication_factor: 3,
                ..Default::default()
            },
        )
        .as_union_value()
    });
    let h = shoal_tests::meta::try_call_at(&net.ip(1), brokers[0].port, frame).expect("an answer");
    let r = flatbuffers::root::<fb::Response>(&h).expect("response");
    assert_eq!(r.error_code(), 0, "{:?}", r.error_message());
    eventually(TOPIC_WAIT, "all in sync", || {
        leader_in(&net, &brokers, &all, topic).is_some_and(|l| l.2.len() == 3)
    });
    let (old, old_port, _) = leader_in(&net, &brokers, &all, topic).expect("a leader");
    let old_host = net.ip(old as usize);
    let pid = 11;
    for seq in 0..5 {
        produce_at(
            &old_host,
            old_port,
            topic,
            &raw::batch(pid, seq, 1, 64),
            fb::Acks::All,
            Duration::from_secs(5),
        )
        .expect("acked before the cut");
    }
    // Cut: no ZooKeeper, no followers; clients still reach it.
    let others: Vec<usize> = all.iter().copied().filter(|&i| i as u32 != old).collect();
    let mut away: Vec<String> = others.iter().map(|&i| net.ip(i)).collect();
    away.push(net.zk_host());
    net.cut(old as usize, &away);
    let during = produce_at(
        &old_host,
        old_port,
        topic,
        &raw::batch(pid + 1, 0, 1, 64),
        fb::Acks::All,
        Duration::from_secs(3),
    );
    assert!(
        during.is_err(),
        "the cut-off leader acknowledged: {during:?}"
    );
    eventually(Duration::from_secs(20), "a new leader", || {
        leader_in(&net, &brokers, &others, topic).is_some_and(|l| l.0 != old)
    });
    let (new, new_port, _) = leader_in(&net, &brokers, &others, topic).expect("the new leader");
    // ZooKeeper names the new leader a moment before the broker has taken
    // the role (NotLeader without a hint until then): retried, as a client
    // would.
    for seq in 5..10 {
        let mut last = None;
        eventually(
            Duration::from_secs(10),
            "the new leader acknowledges",
            || {
                let r = produce_at(
                    &net.ip(new as usize),
                    new_port,
                    topic,
                    &raw::batch(pid, seq, 1, 64),
                    fb::Acks::All,
                    Duration::from_secs(5),
                );
                let done = r.is_ok();
                last = Some(r);
                done
            },
        );
        assert!(last.is_some_and(|r| r.is_ok()));
    }
    let after = produce_at(
        &old_host,
        old_port,
        topic,
        &raw::batch(pid + 2, 0, 1, 64),
        fb::Acks::All,
        Duration::from_secs(3),
    );
    assert!(after.is_err(), "the deposed leader acknowledged: {after:?}");
    // Heal: it follows, truncates and catches up.
    net.heal(old as usize, &away);
    eventually(
        Duration::from_secs(30),
        "the old leader back in sync",
        || leader_in(&net, &brokers, &others, topic).is_some_and(|l| l.2.len() == 3),
    );
    let (leader, port, _) = leader_in(&net, &brokers, &all, topic).expect("a leader");
    let (records, hw) = read_all_at(&net.ip(leader as usize), port, topic);
    let seqs: Vec<u64> = records.iter().map(|r| r.1).collect();
    assert_eq!(seqs, (0..10).collect::<Vec<u64>>(), "{records:?}");
    eventually(
        Duration::from_secs(20),
        "replicas identical up to the high watermark",
        || {
            let a = stored_batches(&brokers[0], topic, hw);
            !a.is_empty()
                && a == stored_batches(&brokers[1], topic, hw)
                && a == stored_batches(&brokers[2], topic, hw)
        },
    );
    for b in &mut brokers {
        b.kill9();
    }
    drop(zk);
}

/// A follower that stops keeping up leaves the in-sync set after
/// `replica_lag_max_ms` (a conditional ZooKeeper write by the leader), so
/// acks=all goes on with the others; once it runs again it catches up and
/// rejoins.
#[test]
fn a_lagging_follower_leaves_the_isr_and_rejoins_when_caught_up() {
    let topic = "lag";
    let (_zk, brokers) = replicated_cluster(topic, "replica_lag_max_ms = 1000");
    let p = ports(&brokers);
    let (leader, port, ..) = leader_of(&p, topic).expect("a leader");
    let follower = (1..=3u32).find(|&b| b != leader).expect("a follower");
    let fpid = brokers[follower as usize - 1].pid().expect("running") as i32;
    // SAFETY: signals our own child process by pid.
    unsafe { libc::kill(fpid, libc::SIGSTOP) };
    let mut seq = 0;
    let send = |seq: &mut i32| {
        let b = raw::batch(21, *seq, 1, 64);
        let r = produce(port, topic, &b, fb::Acks::All, Duration::from_secs(10));
        if r.is_ok() {
            *seq += 1;
        }
        r
    };
    let took = eventually(
        Duration::from_secs(15),
        "the frozen follower leaves the set",
        || {
            let _ = send(&mut seq);
            leader_of(&p, topic).is_some_and(|l| !l.3.contains(&follower) && l.3.len() == 2)
        },
    );
    eprintln!("the in-sync set shrank {took:?} after the follower froze (replica_lag_max_ms 1000)");
    for _ in 0..20 {
        send(&mut seq).expect("acks=all goes on with two in sync");
    }
    // SAFETY: as above.
    unsafe { libc::kill(fpid, libc::SIGCONT) };
    eventually(
        Duration::from_secs(20),
        "the follower rejoins the set",
        || {
            let _ = send(&mut seq);
            leader_of(&p, topic).is_some_and(|l| l.3.len() == 3)
        },
    );
    let (records, _) = read_all(port, topic);
    let seqs: Vec<u64> = records.iter().map(|r| r.1).collect();
    assert_eq!(seqs, (0..seq as u64).collect::<Vec<u64>>());
}

/// A follower that was down while retention deleted what it lacks on the
/// leader starts over at the leader's log start and rejoins the in-sync
/// set (instead of asking for gone offsets for ever).
#[test]
fn a_follower_behind_the_leaders_retention_starts_over() {
    let topic = "retained";
    let toml = "segment_bytes = 1048576\nretention_bytes = 1048576\nretention_check_ms = 200";
    let (_zk, mut brokers) = replicated_cluster(topic, toml);
    let p = ports(&brokers);
    let (leader, port, ..) = leader_of(&p, topic).expect("a leader");
    let follower = (1..=3u32).find(|&b| b != leader).expect("a follower");
    brokers[follower as usize - 1].kill9();
    eventually(
        Duration::from_secs(20),
        "the dead follower out of the set",
        || leader_of(&p, topic).is_some_and(|l| l.3.len() == 2),
    );
    // About 4 MiB in 64 KiB batches: old segments go.
    for seq in 0..64 {
        let b = raw::batch(-1, seq * 64, 64, 1000);
        produce(port, topic, &b, fb::Acks::All, Duration::from_secs(10)).expect("acked");
    }
    let log_start = || {
        let frame = raw::request(1, fb::RequestBody::FetchRequest, |fbb| {
            let t = fbb.create_string(topic);
            fb::FetchRequest::create(
                fbb,
                &fb::FetchRequestArgs {
                    topic: Some(t),
                    offset: 0,
                    by_timestamp: true,
                    timestamp_ms: i64::MAX,
                    ..Default::default()
                },
            )
            .as_union_value()
        });
        let h = shoal_tests::meta::call(port, frame);
        let r = flatbuffers::root::<fb::Response>(&h).expect("response");
        r.body_as_fetch_response()
            .map_or(0, |f| f.log_start_offset())
    };
    eventually(
        Duration::from_secs(20),
        "retention deletes the oldest segments",
        || log_start() > 0,
    );
    brokers[follower as usize - 1].restart();
    eventually(
        Duration::from_secs(30),
        "the follower back in the set",
        || leader_of(&p, topic).is_some_and(|l| l.3.len() == 3),
    );
    assert!(
        brokers[follower as usize - 1]
            .log_text()
            .contains("starting over at its log start"),
        "the follower started over"
    );
}
