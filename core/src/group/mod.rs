//! Consumer groups (C6, C8) on a metadata log with checkpoints (C11).
//!
//! A group's coordinator is the shard that leads partition
//! `fnv1a32(group) % N` of the internal topic `__shoal_groups`
//! ([`shoal_wire::group`]). Its state (membership, assignment, committed
//! offsets) lives in that shard's memory; every change is a record of the
//! partition, appended through a buffer that a background task flushes
//! as one batch (group commit), so the partition replicates like any
//! other and coordination moves with its leadership on failover.
//!
//! - [`state`]: one group's rules (join, heartbeat, leave, expiry,
//!   reconciliation toward the target assignment, commit checks). Pure.
//! - [`assign`]: the strategies (sticky, range, round-robin). Pure.
//! - [`records`]: the log's records and the checkpoint format.
//! - [`coordinator`]: one partition's coordinator: load (checkpoint, then
//!   replay of the log's tail), the flusher and acknowledger, session
//!   expiry, checkpoints.
//!
//! What an acknowledged commit guarantees: it is in the `__shoal_groups`
//! log of every in-sync replica (as an acks=all produce with the topic's
//! `min_insync_replicas`), so it survives the loss of any replica but
//! the last in-sync one, and an offset fetch after it (from any later
//! coordinator) returns it or a later commit. A commit that is not
//! acknowledged (an error or a lost answer) may or may not be kept.

pub mod assign;
pub mod coordinator;
pub mod records;
pub mod standby;
pub mod state;

use crate::error::{Error, Result};
use crate::reactor::Reactor;
use coordinator::Coordinator;
use shoal_wire::group::{coordinator_partition, GROUPS_TOPIC, GROUP_NAME_MAX};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;

/// The coordinators a shard runs: one per `__shoal_groups` partition it
/// leads, created on the first request after it took the lead.
#[derive(Default)]
pub struct Coordinators {
    parts: RefCell<HashMap<u32, Rc<Coordinator>>>,
    /// Whether this shard has asked for `__shoal_groups` to be created.
    creating: Cell<bool>,
    /// Per partition directory: checkpoint installs run one at a time.
    installs: RefCell<HashMap<std::path::PathBuf, Rc<futures::lock::Mutex<()>>>>,
    next_member: Cell<u64>,
}

impl Coordinators {
    /// A member id no other member of any group here has.
    pub fn new_member_id(&self, client_id: &str) -> String {
        let n = self.next_member.get() + 1;
        self.next_member.set(n);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let client: String = client_id
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            .take(64)
            .collect();
        let client = if client.is_empty() { "member" } else { &client };
        format!("{client}-{nanos:x}-{n}")
    }

    pub fn install_lock(&self, dir: &std::path::Path) -> Rc<futures::lock::Mutex<()>> {
        self.installs
            .borrow_mut()
            .entry(dir.to_path_buf())
            .or_default()
            .clone()
    }

    pub fn loaded(&self) -> Vec<Rc<Coordinator>> {
        self.parts.borrow().values().cloned().collect()
    }

    pub fn remove(&self, c: &Rc<Coordinator>) {
        c.stop();
        let mut parts = self.parts.borrow_mut();
        if parts.get(&c.partition).is_some_and(|x| Rc::ptr_eq(x, c)) {
            parts.remove(&c.partition);
        }
    }

    pub fn stop_all(&self) {
        for c in self.parts.borrow_mut().drain().map(|(_, c)| c) {
            c.stop();
        }
    }
}

/// Refuses an empty or over-long group name.
pub fn check_group_name(group: &str) -> Result<()> {
    if group.is_empty() || group.len() > GROUP_NAME_MAX {
        return Err(Error::InvalidGroupId(format!(
            "a group name must be 1 to {GROUP_NAME_MAX} bytes"
        )));
    }
    Ok(())
}

impl Reactor {
    /// The coordinator of `group`, loaded on this shard: `NotLeader` (with
    /// where to go) when another shard or broker leads its partition,
    /// `CoordinatorLoading` while it replays its log (or while
    /// `__shoal_groups` is being created).
    pub fn coordinator(self: &Rc<Self>, group: &str) -> Result<Rc<Coordinator>> {
        check_group_name(group)?;
        let Some(meta) = self.partitions.topic(GROUPS_TOPIC) else {
            self.create_groups_topic();
            return Err(Error::CoordinatorLoading(group.to_string()));
        };
        let p = coordinator_partition(group, meta.partitions());
        self.coordinator_of(p, group)
    }

    /// The coordinator of partition `p` of `__shoal_groups` here (`group`
    /// names the group asked about, for errors).
    pub fn coordinator_of(self: &Rc<Self>, p: u32, group: &str) -> Result<Rc<Coordinator>> {
        let log = self.leading_groups_log(p)?;
        let epoch = log.leader_epoch();
        let existing = self.groups.parts.borrow().get(&p).cloned();
        if let Some(c) = existing {
            if c.is_current(&log, epoch) {
                if c.is_loaded() {
                    return Ok(c);
                }
                return Err(Error::CoordinatorLoading(group.to_string()));
            }
            self.groups.remove(&c);
        }
        let c = Coordinator::start(self.clone(), p, log, epoch);
        self.groups.parts.borrow_mut().insert(p, c);
        Err(Error::CoordinatorLoading(group.to_string()))
    }

    /// The log of partition `p` of `__shoal_groups` if this shard leads it
    /// and may write it now.
    fn leading_groups_log(&self, p: u32) -> Result<Rc<shoal_shard::PartitionLog>> {
        let shard = self.owner(GROUPS_TOPIC, p)?;
        if shard != self.id {
            return Err(self.not_this_shard(p, shard));
        }
        self.replication.check_writable(GROUPS_TOPIC, p)?;
        self.partitions.local_log(GROUPS_TOPIC, p)
    }

    /// `NotLeader` pointing at the shard of this broker that owns `p`.
    fn not_this_shard(&self, p: u32, shard: usize) -> Error {
        let (broker_id, host, port) = match (self.broker_id(), self.cluster.borrow().as_ref()) {
            (Some(me), Some(view)) => match view.brokers.get(&me) {
                Some(b) => (
                    me,
                    b.host.clone(),
                    b.shard_port(shard as u16).unwrap_or(b.port),
                ),
                None => (
                    me,
                    self.config.advertised_host.clone(),
                    self.config.shard_port(shard),
                ),
            },
            (me, _) => (
                me.unwrap_or(0),
                self.config.advertised_host.clone(),
                self.config.shard_port(shard),
            ),
        };
        // The partition's current epoch: a client ignores hints older than
        // the epoch it knows.
        let leader_epoch = self
            .partitions
            .topic(GROUPS_TOPIC)
            .and_then(|m| m.placement.get(p as usize).map(|pl| pl.leader_epoch))
            .unwrap_or(0);
        Error::NotLeader {
            topic: GROUPS_TOPIC.into(),
            partition: p,
            leader: Some(broker_id),
            leader_epoch,
            hint: Some(crate::error::LeaderHint {
                broker_id,
                host,
                port,
                leader_epoch,
            }),
        }
    }

    /// Creates `__shoal_groups` in the background (once per shard at a
    /// time): the configured partitions, replicated on as many brokers as
    /// are live up to the configured factor, every write on stable storage.
    fn create_groups_topic(self: &Rc<Self>) {
        if self.groups.creating.replace(true) {
            return;
        }
        let live = self
            .cluster
            .borrow()
            .as_ref()
            .map_or(1, |v| v.brokers.len().max(1));
        let rf = self
            .config
            .group_replication_factor
            .min(u16::try_from(live).unwrap_or(u16::MAX));
        let spec = crate::controller::TopicSpec {
            name: GROUPS_TOPIC.into(),
            partitions: self.config.group_partitions,
            replication_factor: rf,
            sync: Some("always".into()),
            retention_ms: None,
            retention_bytes: None,
            segment_bytes: Some(self.config.group_segment_bytes),
            min_insync_replicas: None,
            unclean_leader_election: false,
        };
        let me = self.clone();
        crate::rt::spawn_detached(async move {
            match me.create_topic(spec).await {
                Ok(()) | Err(Error::TopicExists(_)) => {}
                Err(e) => tracing::warn!(error = %e, "could not create {GROUPS_TOPIC}"),
            }
            me.groups.creating.set(false);
        });
    }

    /// Once a tick: expires members, checks each coordinator still leads
    /// its partition (drops it otherwise), checkpoints.
    pub async fn groups_tick(self: &Rc<Self>) {
        for c in self.groups.loaded() {
            let still = self
                .leading_groups_log(c.partition)
                .is_ok_and(|log| c.is_current(&log, log.leader_epoch()));
            if !still {
                tracing::info!(
                    partition = c.partition,
                    "no longer coordinating this groups partition"
                );
                self.groups.remove(&c);
                continue;
            }
            if c.is_loaded() {
                c.tick(self).await;
            }
        }
    }
}

/// How often coordinators expire members and consider a checkpoint.
pub const TICK: std::time::Duration = std::time::Duration::from_millis(100);

impl Reactor {
    /// This leader's checkpoint of partition `p` (empty if none), for
    /// follower `replica_id` about to start over at its log start.
    pub async fn group_checkpoint_of(self: &Rc<Self>, p: u32, replica_id: i32) -> Result<Vec<u8>> {
        let shard = self.owner(GROUPS_TOPIC, p)?;
        if shard != self.id {
            return Err(self.not_this_shard(p, shard));
        }
        self.check_replica(p, replica_id)?;
        let log = self.partitions.local_log(GROUPS_TOPIC, p)?;
        let lock = self.groups.install_lock(log.dir());
        let _no_install_meanwhile = lock.lock().await;
        match shoal_shard::durable::read(log.dir().join(coordinator::CHECKPOINT_FILE)).await {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(Error::io("read the group checkpoint", e)),
        }
    }

    /// Refuses a broker that holds no replica of `p`.
    fn check_replica(&self, p: u32, replica_id: i32) -> Result<()> {
        let meta = self
            .partitions
            .topic(GROUPS_TOPIC)
            .ok_or_else(|| Error::UnknownTopic(GROUPS_TOPIC.into()))?;
        let holds = u32::try_from(replica_id).ok().is_some_and(|r| {
            meta.placement
                .get(p as usize)
                .is_some_and(|pl| pl.replica_on(r).is_some())
        });
        if !holds {
            return Err(Error::Malformed(format!(
                "broker {replica_id} holds no replica of {GROUPS_TOPIC}-{p}"
            )));
        }
        Ok(())
    }

    /// A follower's checkpoint of partition `p` as of `offset`: kept if
    /// this shard leads `p` at `leader_epoch`, the sender holds a replica,
    /// the offset is committed here (at most the high watermark, at least
    /// the log start) and the checkpoint reads back whole with that
    /// offset; the log's segments wholly below it are then deleted.
    pub async fn accept_group_checkpoint(
        self: &Rc<Self>,
        p: u32,
        offset: u64,
        leader_epoch: u32,
        replica_id: i32,
        bytes: &[u8],
    ) -> Result<()> {
        let shard = self.owner(GROUPS_TOPIC, p)?;
        if shard != self.id {
            return Err(self.not_this_shard(p, shard));
        }
        self.check_replica(p, replica_id)?;
        let log = self.partitions.local_log(GROUPS_TOPIC, p)?;
        if log.leader_epoch() != leader_epoch {
            return Err(Error::FencedLeaderEpoch {
                topic: GROUPS_TOPIC.into(),
                partition: p,
                asked: i64::from(leader_epoch),
                current: log.leader_epoch(),
            });
        }
        if offset > log.high_watermark() || offset < log.start_offset() {
            return Err(Error::Malformed(format!(
                "checkpoint offset {offset} is outside {}..={} of {GROUPS_TOPIC}-{p}",
                log.start_offset(),
                log.high_watermark()
            )));
        }
        match records::decode_checkpoint(bytes) {
            Ok((at, _)) if at == offset => {}
            Ok((at, _)) => {
                return Err(Error::Malformed(format!(
                    "the checkpoint is as of offset {at}, not {offset}"
                )))
            }
            Err(e) => return Err(Error::Malformed(format!("bad checkpoint: {e}"))),
        }
        if coordinator::install_checkpoint(self, &log, offset, bytes.to_vec()).await? {
            if let Some(c) = self.groups.parts.borrow().get(&p) {
                c.checkpointed_by_follower();
            }
        }
        Ok(())
    }
}
