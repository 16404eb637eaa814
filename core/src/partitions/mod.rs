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

pub use fetch::{FetchData, FetchOk, FetchParams, PartitionState};
pub use produce::{Acks, PendingProduce, ProduceOk};

use crate::error::{Error, Result};
use crate::metadata::TopicMeta;
use crate::reactor::Reactor;
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
}

impl Partitions {
    pub fn new(topics: impl IntoIterator<Item = TopicMeta>) -> Partitions {
        Partitions {
            topics: RefCell::new(topics.into_iter().map(|t| (t.name.clone(), t)).collect()),
            logs: RefCell::new(HashMap::new()),
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

    /// Which shard owns `topic`/`partition`.
    pub fn owner(&self, topic: &str, partition: u32) -> Result<usize> {
        let topics = self.topics.borrow();
        let meta = topics
            .get(topic)
            .ok_or_else(|| Error::UnknownTopic(topic.into()))?;
        meta.shards
            .get(partition as usize)
            .map(|&s| usize::from(s))
            .ok_or_else(|| Error::UnknownPartition {
                topic: topic.into(),
                partition,
                count: meta.partitions(),
            })
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
    /// Opens the logs of every partition this shard owns.
    pub async fn open_local_partitions(&self) -> Result<()> {
        for meta in self.partitions.topics() {
            self.open_topic(&meta).await?;
        }
        Ok(())
    }

    /// Opens this shard's partitions of `meta` and makes the topic known.
    pub async fn open_topic(&self, meta: &TopicMeta) -> Result<()> {
        let mut logs = Vec::with_capacity(meta.shards.len());
        for (p, &s) in meta.shards.iter().enumerate() {
            if usize::from(s) != self.id {
                logs.push(None);
                continue;
            }
            let dir = meta.partition_dir(&self.config.data_dir, p as u32);
            let config = shoal_shard::LogConfig {
                tail_cache_bytes: self.config.tail_cache_bytes,
                ..meta.log_config()
            };
            let log =
                PartitionLog::open(&dir, config)
                    .await
                    .map_err(|source| Error::Partition {
                        partition: format!("{}-{p}", meta.name),
                        source,
                    })?;
            logs.push(Some(Rc::new(log)));
        }
        self.partitions.install(meta, logs);
        Ok(())
    }

    /// Forgets the topic, closes this shard's partitions of it and deletes
    /// their files (off the core: a large directory tree must not stall
    /// the other partitions' produce path).
    pub async fn drop_topic(&self, name: &str) -> Result<()> {
        let (meta, logs) = self.partitions.remove(name);
        for (p, log) in logs.into_iter().enumerate() {
            let Some(log) = log else { continue };
            let _ = log.shutdown().await;
            drop(log);
            if let Some(meta) = &meta {
                let dir = meta.partition_dir(&self.config.data_dir, p as u32);
                shoal_shard::durable::remove_dir_all(&dir)
                    .await
                    .map_err(|e| Error::io(format!("delete {}", dir.display()), e))?;
            }
        }
        Ok(())
    }

    /// Flushes and closes every local partition (clean shutdown).
    pub async fn close_all(&self) {
        for log in self.partitions.all_logs() {
            if let Err(e) = log.shutdown().await {
                tracing::error!(shard = self.id, dir = %log.dir().display(), error = %e, "partition did not close cleanly");
            }
        }
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

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
