//! Replication (Z4), acks=all and the replica side of failover (Z5).
//!
//! Every partition a shard owns in a cluster has a role, derived from the
//! partition state ZooKeeper records (leader, leader epoch, ISR) and kept
//! in line with it by [`Replicas::sync`]:
//! - **leader** ([`leader`]): stamps its epoch on every batch it appends,
//!   serves its followers' fetches (the consumers' read path, zero-copy),
//!   tracks each follower's log end, moves the high watermark to the lowest
//!   log end in the in-sync set, shrinks and grows that set through
//!   conditional ZooKeeper writes, and completes acks=all produces once the
//!   high watermark passes them;
//! - **follower** ([`follower`]): one fetch task per partition, pulling
//!   from the leader's owning shard and appending with the leader's offsets
//!   and epochs, truncating where its log diverges from the leader's
//!   (by leader epoch, never by its own high watermark);
//! - a partition without replicas elsewhere (a single node) is neither: its
//!   log's end is its high watermark, as before replication.
//!
//! A role change waits for the previous role to stop (a follower's fetch
//! task ends before the log takes a leader epoch), one change at a time per
//! partition.
//!
//! Fencing: a leader stops acknowledging acks=all writes while its broker
//! has lost ZooKeeper ([`Replicas::set_fenced`]), and for good once a
//! follower shows it a newer epoch; ZooKeeper then brings its new role.

pub mod dial;
pub mod follower;
pub mod leader;

use crate::error::{Error, Result};
use crate::metadata::TopicMeta;
use crate::reactor::Reactor;
use crate::rt;
use leader::LeaderState;
use shoal_shard::{Notify, PartitionLog};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

/// How often each shard checks its followers' lag, its roles against the
/// metadata, and writes high watermark checkpoints.
pub const TICK: Duration = Duration::from_millis(250);
/// High watermarks are checkpointed at most this often.
pub const HW_CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// What a partition's replica here should be, from the metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Not replicated: a single node, or a topic without placement.
    Alone,
    Leader {
        epoch: u32,
    },
    /// Follow `leader` (none alive: wait for one).
    Follower {
        leader: Option<u32>,
        epoch: u32,
    },
}

impl Want {
    pub fn of(meta: &TopicMeta, partition: u32, me: Option<u32>) -> Want {
        let (Some(me), Some(p)) = (me, meta.placement.get(partition as usize)) else {
            return Want::Alone;
        };
        if p.leader == Some(me) {
            Want::Leader {
                epoch: p.leader_epoch,
            }
        } else {
            Want::Follower {
                leader: p.leader,
                epoch: p.leader_epoch,
            }
        }
    }
}

/// A partition's current role here.
pub enum Role {
    Alone,
    Leader(Rc<LeaderState>),
    Follower(follower::Fetcher),
}

impl Role {
    fn want(&self) -> Want {
        match self {
            Role::Alone => Want::Alone,
            Role::Leader(l) => Want::Leader { epoch: l.epoch },
            Role::Follower(f) => Want::Follower {
                leader: f.leader,
                epoch: f.epoch,
            },
        }
    }
}

/// One local partition's replication state.
pub struct Slot {
    pub topic: String,
    pub partition: u32,
    role: RefCell<Role>,
    /// Role changes run one at a time.
    changing: futures::lock::Mutex<()>,
}

impl Slot {
    pub fn leader(&self) -> Option<Rc<LeaderState>> {
        match &*self.role.borrow() {
            Role::Leader(l) => Some(l.clone()),
            _ => None,
        }
    }

    /// Ends the role (its partition is gone or the shard stops), after any
    /// change under way.
    async fn retire(self: Rc<Self>) {
        let _one = self.changing.lock().await;
        let old = self.role.replace(Role::Alone);
        stop_role(old).await;
    }
}

/// A shard's replication state: a slot per local partition of a cluster
/// topic.
pub struct Replicas {
    /// Cluster mode, before this broker first heard ZooKeeper's partition
    /// states: its `topics.json` may name it leader of partitions that
    /// moved while it was down, so it takes no role and no write yet.
    waiting_for_zookeeper: Cell<bool>,
    slots: RefCell<HashMap<(String, u32), Rc<Slot>>>,
    /// This broker has lost ZooKeeper: acks=all is not acknowledged.
    fenced: Cell<bool>,
    /// Fencing changed.
    fence_changed: Notify,
    /// Topics whose metadata changed since the replication loop last
    /// looked (it brings their roles in line).
    dirty: RefCell<std::collections::BTreeSet<String>>,
    wake: Notify,
}

impl Replicas {
    pub fn new(cluster: bool) -> Replicas {
        Replicas {
            waiting_for_zookeeper: Cell::new(cluster),
            slots: Default::default(),
            fenced: Cell::new(cluster),
            fence_changed: Notify::default(),
            dirty: Default::default(),
            wake: Notify::default(),
        }
    }

    /// Refuses a write unless this replica leads the partition now: not
    /// before this broker knows from ZooKeeper what it leads, not while a
    /// role change is under way (a follower's fetch task may still be
    /// appending, and the new epoch is not taken yet), not once deposed.
    /// A partition without a slot yet (a topic created a moment ago, its
    /// role not set) takes writes as a single node would.
    pub fn check_writable(&self, topic: &str, partition: u32) -> Result<()> {
        if self.waiting_for_zookeeper.get() {
            return Err(not_leader_now(topic, partition));
        }
        let Some(slot) = self.slot(topic, partition) else {
            return Ok(());
        };
        let ok = match &*slot.role.borrow() {
            Role::Leader(l) => !l.deposed.get(),
            Role::Alone => true,
            Role::Follower(_) => false,
        };
        if !ok || slot.changing.try_lock().is_none() {
            return Err(not_leader_now(topic, partition));
        }
        Ok(())
    }

    pub fn slot(&self, topic: &str, partition: u32) -> Option<Rc<Slot>> {
        self.slots
            .borrow()
            .get(&(topic.to_string(), partition))
            .cloned()
    }

    pub fn leader(&self, topic: &str, partition: u32) -> Option<Rc<LeaderState>> {
        self.slot(topic, partition)?.leader()
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.get()
    }

    pub fn set_fenced(&self, fenced: bool) {
        if !fenced && self.waiting_for_zookeeper.replace(false) {
            self.wake.notify_all();
        }
        if self.fenced.replace(fenced) != fenced {
            if fenced {
                tracing::warn!("lost ZooKeeper: acks=all writes wait until it is back (or fail)");
            }
            self.fence_changed.notify_all();
            for slot in self.slots.borrow().values() {
                if let Some(l) = slot.leader() {
                    l.progress.notify_all();
                }
            }
        }
    }

    /// The metadata of `topic` changed: its roles are brought in line
    /// right away by the replication loop.
    pub fn mark(&self, topic: &str) {
        self.dirty.borrow_mut().insert(topic.to_string());
        self.wake.notify_all();
    }

    fn all(&self) -> Vec<Rc<Slot>> {
        self.slots.borrow().values().cloned().collect()
    }
}

impl Reactor {
    /// Brings the roles of this shard's partitions of `topic` (all topics
    /// if `None`) in line with the metadata, in the background.
    pub fn replication_sync(self: &Rc<Self>, topic: Option<&str>) {
        let Some(me) = self.broker_id() else {
            return;
        };
        if self.replication.waiting_for_zookeeper.get() {
            return;
        }
        let logs = match topic {
            Some(t) => self.partitions.local_logs_of(Some(&[t.to_string()])),
            None => self.partitions.local_logs_of(None),
        };
        let mut live: std::collections::HashSet<(String, u32)> = Default::default();
        let mut meta: Option<TopicMeta> = None;
        for ((name, p), _) in logs {
            // The logs come topic by topic: one copy of each topic's
            // metadata.
            if meta.as_ref().is_none_or(|m| m.name != name) {
                meta = self.partitions.topic(&name);
            }
            let Some(meta) = meta.as_ref() else {
                continue;
            };
            let want = Want::of(meta, p, Some(me));
            let key = (name.clone(), p);
            live.insert(key.clone());
            let slot = self
                .replication
                .slots
                .borrow_mut()
                .entry(key)
                .or_insert_with(|| {
                    Rc::new(Slot {
                        topic: name.clone(),
                        partition: p,
                        role: RefCell::new(Role::Alone),
                        changing: futures::lock::Mutex::new(()),
                    })
                })
                .clone();
            let current = slot.role.borrow().want();
            let isr_moved = match (&*slot.role.borrow(), meta.placement.get(p as usize)) {
                (Role::Leader(l), Some(pl)) => *l.isr.borrow() != pl.isr,
                _ => false,
            };
            if current != want || isr_moved {
                let r = self.clone();
                rt::spawn_detached(async move { r.change_role(slot).await });
            }
        }
        // Slots of partitions no longer here (topic deleted): stop them.
        let gone: Vec<Rc<Slot>> = {
            let mut slots = self.replication.slots.borrow_mut();
            let scope = |k: &(String, u32)| topic.is_none_or(|t| k.0 == t);
            let keys: Vec<_> = slots
                .keys()
                .filter(|k| scope(k) && !live.contains(k))
                .cloned()
                .collect();
            keys.into_iter().filter_map(|k| slots.remove(&k)).collect()
        };
        for slot in gone {
            rt::spawn_detached(slot.retire());
        }
    }

    /// Moves one partition to the role the metadata asks for now.
    async fn change_role(self: Rc<Self>, slot: Rc<Slot>) {
        let _one = slot.changing.lock().await;
        let (topic, p) = (slot.topic.clone(), slot.partition);
        let Some(meta) = self.partitions.topic(&topic) else {
            return;
        };
        let Ok(log) = self.partitions.local_log(&topic, p) else {
            return;
        };
        let me = self.broker_id();
        let want = Want::of(&meta, p, me);
        let current = slot.role.borrow().want();
        let placement = meta.placement.get(p as usize).cloned();
        if current == want {
            // Same role and epoch: only the in-sync set may have moved
            // (a conditional write of ours, or the controller's).
            if let (Role::Leader(l), Some(pl)) = (&*slot.role.borrow(), &placement) {
                l.adopt_isr(&pl.isr, &log);
            }
            return;
        }
        let old = slot.role.replace(Role::Alone);
        stop_role(old).await;
        match want {
            Want::Alone => {}
            Want::Leader { epoch } => {
                let Some(pl) = placement else { return };
                if let Err(e) = log.set_leader_epoch(epoch).await {
                    tracing::error!(topic = %topic, partition = p, epoch, error = %e, "cannot take the leader epoch; not leading");
                    return;
                }
                let st = LeaderState::new(&meta, p, epoch, &pl.isr, &log, me.unwrap_or(0));
                tracing::info!(topic = %topic, partition = p, epoch, isr = ?pl.isr, log_end = log.next_offset(), high_watermark = log.high_watermark(), "leading");
                *slot.role.borrow_mut() = Role::Leader(Rc::new(st));
            }
            Want::Follower { leader, epoch } => {
                tracing::info!(topic = %topic, partition = p, ?leader, epoch, log_end = log.next_offset(), "following");
                let f = follower::Fetcher::start(self.clone(), slot.clone(), log, leader, epoch);
                *slot.role.borrow_mut() = Role::Follower(f);
            }
        }
    }

    /// Stops the roles of a topic's partitions (it is being dropped): no
    /// fetch task appends to a log being closed.
    pub async fn replication_stop_topic(&self, topic: &str) {
        let slots: Vec<Rc<Slot>> = {
            let mut all = self.replication.slots.borrow_mut();
            let keys: Vec<_> = all.keys().filter(|k| k.0 == topic).cloned().collect();
            keys.into_iter().filter_map(|k| all.remove(&k)).collect()
        };
        for slot in slots {
            slot.retire().await;
        }
    }

    /// Stops every role (the shard is stopping): fetch tasks end before the
    /// logs close.
    pub async fn replication_stop(&self) {
        for slot in self.replication.all() {
            slot.retire().await;
        }
    }

    /// The shard's replication housekeeping, forever: followers that lag
    /// leave the in-sync set, roles follow the metadata, high watermarks
    /// are checkpointed.
    pub async fn replication_loop(self: Rc<Self>) {
        let Some(lag_max) = self.config.cluster.as_ref().map(|c| c.replica_lag_max) else {
            return;
        };
        while self.replication.waiting_for_zookeeper.get() {
            self.replication.wake.changed().await;
        }
        let mut last_checkpoint = rt::now();
        let mut last_lag_check = rt::now();
        let mut last_full_sync = rt::now();
        self.replication_sync(None);
        loop {
            let woken = self.replication.wake.changed();
            if self.replication.dirty.borrow().is_empty() {
                let _ = rt::timeout(TICK, woken).await;
            }
            let dirty = std::mem::take(&mut *self.replication.dirty.borrow_mut());
            for t in &dirty {
                self.replication_sync(Some(t));
            }
            if rt::since(last_lag_check) >= TICK {
                last_lag_check = rt::now();
                for slot in self.replication.all() {
                    if let Some(l) = slot.leader() {
                        l.check_lag(&self, lag_max);
                    }
                }
            }
            // A safety net for changes that reached no mark (a shard's
            // start, say).
            if rt::since(last_full_sync) >= Duration::from_secs(1) {
                last_full_sync = rt::now();
                self.replication_sync(None);
            }
            if rt::since(last_checkpoint) >= HW_CHECKPOINT_EVERY {
                last_checkpoint = rt::now();
                for slot in self.replication.all() {
                    if let Ok(log) = self.partitions.local_log(&slot.topic, slot.partition) {
                        if let Err(e) = log.checkpoint_high_watermark().await {
                            tracing::warn!(topic = %slot.topic, partition = slot.partition, error = %e, "cannot checkpoint the high watermark");
                        }
                    }
                }
            }
        }
    }
}

async fn stop_role(role: Role) {
    match role {
        Role::Alone => {}
        Role::Leader(l) => l.depose(),
        Role::Follower(f) => f.stop().await,
    }
}

impl Replicas {
    /// Waits until an acks=all produce whose last offset is below `next`
    /// is replicated to the in-sync set, or fails if it cannot be.
    pub async fn wait_all(
        &self,
        topic: &str,
        partition: u32,
        log: &PartitionLog,
        next: u64,
        timeout: Duration,
    ) -> Result<()> {
        log.wait_acked(next).await?;
        let Some(slot) = self.slot(topic, partition) else {
            // Not replicated: the leader's acknowledgement is all there is.
            return Ok(());
        };
        let deadline = rt::now() + timeout;
        loop {
            let l = self.leading_insync(&slot)?;
            let changed = l.progress.changed();
            let fenced = self.fence_changed.changed();
            if log.high_watermark() >= next {
                return Ok(());
            }
            let now = rt::now();
            if now >= deadline {
                return Err(Error::RequestTimeout {
                    ms: timeout.as_millis() as u64,
                });
            }
            let wait = futures::future::select(Box::pin(changed), Box::pin(fenced));
            let _ = rt::timeout(deadline - now, wait).await;
        }
    }

    /// Refuses an acks=all produce before it is appended when the in-sync
    /// set is too small (or this broker cannot know it is the leader).
    pub fn check_insync(&self, topic: &str, partition: u32) -> Result<()> {
        match self.slot(topic, partition) {
            Some(slot) => self.leading_insync(&slot).map(drop),
            None => Ok(()),
        }
    }

    /// The leader's state of `slot`, if this replica may acknowledge acks=all
    /// writes now. A leader that may have been deposed (a newer epoch seen,
    /// or ZooKeeper lost) acknowledges nothing more: `NotLeader`, and the
    /// client asks for metadata and retries where it points (idempotence
    /// keeps the retry exactly once). Too small an in-sync set is
    /// `NotEnoughReplicas`.
    fn leading_insync(&self, slot: &Slot) -> Result<Rc<LeaderState>> {
        let (topic, partition) = (&slot.topic, slot.partition);
        let l = match slot.leader() {
            Some(l) if !l.deposed.get() && !self.is_fenced() => l,
            _ => return Err(not_leader_now(topic, partition)),
        };
        let (isr, min) = (l.isr.borrow().len(), l.min_insync);
        if isr < min {
            return Err(Error::NotEnoughReplicas {
                topic: topic.clone(),
                partition,
                isr,
                min,
            });
        }
        Ok(l)
    }
}

/// `NotLeader` without a hint: the client asks for metadata again.
pub(crate) fn not_leader_now(topic: &str, partition: u32) -> Error {
    Error::NotLeader {
        topic: topic.into(),
        partition,
        leader: None,
        leader_epoch: 0,
        hint: None,
    }
}
