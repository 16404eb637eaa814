//! `Consumer::poll_views` hands out records as views of the received frame
//! (no copy per record, one shared topic name) with the same content that
//! `poll` copies out.

use shoal_client::{Client, Consumer, ConsumerConfig, NewTopic, Producer, ProducerConfig, StartAt};
use shoal_tests::Broker;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_views_match_poll_without_copies() {
    let broker = Broker::start("0");
    let client = Client::connect(&broker.addr()).await.unwrap();
    client
        .create_topic(&NewTopic::new("views", 1))
        .await
        .unwrap();
    let p = Producer::new(client.clone(), ProducerConfig::default());
    for i in 0..50 {
        p.send_to(
            "views",
            0,
            Some(format!("k{i}").as_bytes()),
            format!("v{i}").as_bytes(),
        )
        .unwrap();
    }
    p.flush().await.unwrap();
    let mut copying = Consumer::new(client.clone(), ConsumerConfig::default());
    copying
        .assign("views", 0, StartAt::Beginning)
        .await
        .unwrap();
    let mut viewing = Consumer::new(client.clone(), ConsumerConfig::default());
    viewing
        .assign("views", 0, StartAt::Beginning)
        .await
        .unwrap();
    let mut copied = Vec::new();
    while copied.len() < 50 {
        copied.extend(copying.poll().await.unwrap());
    }
    let mut views = Vec::new();
    while views.len() < 50 {
        views.extend(viewing.poll_views().await.unwrap());
    }
    for (c, v) in copied.iter().zip(&views) {
        assert_eq!(c.offset, v.offset);
        assert_eq!(c.value.as_deref(), v.value.as_deref());
        assert_eq!(c.key.as_deref(), v.key.as_deref());
        assert_eq!(c.topic, &*v.topic);
    }
    assert!(
        views
            .windows(2)
            .all(|w| Arc::ptr_eq(&w[0].topic, &w[1].topic)),
        "one shared topic name"
    );
}
