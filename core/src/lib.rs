//! `shoal-core`: the broker.
//!
//! # Tour
//! - [`server`]: one pinned glommio executor per core, the channel mesh
//!   between them, listeners (public port with SO_REUSEPORT, one port per
//!   shard), signals and clean shutdown.
//! - [`shard`]: what one core owns — partition logs, a copy of the topic
//!   metadata, counters — and the operations on partitions, routed to the
//!   owning shard through [`shard::ShardMsg`]s. Shard 0 is the controller
//!   for topic creation and deletion.
//! - [`conn`]: one client connection: frames, requests, responses, push
//!   subscriptions with credit.
//! - [`zerocopy`]: log bytes to the socket with sendfile.
//! - [`metadata`]: topics, their settings and partition → shard placement.
//! - [`config`]: `shoal serve` flags and the TOML file.

pub mod config;
pub mod conn;
pub mod metadata;
pub mod server;
pub mod shard;
pub mod zerocopy;
