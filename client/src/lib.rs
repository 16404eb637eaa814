//! `shoal-client`: the Rust client for Shoal, usable from tokio.
//!
//! # Tour
//! - [`Client`]: finds the cluster (a bootstrap list, `zk://`, or the
//!   disk cache of the broker list), caches metadata and routes each
//!   partition's requests straight to its leader's shard that owns it (its
//!   shard port from metadata), falling back to that broker's public port;
//!   follows `NotLeader` redirects. Admin operations (topics, metrics) go
//!   to any live broker.
//! - [`discovery`]: bootstrap strings, the ZooKeeper lookup and the disk
//!   cache of the broker list (Z2).
//! - [`Producer`]: batching by size and linger, partitioner (by key or
//!   round-robin), acks, idempotence (producer id + sequence) and retries.
//! - [`Consumer`]: assigned partitions read by long-poll fetch, by offset or
//!   timestamp; [`consumer::Subscription`] for push with credit.
//! - [`cli`]: the client commands of the `shoal` binary (topic, produce,
//!   consume, metrics, cluster status).
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
#[cfg(test)]
mod cluster_tests;
pub mod connection;
pub mod consumer;
pub mod discovery;
pub mod error;
#[cfg(test)]
mod failover_tests;
#[cfg(test)]
mod fake_broker;
pub mod producer;
pub(crate) mod retry;

pub use client::{
    BrokerInfo, Client, ClientConfig, ClusterInfo, DiscoverySource, NewTopic, PartitionInfo,
    TopicInfo,
};
pub use consumer::{
    decode_record_views, decode_records, ConsumedRecord, Consumer, ConsumerConfig, Fetched, Pushed,
    PushedViews, RecordView, StartAt, Subscription,
};
pub use discovery::DiscoveryCache;
pub use error::{Error, LeaderHint, Result};
pub use producer::{
    produce_batches, Acks, Delivery, Partitioner, Produced, Producer, ProducerConfig,
    RecordMetadata,
};
pub use shoal_wire::ErrorCode;
