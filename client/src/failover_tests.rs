//! The client through failovers (L3), against fake brokers: retries of
//! every retriable answer and of lost connections, exactly-once storage
//! with the idempotent producer, order per partition, consumers and push
//! subscriptions that resume on the new leader without a duplicate or a
//! gap, batch CRC checks, and the exit status of `shoal produce`.

use crate::cli::{self, Endpoint};
use crate::fake_broker::{Api, FakeBroker, FakeCluster, ProduceMode, Scripted};
use crate::{
    Acks, Client, ClientConfig, ConsumedRecord, Consumer, ConsumerConfig, DiscoveryCache, Error,
    Producer, ProducerConfig, StartAt,
};
use shoal_wire::ErrorCode;
use std::time::{Duration, Instant};

fn client_config() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(2),
        discovery_cache: DiscoveryCache::Off,
        admin_retry_max: Duration::from_secs(5),
        ..ClientConfig::default()
    }
}

async fn connect(bootstrap: &str) -> Client {
    Client::connect_with_config(bootstrap, client_config())
        .await
        .expect("connect")
}

/// Quick retries, so that a test's failover takes milliseconds.
fn producer_config() -> ProducerConfig {
    ProducerConfig {
        linger: Duration::ZERO,
        retry_backoff: Duration::from_millis(5),
        retry_backoff_max: Duration::from_millis(40),
        delivery_timeout: Duration::from_secs(10),
        ..ProducerConfig::default()
    }
}

fn consumer_config() -> ConsumerConfig {
    ConsumerConfig {
        max_wait: Duration::from_millis(50),
        retry_backoff: Duration::from_millis(5),
        retry_backoff_max: Duration::from_millis(40),
        unavailable_max: Duration::from_secs(10),
        ..ConsumerConfig::default()
    }
}

/// A cluster "prod" of fakes with ids 1..=n.
async fn cluster(n: u32) -> (FakeCluster, Vec<FakeBroker>) {
    let c = FakeCluster::new("prod");
    c.with(|v| v.controller = Some((1, 1)));
    let mut fakes = Vec::new();
    for id in 1..=n {
        fakes.push(FakeBroker::start_member(&c, id).await);
    }
    (c, fakes)
}

fn bootstrap(fakes: &[FakeBroker]) -> String {
    fakes
        .iter()
        .map(FakeBroker::addr_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Broker `dead` dies and broker `to` leads `topic`/`partition` from now
/// on, with everything the log held (as with `acks=all`).
fn fail_over(
    c: &FakeCluster,
    fakes: &[FakeBroker],
    topic: &str,
    partition: u32,
    dead: u32,
    to: u32,
) {
    c.move_leader(topic, partition, to);
    c.remove_member(dead);
    fakes[dead as usize - 1].kill();
}

fn values(records: &[(u64, Vec<u8>)]) -> Vec<String> {
    records
        .iter()
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        .collect()
}

fn numbered(range: std::ops::Range<u32>) -> Vec<String> {
    range.map(|i| format!("m{i}")).collect()
}

/// Offsets of stored records are 0, 1, 2, ...: nothing stored twice,
/// nothing between.
fn assert_dense(records: &[(u64, Vec<u8>)]) {
    let offsets: Vec<u64> = records.iter().map(|(o, _)| *o).collect();
    let want: Vec<u64> = (0..records.len() as u64).collect();
    assert_eq!(offsets, want);
}

// ---- producer ---------------------------------------------------------------

/// Every retriable answer — `NotLeader` without a hint, `LeaderNotAvailable`,
/// `NotEnoughReplicas`, a fenced leader epoch — is retried until it passes;
/// the record is stored once, with `acks=all` asked for every time.
#[tokio::test]
async fn retriable_answers_are_retried_until_one_passes() {
    let fake = FakeBroker::start(&[("t", 1)]).await;
    for (code, n) in [
        (ErrorCode::NotLeader, 2),
        (ErrorCode::LeaderNotAvailable, 2),
        (ErrorCode::NotEnoughReplicas, 3),
        (ErrorCode::FencedLeaderEpoch, 1),
    ] {
        fake.script(Api::Produce, Scripted::Fail(code), n);
    }
    let p = Producer::new(
        connect(&fake.addr_string()).await,
        ProducerConfig {
            acks: Acks::All,
            ..producer_config()
        },
    );
    let m = p.send("t", None, b"once").await.expect("stored in the end");
    assert_eq!(m.offset, 0);
    assert_eq!(fake.scripted_left(Api::Produce), 0);
    assert_eq!(fake.produces().len(), 9);
    assert_eq!(values(&fake.records("t", 0)), ["once"]);
}

/// `NotEnoughReplicas` that never ends fails the send once the delivery
/// timeout has passed, with that error; nothing was stored.
#[tokio::test]
async fn not_enough_replicas_for_good_fails_at_the_delivery_timeout() {
    let fake = FakeBroker::start(&[("t", 1)]).await;
    fake.script(
        Api::Produce,
        Scripted::Fail(ErrorCode::NotEnoughReplicas),
        100_000,
    );
    let timeout = Duration::from_millis(300);
    let p = Producer::new(
        connect(&fake.addr_string()).await,
        ProducerConfig {
            acks: Acks::All,
            delivery_timeout: timeout,
            ..producer_config()
        },
    );
    let t0 = Instant::now();
    let e = p.send("t", None, b"v").await.expect_err("never enough");
    let took = t0.elapsed();
    assert_eq!(e.code(), Some(ErrorCode::NotEnoughReplicas), "{e}");
    assert!(took >= timeout * 9 / 10 && took < timeout * 4, "{took:?}");
    assert!(fake.produces().len() > 2, "retried meanwhile");
    assert!(fake.records("t", 0).is_empty());
}

/// After a batch failed for good the partition is not wedged: the next
/// batch is stored at once, numbered under a new producer epoch, since the
/// broker may or may not have the failed one (here it has it: the answer
/// to it was lost, then every retry refused until its time ran out).
#[tokio::test]
async fn a_partition_is_usable_after_a_batch_failed() {
    let fake = FakeBroker::start(&[("t", 1)]).await;
    let client = Client::connect_with_config(
        &fake.addr_string(),
        ClientConfig {
            request_timeout: Duration::from_millis(100),
            ..client_config()
        },
    )
    .await
    .expect("connect");
    let p = Producer::new(
        client,
        ProducerConfig {
            delivery_timeout: Duration::from_millis(400),
            ..producer_config()
        },
    );
    p.send("t", None, b"first").await.expect("stored");
    fake.script(Api::Produce, Scripted::StoreAndIgnore, 1);
    fake.script(
        Api::Produce,
        Scripted::Fail(ErrorCode::NotEnoughReplicas),
        100_000,
    );
    let e = p
        .send("t", None, b"fate unknown")
        .await
        .expect_err("out of time");
    assert_eq!(e.code(), Some(ErrorCode::NotEnoughReplicas), "{e}");
    fake.clear_script(Api::Produce);
    let calls_before = fake.produces().len();
    assert_eq!(p.send("t", None, b"next").await.expect("stored").offset, 2);
    let calls = &fake.produces()[calls_before..];
    assert_eq!(calls.len(), 1, "no refusal first: {calls:?}");
    let h = calls[0].headers[0];
    assert_eq!((h.producer_epoch, h.base_sequence), (1, 0));
    // Refused for good without being stored: the next one goes on.
    fake.script(Api::Produce, Scripted::Fail(ErrorCode::BatchTooLarge), 1);
    p.send("t", None, b"refused").await.expect_err("too large");
    p.send("t", None, b"after").await.expect("stored");
    assert_eq!(
        values(&fake.records("t", 0)),
        ["first", "fate unknown", "next", "after"]
    );
}

/// A batch stored before the connection dropped (the answer lost) is sent
/// again and answered with its first offsets: stored once.
#[tokio::test]
async fn a_batch_stored_before_the_connection_dropped_is_stored_once() {
    let fake = FakeBroker::start(&[("t", 1)]).await;
    fake.script(Api::Produce, Scripted::DropAfterStore, 1);
    let p = Producer::new(connect(&fake.addr_string()).await, producer_config());
    let m = p.send("t", None, b"once").await.expect("acknowledged");
    assert_eq!(m.offset, 0);
    let calls = fake.produces();
    assert_eq!(calls.len(), 2);
    assert!(calls[0].accepted && !calls[0].duplicate);
    assert!(calls[1].accepted && calls[1].duplicate, "{calls:?}");
    assert_eq!(values(&fake.records("t", 0)), ["once"]);
}

/// A broker that stores a batch and never answers is given up on after
/// the request timeout; the retry on a new connection finds the batch
/// stored.
#[tokio::test]
async fn a_hung_broker_is_left_after_the_request_timeout() {
    let fake = FakeBroker::start(&[("t", 1)]).await;
    fake.script(Api::Produce, Scripted::StoreAndIgnore, 1);
    let client = Client::connect_with_config(
        &fake.addr_string(),
        ClientConfig {
            request_timeout: Duration::from_millis(200),
            ..client_config()
        },
    )
    .await
    .expect("connect");
    let p = Producer::new(client, producer_config());
    let t0 = Instant::now();
    let m = p.send("t", None, b"once").await.expect("acknowledged");
    assert_eq!(m.offset, 0);
    // The produce asks the broker to wait up to 30 s for its acks; the
    // client waits that plus the request timeout.
    assert!(t0.elapsed() < Duration::from_secs(40));
    assert_eq!(values(&fake.records("t", 0)), ["once"]);
    assert_eq!(fake.connections(), 2, "the hung connection was closed");
}

/// Several batches in one request, all stored before the connection
/// dropped: the retry sends them one by one, each is recognised, each
/// delivery gets its own offsets though another producer wrote in
/// between. No request carries more batches than the broker remembers.
#[tokio::test]
async fn a_dropped_multi_batch_request_is_retried_batch_by_batch() {
    let fake = FakeBroker::start(&[("t", 1)]).await;
    fake.set_produce_mode(ProduceMode::Hold);
    let p = Producer::new(
        connect(&fake.addr_string()).await,
        ProducerConfig {
            linger: Duration::from_secs(3600),
            ..producer_config()
        },
    );
    let first = p
        .send_batch("t", 0, &[(None, b"m0"), (None, b"m1")])
        .await
        .expect("room");
    fake.wait_held(1).await;
    // Queued behind the held request: 8 batches of 2 records.
    let mut queued = Vec::new();
    for i in 1..9u32 {
        let (a, b) = (format!("m{}", 2 * i), format!("m{}", 2 * i + 1));
        queued.push(
            p.send_batch("t", 0, &[(None, a.as_bytes()), (None, b.as_bytes())])
                .await
                .expect("room"),
        );
    }
    fake.script(Api::Produce, Scripted::DropAfterStore, 1);
    fake.set_produce_mode(ProduceMode::Ack);
    assert!(fake.release(None));
    assert_eq!(first.await.expect("stored").offset, 0);
    // The dropped request stored its 5 batches; then another producer
    // writes, before the retries.
    let t0 = Instant::now();
    while fake.records("t", 0).len() < 12 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    fake.append("t", 0, &[b"other"]);
    let mut offsets = Vec::new();
    for d in queued {
        offsets.push(d.await.expect("acknowledged").offset);
    }
    assert_eq!(offsets, [2, 4, 6, 8, 10, 13, 15, 17]);
    let stored = fake.records("t", 0);
    assert_dense(&stored);
    let mut want = numbered(0..12);
    want.push("other".into());
    want.extend(numbered(12..18));
    assert_eq!(values(&stored), want);
    let calls = fake.produces();
    assert!(calls.iter().all(|c| c.headers.len() <= 5), "{calls:?}");
    let dups = calls.iter().filter(|c| c.duplicate).count();
    assert_eq!(
        dups, 5,
        "each batch of the dropped request alone: {calls:?}"
    );
}

/// Batches of one request stored with another producer's between them:
/// the answer's offsets do not span them back to back, so each batch is
/// asked again alone and answered, as a duplicate, with its own offsets.
#[tokio::test]
async fn batches_stored_apart_each_learn_their_own_offsets() {
    let fake = FakeBroker::start(&[("t", 1)]).await;
    fake.set_produce_mode(ProduceMode::Hold);
    let p = Producer::new(connect(&fake.addr_string()).await, producer_config());
    let pair = |i: u32| (format!("m{}", 2 * i), format!("m{}", 2 * i + 1));
    let (a, b) = pair(0);
    let first = p
        .send_batch("t", 0, &[(None, a.as_bytes()), (None, b.as_bytes())])
        .await
        .expect("room");
    fake.wait_held(1).await;
    let mut queued = Vec::new();
    for i in 1..4u32 {
        let (a, b) = pair(i);
        queued.push(
            p.send_batch("t", 0, &[(None, a.as_bytes()), (None, b.as_bytes())])
                .await
                .expect("room"),
        );
    }
    fake.interleave_next_produce();
    fake.set_produce_mode(ProduceMode::Ack);
    assert!(fake.release(None));
    assert_eq!(first.await.expect("stored").offset, 0);
    let mut offsets = Vec::new();
    for d in queued {
        offsets.push(d.await.expect("stored").offset);
    }
    assert_eq!(offsets, [2, 5, 8]);
    let mut want = numbered(0..4);
    want.push("between".into());
    want.extend(numbered(4..6));
    want.push("between".into());
    want.extend(numbered(6..8));
    assert_eq!(values(&fake.records("t", 0)), want);
    let calls: Vec<(usize, bool)> = fake
        .produces()
        .iter()
        .map(|c| (c.headers.len(), c.duplicate))
        .collect();
    assert_eq!(
        calls,
        [(1, false), (3, false), (1, true), (1, true), (1, true)]
    );
}

/// Produces on while the leader dies with requests in flight: the held
/// request and those queued behind it go to the new leader, in order, and
/// every record is stored once.
#[tokio::test]
async fn in_flight_batches_follow_the_leader_in_order() {
    let (c, fakes) = cluster(2).await;
    c.topic("t", &[2]);
    let p = Producer::new(connect(&bootstrap(&fakes)).await, producer_config());
    let mut ds = Vec::new();
    for i in 0..50 {
        ds.push(
            p.send_nowait_to("t", 0, None, format!("m{i}").as_bytes())
                .await
                .expect("room"),
        );
    }
    for d in ds.drain(..) {
        d.await.expect("stored");
    }
    fakes[1].set_produce_mode(ProduceMode::Hold);
    ds.push(p.send_nowait_to("t", 0, None, b"m50").await.expect("room"));
    fakes[1].wait_held(1).await;
    for i in 51..100 {
        ds.push(
            p.send_nowait_to("t", 0, None, format!("m{i}").as_bytes())
                .await
                .expect("room"),
        );
    }
    fail_over(&c, &fakes, "t", 0, 2, 1);
    for i in 100..150 {
        ds.push(
            p.send_nowait_to("t", 0, None, format!("m{i}").as_bytes())
                .await
                .expect("room"),
        );
    }
    let offsets: Vec<u64> = futures::future::join_all(ds)
        .await
        .into_iter()
        .map(|r| r.expect("acknowledged").offset)
        .collect();
    assert_eq!(offsets, (50..150).collect::<Vec<u64>>());
    let stored = fakes[0].records("t", 0);
    assert_dense(&stored);
    assert_eq!(values(&stored), numbered(0..150));
    assert!(fakes[0].produces().iter().all(|c| c.accepted));
}

/// The leader died with a request stored but unanswered, and the new
/// leader has it (replicated): the retry there is a duplicate, stored once.
#[tokio::test]
async fn a_batch_stored_by_the_dead_leader_is_not_stored_again() {
    let (c, fakes) = cluster(2).await;
    c.topic("t", &[2]);
    let p = Producer::new(connect(&bootstrap(&fakes)).await, producer_config());
    p.send_to("t", 0, None, b"m0")
        .expect("room")
        .await
        .expect("stored");
    fakes[1].script(Api::Produce, Scripted::StoreAndIgnore, 1);
    let d = p.send_to("t", 0, None, b"m1").expect("room");
    let t0 = Instant::now();
    while fakes[1].records("t", 0).len() < 2 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    fail_over(&c, &fakes, "t", 0, 2, 1);
    assert_eq!(d.await.expect("acknowledged").offset, 1);
    let calls = fakes[0].produces();
    assert_eq!(calls.len(), 1);
    assert!(calls[0].duplicate);
    assert_eq!(values(&fakes[0].records("t", 0)), ["m0", "m1"]);
}

/// A new leader that lost batches acknowledged with `acks=leader` refuses
/// the next one as out of order; the producer starts a new epoch and the
/// partition goes on (the lost records stay lost: only `acks=all` keeps
/// them).
#[tokio::test]
async fn a_leader_that_lost_acknowledged_batches_gets_a_new_epoch() {
    let (c, fakes) = cluster(2).await;
    c.topic("t", &[2]);
    let p = Producer::new(connect(&bootstrap(&fakes)).await, producer_config());
    for i in 0..3 {
        p.send("t", None, format!("m{i}").as_bytes())
            .await
            .expect("stored");
    }
    // Only m0 had reached the follower.
    c.log("t", 0, |l| l.truncate(1));
    fail_over(&c, &fakes, "t", 0, 2, 1);
    assert_eq!(p.send("t", None, b"m3").await.expect("stored").offset, 1);
    assert_eq!(p.send("t", None, b"m4").await.expect("stored").offset, 2);
    assert_eq!(values(&fakes[0].records("t", 0)), ["m0", "m3", "m4"]);
    let headers: Vec<(i16, i32)> = fakes[0]
        .produces()
        .iter()
        .filter(|c| c.accepted)
        .flat_map(|c| {
            c.headers
                .iter()
                .map(|h| (h.producer_epoch, h.base_sequence))
        })
        .collect();
    assert_eq!(headers, [(1, 0), (1, 1)]);
}

/// While the cluster cannot answer metadata in a failover, sends go on:
/// the partition is chosen from the partitions last seen, and the batch
/// waits for a leader rather than failing.
#[tokio::test]
async fn sends_go_on_while_metadata_is_unavailable() {
    let (c, fakes) = cluster(2).await;
    c.topic("t", &[2]);
    let client = Client::connect_with_config(
        &bootstrap(&fakes),
        ClientConfig {
            admin_retry_max: Duration::from_millis(50),
            ..client_config()
        },
    )
    .await
    .expect("connect");
    let p = Producer::new(client, producer_config());
    p.send("t", None, b"m0").await.expect("stored");
    for f in &fakes {
        f.script(
            Api::Metadata,
            Scripted::Fail(ErrorCode::ClusterUnavailable),
            20,
        );
    }
    fail_over(&c, &fakes, "t", 0, 2, 1);
    let first = p.send_nowait("t", None, b"m1").await.expect("queued");
    let t0 = Instant::now();
    while fakes[0].scripted_left(Api::Metadata) == 20 {
        assert!(t0.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let second = p.send_nowait("t", None, b"m2").await.expect("queued");
    assert_eq!(first.await.expect("stored").offset, 1);
    assert_eq!(second.await.expect("stored").offset, 2);
    assert_eq!(fakes[0].scripted_left(Api::Metadata), 0);
    assert_eq!(values(&fakes[0].records("t", 0)), ["m0", "m1", "m2"]);
}

/// Sequence numbers wrap from `i32::MAX` to 0, never to a negative number
/// (which means "no sequence"); a batch may span the wrap.
#[test]
fn sequences_wrap_to_zero() {
    use crate::producer::seq_add;
    assert_eq!(seq_add(0, 5), 5);
    assert_eq!(seq_add(i32::MAX, 1), 0);
    assert_eq!(seq_add(i32::MAX - 1, 3), 1);
    assert_eq!(seq_add(i32::MAX, 0), i32::MAX);
    assert_eq!(crate::fake_broker::seq_add(i32::MAX - 1, 3), 1);
}

/// A topic that does not exist, or a batch the broker refuses as invalid,
/// fails at once rather than after the delivery timeout.
#[tokio::test]
async fn errors_that_cannot_pass_fail_at_once() {
    let fake = FakeBroker::start(&[("t", 1)]).await;
    let p = Producer::new(connect(&fake.addr_string()).await, producer_config());
    let t0 = Instant::now();
    let e = p.send("nope", None, b"v").await.expect_err("unknown");
    assert_eq!(e.code(), Some(ErrorCode::UnknownTopic), "{e}");
    fake.set_produce_mode(ProduceMode::Fail(ErrorCode::CorruptBatch));
    let e = p.send("t", None, b"v").await.expect_err("refused");
    assert_eq!(e.code(), Some(ErrorCode::CorruptBatch), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(fake.produces().len(), 1);
}

/// A broker that says it does not know the topic is asked once more after
/// a metadata refresh (it may no longer hold the partition); if metadata
/// still has the topic, the retry goes through.
#[tokio::test]
async fn unknown_topic_from_a_broker_is_retried_once_after_a_refresh() {
    let fake = FakeBroker::start(&[("t", 1)]).await;
    let p = Producer::new(connect(&fake.addr_string()).await, producer_config());
    fake.script(Api::Produce, Scripted::Fail(ErrorCode::UnknownTopic), 1);
    p.send("t", None, b"v")
        .await
        .expect("stored after a refresh");
    fake.script(Api::Produce, Scripted::Fail(ErrorCode::UnknownTopic), 2);
    let e = p.send("t", None, b"w").await.expect_err("twice: gone");
    assert_eq!(e.code(), Some(ErrorCode::UnknownTopic));
}

// ---- consumer ---------------------------------------------------------------

/// Stores `n` batches of three records m(3i), m(3i+1), m(3i+2).
fn fill(fake: &FakeBroker, topic: &str, partition: u32, from_batch: u32, n: u32) {
    for b in from_batch..from_batch + n {
        let vals: Vec<String> = (3 * b..3 * b + 3).map(|i| format!("m{i}")).collect();
        let refs: Vec<&[u8]> = vals.iter().map(|v| v.as_bytes()).collect();
        fake.append(topic, partition, &refs);
    }
}

async fn poll_until(consumer: &mut Consumer, n: usize, got: &mut Vec<ConsumedRecord>) {
    let t0 = Instant::now();
    while got.len() < n {
        assert!(t0.elapsed() < Duration::from_secs(10), "have {}", got.len());
        got.extend(consumer.poll().await.expect("no error through a failover"));
    }
}

fn offsets_and_values(got: &[ConsumedRecord]) -> (Vec<u64>, Vec<String>) {
    (
        got.iter().map(|r| r.offset).collect(),
        got.iter()
            .map(|r| String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned())
            .collect(),
    )
}

/// The leader dies mid-read: polling goes on at the new leader from the
/// first offset not yet returned, through a few `LeaderNotAvailable`s
/// there, with no error, no record twice and none missing. The start
/// offset is mid-batch: the records before it are never returned.
#[tokio::test]
async fn polling_resumes_on_the_new_leader_without_duplicates_or_gaps() {
    let (c, fakes) = cluster(2).await;
    c.topic("t", &[2]);
    fill(&fakes[1], "t", 0, 0, 5);
    let mut consumer = Consumer::new(
        connect(&bootstrap(&fakes)).await,
        ConsumerConfig {
            // One batch per fetch.
            max_bytes: 1,
            ..consumer_config()
        },
    );
    consumer
        .assign("t", 0, StartAt::Offset(4))
        .await
        .expect("assigned");
    let mut got = Vec::new();
    poll_until(&mut consumer, 5, &mut got).await;
    fail_over(&c, &fakes, "t", 0, 2, 1);
    fakes[0].script(Api::Fetch, Scripted::Fail(ErrorCode::LeaderNotAvailable), 3);
    fill(&fakes[0], "t", 0, 5, 3);
    poll_until(&mut consumer, 20, &mut got).await;
    let (offsets, vals) = offsets_and_values(&got);
    assert_eq!(offsets, (4..24).collect::<Vec<u64>>());
    assert_eq!(vals, numbered(4..24));
    assert_eq!(fakes[0].scripted_left(Api::Fetch), 0);
    assert_eq!(consumer.positions()[0].2, 24);
}

/// A partition without a leader holds up none of the others: polls return
/// the others' records at once and no error; it is read again, from where
/// it was, once it has a leader.
#[tokio::test]
async fn a_partition_in_failover_holds_up_no_other() {
    let (c, fakes) = cluster(2).await;
    c.topic("t", &[1, 2]);
    fill(&fakes[0], "t", 0, 0, 1);
    fill(&fakes[0], "t", 1, 0, 1);
    let mut consumer = Consumer::new(connect(&bootstrap(&fakes)).await, consumer_config());
    consumer
        .assign_all("t", StartAt::Beginning)
        .await
        .expect("assigned");
    let mut got = Vec::new();
    poll_until(&mut consumer, 6, &mut got).await;
    c.place("t", 1, |p| p.offline = true);
    fakes[1].kill();
    c.remove_member(2);
    fill(&fakes[0], "t", 0, 1, 1);
    fill(&fakes[0], "t", 1, 1, 1);
    let t0 = Instant::now();
    poll_until(&mut consumer, 9, &mut got).await;
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(got[6..].iter().all(|r| r.partition == 0));
    c.move_leader("t", 1, 1);
    poll_until(&mut consumer, 12, &mut got).await;
    let p1: Vec<u64> = got
        .iter()
        .filter(|r| r.partition == 1)
        .map(|r| r.offset)
        .collect();
    assert_eq!(p1, [0, 1, 2, 3, 4, 5]);
}

/// A partition unavailable for longer than `unavailable_max` surfaces its
/// error.
#[tokio::test]
async fn a_partition_unavailable_too_long_is_an_error() {
    let (c, fakes) = cluster(1).await;
    c.topic("t", &[1]);
    let mut consumer = Consumer::new(
        connect(&fakes[0].addr_string()).await,
        ConsumerConfig {
            unavailable_max: Duration::from_millis(300),
            ..consumer_config()
        },
    );
    consumer
        .assign("t", 0, StartAt::Offset(0))
        .await
        .expect("assigned");
    c.place("t", 0, |p| p.offline = true);
    let t0 = Instant::now();
    let e = loop {
        match consumer.poll().await {
            Ok(r) => assert!(r.is_empty()),
            Err(e) => break e,
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "no error surfaced");
    };
    assert_eq!(e.code(), Some(ErrorCode::LeaderNotAvailable), "{e}");
    assert!(t0.elapsed() >= Duration::from_millis(250));
}

/// A batch that fails its CRC is an error, nothing of the poll is
/// returned, and the position stays before it; mended, it is read.
#[tokio::test]
async fn a_corrupt_batch_is_an_error_and_the_position_stays() {
    let fake = FakeBroker::start(&[("t", 1)]).await;
    fill(&fake, "t", 0, 0, 2);
    fake.flip_byte("t", 0, 1);
    let mut consumer = Consumer::new(connect(&fake.addr_string()).await, consumer_config());
    consumer
        .assign("t", 0, StartAt::Beginning)
        .await
        .expect("assigned");
    let e = consumer.poll().await.expect_err("corrupt");
    assert!(
        matches!(
            e,
            Error::Corrupt {
                partition: 0,
                offset: 3,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(consumer.positions()[0].2, 0);
    fake.flip_byte("t", 0, 1);
    let mut got = Vec::new();
    poll_until(&mut consumer, 6, &mut got).await;
    assert_eq!(offsets_and_values(&got).1, numbered(0..6));
}

/// Start at the end or the beginning: the offsets come from the leader
/// (metadata here says 0 for both, and names the wrong broker).
#[tokio::test]
async fn start_offsets_come_from_the_leader() {
    let (c, fakes) = cluster(2).await;
    c.topic("t", &[2]);
    c.place("t", 0, |p| {
        p.leader_epoch = 1;
        p.advertised = Some((1, 0));
    });
    c.with(|v| v.stale_metadata = u32::MAX);
    fill(&fakes[1], "t", 0, 0, 2);
    let client = connect(&fakes[0].addr_string()).await;
    assert_eq!(
        client.partition_offsets("t", 0).await.expect("offsets"),
        (0, 6)
    );
    let mut consumer = Consumer::new(client, consumer_config());
    consumer
        .assign("t", 0, StartAt::End)
        .await
        .expect("assigned");
    assert_eq!(consumer.positions()[0].2, 6);
    fill(&fakes[1], "t", 0, 2, 1);
    let mut got = Vec::new();
    poll_until(&mut consumer, 3, &mut got).await;
    assert_eq!(offsets_and_values(&got).0, [6, 7, 8]);
}

// ---- push subscriptions ----------------------------------------------------

async fn next_until(sub: &mut crate::Subscription, n: usize, got: &mut Vec<ConsumedRecord>) {
    let t0 = Instant::now();
    while got.len() < n {
        let left = Duration::from_secs(10).saturating_sub(t0.elapsed());
        let p = tokio::time::timeout(left, sub.next())
            .await
            .unwrap_or_else(|_| panic!("have {} of {n}", got.len()))
            .expect("no error through a failover");
        got.extend(p.records);
    }
}

/// A subscription whose leader stops leading (the broker ends it, naming
/// it, or without naming it) or dies subscribes again at the new leader
/// from the first offset not yet delivered: no error, no record twice,
/// none missing.
#[tokio::test]
async fn a_subscription_resumes_on_the_new_leader_without_duplicates_or_gaps() {
    for how in ["named", "unnamed", "killed"] {
        let (c, fakes) = cluster(3).await;
        c.topic("t", &[2]);
        fill(&fakes[1], "t", 0, 0, 4);
        let consumer = Consumer::new(connect(&bootstrap(&fakes)).await, consumer_config());
        let batch_bytes = 200;
        let mut sub = consumer
            .subscribe("t", 0, 4u64, batch_bytes)
            .await
            .expect("subscribed");
        let mut got = Vec::new();
        next_until(&mut sub, 5, &mut got).await;
        match how {
            "named" | "unnamed" => {
                c.move_leader("t", 0, 3);
                fakes[1].end_subscriptions(ErrorCode::NotLeader, how == "named");
            }
            _ => fail_over(&c, &fakes, "t", 0, 2, 3),
        }
        fill(&fakes[2], "t", 0, 4, 3);
        next_until(&mut sub, 17, &mut got).await;
        let (offsets, vals) = offsets_and_values(&got);
        assert_eq!(offsets, (4..21).collect::<Vec<u64>>(), "{how}");
        assert_eq!(vals, numbered(4..21), "{how}");
        assert_eq!(sub.position(), 21, "{how}");
        let resumed_at: Vec<u64> = fakes[2].subscribes().iter().map(|s| s.2).collect();
        assert_eq!(resumed_at.len(), 1, "{how}: {resumed_at:?}");
        assert!(
            resumed_at[0] == 6 || resumed_at[0] == 9,
            "{how}: {resumed_at:?}"
        );
    }
}

/// A subscription ended by name leaves the others on its connection alone.
#[tokio::test]
async fn ending_one_subscription_by_name_leaves_the_others() {
    let fake = FakeBroker::start(&[("t", 2)]).await;
    fill(&fake, "t", 0, 0, 1);
    fill(&fake, "t", 1, 0, 1);
    let consumer = Consumer::new(connect(&fake.addr_string()).await, consumer_config());
    let mut a = consumer.subscribe("t", 0, 0u64, 1 << 20).await.expect("a");
    let mut b = consumer.subscribe("t", 1, 0u64, 1 << 20).await.expect("b");
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    next_until(&mut a, 3, &mut got_a).await;
    next_until(&mut b, 3, &mut got_b).await;
    fake.end_subscription(a.id(), ErrorCode::LeaderNotAvailable, true);
    fill(&fake, "t", 0, 1, 1);
    fill(&fake, "t", 1, 1, 1);
    next_until(&mut a, 6, &mut got_a).await;
    next_until(&mut b, 6, &mut got_b).await;
    assert_eq!(fake.subscribes().len(), 3, "only a subscribed again");
    assert_eq!(offsets_and_values(&got_a).0, [0, 1, 2, 3, 4, 5]);
    assert_eq!(offsets_and_values(&got_b).0, [0, 1, 2, 3, 4, 5]);
}

/// A push whose batch fails its CRC is an error; the position stays before
/// it and the next call subscribes again from there.
#[tokio::test]
async fn a_corrupt_push_is_an_error_and_the_subscription_resumes_before_it() {
    let fake = FakeBroker::start(&[("t", 1)]).await;
    fill(&fake, "t", 0, 0, 2);
    fake.flip_byte("t", 0, 1);
    let consumer = Consumer::new(connect(&fake.addr_string()).await, consumer_config());
    let mut sub = consumer
        .subscribe("t", 0, 0u64, 1 << 20)
        .await
        .expect("sub");
    let mut got = Vec::new();
    next_until(&mut sub, 3, &mut got).await;
    let e = sub.next().await.expect_err("corrupt");
    assert!(matches!(e, Error::Corrupt { offset: 3, .. }), "{e}");
    assert_eq!(sub.position(), 3);
    fake.flip_byte("t", 0, 1);
    next_until(&mut sub, 6, &mut got).await;
    assert_eq!(offsets_and_values(&got).1, numbered(0..6));
    assert_eq!(fake.subscribes().last().map(|s| s.2), Some(3));
}

// ---- CLI --------------------------------------------------------------------

fn endpoint(fakes: &[FakeBroker]) -> Endpoint {
    Endpoint::new(&bootstrap(fakes), Some("off"))
}

/// `shoal produce` sends each line's bytes, UTF-8 or not, without its line
/// end, and succeeds only when every line is acknowledged.
#[tokio::test]
async fn produce_sends_every_line_as_bytes() {
    let fake = FakeBroker::start(&[("t", 1)]).await;
    let input = b"first\r\nsecond\n\xff\xfe not utf-8\n\nlast".to_vec();
    let summary = cli::produce_lines(
        &endpoint(std::slice::from_ref(&fake)),
        "t",
        None,
        None,
        Acks::Leader,
        std::io::Cursor::new(input),
    )
    .await
    .expect("all acknowledged");
    assert_eq!(summary.lines, 5);
    assert_eq!(summary.acknowledged, 5);
    let stored: Vec<Vec<u8>> = fake.records("t", 0).into_iter().map(|r| r.1).collect();
    assert_eq!(
        stored,
        [
            &b"first"[..],
            b"second",
            b"\xff\xfe not utf-8",
            b"",
            b"last"
        ]
    );
}

/// Lines the broker does not acknowledge make `shoal produce` fail,
/// saying how many.
#[tokio::test]
async fn produce_fails_naming_the_lines_not_acknowledged() {
    let fake = FakeBroker::start(&[("t", 1)]).await;
    fake.set_produce_mode(ProduceMode::Fail(ErrorCode::CorruptBatch));
    let e = cli::produce_lines(
        &endpoint(std::slice::from_ref(&fake)),
        "t",
        None,
        Some(0),
        Acks::Leader,
        std::io::Cursor::new(b"a\nb\nc\n".to_vec()),
    )
    .await
    .expect_err("nothing acknowledged");
    assert!(e.starts_with("3 of 3 lines were not acknowledged"), "{e}");
    assert!(e.contains("CorruptBatch"), "{e}");
}

/// An input that cannot be read to its end fails the command too.
#[tokio::test]
async fn produce_fails_on_an_input_read_error() {
    struct Broken(bool);
    impl std::io::Read for Broken {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if std::mem::replace(&mut self.0, true) {
                return Err(std::io::Error::other("disk gone"));
            }
            buf[..2].copy_from_slice(b"a\n");
            Ok(2)
        }
    }
    let fake = FakeBroker::start(&[("t", 1)]).await;
    let e = cli::produce_lines(
        &endpoint(std::slice::from_ref(&fake)),
        "t",
        None,
        None,
        Acks::Leader,
        Broken(false),
    )
    .await
    .expect_err("input broken");
    assert!(e.contains("disk gone"), "{e}");
    assert_eq!(values(&fake.records("t", 0)), ["a"]);
}

/// `shoal produce --acks all` across a failover: every line acknowledged,
/// each stored once, in order.
#[tokio::test]
async fn produce_with_acks_all_succeeds_across_a_failover() {
    let (c, fakes) = cluster(2).await;
    c.topic("t", &[2]);
    let lines: Vec<String> = numbered(0..2000);
    let input = lines.join("\n").into_bytes();
    fakes[1].script(
        Api::Produce,
        Scripted::Fail(ErrorCode::NotEnoughReplicas),
        2,
    );
    fakes[1].script(Api::Produce, Scripted::DropAfterStore, 1);
    let to = endpoint(&fakes);
    let run = tokio::spawn(async move {
        cli::produce_lines(&to, "t", None, None, Acks::All, std::io::Cursor::new(input)).await
    });
    let t0 = Instant::now();
    while fakes[1].records("t", 0).len() < 500 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    fail_over(&c, &fakes, "t", 0, 2, 1);
    let summary = run.await.expect("task").expect("every line acknowledged");
    assert_eq!(summary.acknowledged, 2000);
    let stored = fakes[0].records("t", 0);
    assert_dense(&stored);
    assert_eq!(values(&stored), lines);
}

/// Output shared with the test while `consume_to` writes it.
#[derive(Clone, Default)]
struct SharedOut(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SharedOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedOut {
    fn lines(&self) -> Vec<String> {
        let b = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        String::from_utf8_lossy(&b)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// `shoal consume --follow` through a failover: every message printed
/// once, in order, and the command ends when it has its count.
#[tokio::test]
async fn consume_follows_the_leader_through_a_failover() {
    let (c, fakes) = cluster(2).await;
    c.topic("t", &[2]);
    fill(&fakes[1], "t", 0, 0, 5);
    let out = SharedOut::default();
    let (to, o) = (endpoint(&fakes), out.clone());
    let run = tokio::spawn(async move {
        let mut o = cli::Out(o);
        cli::consume_to(&to, "t", true, Some(30), true, None, &mut o)
            .await
            .map_err(|e| format!("{e:?}"))
    });
    let t0 = Instant::now();
    while out.lines().len() < 15 {
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", out.lines());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    fail_over(&c, &fakes, "t", 0, 2, 1);
    fakes[0].script(Api::Fetch, Scripted::Fail(ErrorCode::LeaderNotAvailable), 2);
    fill(&fakes[0], "t", 0, 5, 5);
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("ends at its count")
        .expect("task")
        .expect("no error");
    assert_eq!(out.lines(), numbered(0..30));
}

/// `shoal consume` without `--follow` stops at the end its partitions'
/// leaders report, though a fetch there fails on the way.
#[tokio::test]
async fn consume_stops_at_the_leaders_end() {
    let (c, fakes) = cluster(2).await;
    c.topic("t", &[2, 1]);
    fill(&fakes[1], "t", 0, 0, 2);
    fill(&fakes[0], "t", 1, 0, 1);
    fakes[1].script(Api::Fetch, Scripted::DropBeforeStore, 1);
    let out = SharedOut::default();
    let mut o = cli::Out(out.clone());
    tokio::time::timeout(
        Duration::from_secs(10),
        cli::consume_to(&endpoint(&fakes), "t", true, None, false, None, &mut o),
    )
    .await
    .expect("stops at the end")
    .map_err(|e| format!("{e:?}"))
    .expect("no error");
    let mut lines = out.lines();
    lines.sort_by_key(|l| l[1..].parse::<u32>().unwrap_or(0));
    assert_eq!(
        lines,
        ["m0", "m0", "m1", "m1", "m2", "m2", "m3", "m4", "m5"]
    );
}
