//! Fetch: read a partition by offset or timestamp, long-polling for data,
//! and the partition offsets metadata reports.
//!
//! The answer is never the bytes themselves: a local [`ReadSlice`] (a
//! segment or tail-cache range the connection sends with sendfile) or, from
//! another shard, a [`FileRange`] over a duplicated descriptor.

use crate::error::Result;
use crate::limits::RESIDENT_WAIT_MAX;
use crate::mesh::{FileRange, MeshMsg};
use crate::metrics::add;
use crate::reactor::Reactor;
use crate::rt;
use shoal_shard::ReadSlice;
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct FetchParams {
    pub topic: String,
    /// The incarnation asked for (0: any).
    pub topic_id: u64,
    pub partition: u32,
    pub offset: u64,
    pub timestamp_ms: Option<i64>,
    pub max_bytes: u32,
    pub min_bytes: u32,
    pub max_wait: Duration,
    /// A follower's fetch from its leader (`None`: a consumer).
    pub replica: Option<ReplicaFetch>,
}

/// What a follower's fetch says about it.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaFetch {
    pub broker: u32,
    /// The leader epoch it believes current.
    pub current_leader_epoch: i32,
    /// The epoch of the last batch in its log (-1: none).
    pub last_fetched_epoch: i32,
}

/// Log bytes to send.
pub enum FetchData {
    /// A slice of a partition this shard owns.
    Local(ReadSlice),
    /// A range another shard answered with.
    Remote(FileRange),
}

impl FetchData {
    pub fn len(&self) -> u64 {
        match self {
            FetchData::Local(s) => s.len,
            FetchData::Remote(r) => r.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file the bytes are in, where they start in it, and how many.
    pub fn file_range(&self) -> (&std::fs::File, u64, u64) {
        match self {
            FetchData::Local(s) => (s.file(), s.file_position(), s.len),
            FetchData::Remote(r) => (&r.file, r.position, r.len),
        }
    }
}

pub struct FetchOk {
    pub data: Option<FetchData>,
    pub high_watermark: u64,
    pub log_start_offset: u64,
    pub next_offset: u64,
    /// When the last batch of `data` was appended, if it is among the
    /// partition's newest (for the e2e histogram).
    pub appended_at: Option<std::time::Instant>,
    /// Replica fetches: the leader's epoch, and where the follower's log
    /// diverges (epoch, end offset; see the protocol's FetchResponse).
    pub leader_epoch: u32,
    pub diverging: Option<(i32, u64)>,
}

/// State of one partition as seen by its owner.
#[derive(Debug, Clone, Copy, Default)]
pub struct PartitionState {
    pub log_start_offset: u64,
    pub high_watermark: u64,
}

impl Reactor {
    pub async fn fetch(self: &Rc<Self>, params: FetchParams) -> Result<FetchOk> {
        let owner = self.owner(&params.topic, params.partition)?;
        if owner == self.id {
            return self.fetch_local(&params).await;
        }
        self.partitions.check_id(&params.topic, params.topic_id)?;
        let r = self
            .mesh
            .call(self, owner, |reply| MeshMsg::Fetch { params, reply })
            .await?;
        Ok(FetchOk {
            data: r.data.map(FetchData::Remote),
            high_watermark: r.high_watermark,
            log_start_offset: r.log_start_offset,
            next_offset: r.next_offset,
            appended_at: r.appended_at,
            leader_epoch: r.leader_epoch,
            diverging: r.diverging,
        })
    }

    /// Reads from a local partition, long-polling up to `max_wait` for
    /// `min_bytes`.
    pub(crate) async fn fetch_local(self: &Rc<Self>, p: &FetchParams) -> Result<FetchOk> {
        self.partitions.check_id(&p.topic, p.topic_id)?;
        let log = self.partitions.local_log(&p.topic, p.partition)?;
        add(&self.metrics.fetch_requests, 1);
        let mut leader_epoch = 0;
        if let Some(r) = &p.replica {
            let leader = self.replication.leading(&p.topic, p.partition)?;
            leader.check_epoch(r.current_leader_epoch)?;
            leader_epoch = leader.epoch;
            if let Some(d) = divergence(&log, r, p.offset) {
                return Ok(FetchOk {
                    data: None,
                    high_watermark: log.high_watermark(),
                    log_start_offset: log.start_offset(),
                    next_offset: p.offset,
                    appended_at: None,
                    leader_epoch,
                    diverging: Some(d),
                });
            }
            leader.on_fetch(self, &log, r.broker, p.offset);
        }
        let replica = p.replica.is_some();
        let deadline = rt::now() + p.max_wait;
        let mut offset = p.offset;
        if let Some(ts) = p.timestamp_ms {
            offset = log
                .offset_for_timestamp(ts)
                .unwrap_or_else(|| log.high_watermark());
        }
        loop {
            // The slice's pages are in memory before its headers are
            // walked or it is sent, and the partition's read-ahead stays
            // ahead of this reader (issue 16); the shard never waits for
            // the disk.
            let max_bytes = u64::from(p.max_bytes.max(1));
            let slice = if replica {
                log.read_replica_ready(offset, max_bytes, RESIDENT_WAIT_MAX)
                    .await?
            } else {
                log.read_ready(offset, max_bytes, RESIDENT_WAIT_MAX).await?
            };
            let now = rt::now();
            // A slice that stops short of the data already there (at
            // max_bytes, a segment's end or a tail cache block's end) cannot
            // grow by waiting: answer now, the consumer comes straight back.
            let stopped_short = !slice.is_empty() && slice.next_offset < slice.high_watermark;
            if slice.len >= u64::from(p.min_bytes)
                || stopped_short
                || now >= deadline
                || self.stopping.get()
            {
                if slice.is_cached() {
                    add(&self.metrics.tail_cache_bytes, slice.len);
                }
                let appended_at = if slice.is_empty() {
                    None
                } else {
                    self.metrics
                        .append_clocks
                        .appended_at(&p.topic, p.partition, slice.next_offset)
                };
                let ok = FetchOk {
                    // A replica read goes to the log's end, which is not the
                    // high watermark: a follower must learn the real one (it
                    // is where a promoted follower starts exposing records,
                    // and how far its group standby may apply).
                    high_watermark: if replica {
                        log.high_watermark()
                    } else {
                        slice.high_watermark
                    },
                    log_start_offset: log.start_offset(),
                    next_offset: slice.next_offset,
                    data: (!slice.is_empty()).then_some(FetchData::Local(slice)),
                    appended_at,
                    leader_epoch,
                    diverging: None,
                };
                return Ok(ok);
            }
            let wait_from = if slice.is_empty() {
                offset
            } else {
                slice.next_offset
            };
            if replica {
                let _ = rt::timeout(deadline - now, log.wait_for_replica_data(wait_from)).await;
            } else {
                let _ = rt::timeout(deadline - now, log.wait_for_data(wait_from)).await;
            }
        }
    }

    /// Offsets of the partitions this shard owns, of `topics` (all if
    /// `None`).
    pub fn local_partition_states(
        &self,
        topics: Option<&[String]>,
    ) -> Vec<((String, u32), PartitionState)> {
        self.partitions
            .local_logs_of(topics)
            .into_iter()
            .map(|(key, log)| {
                let st = PartitionState {
                    log_start_offset: log.start_offset(),
                    high_watermark: log.high_watermark(),
                };
                (key, st)
            })
            .collect()
    }

    /// Offsets of every partition of `topics` (all if `None`), whichever
    /// shard owns it: one mesh call per other shard.
    pub async fn partition_states(
        &self,
        topics: Option<Vec<String>>,
    ) -> HashMap<(String, u32), PartitionState> {
        let mut all: HashMap<_, _> = self
            .local_partition_states(topics.as_deref())
            .into_iter()
            .collect();
        for s in (0..self.nshards).filter(|&s| s != self.id) {
            let topics = topics.clone();
            match self
                .mesh
                .call(self, s, |reply| MeshMsg::PartitionStates { topics, reply })
                .await
            {
                Ok(states) => all.extend(states),
                // A stopping shard: its partitions show no offsets.
                Err(e) => tracing::debug!(shard = s, error = %e, "no partition offsets"),
            }
        }
        all
    }

    pub async fn partition_state(&self, topic: &str, partition: u32) -> Result<PartitionState> {
        let owner = self.partitions.owner(topic, partition)?;
        if owner == self.id {
            let log = self.partitions.local_log(topic, partition)?;
            return Ok(PartitionState {
                log_start_offset: log.start_offset(),
                high_watermark: log.high_watermark(),
            });
        }
        let topic = topic.to_string();
        self.mesh
            .call(self, owner, |reply| MeshMsg::PartitionState {
                topic,
                partition,
                reply,
            })
            .await
    }
}

/// Where a follower's log parts from the leader's, if it does before
/// `offset` (KIP-279, asked in the fetch itself as in KIP-595): its last
/// epoch ends earlier here, or this log has no such epoch.
fn divergence(
    log: &shoal_shard::PartitionLog,
    r: &ReplicaFetch,
    offset: u64,
) -> Option<(i32, u64)> {
    if offset < log.start_offset() {
        // What the follower lacks is gone here: it starts over at our start.
        return Some((-3, log.start_offset()));
    }
    if r.last_fetched_epoch < 0 {
        // An empty follower (or one from before epochs): only a position
        // past this log's end needs cutting back.
        return (offset > log.next_offset()).then_some((-2, log.next_offset()));
    }
    match log.epoch_end(r.last_fetched_epoch as u32) {
        Some((e, end)) if e == r.last_fetched_epoch as u32 && end >= offset => None,
        Some((e, end)) => Some((e as i32, end)),
        None => Some((-2, log.start_offset())),
    }
}
