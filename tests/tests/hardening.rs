//! What a hostile or careless client does to a real `shoal` process (issue
//! 9): each situation ends in a clear error and a broker that keeps
//! serving everything else.

use shoal_client::connection::Connection;
use shoal_client::{Client, Consumer, ConsumerConfig, NewTopic, StartAt};
use shoal_tests::raw::{self, read_header};
use shoal_tests::Broker;
use shoal_wire::frame::{self, Check};
use shoal_wire::{fb, ErrorCode};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn batch_of(n: usize, size: usize) -> Vec<u8> {
    raw::batch(-1, -1, n, size)
}

async fn metrics(client: &Client) -> HashMap<String, u64> {
    client.metrics().await.unwrap().into_iter().collect()
}

/// At `connections_max` a new connection is told why (TooManyConnections)
/// before it is closed, and the connections already open keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_told_why() {
    let broker = Broker::start_with_config("0", "connections_max = 2\n");
    // The harness' readiness probes held slots for a moment: retry until
    // the broker has closed them.
    let deadline = Instant::now() + Duration::from_secs(10);
    let client = loop {
        match Client::connect(&broker.addr()).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(Instant::now() < deadline, "never connected: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let second = TcpStream::connect(broker.addr()).unwrap();
    // Both slots are taken once the broker has accepted the second.
    std::thread::sleep(Duration::from_millis(200));
    let mut third = TcpStream::connect(broker.addr()).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let h = read_header(&mut third, &mut Vec::new()).expect("an error frame before the close");
    let r = frame::decode_response(&h).unwrap();
    assert_eq!(
        ErrorCode::from_u16(r.error_code()),
        ErrorCode::TooManyConnections,
        "{:?}",
        r.error_message()
    );
    assert!(r.error_message().unwrap_or("").contains("limit"));
    let mut b = [0u8; 1];
    assert!(matches!(third.read(&mut b), Ok(0) | Err(_)), "closed");
    drop(second);
    let m = metrics(&client).await;
    assert!(m["connections_refused"] >= 1);
}

/// A subscriber that stops reading its socket is disconnected after
/// `slow_consumer_timeout_ms` (metric, log line), while another consumer of
/// the same partition reads everything meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_consumer_is_disconnected_and_slows_no_one() {
    let broker = Broker::start_with_config(
        shoal_tests::two_shards(),
        "slow_consumer_timeout_ms = 1500\n",
    );
    let client = Client::connect(&broker.addr()).await.unwrap();
    client
        .create_topic(&NewTopic::new("flood", 1))
        .await
        .unwrap();
    // The stalled subscriber: subscribes with plenty of credit, reads the
    // answer, then never reads again.
    let mut stalled = TcpStream::connect(broker.addr()).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stalled
        .write_all(&raw::subscribe(1, "flood", 1 << 40))
        .unwrap();
    let h = read_header(&mut stalled, &mut Vec::new()).expect("subscribe response");
    assert_eq!(frame::decode_response(&h).unwrap().error_code(), 0);

    // 64 MiB through the partition; a healthy consumer reads all of it.
    let conn = Connection::connect(broker.addr().parse().unwrap(), "test")
        .await
        .unwrap();
    let batch = batch_of(1000, 1000);
    let batches = 64u64;
    let mut healthy = Consumer::new(client.clone(), ConsumerConfig::default());
    healthy
        .assign("flood", 0, StartAt::Beginning)
        .await
        .unwrap();
    let started = Instant::now();
    for _ in 0..batches {
        shoal_client::produce_batches(&conn, "flood", 0, shoal_client::Acks::Leader, &batch)
            .await
            .unwrap();
    }
    let mut read = 0u64;
    while read < batches * 1000 {
        read += healthy.poll().await.unwrap().len() as u64;
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "healthy consumer starved"
        );
    }

    // The stalled one is closed within the timeout (plus a sweep).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = metrics(&client).await;
        if m["slow_consumers_closed"] >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "stalled consumer never closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // What it had buffered drains, then the stream ends.
    let mut sink = vec![0u8; 1 << 20];
    let mut drained = 0usize;
    loop {
        match stalled.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
    assert!(drained < 64 << 20, "the broker stopped sending to it");
    assert!(broker.log_text().contains("slow consumers"));
}

/// A topic creation that fails on one shard leaves nothing behind: no
/// entry in `topics.json`, no partition on any shard, a broker that
/// restarts, and the name free for a later creation (issue 9 #3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_creation_is_all_or_nothing() {
    let mut broker = Broker::start(shoal_tests::two_shards());
    let client = Client::connect(&broker.addr()).await.unwrap();
    client
        .create_topic(&NewTopic::new("kept", 2))
        .await
        .unwrap();
    // A file where partition 3's directory must go: that partition cannot
    // be created, the others (on both shards) can.
    let topics_dir = broker.data.path().join("data").join("topics");
    let blocker = topics_dir.join("blocked-3");
    std::fs::write(&blocker, b"not a directory").unwrap();
    let e = client
        .create_topic(&NewTopic::new("blocked", 4))
        .await
        .expect_err("creation must fail");
    assert!(e.to_string().contains("blocked"), "{e}");
    let names: Vec<String> = client
        .list_topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, vec!["kept".to_string()]);
    match client.describe_topic("blocked").await {
        Err(shoal_client::Error::Broker { code, .. }) => assert_eq!(code, ErrorCode::UnknownTopic),
        other => panic!("expected UnknownTopic, got {:?}", other.map(|t| t.name)),
    }
    for p in 0..3 {
        assert!(
            !topics_dir.join(format!("blocked-{p}")).exists(),
            "partition {p} rolled back"
        );
    }
    let json =
        std::fs::read_to_string(broker.data.path().join("data").join("topics.json")).unwrap();
    assert!(!json.contains("blocked"), "{json}");
    // The broker restarts, and the name can be used once the obstacle is gone.
    assert!(broker.terminate());
    broker.restart();
    std::fs::remove_file(&blocker).unwrap();
    let client = Client::connect(&broker.addr()).await.unwrap();
    client
        .create_topic(&NewTopic::new("blocked", 4))
        .await
        .unwrap();
    assert_eq!(
        client
            .describe_topic("blocked")
            .await
            .unwrap()
            .partitions
            .len(),
        4
    );
}

async fn topic_id(conn: &Connection, topic: &str) -> u64 {
    let f = conn
        .request(
            fb::RequestBody::MetadataRequest,
            |fbb| {
                let t = fbb.create_string(topic);
                let v = fbb.create_vector(&[t]);
                fb::MetadataRequest::create(fbb, &fb::MetadataRequestArgs { topics: Some(v) })
                    .as_union_value()
            },
            &[],
        )
        .await
        .unwrap();
    let m = f.response().body_as_metadata_response().unwrap();
    let brokers = m.brokers().unwrap();
    assert!(
        !brokers.get(0).version().unwrap_or("").is_empty(),
        "the broker reports its version"
    );
    m.topics().unwrap().get(0).topic_id()
}

async fn produce_with_id(conn: &Connection, topic: &str, id: u64) -> Result<(), ErrorCode> {
    let payload = batch_of(1, 10);
    conn.request(
        fb::RequestBody::ProduceRequest,
        |fbb| {
            let t = fbb.create_string(topic);
            fb::ProduceRequest::create(
                fbb,
                &fb::ProduceRequestArgs {
                    topic: Some(t),
                    topic_id: id,
                    partition: 0,
                    acks: fb::Acks::Leader,
                    timeout_ms: 30_000,
                },
            )
            .as_union_value()
        },
        &payload,
    )
    .await
    .map(|_| ())
    .map_err(|e| match e {
        shoal_client::Error::Broker { code, .. } => code,
        other => panic!("unexpected {other}"),
    })
}

/// A topic deleted and created again under the same name is a new
/// incarnation with a new id: a request that still names the old id is
/// refused (UnknownTopicId), on the owning shard and through the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_topic_is_not_the_same_topic() {
    let broker = Broker::start(shoal_tests::two_shards());
    let client = Client::connect(&broker.addr()).await.unwrap();
    client
        .create_topic(&NewTopic::new("again", 1))
        .await
        .unwrap();
    let shards = broker.shards as u16;
    let conns: Vec<Connection> = {
        let mut v = Vec::new();
        for s in 0..shards {
            let addr = format!("127.0.0.1:{}", broker.port + 1 + s)
                .parse()
                .unwrap();
            v.push(
                std::sync::Arc::into_inner(Connection::connect(addr, "test").await.unwrap())
                    .unwrap(),
            );
        }
        v
    };
    let old = topic_id(&conns[0], "again").await;
    assert_ne!(old, 0);
    for c in &conns {
        produce_with_id(c, "again", old).await.unwrap();
    }
    client.delete_topic("again").await.unwrap();
    client
        .create_topic(&NewTopic::new("again", 1))
        .await
        .unwrap();
    let new = topic_id(&conns[0], "again").await;
    assert_ne!(new, old);
    for c in &conns {
        assert_eq!(
            produce_with_id(c, "again", old).await,
            Err(ErrorCode::UnknownTopicId)
        );
        produce_with_id(c, "again", new).await.unwrap();
        produce_with_id(c, "again", 0).await.unwrap();
    }
    let t = client.describe_topic("again").await.unwrap();
    assert_eq!(
        t.partitions[0].high_watermark,
        2 * shards as u64,
        "only the new incarnation's records"
    );
}

/// CPU time (user + system) the process has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start after ')'.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Thousands of push subscriptions idle at the end of their logs cost
/// nothing until data arrives: the broker stays idle (a re-poll never
/// scans the other waiters), and a round trip through another partition is
/// not held up (issue 9 #5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_subscriptions_cost_nothing() {
    let broker = Broker::start(shoal_tests::two_shards());
    let client = Client::connect(&broker.addr()).await.unwrap();
    client
        .create_topic(&NewTopic::new("idle", 1))
        .await
        .unwrap();
    client
        .create_topic(&NewTopic::new("busy", 1))
        .await
        .unwrap();
    let mut idle = Vec::new();
    for c in 0..5 {
        let mut s = TcpStream::connect(broker.addr()).unwrap();
        let mut all = Vec::new();
        for i in 0..1024u32 {
            all.extend(raw::subscribe(c * 10_000 + i + 1, "idle", 1 << 20));
        }
        s.write_all(&all).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        let mut answered = 0;
        while answered < 1024 {
            if let Ok(Check::Complete(p)) = frame::check_response(&buf) {
                let r = frame::decode_response(&buf[p.header.clone()]).unwrap();
                assert_eq!(r.error_code(), 0, "{:?}", r.error_message());
                buf.drain(..p.total);
                answered += 1;
                continue;
            }
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "closed");
            buf.extend_from_slice(&chunk[..n]);
        }
        idle.push(s);
    }
    let pid = broker.pid().unwrap();
    let ticks_per_s = 100; // USER_HZ on Linux
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    println!("5 x 1024 idle subscriptions: broker used {used} ticks of CPU in 2 s");
    assert!(
        used < ticks_per_s / 2,
        "idle subscriptions burned {used} ticks in 2 s"
    );

    // A 100-message round trip through another partition is not held up.
    let conn = Connection::connect(broker.addr().parse().unwrap(), "test")
        .await
        .unwrap();
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer
        .assign("busy", 0, StartAt::Beginning)
        .await
        .unwrap();
    let started = Instant::now();
    for _ in 0..100 {
        shoal_client::produce_batches(
            &conn,
            "busy",
            0,
            shoal_client::Acks::Leader,
            &batch_of(1, 10),
        )
        .await
        .unwrap();
    }
    let mut got = 0;
    while got < 100 {
        got += consumer.poll().await.unwrap().len();
    }
    println!(
        "100-message round trip beside them: {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// A producer pins the incarnation of a topic it first wrote to: after the
/// topic is deleted and re-created under the same name, its sends fail with
/// UnknownTopicId instead of landing in the new topic (issue 9 #9).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_never_writes_into_a_recreated_topic() {
    let broker = Broker::start(shoal_tests::two_shards());
    let client = Client::connect(&broker.addr()).await.unwrap();
    client
        .create_topic(&NewTopic::new("pinned", 1))
        .await
        .unwrap();
    let producer = shoal_client::Producer::new(
        client.clone(),
        shoal_client::ProducerConfig {
            linger: Duration::ZERO,
            ..Default::default()
        },
    );
    producer.send("pinned", None, b"first").await.unwrap();
    let admin = Client::connect(&broker.addr()).await.unwrap();
    admin.delete_topic("pinned").await.unwrap();
    admin
        .create_topic(&NewTopic::new("pinned", 1))
        .await
        .unwrap();
    let e = producer
        .send("pinned", None, b"into the new one?")
        .await
        .expect_err("the old incarnation is gone");
    match e {
        shoal_client::Error::Broker { code, .. } => assert_eq!(code, ErrorCode::UnknownTopicId),
        other => panic!("unexpected {other}"),
    }
    assert_eq!(
        admin.describe_topic("pinned").await.unwrap().partitions[0].high_watermark,
        0,
        "nothing written into the new incarnation"
    );
    // A new producer writes to the new incarnation.
    let fresh = shoal_client::Producer::new(admin.clone(), Default::default());
    fresh.send("pinned", None, b"new").await.unwrap();
}

/// Topic changes from many connections at once are all recorded: after a
/// restart every created topic is there and no deleted one came back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_topic_changes_are_all_recorded() {
    let mut broker = Broker::start(shoal_tests::two_shards());
    let mut tasks = Vec::new();
    for c in 0..6 {
        let addr = broker.addr();
        tasks.push(tokio::spawn(async move {
            let client = Client::connect(&addr).await.unwrap();
            for i in 0..8 {
                client
                    .create_topic(&NewTopic::new(format!("c{c}-t{i}"), 2))
                    .await
                    .unwrap();
            }
            client.delete_topic(&format!("c{c}-t0")).await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(broker.terminate());
    broker.restart();
    let client = Client::connect(&broker.addr()).await.unwrap();
    let mut names: Vec<String> = client
        .list_topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    names.sort();
    let mut expected: Vec<String> = (0..6)
        .flat_map(|c| (1..8).map(move |i| format!("c{c}-t{i}")))
        .collect();
    expected.sort();
    assert_eq!(names, expected);
}
