//! `shoal-core`: the broker.
//!
//! # Tour
//! - [`server`]: one pinned glommio executor per core, listeners (public
//!   port with SO_REUSEPORT, one port per shard), signals, clean shutdown.
//! - [`reactor`]: what one core's executor owns ([`reactor::Reactor`]: its
//!   partitions, metadata copy, counters, ends of the mesh) and the mesh
//!   messages it serves. (The storage engine, `shoal_shard`, owns the logs
//!   themselves.)
//! - [`mesh`]: the one way cores meet: typed messages, ordered per
//!   partition, log bytes as a [`mesh::FileRange`] for sendfile.
//! - [`partitions`]: the local partition table; produce (all batches or
//!   none, in order) and fetch (long-poll, zero-copy), routed to the owner.
//! - [`controller`]: topic create/delete and placement of partitions.
//! - [`conn`]: one client connection: bounded receive, a dispatcher, one
//!   file per API family, the protocol-neutral writer with sendfile (or,
//!   over TLS, bounded copies: no kTLS here), the TLS handshake.
//! - [`auth`]: security (C10): SCRAM-SHA-256 users, ACLs and their
//!   per-shard cache, the store (`security.json` or ZooKeeper), TLS
//!   settings and client certificates as principals.
//! - [`metadata`]: topics, their settings and `topics.json`.
//! - [`config`]: `shoal serve` flags and the TOML file; [`limits`]: every
//!   bound and how they relate; [`error`]: the broker's errors and their
//!   wire codes; [`metrics`]: per-shard counters and latency histograms;
//!   [`prometheus`]: `GET /metrics` over them; [`coreplan`]: the affinity
//!   mask, the core plan and pinning; [`logging`]: text or JSON logs;
//!   [`rt`]: the seam for spawning and time.
//!
//! The client commands of the `shoal` binary live with the client
//! (`shoal_client::cli`).

pub mod auth;
pub mod cluster;
pub mod config;
pub mod conn;
pub mod controller;
pub mod coreplan;
pub mod error;
pub mod group;
pub mod limits;
pub mod logging;
pub mod mesh;
pub mod metadata;
pub mod metrics;
pub mod partitions;
pub mod prometheus;
pub mod reactor;
pub mod replication;
pub mod rt;
pub mod server;
