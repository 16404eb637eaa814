//! End-to-end behaviour of a single-node broker, through the real `shoal`
//! process and the Rust client.

use shoal_client::connection::Connection;
use shoal_client::{Client, Consumer, ConsumerConfig, NewTopic, Producer, ProducerConfig, StartAt};
use shoal_tests::{two_shards, Broker};
use shoal_wire::{fb, ErrorCode};
use std::collections::HashMap;
use std::time::{Duration, Instant};

async fn read_all(client: &Client, topic: &str) -> HashMap<u32, Vec<(u64, String)>> {
    let t = client.topic(topic).await.unwrap();
    let mut out = HashMap::new();
    let consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    for p in 0..t.partitions.len() as u32 {
        let mut at = 0;
        let mut got = Vec::new();
        loop {
            let f = consumer
                .fetch_once(topic, p, at, None, 0, Duration::ZERO)
                .await
                .unwrap();
            if f.records.is_empty() {
                break;
            }
            for r in f.records {
                got.push((r.offset, String::from_utf8(r.value.unwrap()).unwrap()));
            }
            at = f.next_offset;
        }
        out.insert(p, got);
    }
    out
}

/// Messages produced to every partition (spread over both shards) are read
/// back in order per partition, offsets dense from 0, and again after a
/// clean restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_and_consume_across_shards_survives_restart() {
    let mut broker = Broker::start(two_shards());
    let client = Client::connect(&broker.addr()).await.unwrap();
    client
        .create_topic(&NewTopic::new("orders", 6))
        .await
        .unwrap();
    let t = client.describe_topic("orders").await.unwrap();
    let shards: std::collections::HashSet<u16> = t.partitions.iter().map(|p| p.shard).collect();
    assert_eq!(
        shards.len(),
        broker.shards,
        "partitions are spread over every shard"
    );

    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let mut deliveries = Vec::new();
    for i in 0..3000u32 {
        let p = i % 6;
        deliveries.push(
            producer
                .send_to("orders", p, None, format!("{p}:{}", i / 6).as_bytes())
                .unwrap(),
        );
    }
    for d in deliveries {
        d.await.unwrap();
    }
    let check = |all: &HashMap<u32, Vec<(u64, String)>>| {
        for p in 0..6u32 {
            let recs = &all[&p];
            assert_eq!(recs.len(), 500, "partition {p}");
            for (i, (offset, v)) in recs.iter().enumerate() {
                assert_eq!(*offset, i as u64);
                assert_eq!(v, &format!("{p}:{i}"), "partition {p} in order");
            }
        }
    };
    check(&read_all(&client, "orders").await);

    assert!(
        broker.terminate(),
        "clean exit on SIGTERM: {}",
        broker.log_text()
    );
    broker.restart();
    let client = Client::connect(&broker.addr()).await.unwrap();
    check(&read_all(&client, "orders").await);
    assert_eq!(
        client.list_topics().await.unwrap().len(),
        1,
        "topic metadata survives restarts"
    );
}

/// With `--sync always`, every acknowledged message survives `kill -9`
/// during a produce stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_produce_loses_no_acknowledged_message() {
    let mut broker = Broker::start(two_shards());
    let client = Client::connect(&broker.addr()).await.unwrap();
    let mut nt = NewTopic::new("durable", 2);
    nt.sync = Some("always".into());
    client.create_topic(&nt).await.unwrap();
    let producer = Producer::new(
        client.clone(),
        ProducerConfig {
            retries: 0,
            ..ProducerConfig::default()
        },
    );
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in 0..4u32 {
        let (producer, acked) = (producer.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            for i in 0u32.. {
                let v = format!("{w}-{i}");
                match producer.send_to("durable", w % 2, None, v.as_bytes()) {
                    Ok(d) => match d.await {
                        Ok(m) => acked.lock().unwrap().push((m.partition, m.offset, v)),
                        Err(_) => return,
                    },
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    broker.kill9();
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 50,
        "the stream was running: {} acked",
        acked.len()
    );
    broker.restart();
    let client = match Client::connect(&broker.addr()).await {
        Ok(c) => c,
        Err(e) => panic!("cannot connect after restart: {e}: {}", broker.log_text()),
    };
    let all = read_all(&client, "durable").await;
    assert!(
        broker.is_running(),
        "broker alive after recovery: {}",
        broker.log_text()
    );
    for (p, offset, v) in &acked {
        let got = all[p].iter().find(|(o, _)| o == offset).map(|(_, v)| v);
        assert_eq!(
            got,
            Some(v),
            "acknowledged message {v} at {p}/{offset} lost"
        );
    }
}

fn batch(producer_id: i64, seq: i32, values: &[&str]) -> Vec<u8> {
    let mut b = shoal_wire::batch::BatchBuilder::default();
    for v in values {
        b.push(&shoal_wire::NewRecord {
            value: Some(v.as_bytes()),
            ..Default::default()
        })
        .unwrap();
    }
    b.finish(producer_id, 0, seq)
}

async fn produce_raw(
    conn: &Connection,
    topic: &str,
    partition: u32,
    payload: &[u8],
) -> shoal_client::Result<(u64, u64, bool)> {
    let p =
        shoal_client::produce_batches(conn, topic, partition, shoal_client::Acks::Leader, payload)
            .await?;
    Ok((p.base_offset, p.last_offset, p.duplicate))
}

/// A retried idempotent batch (same producer id and sequence) is
/// acknowledged with its original offsets and not written again.
#[tokio::test]
async fn idempotent_retry_writes_no_duplicate() {
    let broker = Broker::start(two_shards());
    let client = Client::connect(&broker.addr()).await.unwrap();
    client
        .create_topic(&NewTopic::new("idem", 1))
        .await
        .unwrap();
    let conn = client.partition_connection("idem", 0).await.unwrap();
    let b = batch(77, 0, &["a", "b", "c"]);
    assert_eq!(
        produce_raw(&conn, "idem", 0, &b).await.unwrap(),
        (0, 2, false)
    );
    assert_eq!(
        produce_raw(&conn, "idem", 0, &b).await.unwrap(),
        (0, 2, true)
    );
    let gap = batch(77, 9, &["x"]);
    let err = produce_raw(&conn, "idem", 0, &gap).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::OutOfOrderSequence));
    assert_eq!(
        produce_raw(&conn, "idem", 0, &batch(77, 3, &["d"]))
            .await
            .unwrap(),
        (3, 3, false)
    );
    let all = read_all(&client, "idem").await;
    let values: Vec<&str> = all[&0].iter().map(|(_, v)| v.as_str()).collect();
    assert_eq!(values, ["a", "b", "c", "d"]);
}

/// A long-poll fetch on an empty partition returns as soon as data
/// arrives, well before its wait expires, and by timestamp lookup too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_returns_when_data_arrives() {
    let broker = Broker::start(two_shards());
    let client = Client::connect(&broker.addr()).await.unwrap();
    client.create_topic(&NewTopic::new("lp", 1)).await.unwrap();
    let c2 = client.clone();
    let started = Instant::now();
    let waiter = tokio::spawn(async move {
        let consumer = Consumer::new(c2, ConsumerConfig::default());
        consumer
            .fetch_once("lp", 0, 0, None, 1, Duration::from_secs(30))
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the fetch waits for data");
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    producer
        .send_to("lp", 0, None, b"wake")
        .unwrap()
        .await
        .unwrap();
    let f = waiter.await.unwrap();
    assert_eq!(f.records.len(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "returned on data, not at the 30 s deadline"
    );
    // A wait that no data satisfies ends at its deadline with nothing.
    let consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    let f = consumer
        .fetch_once("lp", 0, 1, None, 1, Duration::from_millis(200))
        .await
        .unwrap();
    assert!(f.records.is_empty());
    // By timestamp.
    let f = consumer
        .fetch_once("lp", 0, 0, Some(0), 1, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(f.records[0].value.as_deref(), Some(&b"wake"[..]));
    let mut c = Consumer::new(client, ConsumerConfig::default());
    c.assign("lp", 0, StartAt::Timestamp(i64::MAX))
        .await
        .unwrap();
    assert_eq!(
        c.positions()[0].2,
        1,
        "a timestamp past every record starts at the end"
    );
}

/// A push subscriber that grants little credit never receives more payload
/// than it granted; granting more resumes the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_push_subscriber_never_gets_more_than_its_credit() {
    let broker = Broker::start(two_shards());
    let client = Client::connect(&broker.addr()).await.unwrap();
    client
        .create_topic(&NewTopic::new("push", 1))
        .await
        .unwrap();
    let producer = Producer::new(
        client.clone(),
        ProducerConfig {
            batch_bytes: 1,
            ..ProducerConfig::default()
        },
    );
    // 100 single-record batches of about 1 KiB.
    let mut ds = Vec::new();
    for i in 0..100 {
        ds.push(
            producer
                .send_to(
                    "push",
                    0,
                    None,
                    format!("{i:04}{}", "x".repeat(1000)).as_bytes(),
                )
                .unwrap(),
        );
    }
    for d in ds {
        d.await.unwrap();
    }
    let consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    let credit = 5000u64;
    let mut sub = consumer.subscribe("push", 0, 0, credit).await.unwrap();
    sub.manual_credit();
    let mut received = 0u64;
    let mut records = 0usize;
    while let Ok(p) = tokio::time::timeout(Duration::from_millis(800), sub.next()).await {
        let p = p.unwrap();
        received += p.payload_bytes;
        records += p.records.len();
        assert!(
            received <= credit,
            "received {received} bytes with {credit} granted"
        );
    }
    assert!(
        (3..100).contains(&records),
        "{records} records within the credit: {}",
        broker.log_text()
    );
    sub.grant(1 << 20).await.unwrap();
    let granted = credit + (1 << 20);
    while records < 100 {
        let p = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("pushes resume")
            .unwrap();
        received += p.payload_bytes;
        records += p.records.len();
        assert!(received <= granted);
    }
    assert_eq!(records, 100);
    // New appends are pushed as they arrive.
    producer
        .send_to("push", 0, None, b"live")
        .unwrap()
        .await
        .unwrap();
    let p = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("live push")
        .unwrap();
    assert_eq!(p.records[0].value.as_deref(), Some(&b"live"[..]));
}

/// A push subscription streams a backlog of many slices (~20 MiB, read
/// from the segment file) and then follows appends that arrive while it
/// reads: every record once, in order, with no gap between the backlog and
/// the live part (issue 16: the stream driven by the log, the next slice
/// read while the last one is sent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_stream_catches_up_then_follows_in_order() {
    let broker = Broker::start(two_shards());
    let client = Client::connect(&broker.addr()).await.unwrap();
    client
        .create_topic(&NewTopic::new("stream", 1))
        .await
        .unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let value = |i: u32| format!("{i:08}{}", "v".repeat(1000)).into_bytes();
    const BACKLOG: u32 = 20_000;
    const LIVE: u32 = 5_000;
    let mut ds = Vec::new();
    for i in 0..BACKLOG {
        ds.push(producer.send_to("stream", 0, None, &value(i)).unwrap());
    }
    for d in ds {
        d.await.unwrap();
    }
    let consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    let mut sub = consumer.subscribe("stream", 0, 0, 8 << 20).await.unwrap();
    let live = tokio::spawn(async move {
        for i in BACKLOG..BACKLOG + LIVE {
            producer
                .send_to("stream", 0, None, &value(i))
                .unwrap()
                .await
                .unwrap();
        }
    });
    let mut next = 0u32;
    let mut pushes = 0;
    while next < BACKLOG + LIVE {
        let p = tokio::time::timeout(Duration::from_secs(20), sub.next())
            .await
            .unwrap_or_else(|_| panic!("stalled at {next}: {}", broker.log_text()))
            .unwrap();
        pushes += 1;
        for r in p.records {
            assert_eq!(r.offset, u64::from(next), "every record once, in order");
            assert_eq!(r.value.as_deref(), Some(&value(next)[..]));
            next += 1;
        }
    }
    live.await.unwrap();
    assert!(
        pushes > 5,
        "the backlog came in several slices ({pushes} pushes)"
    );
    // Nothing more than what was produced.
    let extra = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
    assert!(extra.is_err(), "no record past the end");
}

fn metric(m: &[(String, u64)], name: &str) -> u64 {
    m.iter().find(|(k, _)| k == name).map(|(_, v)| *v).unwrap()
}

/// Every fetched byte went out through sendfile: the zero-copy counter
/// grows by exactly the bytes fetched, which are the payload received.
#[tokio::test]
async fn zero_copy_counter_equals_bytes_fetched() {
    let broker = Broker::start(two_shards());
    let client = Client::connect(&broker.addr()).await.unwrap();
    client.create_topic(&NewTopic::new("zc", 2)).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    for i in 0..200u32 {
        producer
            .send_to("zc", i % 2, None, format!("value-{i}").as_bytes())
            .unwrap();
    }
    producer.flush().await.unwrap();
    let before = client.metrics().await.unwrap();
    let mut payload = 0u64;
    for p in 0..2 {
        let conn = client.partition_connection("zc", p).await.unwrap();
        let f = conn
            .request(
                fb::RequestBody::FetchRequest,
                |fbb| {
                    let t = fbb.create_string("zc");
                    fb::FetchRequest::create(
                        fbb,
                        &fb::FetchRequestArgs {
                            topic_id: 0,
                            topic: Some(t),
                            partition: p,
                            max_bytes: 1 << 20,
                            ..Default::default()
                        },
                    )
                    .as_union_value()
                },
                &[],
            )
            .await
            .unwrap();
        payload += f.payload().len() as u64;
    }
    let after = client.metrics().await.unwrap();
    assert!(payload > 0);
    assert_eq!(
        metric(&after, "fetch_bytes") - metric(&before, "fetch_bytes"),
        payload
    );
    assert_eq!(
        metric(&after, "zero_copy_bytes") - metric(&before, "zero_copy_bytes"),
        payload
    );
    assert_eq!(
        metric(&after, "copied_bytes"),
        metric(&before, "copied_bytes")
    );
}

/// Fetch responses of several MiB (large frames on the client's fast path)
/// carry every record intact and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_fetches_read_back_exactly() {
    let broker = Broker::start(two_shards());
    let client = Client::connect(&broker.addr()).await.unwrap();
    client.create_topic(&NewTopic::new("big", 1)).await.unwrap();
    let producer = Producer::new(
        client.clone(),
        ProducerConfig {
            batch_bytes: 256 * 1024,
            ..ProducerConfig::default()
        },
    );
    let value = |i: u32| format!("{i:06}-{}", "v".repeat(2040));
    let mut ds = Vec::new();
    for i in 0..3000u32 {
        ds.push(
            producer
                .send_to("big", 0, None, value(i).as_bytes())
                .unwrap(),
        );
    }
    for d in ds {
        d.await.unwrap();
    }
    let consumer = Consumer::new(
        client.clone(),
        ConsumerConfig {
            max_bytes: 4 << 20,
            ..ConsumerConfig::default()
        },
    );
    let mut at = 0;
    let mut n = 0u32;
    let mut largest = 0usize;
    while at < 3000 {
        let f = consumer
            .fetch_once("big", 0, at, None, 0, Duration::ZERO)
            .await
            .unwrap();
        largest = largest.max(f.records.len());
        for r in f.records {
            assert_eq!(r.offset, u64::from(n));
            assert_eq!(r.value.unwrap(), value(n).into_bytes());
            n += 1;
        }
        at = f.next_offset;
    }
    assert_eq!(n, 3000);
    assert!(
        largest > 1000,
        "fetches of several MiB ({largest} records in the largest)"
    );
}

/// Subscribes at the end of a fresh topic, then produces `n` values one
/// by one and checks every push: values intact and in order. Returns the
/// broker's `tail_cache_bytes` and `fetch_bytes` growth.
async fn follow_the_tail(broker: &Broker, n: u32) -> (u64, u64) {
    let client = Client::connect(&broker.addr()).await.unwrap();
    client
        .create_topic(&NewTopic::new("tail", 1))
        .await
        .unwrap();
    let before = client.metrics().await.unwrap();
    let consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    let mut sub = consumer.subscribe("tail", 0, 0, 1 << 20).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let mut next = 0u32;
    for i in 0..n {
        producer
            .send_to("tail", 0, None, format!("tail-{i}").as_bytes())
            .unwrap()
            .await
            .unwrap();
        while next <= i {
            let p = tokio::time::timeout(Duration::from_secs(10), sub.next())
                .await
                .expect("push")
                .unwrap();
            for r in p.records {
                assert_eq!(r.offset, u64::from(next));
                assert_eq!(r.value.as_deref(), Some(format!("tail-{next}").as_bytes()));
                next += 1;
            }
        }
    }
    let after = client.metrics().await.unwrap();
    let d = |k| metric(&after, k) - metric(&before, k);
    (d("tail_cache_bytes"), d("fetch_bytes"))
}

/// A subscriber following the tail is served from the tail cache's memory
/// (still by sendfile), with every value intact and in order; with the
/// cache turned off the same bytes come from the segment file.
#[tokio::test]
async fn tail_readers_are_served_from_memory() {
    let broker = Broker::start("0");
    let (cached, fetched) = follow_the_tail(&broker, 300).await;
    assert!(fetched > 0);
    // The first pushes may come before the cache fills (it starts when a
    // reader first waits at the end); nearly all must come from memory.
    assert!(
        cached * 10 >= fetched * 9,
        "{cached} of {fetched} bytes from the tail cache"
    );

    let off = Broker::start_with_config("0", "tail_cache_bytes = 0\n");
    let (cached, fetched) = follow_the_tail(&off, 50).await;
    assert!(fetched > 0);
    assert_eq!(cached, 0);
}

/// The broker's produce latency buckets count every acknowledged produce
/// request once, cumulatively (Prometheus `le` style), summed over shards.
#[tokio::test]
async fn produce_latency_buckets_count_every_request() {
    let broker = Broker::start(two_shards());
    let client = Client::connect(&broker.addr()).await.unwrap();
    client.create_topic(&NewTopic::new("lat", 2)).await.unwrap();
    let before = client.metrics().await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    for i in 0..50u32 {
        producer
            .send_to("lat", i % 2, None, b"x")
            .unwrap()
            .await
            .unwrap();
    }
    let after = client.metrics().await.unwrap();
    let d = |k: &str| metric(&after, k) - metric(&before, k);
    assert_eq!(d("produce_requests"), 50);
    assert_eq!(d("produce_latency_us_count"), 50);
    let buckets: Vec<(u64, u64)> = after
        .iter()
        .filter_map(|(k, v)| {
            let b = k.strip_prefix("produce_latency_us_le_")?.parse().ok()?;
            Some((b, *v))
        })
        .collect();
    assert!(buckets.len() >= 10, "{buckets:?}");
    assert!(
        buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1),
        "bounds rise and counts are cumulative: {buckets:?}"
    );
    assert!(buckets.last().unwrap().1 <= metric(&after, "produce_latency_us_count"));
    // Some time was spent: the sum moved, and not every request took 0 µs.
    assert!(d("produce_latency_us_sum") > 0);
}

/// A fetch whose `min_bytes` is more than one segment holds is answered at
/// once when the data is there (slices never cross a segment, so waiting
/// for the slice to grow would only run into `max_wait`).
#[tokio::test]
async fn min_bytes_across_a_segment_end_does_not_wait_out_max_wait() {
    let broker = Broker::start("0");
    let client = Client::connect(&broker.addr()).await.unwrap();
    let mut t = NewTopic::new("segs", 1);
    // The smallest segment allowed (1 MiB); 1.5 MB of records span two.
    t.segment_bytes = Some(1024 * 1024);
    client.create_topic(&t).await.unwrap();
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    let value = vec![7u8; 1000];
    for _ in 0..1500 {
        producer.send_to("segs", 0, None, &value).unwrap();
    }
    producer.flush().await.unwrap();
    let consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    let started = Instant::now();
    let f = consumer
        .fetch_once("segs", 0, 0, None, 1200 * 1024, Duration::from_secs(8))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "waited {:?} with data there",
        started.elapsed()
    );
    assert!(!f.records.is_empty() && f.next_offset < f.high_watermark);
    // Reading on from there reaches the end, every value intact.
    let mut at = f.next_offset;
    let mut n = f.records.len() as u64;
    while at < f.high_watermark {
        let g = consumer
            .fetch_once("segs", 0, at, None, 1, Duration::ZERO)
            .await
            .unwrap();
        assert!(g
            .records
            .iter()
            .all(|r| r.value.as_deref() == Some(&value[..])));
        n += g.records.len() as u64;
        at = g.next_offset;
    }
    assert_eq!(n, 1500);
}

/// What a consumer following the tail was shown (served from the tail
/// cache) is never taken back by `kill -9`: after the restart the log holds
/// every record the consumer saw, at the same offset, with the same value.
/// Sync mode `none`, the weakest: a record becomes visible once it is in the
/// log file, never while it is only in the broker's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_never_takes_back_what_a_tail_consumer_saw() {
    let mut broker = Broker::start("0");
    let client = Client::connect(&broker.addr()).await.unwrap();
    let mut nt = NewTopic::new("seen", 1);
    nt.sync = Some("none".into());
    client.create_topic(&nt).await.unwrap();
    let consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    let mut sub = consumer.subscribe("seen", 0, 0, 64 << 20).await.unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok(p) = sub.next().await {
                for r in p.records {
                    let v = String::from_utf8(r.value.unwrap()).unwrap();
                    seen.lock().unwrap().push((r.offset, v));
                }
            }
        })
    };
    let producer = Producer::new(
        client.clone(),
        ProducerConfig {
            retries: 0,
            ..ProducerConfig::default()
        },
    );
    // Up to 64 sends in flight, so batches are always accepted but not yet
    // written while the consumer reads.
    let writer = tokio::spawn(async move {
        let mut inflight = std::collections::VecDeque::new();
        for i in 0u32.. {
            match producer.send_to("seen", 0, None, format!("v-{i}").as_bytes()) {
                Ok(d) => inflight.push_back(d),
                Err(_) => return,
            }
            if inflight.len() >= 64 {
                if let Some(d) = inflight.pop_front() {
                    if d.await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    let m = client.metrics().await.unwrap();
    assert!(
        metric(&m, "tail_cache_bytes") > 0,
        "the cache served the tail"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    broker.kill9();
    let _ = writer.await;
    let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
    let seen = seen.lock().unwrap().clone();
    assert!(
        seen.len() > 50,
        "the consumer was following: {}",
        seen.len()
    );
    broker.restart();
    let client = Client::connect(&broker.addr()).await.unwrap();
    let all = read_all(&client, "seen").await;
    let log: HashMap<u64, String> = all[&0].iter().cloned().collect();
    for (offset, v) in &seen {
        assert_eq!(
            log.get(offset),
            Some(v),
            "record {offset} the consumer saw is gone or changed after kill -9"
        );
    }
}

/// A port another program used a moment ago still holds its connections
/// in TIME_WAIT: the broker binds it all the same (SO_REUSEADDR beside
/// SO_REUSEPORT), as it must when it restarts where, say, a killed
/// ZooKeeper listened.
#[test]
fn a_broker_binds_ports_with_lingering_connections() {
    use std::io::Read;
    let base = shoal_tests::free_port_range(1);
    // A server-side close first leaves the server's socket, on the
    // broker's shard port, in TIME_WAIT.
    {
        let l = std::net::TcpListener::bind(("127.0.0.1", base + 1)).expect("listen");
        let c = std::net::TcpStream::connect(("127.0.0.1", base + 1)).expect("connect");
        let (s, _) = l.accept().expect("accept");
        drop(s);
        std::thread::sleep(Duration::from_millis(50));
        drop(c);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = std::process::Command::new(shoal_tests::shoal_bin())
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{base}"),
            "--cores",
            "0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start shoal");
    let mut err = child.stderr.take().expect("stderr");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            if text.contains("shoal is ready") {
                break;
            }
        }
        text
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = reader.join().expect("reader");
    assert!(
        text.contains("shoal is ready"),
        "the broker did not serve: {text}"
    );
}
