//! The partitions a shard owns, and the operations on any partition,
//! routed to the shard that owns it.
//!
//! - [`Partitions`]: this shard's table: its copy of the topic metadata and
//!   the logs of the partitions it owns.
//! - [`produce`]: append in request order, acknowledge beside the next
//!   request; all batches of a request or none.
//! - [`fetch`]: read by offset or timestamp with long-poll, answered as a
//!   file range for sendfile; partition offsets for metadata.

pub mod fetch;
pub mod produce;

pub use fetch::{FetchData, FetchOk, FetchParams, PartitionState, ReplicaFetch};
pub use produce::{Acks, PendingProduce, ProduceOk};

use crate::error::{Error, Result};
use crate::limits::PARTITION_OPENS_IN_FLIGHT_MAX;
use crate::metadata::TopicMeta;
use crate::reactor::Reactor;
use futures::stream::{self, StreamExt};
use shoal_shard::PartitionLog;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

/// One shard's view of the topics and the logs it owns. Owned by its
/// shard's core; never crosses cores.
pub struct Partitions {
    topics: RefCell<BTreeMap<String, TopicMeta>>,
    /// Per topic, the log of partition `i` at index `i` if this shard owns
    /// it.
    logs: RefCell<HashMap<String, Vec<Option<Rc<PartitionLog>>>>>,
    /// Topics being created: opened here, not visible until committed.
    staged: RefCell<HashMap<String, Staged>>,
}

/// A topic's metadata and this shard's logs of it.
type Staged = (TopicMeta, Vec<Option<Rc<PartitionLog>>>);

impl Partitions {
    pub fn new(topics: impl IntoIterator<Item = TopicMeta>) -> Partitions {
        Partitions {
            topics: RefCell::new(topics.into_iter().map(|t| (t.name.clone(), t)).collect()),
            logs: RefCell::new(HashMap::new()),
            staged: RefCell::new(HashMap::new()),
        }
    }

    pub fn topic(&self, name: &str) -> Option<TopicMeta> {
        self.topics.borrow().get(name).cloned()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.topics.borrow().contains_key(name)
    }

    /// Every topic, in name order.
    pub fn topics(&self) -> Vec<TopicMeta> {
        self.topics.borrow().values().cloned().collect()
    }

    pub fn topic_map(&self) -> BTreeMap<String, TopicMeta> {
        self.topics.borrow().clone()
    }

    /// Refuses a request that names another incarnation of `topic` than
    /// the current one (`topic_id` 0: any).
    pub fn check_id(&self, topic: &str, topic_id: u64) -> Result<()> {
        if topic_id == 0 {
            return Ok(());
        }
        let topics = self.topics.borrow();
        let meta = topics
            .get(topic)
            .ok_or_else(|| Error::UnknownTopic(topic.into()))?;
        if meta.id != 0 && meta.id != topic_id {
            return Err(Error::UnknownTopicId {
                topic: topic.into(),
                asked: topic_id,
                current: meta.id,
            });
        }
        Ok(())
    }

    /// Which shard owns `topic`/`partition` (metadata, any replica).
    pub fn owner(&self, topic: &str, partition: u32) -> Result<usize> {
        self.leading_owner(topic, partition, None)
    }

    /// Which shard owns `topic`/`partition` here, if broker `me` leads it
    /// (`None`: a single node, which leads everything). A partition led
    /// elsewhere is `NotLeader` (without a hint: [`Reactor::owner`] adds
    /// one).
    pub fn leading_owner(&self, topic: &str, partition: u32, me: Option<u32>) -> Result<usize> {
        let topics = self.topics.borrow();
        let meta = topics
            .get(topic)
            .ok_or_else(|| Error::UnknownTopic(topic.into()))?;
        if let (Some(me), Some(p)) = (me, meta.placement.get(partition as usize)) {
            if p.leader != Some(me) {
                return Err(match p.leader {
                    None => Error::LeaderNotAvailable {
                        topic: topic.into(),
                        partition,
                    },
                    leader => Error::NotLeader {
                        topic: topic.into(),
                        partition,
                        leader,
                        leader_epoch: p.leader_epoch,
                        hint: None,
                    },
                });
            }
        }
        meta.shards
            .get(partition as usize)
            .map(|&s| usize::from(s))
            .ok_or_else(|| Error::UnknownPartition {
                topic: topic.into(),
                partition,
                count: meta.partitions(),
            })
    }

    /// The leader's shard of a partition (on the leader's broker), in a
    /// cluster.
    pub fn leader_shard(&self, topic: &str, partition: u32) -> Option<u16> {
        let topics = self.topics.borrow();
        let p = topics.get(topic)?.placement.get(partition as usize)?;
        let leader = p.leader?;
        p.replica_on(leader).map(|r| r.shard)
    }

    pub fn local_log(&self, topic: &str, partition: u32) -> Result<Rc<PartitionLog>> {
        let logs = self.logs.borrow();
        let parts = logs
            .get(topic)
            .ok_or_else(|| Error::UnknownTopic(topic.into()))?;
        match parts.get(partition as usize) {
            Some(Some(log)) => Ok(log.clone()),
            Some(None) => Err(Error::NotOwner {
                topic: topic.into(),
                partition,
            }),
            None => Err(Error::UnknownPartition {
                topic: topic.into(),
                partition,
                count: parts.len() as u32,
            }),
        }
    }

    /// Reserves a name before any await (the controller, while it creates
    /// the topic).
    pub fn reserve(&self, meta: &TopicMeta) {
        self.topics
            .borrow_mut()
            .insert(meta.name.clone(), meta.clone());
    }

    pub fn forget(&self, name: &str) -> Option<TopicMeta> {
        self.topics.borrow_mut().remove(name)
    }

    fn install(&self, meta: &TopicMeta, logs: Vec<Option<Rc<PartitionLog>>>) {
        self.reserve(meta);
        self.logs.borrow_mut().insert(meta.name.clone(), logs);
    }

    fn remove(&self, name: &str) -> (Option<TopicMeta>, Vec<Option<Rc<PartitionLog>>>) {
        let meta = self.forget(name);
        let logs = self.logs.borrow_mut().remove(name).unwrap_or_default();
        (meta, logs)
    }

    /// The logs this shard owns of `topics` (all if `None`), by topic and
    /// partition.
    pub fn local_logs_of(
        &self,
        topics: Option<&[String]>,
    ) -> Vec<((String, u32), Rc<PartitionLog>)> {
        let logs = self.logs.borrow();
        let of = |name: &String, parts: &Vec<Option<Rc<PartitionLog>>>| {
            parts
                .iter()
                .enumerate()
                .filter_map(|(p, l)| l.clone().map(|l| ((name.clone(), p as u32), l)))
                .collect::<Vec<_>>()
        };
        match topics {
            None => logs.iter().flat_map(|(n, p)| of(n, p)).collect(),
            Some(names) => names
                .iter()
                .filter_map(|n| logs.get_key_value(n))
                .flat_map(|(n, p)| of(n, p))
                .collect(),
        }
    }

    /// The logs this shard owns.
    pub fn all_logs(&self) -> Vec<Rc<PartitionLog>> {
        self.logs
            .borrow()
            .values()
            .flatten()
            .flatten()
            .cloned()
            .collect()
    }
}

impl Reactor {
    /// The shard that serves produce and fetch of `topic`/`partition` on
    /// this broker: refused with `NotLeader` (naming the leader's address,
    /// so the client goes straight there) when another broker leads it, or
    /// `LeaderNotAvailable` when its leader is not live.
    pub fn owner(&self, topic: &str, partition: u32) -> Result<usize> {
        match self
            .partitions
            .leading_owner(topic, partition, self.broker_id())
        {
            Err(Error::NotLeader {
                topic,
                partition,
                leader: Some(leader),
                leader_epoch,
                ..
            }) => {
                let view = self.cluster.borrow();
                let Some(broker) = view.as_ref().and_then(|v| v.brokers.get(&leader)) else {
                    return Err(Error::LeaderNotAvailable { topic, partition });
                };
                let shard = self.partitions.leader_shard(&topic, partition).unwrap_or(0);
                let hint = crate::error::LeaderHint {
                    broker_id: leader,
                    host: broker.host.clone(),
                    port: broker.shard_port(shard).unwrap_or(broker.port),
                    leader_epoch,
                };
                Err(Error::NotLeader {
                    topic,
                    partition,
                    leader: Some(leader),
                    leader_epoch,
                    hint: Some(hint),
                })
            }
            other => other,
        }
    }

    /// Opens the logs of every partition this shard owns, many at a time
    /// (a restart with thousands of partitions is bound by I/O latency, not
    /// by any one open).
    pub async fn open_local_partitions(&self) -> Result<()> {
        let topics = self.partitions.topics();
        let opened: Vec<Result<Vec<Option<Rc<PartitionLog>>>>> = stream::iter(&topics)
            .map(|meta| self.open_logs(meta, false))
            .buffered(PARTITION_OPENS_IN_FLIGHT_MAX)
            .collect()
            .await;
        for (meta, logs) in topics.iter().zip(opened) {
            self.partitions.install(meta, logs?);
        }
        Ok(())
    }

    /// Opens this shard's partitions of a topic being created, without
    /// making it visible: [`Self::commit_topic`] does that once every shard
    /// opened its share and the controller recorded the topic. On failure
    /// this shard's share is removed again.
    pub async fn stage_topic(&self, meta: &TopicMeta) -> Result<()> {
        match self.open_logs(meta, true).await {
            Ok(logs) => {
                self.partitions
                    .staged
                    .borrow_mut()
                    .insert(meta.name.clone(), (meta.clone(), logs));
                Ok(())
            }
            Err(e) => {
                if let Err(cleanup) = self.remove_partition_dirs(meta).await {
                    tracing::warn!(topic = %meta.name, error = %cleanup, "could not remove a failed topic's files");
                }
                Err(e)
            }
        }
    }

    /// Makes a staged topic visible.
    pub fn commit_topic(&self, name: &str) -> Result<()> {
        let (meta, logs) = self
            .partitions
            .staged
            .borrow_mut()
            .remove(name)
            .ok_or_else(|| Error::UnknownTopic(name.into()))?;
        self.partitions.install(&meta, logs);
        self.replication.mark(&meta.name);
        Ok(())
    }

    /// Opens this shard's partitions of `meta`. `fresh`: a topic being
    /// created, whose directories can only hold the leftovers of a creation
    /// that never committed (the name is in no `topics.json`): they are
    /// removed first, so a new topic never inherits old records.
    async fn open_logs(
        &self,
        meta: &TopicMeta,
        fresh: bool,
    ) -> Result<Vec<Option<Rc<PartitionLog>>>> {
        let mut logs: Vec<Option<Rc<PartitionLog>>> = Vec::with_capacity(meta.shards.len());
        let me = self.broker_id();
        for (p, &s) in meta.shards.iter().enumerate() {
            if usize::from(s) != self.id || !meta.is_local(p as u32, me) {
                logs.push(None);
                continue;
            }
            let dir = meta.partition_dir(&self.config.data_dir, p as u32);
            if fresh {
                remove_dir(&dir).await?;
            }
            let config = shoal_shard::LogConfig {
                tail_cache_bytes: self.config.tail_cache_bytes,
                ..meta.log_config()
            };
            let log = match PartitionLog::open(&dir, config).await {
                Ok(log) => log,
                Err(source) => {
                    // Close what this call opened: nothing may keep writing.
                    for log in logs.into_iter().flatten() {
                        let _ = log.shutdown().await;
                    }
                    return Err(Error::Partition {
                        partition: format!("{}-{p}", meta.name),
                        source,
                    });
                }
            };
            logs.push(Some(Rc::new(log)));
        }
        Ok(logs)
    }

    /// Forgets the topic (live or staged), closes this shard's partitions
    /// of it and deletes their files (off the core: a large directory tree
    /// must not stall the other partitions' produce path). Idempotent: a
    /// topic this shard never opened is fine.
    pub async fn drop_topic(&self, meta: &TopicMeta) -> Result<()> {
        self.replication_stop_topic(&meta.name).await;
        let (_, mut logs) = self.partitions.remove(&meta.name);
        self.metrics.append_clocks.forget(&meta.name);
        if let Some((_, staged)) = self.partitions.staged.borrow_mut().remove(&meta.name) {
            logs.extend(staged);
        }
        for log in logs.into_iter().flatten() {
            let _ = log.shutdown().await;
        }
        self.remove_partition_dirs(meta).await
    }

    /// Deletes the directories of this shard's partitions of `meta`.
    async fn remove_partition_dirs(&self, meta: &TopicMeta) -> Result<()> {
        let me = self.broker_id();
        for (p, &s) in meta.shards.iter().enumerate() {
            if usize::from(s) == self.id && meta.is_local(p as u32, me) {
                remove_dir(&meta.partition_dir(&self.config.data_dir, p as u32)).await?;
            }
        }
        Ok(())
    }

    /// Flushes and closes every local partition (clean shutdown), many at a
    /// time.
    pub async fn close_all(&self) {
        let logs = self.partitions.all_logs();
        stream::iter(logs)
            .for_each_concurrent(PARTITION_OPENS_IN_FLIGHT_MAX, |log| async move {
                if let Err(e) = log.shutdown().await {
                    tracing::error!(shard = self.id, dir = %log.dir().display(), error = %e, "partition did not close cleanly");
                }
            })
            .await;
    }

    /// Periodic retention over the local partitions.
    pub async fn enforce_retention(&self) {
        let now = now_ms();
        for log in self.partitions.all_logs() {
            if let Err(e) = log.enforce_retention(now).await {
                tracing::warn!(dir = %log.dir().display(), error = %e, "retention failed");
            }
        }
    }
}

/// Removes a partition directory, if there is one.
async fn remove_dir(dir: &std::path::Path) -> Result<()> {
    match shoal_shard::durable::remove_dir_all(dir).await {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("delete {}", dir.display()), e)),
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
