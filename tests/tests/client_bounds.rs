//! The client's memory bounds against the real broker: the producer's
//! buffer (`buffer_bytes_max`, `buffer_wait_max`) and the push queue of a
//! subscription (bounded by its credit).

use shoal_client::{
    Client, Consumer, ConsumerConfig, Error, NewTopic, Producer, ProducerConfig, StartAt,
};
use shoal_tests::{two_shards, Broker};
use std::time::Duration;

const BUFFER_BYTES: usize = 16 * 1024;
const VALUE_BYTES: usize = 100;

async fn producer(broker: &Broker, topic: &str, wait: Duration) -> (Client, Producer) {
    let client = Client::connect(&broker.addr()).await.unwrap();
    client.create_topic(&NewTopic::new(topic, 2)).await.unwrap();
    let p = Producer::new(
        client.clone(),
        ProducerConfig {
            batch_bytes: 4 * 1024,
            buffer_bytes_max: BUFFER_BYTES,
            buffer_wait_max: wait,
            ..ProducerConfig::default()
        },
    );
    (client, p)
}

/// 20,000 records of 100 bytes (≈150 times the buffer) through a 16 KiB
/// buffer, every delivery kept until the end: since no send fails, sends
/// waited for acknowledgements to free room; the buffered bytes never pass
/// the bound, and every record is stored in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_buffer_makes_sends_wait_and_stays_bounded() {
    let broker = Broker::start(two_shards());
    let (client, p) = producer(&broker, "bounded", Duration::from_secs(30)).await;
    let n = 20_000u32;
    let mut deliveries = Vec::with_capacity(n as usize);
    let mut peak_bytes = 0;
    for i in 0..n {
        let value = format!("{i:0width$}", width = VALUE_BYTES);
        deliveries.push(
            p.send_nowait_to("bounded", i % 2, None, value.as_bytes())
                .await
                .unwrap(),
        );
        peak_bytes = peak_bytes.max(p.buffered_bytes());
    }
    assert!(peak_bytes <= BUFFER_BYTES, "{peak_bytes} bytes buffered");
    let mut next = [0u64; 2];
    for (i, d) in deliveries.into_iter().enumerate() {
        let m = d.await.unwrap();
        assert_eq!(m.partition, i as u32 % 2);
        assert_eq!(m.offset, next[m.partition as usize]);
        next[m.partition as usize] += 1;
    }
    assert_eq!(p.buffered_bytes(), 0);
    let mut consumer = Consumer::new(client, ConsumerConfig::default());
    consumer
        .assign("bounded", 1, StartAt::Beginning)
        .await
        .unwrap();
    let mut seen = 0u32;
    while seen < n / 2 {
        for r in consumer.poll().await.unwrap() {
            let want = format!("{:0width$}", seen * 2 + 1, width = VALUE_BYTES);
            assert_eq!(r.value.as_deref(), Some(want.as_bytes()));
            seen += 1;
        }
    }
}

/// With `buffer_wait_max` zero, sends that outrun the broker fail at once
/// with `BufferFull` (naming the bound) and nothing is lost: every record
/// accepted is acknowledged, and room comes back.
#[tokio::test(flavor = "current_thread")]
async fn a_tiny_buffer_without_wait_fails_fast() {
    let broker = Broker::start(two_shards());
    let (_client, p) = producer(&broker, "nowait", Duration::ZERO).await;
    let value = [b'v'; VALUE_BYTES];
    let mut accepted = Vec::new();
    let mut refused = None;
    // Synchronous sends on a current-thread runtime: the sender tasks
    // cannot run in between, so the buffer must fill.
    for _ in 0..10_000 {
        match p.send_to("nowait", 0, None, &value) {
            Ok(d) => accepted.push(d),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("a full buffer refuses");
    assert!(
        matches!(e, Error::BufferFull { bytes_max } if bytes_max == BUFFER_BYTES),
        "{e}"
    );
    assert!(p.buffered_bytes() <= BUFFER_BYTES);
    assert!(accepted.len() * VALUE_BYTES < BUFFER_BYTES);
    for d in accepted {
        d.await.unwrap();
    }
    assert_eq!(p.buffered_bytes(), 0);
    p.send("nowait", None, &value).await.unwrap();
}

/// A subscription that is not read holds no more than its credit: 2 MiB
/// are appended behind a 64 KiB credit, the queue stays within the credit
/// (plus one push), and reading it all afterwards gets every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unread_subscription_holds_at_most_its_credit() {
    let broker = Broker::start(two_shards());
    let (client, p) = producer(&broker, "pushq", Duration::from_secs(30)).await;
    let credit = 64 * 1024u64;
    let consumer = Consumer::new(client, ConsumerConfig::default());
    let mut sub = consumer.subscribe("pushq", 0, 0, credit).await.unwrap();
    let value = [b'p'; 1024];
    let n = 2048u64;
    for _ in 0..n {
        p.send_nowait_to("pushq", 0, None, &value).await.unwrap();
    }
    p.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let queued = sub.queued_bytes();
    assert!(queued > 0, "nothing was pushed");
    assert!(queued <= credit + 64 * 1024, "{queued} bytes queued");
    let mut got = 0u64;
    while got < n {
        let pushed = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .expect("pushes continue")
            .unwrap();
        got += pushed.records.len() as u64;
        assert!(sub.queued_bytes() <= credit + 64 * 1024);
    }
    assert_eq!(got, n);
}
