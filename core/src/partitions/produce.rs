//! Produce: append in request order, acknowledge beside the next request.
//!
//! A produce has two halves. [`Reactor::produce_start`] is the
//! order-sensitive one: it validates the request's batches and appends them
//! (or sends them to the owning shard, whose lane appends them in arrival
//! order). The [`PendingProduce`] it returns waits for the acknowledgement
//! the acks level asks for, so a connection goes on to its next request
//! while the disk works.

use crate::error::{Error, Result};
use crate::mesh::MeshMsg;
use crate::metrics::add;
use crate::reactor::Reactor;
use crate::replication::Replicas;
use crate::rt;
use futures::channel::oneshot;
use shoal_shard::PartitionLog;
use shoal_wire::batch::{validate_batch, Batches};
use std::rc::Rc;

/// What a produce waits for before it is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acks {
    /// Answered once appended (ordered, given offsets); nothing promised
    /// about the file or the disk.
    None,
    /// Answered once the topic's sync mode acknowledges: in the file under
    /// `interval` and `none`, on stable storage under `always`.
    Leader,
    /// Answered once every in-sync replica holds the batches as `Leader`
    /// promises (the high watermark passed them) and the in-sync set has
    /// at least the topic's `min_insync_replicas`; within `timeout`. The
    /// same as `Leader` where the partition is not replicated.
    All { timeout: std::time::Duration },
}

#[derive(Debug, Clone)]
pub struct ProduceOk {
    pub base_offset: u64,
    pub last_offset: u64,
    /// Every batch was a retry the log had already appended.
    pub duplicate: bool,
}

/// A produce whose batches are appended (or on their way to the owning
/// shard), waiting for its acknowledgement.
pub enum PendingProduce {
    Local {
        log: Rc<PartitionLog>,
        ok: ProduceOk,
        /// Offset the acknowledgement must reach, if any.
        wait: Option<u64>,
        /// acks=all: the replicas it waits for.
        all: Option<AllWait>,
    },
    Remote(oneshot::Receiver<Result<ProduceOk>>),
}

/// What an acks=all produce waits on.
pub struct AllWait {
    pub replicas: Rc<Replicas>,
    pub topic: String,
    pub partition: u32,
    pub timeout: std::time::Duration,
}

impl AllWait {
    pub async fn wait(&self, log: &PartitionLog, next: u64) -> Result<()> {
        self.replicas
            .wait_all(&self.topic, self.partition, log, next, self.timeout)
            .await
    }
}

impl PendingProduce {
    pub async fn finish(self) -> Result<ProduceOk> {
        match self {
            PendingProduce::Local { log, ok, wait, all } => {
                match (wait, all) {
                    (Some(next), Some(all)) => all.wait(&log, next).await?,
                    (Some(next), None) => log.wait_acked(next).await?,
                    (None, _) => {}
                }
                Ok(ok)
            }
            PendingProduce::Remote(rx) => rx.await.map_err(|_| Error::ShardGone)?,
        }
    }
}

/// Checks every batch of a request before any is appended, so a bad batch
/// anywhere refuses the whole request and leaves the log untouched. A
/// request of one batch is left to the log's own check (no second pass
/// over its bytes).
fn validate_all(payload: &[u8], batch_bytes_max: usize) -> Result<()> {
    if payload.is_empty() {
        return Err(Error::Malformed(
            "produce request carries no record batch".into(),
        ));
    }
    let mut batches = Batches::new(payload, batch_bytes_max).enumerate();
    let Some((_, first)) = batches.next() else {
        return Ok(());
    };
    let (_, first) = first.map_err(|source| Error::InvalidBatch { index: 0, source })?;
    if first.len() == payload.len() {
        return Ok(());
    }
    validate_batch(first, batch_bytes_max)
        .map_err(|source| Error::InvalidBatch { index: 0, source })?;
    for (index, b) in batches {
        let (_, bytes) = b.map_err(|source| Error::InvalidBatch { index, source })?;
        validate_batch(bytes, batch_bytes_max)
            .map_err(|source| Error::InvalidBatch { index, source })?;
    }
    Ok(())
}

impl Reactor {
    /// The order-sensitive half of a produce: appends the batches here or
    /// hands them to the owning shard, in request order.
    pub async fn produce_start(
        &self,
        topic: &str,
        topic_id: u64,
        partition: u32,
        payload: &[u8],
        acks: Acks,
    ) -> Result<PendingProduce> {
        let owner = self.owner(topic, partition)?;
        if owner == self.id {
            let (log, ok) = self
                .produce_append(topic, topic_id, partition, payload, acks)
                .await?;
            let wait = (acks != Acks::None).then_some(ok.last_offset + 1);
            let all = self.all_wait(topic, partition, acks);
            return Ok(PendingProduce::Local { log, ok, wait, all });
        }
        let (tx, rx) = oneshot::channel();
        self.partitions.check_id(topic, topic_id)?;
        let msg = MeshMsg::Produce {
            topic: topic.into(),
            topic_id,
            partition,
            payload: payload.to_vec(),
            acks,
            reply: tx,
        };
        self.mesh.send(self, owner, msg).await?;
        Ok(PendingProduce::Remote(rx))
    }

    /// What an acks=all produce on a local partition waits on.
    pub(crate) fn all_wait(&self, topic: &str, partition: u32, acks: Acks) -> Option<AllWait> {
        match acks {
            Acks::All { timeout } => Some(AllWait {
                replicas: self.replication.clone(),
                topic: topic.to_string(),
                partition,
                timeout,
            }),
            _ => None,
        }
    }

    /// Appends every batch of `payload` to a local partition, or none.
    /// acks=all is refused before anything is appended when the in-sync
    /// set is too small.
    pub(crate) async fn produce_append(
        &self,
        topic: &str,
        topic_id: u64,
        partition: u32,
        payload: &[u8],
        acks: Acks,
    ) -> Result<(Rc<PartitionLog>, ProduceOk)> {
        self.partitions.check_id(topic, topic_id)?;
        self.replication.check_writable(topic, partition)?;
        if matches!(acks, Acks::All { .. }) {
            self.replication.check_insync(topic, partition)?;
        }
        let log = self.partitions.local_log(topic, partition)?;
        let batch_bytes_max = log.config().batch_bytes_max;
        validate_all(payload, batch_bytes_max)?;
        add(&self.metrics.produce_requests, 1);
        let mut result: Option<ProduceOk> = None;
        for (index, b) in Batches::new(payload, batch_bytes_max).enumerate() {
            let (_, bytes) = b.map_err(|source| Error::InvalidBatch { index, source })?;
            let a = log.append(bytes).await?;
            self.metrics
                .append_clocks
                .appended(topic, partition, a.last_offset + 1, rt::now());
            let r = result.get_or_insert(ProduceOk {
                base_offset: a.base_offset,
                last_offset: a.last_offset,
                duplicate: true,
            });
            r.last_offset = a.last_offset;
            r.duplicate &= a.duplicate;
        }
        let r = result.ok_or_else(|| Error::Malformed("no record batch".into()))?;
        add(&self.metrics.produce_bytes, payload.len() as u64);
        Ok((log, r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_wire::{BatchBuilder, NewRecord};

    fn batch(n: usize) -> Vec<u8> {
        let mut b = BatchBuilder::default();
        for i in 0..n {
            let value = format!("v{i}");
            b.push(&NewRecord {
                key: None,
                value: Some(value.as_bytes()),
                timestamp_ms: 1,
                headers: &[],
            })
            .expect("small record");
        }
        b.finish(-1, 0, -1)
    }

    #[test]
    fn a_bad_batch_anywhere_refuses_the_request() {
        let mut two = batch(3);
        two.extend_from_slice(&batch(2));
        validate_all(&two, 1 << 20).unwrap();
        let mut bad = batch(3);
        let mut second = batch(2);
        let last = second.len() - 1;
        second[last] ^= 0xff;
        bad.extend_from_slice(&second);
        match validate_all(&bad, 1 << 20) {
            Err(Error::InvalidBatch { index: 1, .. }) => {}
            other => panic!("expected batch 1 refused, got {other:?}"),
        }
        assert!(matches!(
            validate_all(&[], 1 << 20),
            Err(Error::Malformed(_))
        ));
    }
}
