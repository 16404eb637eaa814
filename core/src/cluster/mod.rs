//! Cluster membership (Z1), the cluster controller and topic placement
//! (Z3), through ZooKeeper.
//!
//! No ZooKeeper call runs on a shard's core: [`control`] runs the
//! ZooKeeper session, the controller and the links to the other brokers
//! on a thread of its own (a current-thread tokio runtime). It talks to
//! the shards over two bounded channels:
//! - shards → control ([`ToControl`]): topic create/delete, which the
//!   controller decides (any broker forwards to it over a [`links`] link);
//! - control → shard 0 ([`ToShards`], served by [`bridge`]): the
//!   membership ([`ClusterView`], which shard 0 passes to every shard over
//!   the mesh) and the topics as ZooKeeper records them, which shard 0
//!   applies like a single node's controller applies a topic change
//!   (open or drop local replicas, record `topics.json`).
//!
//! - [`zk`]: the ZooKeeper layout and its records.
//! - [`links`]: one link per pair of live brokers, kept in line with
//!   membership.

pub mod bridge;
pub mod control;
pub mod links;
pub mod zk;

use crate::controller::TopicSpec;
use crate::error::Result;
use crate::metadata::TopicMeta;
use futures::channel::{mpsc, oneshot};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A broker as it registers itself (`<root>/brokers/ids/<id>`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BrokerReg {
    pub id: u32,
    pub host: String,
    /// Public port (any shard accepts).
    pub port: u16,
    /// Port of shard `i` at index `i`.
    pub shard_ports: Vec<u16>,
    /// Where the control thread accepts links from other brokers.
    pub peer_port: u16,
    #[serde(default)]
    pub rack: Option<String>,
    pub version: String,
    /// The registration's ZooKeeper creation id: a broker that restarted
    /// (or re-registered after its session expired) has a new one, so
    /// links to the old incarnation are dropped. Not part of the record.
    #[serde(skip)]
    pub incarnation: i64,
}

impl BrokerReg {
    pub fn shards(&self) -> usize {
        self.shard_ports.len()
    }

    /// The port of `shard`, mapped onto the shards the broker runs now.
    pub fn shard_port(&self, shard: u16) -> Option<u16> {
        if self.shard_ports.is_empty() {
            return None;
        }
        self.shard_ports
            .get(usize::from(shard) % self.shard_ports.len())
            .copied()
    }
}

/// The cluster as this broker last saw it in ZooKeeper.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    pub name: String,
    pub me: u32,
    /// Live brokers, by id.
    pub brokers: BTreeMap<u32, BrokerReg>,
    /// The controller's broker id and epoch.
    pub controller: Option<(u32, u64)>,
}

impl ClusterView {
    pub fn is_live(&self, broker: u32) -> bool {
        self.brokers.contains_key(&broker)
    }
}

/// Shards → the control thread.
pub enum ToControl {
    CreateTopic {
        spec: TopicSpec,
        reply: oneshot::Sender<Result<()>>,
    },
    DeleteTopic {
        name: String,
        reply: oneshot::Sender<Result<()>>,
    },
    /// A leader changes a partition's in-sync set: written to ZooKeeper
    /// only if this broker still leads it at `leader_epoch` there; answers
    /// the set as written.
    AlterIsr {
        topic: String,
        partition: u32,
        leader_epoch: u32,
        isr: Vec<u32>,
        reply: oneshot::Sender<Result<Vec<u32>>>,
    },
    /// Change the users or ACLs in ZooKeeper; answered once this broker's
    /// shards have the new snapshot.
    Security {
        change: crate::auth::store::SecurityChange,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// The control thread → shard 0.
pub enum ToShards {
    /// The users and ACLs ZooKeeper holds now: installed on every shard
    /// before the answer.
    Security {
        state: Arc<crate::auth::store::SecurityState>,
        reply: oneshot::Sender<Result<()>>,
    },
    View(Arc<ClusterView>),
    /// This broker lost (true) or regained (false) its ZooKeeper
    /// connection.
    Fence(bool),
    /// Make the local state of this topic match ZooKeeper's record: open
    /// the replicas this broker holds, update leader and ISR.
    Apply {
        meta: TopicMeta,
        reply: oneshot::Sender<Result<()>>,
    },
    /// The topic is gone from ZooKeeper: drop its local replicas, if this
    /// incarnation (or any, with id 0) is what this broker has.
    Remove {
        name: String,
        id: u64,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Every topic ZooKeeper records (at start, and after a new session):
    /// apply each; cluster topics that ZooKeeper no longer has were deleted
    /// while this broker was away and are dropped.
    Reconcile {
        topics: Vec<TopicMeta>,
        drop_strays: bool,
        reply: oneshot::Sender<Result<()>>,
    },
}

/// How shards reach the control thread. Bounded: a shard waits rather
/// than queue without end.
pub type ControlSender = mpsc::Sender<ToControl>;

/// Room in each direction between the shards and the control thread.
pub const CONTROL_QUEUE_MAX: usize = 64;
