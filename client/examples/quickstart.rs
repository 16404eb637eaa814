//! Produce and consume with the Rust client.
//!
//! Start a broker (`cargo run --release -p shoal-core -- serve`), then:
//! `cargo run -p shoal-client --example quickstart [-- 127.0.0.1:9400]`

use shoal_client::{Client, Consumer, ConsumerConfig, NewTopic, Producer, ProducerConfig, StartAt};

#[tokio::main]
async fn main() -> shoal_client::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9400".into());
    let client = Client::connect(&addr).await?;
    let topic = format!("quickstart-{}", std::process::id());
    client.create_topic(&NewTopic::new(&topic, 2)).await?;

    // Batches by size and linger; idempotent; acks=leader.
    let producer = Producer::new(client.clone(), ProducerConfig::default());
    for i in 0..10 {
        let key = format!("user-{}", i % 3);
        let meta = producer
            .send(
                &topic,
                Some(key.as_bytes()),
                format!("event {i}").as_bytes(),
            )
            .await?;
        println!(
            "stored event {i} at partition {} offset {}",
            meta.partition, meta.offset
        );
    }

    // Pull: long-poll fetches over every partition.
    let mut consumer = Consumer::new(client.clone(), ConsumerConfig::default());
    consumer.assign_all(&topic, StartAt::Beginning).await?;
    let mut seen = 0;
    while seen < 10 {
        for r in consumer.poll().await? {
            println!(
                "pulled {}-{}@{}: {}",
                r.topic,
                r.partition,
                r.offset,
                String::from_utf8_lossy(r.value.as_deref().unwrap_or_default())
            );
            seen += 1;
        }
    }

    // Push: the broker streams new batches within the granted credit.
    let mut sub = consumer.subscribe(&topic, 0, 0, 64 * 1024).await?;
    let pushed = sub.next().await?;
    println!(
        "pushed {} records ({} bytes of credit used)",
        pushed.records.len(),
        pushed.payload_bytes
    );
    sub.unsubscribe().await?;
    client.delete_topic(&topic).await?;
    Ok(())
}
