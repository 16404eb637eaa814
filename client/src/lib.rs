//! `shoal-client`: the Rust client for Shoal, usable from tokio.
//!
//! # Tour
//! - [`Client`]: connects to a broker, caches metadata and routes each
//!   partition's requests straight to the shard that owns it (its shard
//!   port from metadata), falling back to the public port. Admin
//!   operations (topics, metrics) live here too.
//! - [`Producer`]: batching by size and linger, partitioner (by key or
//!   round-robin), acks, idempotence (producer id + sequence) and retries.
//! - [`Consumer`]: assigned partitions read by long-poll fetch, by offset or
//!   timestamp; [`consumer::Subscription`] for push with credit.
//! - [`cli`]: the client commands of the `shoal` binary (topic, produce,
//!   consume, metrics).
//! - [`connection`]: one TCP connection, requests multiplexed by
//!   correlation id.
//!
//! ```no_run
//! # async fn demo() -> shoal_client::Result<()> {
//! use shoal_client::{Client, NewTopic, Producer, ProducerConfig, Consumer, ConsumerConfig, StartAt};
//! let client = Client::connect("127.0.0.1:9400").await?;
//! client.create_topic(&NewTopic::new("orders", 4)).await?;
//! let producer = Producer::new(client.clone(), ProducerConfig::default());
//! producer.send("orders", Some(b"customer-7"), b"hello").await?;
//! let mut consumer = Consumer::new(client, ConsumerConfig::default());
//! consumer.assign_all("orders", StartAt::Beginning).await?;
//! for r in consumer.poll().await? {
//!     println!("{}-{} @{}: {:?}", r.topic, r.partition, r.offset, r.value);
//! }
//! # Ok(()) }
//! ```

pub mod cli;
pub mod client;
pub mod connection;
pub mod consumer;
pub mod error;
#[cfg(test)]
mod fake_broker;
pub mod producer;

pub use client::{Client, ClientConfig, NewTopic, PartitionInfo, TopicInfo};
pub use consumer::{
    decode_record_views, decode_records, ConsumedRecord, Consumer, ConsumerConfig, Fetched, Pushed,
    PushedViews, RecordView, StartAt, Subscription,
};
pub use error::{Error, Result};
pub use producer::{
    produce_batches, Acks, Delivery, Partitioner, Produced, Producer, ProducerConfig,
    RecordMetadata,
};
pub use shoal_wire::ErrorCode;
