//! The controller: topic creation and deletion, and where partitions go.
//!
//! On a single node shard 0 is the controller; any other shard forwards
//! topic changes to it over the mesh. The controller validates, records
//! the change durably in `topics.json` (write-then-rename), then has every
//! shard open (or drop) its partitions. The cluster's controller
//! (ZooKeeper-elected, placing replicas over brokers) will take this room.
//!
//! - [`placement`]: partitions → shards.

pub mod placement;

use crate::error::{Error, Result};
use crate::limits::PARTITIONS_MAX;
use crate::mesh::{MeshMsg, Reply};
use crate::metadata::{validate_topic_name, TopicMeta, Topics};
use crate::reactor::Reactor;
use std::collections::BTreeMap;

/// The shard that runs the controller on a single node.
pub const CONTROLLER_SHARD: usize = 0;

/// A topic to create.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u16,
    pub sync: Option<String>,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub segment_bytes: Option<u64>,
}

impl Reactor {
    pub async fn create_topic(&self, spec: TopicSpec) -> Result<()> {
        if self.id != CONTROLLER_SHARD {
            return self
                .mesh
                .call(self, CONTROLLER_SHARD, |reply| MeshMsg::CreateTopic {
                    spec,
                    reply,
                })
                .await;
        }
        let meta = self.topic_meta(&spec)?;
        if self.partitions.contains(&spec.name) {
            return Err(Error::TopicExists(spec.name));
        }
        // Reserve the name before any await.
        self.partitions.reserve(&meta);
        let all = self.partitions.topic_map();
        if let Err(e) = self.persist_topics(all).await {
            self.partitions.forget(&meta.name);
            return Err(e);
        }
        self.broadcast(
            |reply| MeshMsg::OpenTopic {
                meta: meta.clone(),
                reply,
            },
            self.open_topic(&meta),
        )
        .await
    }

    /// Validates a spec and fills in the broker's defaults.
    fn topic_meta(&self, spec: &TopicSpec) -> Result<TopicMeta> {
        validate_topic_name(&spec.name)?;
        if spec.partitions == 0 || spec.partitions > PARTITIONS_MAX {
            return Err(Error::InvalidConfig(format!(
                "partitions must be 1 to {PARTITIONS_MAX}"
            )));
        }
        if spec.replication_factor > 1 {
            return Err(Error::InvalidConfig(
                "replication factor above 1 needs a cluster; this broker runs alone".into(),
            ));
        }
        let sync = spec
            .sync
            .clone()
            .unwrap_or_else(|| self.config.default_sync.to_string());
        sync.parse::<shoal_shard::SyncMode>()
            .map_err(Error::InvalidConfig)?;
        let meta = TopicMeta {
            name: spec.name.clone(),
            shards: placement::assign_shards(&spec.name, spec.partitions, self.nshards),
            sync,
            retention_ms: spec
                .retention_ms
                .or(self.config.retention.map(|d| d.as_millis() as u64)),
            retention_bytes: spec.retention_bytes.or(self.config.retention_bytes),
            segment_bytes: spec.segment_bytes.unwrap_or(self.config.segment_bytes),
        };
        meta.log_config().validate().map_err(Error::InvalidConfig)?;
        Ok(meta)
    }

    pub async fn delete_topic(&self, name: String) -> Result<()> {
        if self.id != CONTROLLER_SHARD {
            return self
                .mesh
                .call(self, CONTROLLER_SHARD, |reply| MeshMsg::DeleteTopic {
                    name,
                    reply,
                })
                .await;
        }
        if !self.partitions.contains(&name) {
            return Err(Error::UnknownTopic(name));
        }
        let mut remaining = self.partitions.topic_map();
        remaining.remove(&name);
        self.persist_topics(remaining).await?;
        self.broadcast(
            |reply| MeshMsg::DropTopic {
                name: name.clone(),
                reply,
            },
            self.drop_topic(&name),
        )
        .await
    }

    async fn persist_topics(&self, topics: BTreeMap<String, TopicMeta>) -> Result<()> {
        let topics = Topics { topics };
        shoal_shard::durable::write_durably(&self.config.data_dir, "topics.json", topics.encode())
            .await
            .map_err(|e| Error::io("save topic metadata", e))
    }

    /// Runs `local` here and sends `msg` to every other shard; all must
    /// agree.
    async fn broadcast(
        &self,
        msg: impl Fn(Reply<()>) -> MeshMsg,
        local: impl std::future::Future<Output = Result<()>>,
    ) -> Result<()> {
        let mut waits = Vec::new();
        for s in (0..self.nshards).filter(|&s| s != self.id) {
            let (tx, rx) = futures::channel::oneshot::channel();
            self.mesh.send(self, s, msg(tx)).await?;
            waits.push(rx);
        }
        let mut result = local.await;
        for rx in waits {
            let r = rx.await.map_err(|_| Error::ShardGone).and_then(|r| r);
            if result.is_ok() {
                result = r;
            }
        }
        result
    }

    /// Every shard's counters, summed.
    pub async fn metrics_all(&self) -> Vec<(&'static str, u64)> {
        let mut total = self.metrics.snapshot();
        for s in (0..self.nshards).filter(|&s| s != self.id) {
            let (tx, rx) = futures::channel::oneshot::channel();
            if self
                .mesh
                .send(self, s, MeshMsg::Metrics { reply: tx })
                .await
                .is_err()
            {
                continue;
            }
            if let Ok(m) = rx.await {
                for (t, (_, v)) in total.iter_mut().zip(m) {
                    t.1 += v;
                }
            }
        }
        total
    }
}
