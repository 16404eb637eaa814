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
//! - [`GroupConsumer`] ([`group`]): a member of a consumer group, reading
//!   what the group's coordinator assigns it and committing its positions;
//!   the group admin calls ([`Client::list_groups`],
//!   [`Client::describe_group`], ...).
//! - [`cli`]: the client commands of the `shoal` binary (topic, produce,
//!   consume, group, metrics, cluster status).
//! - [`security`]: credentials (program, environment or file), the
//!   SCRAM-SHA-256 exchange each connection makes first, and the user and
//!   ACL administration calls.
//! - [`connection`]: one TCP connection (plaintext or TLS), requests
//!   multiplexed by correlation id.
//! - [`tls`]: TLS settings (CA file, optional client certificate, the
//!   server name brokers are verified against).
//! - `retry`: the retry policy every partition request follows through a
//!   failover (exponential backoff with jitter, bounded by a timeout).
//!
//! # Failover (L3)
//! A partition's leader may move or die at any moment. The client treats
//! `NotLeader`, `LeaderNotAvailable`, `NotEnoughReplicas`,
//! `ClusterUnavailable`, `FencedLeaderEpoch`, a refused connect, a
//! connection lost mid-request and a request unanswered within
//! [`ClientConfig::request_timeout`] alike: it learns where the leader is
//! now (the `NotLeader` hint, else fresh metadata), backs off (50 ms
//! doubling to 1 s, jittered; none after a hint) and tries again.
//! - The [`Producer`] retries each batch with the same producer id and
//!   sequence until [`ProducerConfig::delivery_timeout`] (120 s): a batch
//!   the old leader stored before the connection dropped is answered as a
//!   duplicate with its original offsets, never stored twice; batches of a
//!   partition stay in order. Only [`Acks::All`] promises that an
//!   acknowledged record survives a failover.
//! - The [`Consumer`] and push [`Subscription`]s resume at the new leader
//!   from the first offset not yet delivered: no error, no record twice,
//!   none skipped. An error surfaces only once a partition has been
//!   unavailable for [`ConsumerConfig::unavailable_max`] (120 s). Every
//!   batch received is checked against its CRC ([`Error::Corrupt`]).
//! - `shoal produce` exits 0 only if every input line was acknowledged.
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
pub mod group;
pub mod producer;
pub(crate) mod retry;
pub mod security;
pub mod tls;

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
pub use group::{
    AssignmentStrategy, CommittedOffset, GroupConfig, GroupConsumer, GroupDescription,
    GroupListing, GroupMember, OffsetReset, RebalanceEvent, TopicPartition,
};
pub use producer::{
    produce_batches, Acks, Delivery, Partitioner, Produced, Producer, ProducerConfig,
    RecordMetadata,
};
pub use security::{Acl, AclOperation, AclResource, Credentials, UserInfo};
pub use shoal_wire::ErrorCode;
pub use tls::{TlsConfig, TlsFiles};
