//! The leader's side of a partition: its followers' positions, the in-sync
//! set, the high watermark.
//!
//! - A follower's fetch at offset `o` says it holds every batch below `o`
//!   (the fetch passed the divergence check, so those batches are the
//!   leader's). A follower is *caught up* as of its previous fetch when it
//!   now asks for at least the log end the leader had then (Kafka's
//!   `lastCaughtUpTimeMs`), so a follower that keeps up under steady load
//!   counts as caught up even though the end keeps moving.
//! - The high watermark is the lowest position in the in-sync set (a
//!   proposed addition counts from the moment it is proposed: the maximal
//!   ISR of KIP-497), never moves back, and while the leader is alone in
//!   the set it follows the leader's own log end.
//! - The in-sync set changes only through a conditional ZooKeeper write of
//!   the partition's state ([`crate::cluster::ToControl::AlterIsr`]); one
//!   change at a time; a removal counts only once written, so a follower
//!   that could still be elected is always waited for.

use super::Replicas;
use crate::cluster::ToControl;
use crate::error::{Error, Result};
use crate::metadata::TopicMeta;
use crate::reactor::Reactor;
use crate::rt;
use shoal_shard::{Notify, PartitionLog};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Where one follower is, as its fetches show.
#[derive(Debug, Clone, Copy)]
struct Position {
    /// It holds every offset below this.
    offset: u64,
    /// The leader's log end when it answered the previous fetch, and when.
    prev_end: u64,
    prev_at: Instant,
    last_caught_up: Instant,
}

pub struct LeaderState {
    pub topic: String,
    pub partition: u32,
    pub epoch: u32,
    me: u32,
    /// The brokers holding a replica (only they may join the set).
    replicas: Vec<u32>,
    pub min_insync: usize,
    /// The in-sync set as ZooKeeper records it.
    pub isr: RefCell<Vec<u32>>,
    /// A change of the set written to ZooKeeper, not yet confirmed.
    pending: RefCell<Option<Vec<u32>>>,
    followers: RefCell<HashMap<u32, Position>>,
    /// Since when this broker leads (a follower not heard from since then
    /// counts as caught up at that moment).
    since: Instant,
    /// The log end when this epoch began: a follower joins the set only
    /// once it has reached into this epoch.
    epoch_start: u64,
    /// The high watermark, once the leader has followers in the set
    /// (`None`: alone, the log's end is the high watermark).
    hw: Cell<Option<u64>>,
    /// A newer epoch exists (a follower showed it, or the role ended).
    pub deposed: Cell<bool>,
    /// The high watermark, the set or `deposed` changed (acks=all waiters).
    pub progress: Notify,
}

impl LeaderState {
    pub fn new(
        meta: &TopicMeta,
        partition: u32,
        epoch: u32,
        isr: &[u32],
        log: &PartitionLog,
        me: u32,
    ) -> LeaderState {
        let replicas = meta
            .placement
            .get(partition as usize)
            .map(|p| p.replicas.iter().map(|r| r.broker).collect())
            .unwrap_or_default();
        let st = LeaderState {
            topic: meta.name.clone(),
            partition,
            epoch,
            me,
            replicas,
            min_insync: meta.min_insync(partition),
            isr: RefCell::new(isr.to_vec()),
            pending: RefCell::new(None),
            followers: RefCell::new(HashMap::new()),
            since: rt::now(),
            epoch_start: log.next_offset(),
            hw: Cell::new(None),
            deposed: Cell::new(false),
            progress: Notify::default(),
        };
        // A new leader starts from the high watermark it knew as a follower
        // (checkpointed): what lies above it may not be on the others yet.
        let start = log.high_watermark().min(log.end_offset());
        st.hw.set(Some(start));
        st.recompute(log);
        st
    }

    pub fn depose(&self) {
        self.deposed.set(true);
        self.progress.notify_all();
    }

    /// The brokers the high watermark waits for: the set, with a proposed
    /// addition, without this broker.
    fn members(&self) -> Vec<u32> {
        let mut m: Vec<u32> = self.isr.borrow().clone();
        if let Some(p) = &*self.pending.borrow() {
            for &b in p {
                if !m.contains(&b) {
                    m.push(b);
                }
            }
        }
        m.retain(|&b| b != self.me);
        m
    }

    /// Moves the high watermark to the lowest position in the set.
    pub fn recompute(&self, log: &PartitionLog) {
        let members = self.members();
        let before = log.high_watermark();
        if members.is_empty() {
            self.hw.set(None);
            log.set_high_watermark(u64::MAX);
        } else {
            let followers = self.followers.borrow();
            let lowest = members
                .iter()
                .map(|b| followers.get(b).map_or(0, |p| p.offset))
                .min()
                .unwrap_or(0);
            // Never back: from "follows the log end" the mark freezes where
            // the end is now until the new member passes it.
            let floor = self.hw.get().unwrap_or_else(|| log.end_offset());
            let hw = floor.max(lowest.min(log.end_offset()));
            self.hw.set(Some(hw));
            log.set_high_watermark(hw);
        }
        if log.high_watermark() != before {
            self.progress.notify_all();
        }
    }

    /// ZooKeeper's set (after our write, or the controller's).
    pub fn adopt_isr(&self, isr: &[u32], log: &PartitionLog) {
        *self.isr.borrow_mut() = isr.to_vec();
        let done = self.pending.borrow().as_deref() == Some(isr);
        if done {
            self.pending.borrow_mut().take();
        }
        self.recompute(log);
        self.progress.notify_all();
    }

    /// Checks a follower's fetch against this epoch. A follower that knows
    /// a newer epoch deposes this leader.
    pub fn check_epoch(&self, asked: i32) -> Result<()> {
        if asked >= 0 && asked as u32 == self.epoch && !self.deposed.get() {
            return Ok(());
        }
        if asked >= 0 && asked as u32 > self.epoch && !self.deposed.get() {
            tracing::warn!(topic = %self.topic, partition = self.partition, epoch = self.epoch, newer = asked, "a follower knows a newer leader epoch: no longer acknowledging");
            self.depose();
        }
        Err(Error::FencedLeaderEpoch {
            topic: self.topic.clone(),
            partition: self.partition,
            asked: i64::from(asked),
            current: self.epoch,
        })
    }

    /// A follower fetches at `offset`: it holds everything below.
    pub fn on_fetch(
        self: &Rc<Self>,
        reactor: &Rc<Reactor>,
        log: &PartitionLog,
        broker: u32,
        offset: u64,
    ) {
        let now = rt::now();
        let end = log.next_offset();
        {
            let mut followers = self.followers.borrow_mut();
            let p = followers.entry(broker).or_insert(Position {
                offset,
                prev_end: u64::MAX,
                prev_at: now,
                last_caught_up: self.since,
            });
            if offset >= p.prev_end {
                p.last_caught_up = p.last_caught_up.max(p.prev_at);
            }
            if offset >= end {
                p.last_caught_up = now;
            }
            p.offset = offset;
            p.prev_end = end;
            p.prev_at = now;
        }
        self.recompute(log);
        let joins = !self.isr.borrow().contains(&broker)
            && self.pending.borrow().is_none()
            && self.replicas.contains(&broker)
            && offset >= log.high_watermark().min(log.end_offset())
            && offset >= self.epoch_start;
        if joins {
            let mut isr = self.isr.borrow().clone();
            isr.push(broker);
            tracing::info!(topic = %self.topic, partition = self.partition, follower = broker, offset, "follower caught up: adding it to the in-sync set");
            self.propose(reactor, isr);
        }
    }

    /// Drops from the set the followers that have not caught up for
    /// `lag_max`.
    pub fn check_lag(self: &Rc<Self>, reactor: &Rc<Reactor>, lag_max: Duration) {
        if self.deposed.get() || self.pending.borrow().is_some() {
            return;
        }
        let now = rt::now();
        let lagging: Vec<u32> = {
            let followers = self.followers.borrow();
            self.isr
                .borrow()
                .iter()
                .copied()
                .filter(|&b| b != self.me)
                .filter(|b| {
                    let caught = followers.get(b).map_or(self.since, |p| p.last_caught_up);
                    now.saturating_duration_since(caught) > lag_max
                })
                .collect()
        };
        if lagging.is_empty() {
            return;
        }
        let isr: Vec<u32> = self
            .isr
            .borrow()
            .iter()
            .copied()
            .filter(|b| !lagging.contains(b))
            .collect();
        tracing::warn!(topic = %self.topic, partition = self.partition, ?lagging, lag_max_ms = lag_max.as_millis() as u64, "followers fell behind: removing them from the in-sync set");
        self.propose(reactor, isr);
    }

    /// Writes a new in-sync set to ZooKeeper (conditional on this epoch
    /// still leading there) and adopts it once written.
    fn propose(self: &Rc<Self>, reactor: &Rc<Reactor>, isr: Vec<u32>) {
        let Some(control) = reactor.control.clone() else {
            return;
        };
        *self.pending.borrow_mut() = Some(isr.clone());
        let (st, reactor) = (self.clone(), reactor.clone());
        rt::spawn_detached(async move {
            let r = crate::controller::ask_control(&control, |reply| ToControl::AlterIsr {
                topic: st.topic.clone(),
                partition: st.partition,
                leader_epoch: st.epoch,
                isr: isr.clone(),
                reply,
            })
            .await;
            let Ok(log) = reactor.partitions.local_log(&st.topic, st.partition) else {
                return;
            };
            match r {
                Ok(written) => st.adopt_isr(&written, &log),
                Err(e) => {
                    st.pending.borrow_mut().take();
                    st.recompute(&log);
                    tracing::warn!(topic = %st.topic, partition = st.partition, error = %e, "in-sync set not changed");
                    if matches!(e, Error::FencedLeaderEpoch { .. } | Error::NotLeader { .. }) {
                        st.depose();
                    }
                }
            }
        });
    }
}

impl Replicas {
    /// The leader's state of a partition this shard leads, for a follower's
    /// fetch; `NotLeader` otherwise.
    pub fn leading(&self, topic: &str, partition: u32) -> Result<Rc<LeaderState>> {
        self.leader(topic, partition)
            .filter(|l| !l.deposed.get())
            .ok_or_else(|| super::not_leader_now(topic, partition))
    }
}
