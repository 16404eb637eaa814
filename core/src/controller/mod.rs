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
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: u32,
    pub replication_factor: u16,
    pub sync: Option<String>,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub segment_bytes: Option<u64>,
    /// acks=all needs this many in-sync replicas (`None`: min(2, RF)).
    #[serde(default)]
    pub min_insync_replicas: Option<u16>,
    /// Whether a replica outside the in-sync set may become leader when no
    /// in-sync one is alive (availability over acknowledged data).
    #[serde(default)]
    pub unclean_leader_election: bool,
}

/// A topic's settings: the spec's, or the broker's defaults.
pub struct Settings {
    pub sync: String,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub segment_bytes: u64,
    pub min_insync_replicas: u16,
    pub unclean_leader_election: bool,
}

/// Validates a spec (name, partition count, settings) and fills in the
/// defaults of `config`.
pub fn settings(spec: &TopicSpec, config: &crate::config::Config) -> Result<Settings> {
    validate_topic_name(&spec.name)?;
    if spec.partitions == 0 || spec.partitions > PARTITIONS_MAX {
        return Err(Error::InvalidConfig(format!(
            "partitions must be 1 to {PARTITIONS_MAX}"
        )));
    }
    if spec.replication_factor == 0 {
        return Err(Error::InvalidConfig(
            "replication factor must be at least 1".into(),
        ));
    }
    let sync = spec
        .sync
        .clone()
        .unwrap_or_else(|| config.default_sync.to_string());
    sync.parse::<shoal_shard::SyncMode>()
        .map_err(Error::InvalidConfig)?;
    let s = Settings {
        sync,
        retention_ms: spec
            .retention_ms
            .or(config.retention.map(|d| d.as_millis() as u64)),
        retention_bytes: spec.retention_bytes.or(config.retention_bytes),
        segment_bytes: spec.segment_bytes.unwrap_or(config.segment_bytes),
        min_insync_replicas: spec
            .min_insync_replicas
            .unwrap_or(spec.replication_factor.min(2)),
        unclean_leader_election: spec.unclean_leader_election,
    };
    // The group log is never cut by retention: checkpoints delete what
    // they cover, nothing else may go.
    let s = if spec.name == shoal_wire::group::GROUPS_TOPIC {
        Settings {
            retention_ms: None,
            retention_bytes: None,
            ..s
        }
    } else {
        s
    };
    if s.min_insync_replicas == 0 || s.min_insync_replicas > spec.replication_factor {
        return Err(Error::InvalidConfig(format!(
            "min_insync_replicas must be 1 to the replication factor ({})",
            spec.replication_factor
        )));
    }
    let probe = TopicMeta {
        name: spec.name.clone(),
        id: 0,
        shards: Vec::new(),
        sync: s.sync.clone(),
        retention_ms: s.retention_ms,
        retention_bytes: s.retention_bytes,
        segment_bytes: s.segment_bytes,
        placement: Vec::new(),
        min_insync_replicas: s.min_insync_replicas,
        unclean_leader_election: s.unclean_leader_election,
    };
    probe
        .log_config()
        .validate()
        .map_err(Error::InvalidConfig)?;
    Ok(s)
}

/// A new incarnation id: the creation time in nanoseconds, which no earlier
/// incarnation of a name can share (never 0, the "any" id).
pub fn new_topic_id() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    nanos.max(1)
}

/// Sends a request to the control thread (cluster mode) and waits for its
/// answer.
pub(crate) async fn ask_control<T>(
    control: &crate::cluster::ControlSender,
    msg: impl FnOnce(futures::channel::oneshot::Sender<Result<T>>) -> crate::cluster::ToControl,
) -> Result<T> {
    use futures::SinkExt;
    let (tx, rx) = futures::channel::oneshot::channel();
    control
        .clone()
        .send(msg(tx))
        .await
        .map_err(|_| Error::ClusterUnavailable("the cluster thread has stopped".into()))?;
    rx.await
        .map_err(|_| Error::ClusterUnavailable("the cluster thread has stopped".into()))?
}

impl Reactor {
    /// Creates a topic on every shard, or on none. Every shard first opens
    /// its share without showing it (stage); only when all did is the topic
    /// recorded in `topics.json`, then shown (commit). A failure anywhere
    /// before the record rolls every shard back, files included; a crash
    /// before the record leaves only directories that the next creation of
    /// the name (or the next start) removes.
    pub async fn create_topic(&self, spec: TopicSpec) -> Result<()> {
        if let Some(control) = &self.control {
            return ask_control(control, |reply| crate::cluster::ToControl::CreateTopic {
                spec,
                reply,
            })
            .await;
        }
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
        let _one_at_a_time = self.topic_changes.lock().await;
        if self.partitions.contains(&spec.name)
            || !self.creating.borrow_mut().insert(spec.name.clone())
        {
            return Err(Error::TopicExists(spec.name));
        }
        let r = match self.check_space(&meta).await {
            Ok(()) => self.create_everywhere(&meta).await,
            Err(e) => Err(e),
        };
        self.creating.borrow_mut().remove(&meta.name);
        r
    }

    /// Refuses a topic whose partitions could not all preallocate what
    /// they reserve at most (their active segments' lead, checkpoints)
    /// in the space left.
    async fn check_space(&self, meta: &TopicMeta) -> Result<()> {
        let needed_bytes = meta
            .log_config()
            .reserved_bytes_max()
            .saturating_mul(u64::from(meta.partitions()));
        let free_bytes = shoal_shard::durable::free_bytes(&self.config.data_dir)
            .await
            .map_err(|e| Error::io("read the free space of the data directory", e))?;
        if needed_bytes > free_bytes {
            return Err(Error::NoSpace {
                topic: meta.name.clone(),
                needed_bytes,
                free_bytes,
            });
        }
        Ok(())
    }

    async fn create_everywhere(&self, meta: &TopicMeta) -> Result<()> {
        let staged = self
            .broadcast(
                |reply| MeshMsg::StageTopic {
                    meta: meta.clone(),
                    reply,
                },
                self.stage_topic(meta),
            )
            .await;
        let recorded = match staged {
            Ok(()) => {
                let mut all = self.partitions.topic_map();
                all.insert(meta.name.clone(), meta.clone());
                self.persist_topics(all).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = recorded {
            tracing::warn!(topic = %meta.name, error = %e, "topic creation failed; rolling back on every shard");
            let rolled_back = self
                .broadcast(
                    |reply| MeshMsg::DropTopic {
                        meta: meta.clone(),
                        reply,
                    },
                    self.drop_topic(meta),
                )
                .await;
            if let Err(r) = rolled_back {
                tracing::warn!(topic = %meta.name, error = %r, "rollback incomplete; leftovers are removed when the name is created again or at the next start");
            }
            return Err(e);
        }
        self.broadcast(
            |reply| MeshMsg::CommitTopic {
                name: meta.name.clone(),
                reply,
            },
            async { self.commit_topic(&meta.name) },
        )
        .await
    }

    /// Validates a spec and fills in the broker's defaults.
    fn topic_meta(&self, spec: &TopicSpec) -> Result<TopicMeta> {
        if spec.replication_factor > 1 {
            return Err(Error::InvalidConfig(
                "replication factor above 1 needs a cluster; this broker runs alone".into(),
            ));
        }
        let s = settings(spec, &self.config)?;
        Ok(TopicMeta {
            name: spec.name.clone(),
            id: new_topic_id(),
            shards: placement::assign_shards(&spec.name, spec.partitions, self.nshards),
            sync: s.sync,
            retention_ms: s.retention_ms,
            retention_bytes: s.retention_bytes,
            segment_bytes: s.segment_bytes,
            placement: Vec::new(),
            min_insync_replicas: s.min_insync_replicas,
            unclean_leader_election: s.unclean_leader_election,
        })
    }

    /// Deletes a topic: records it gone, then every shard closes its
    /// partitions and deletes their files. On a full disk the record cannot
    /// be rewritten first, so the files go first to make room, then the
    /// record; a crash in between brings the topic back empty, never with
    /// old records.
    pub async fn delete_topic(&self, name: String) -> Result<()> {
        if let Some(control) = &self.control {
            return ask_control(control, |reply| crate::cluster::ToControl::DeleteTopic {
                name,
                reply,
            })
            .await;
        }
        if self.id != CONTROLLER_SHARD {
            return self
                .mesh
                .call(self, CONTROLLER_SHARD, |reply| MeshMsg::DeleteTopic {
                    name,
                    reply,
                })
                .await;
        }
        let _one_at_a_time = self.topic_changes.lock().await;
        let meta = self
            .partitions
            .topic(&name)
            .ok_or_else(|| Error::UnknownTopic(name.clone()))?;
        let mut remaining = self.partitions.topic_map();
        remaining.remove(&name);
        let persisted = self.persist_topics(remaining.clone()).await;
        let disk_full = matches!(&persisted, Err(Error::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOSPC));
        if persisted.is_err() && !disk_full {
            return persisted;
        }
        if disk_full {
            tracing::warn!(topic = %name, "disk full: deleting the topic's files before recording the deletion");
        }
        self.broadcast(
            |reply| MeshMsg::DropTopic {
                meta: meta.clone(),
                reply,
            },
            self.drop_topic(&meta),
        )
        .await?;
        if disk_full {
            self.persist_topics(remaining).await?;
        }
        Ok(())
    }

    async fn persist_topics(&self, topics: BTreeMap<String, TopicMeta>) -> Result<()> {
        let topics = Topics { topics };
        shoal_shard::durable::write_durably(&self.config.data_dir, "topics.json", topics.encode())
            .await
            .map_err(|e| Error::io("save topic metadata", e))
    }

    /// Cluster mode, on shard 0: makes this broker's copy of a topic match
    /// what ZooKeeper records. A new topic (or a new incarnation of a name)
    /// is created here as on a single node (its local replicas opened on
    /// every shard, `topics.json` rewritten); a known one gets its leader,
    /// epoch and ISR updated.
    pub async fn apply_cluster_topic(&self, meta: TopicMeta) -> Result<()> {
        let _one_at_a_time = self.topic_changes.lock().await;
        match self.partitions.topic(&meta.name) {
            Some(cur) if cur.id == meta.id => {
                if cur == meta {
                    return Ok(());
                }
                self.broadcast(
                    |reply| MeshMsg::UpdateTopic {
                        meta: meta.clone(),
                        reply,
                    },
                    async {
                        self.partitions.reserve(&meta);
                        self.replication.mark(&meta.name);
                        Ok(())
                    },
                )
                .await?;
                self.persist_topics(self.partitions.topic_map()).await
            }
            Some(cur) => {
                tracing::info!(topic = %meta.name, old_id = cur.id, new_id = meta.id, "topic was re-created while this broker was away: dropping the old incarnation");
                self.drop_everywhere(&cur).await?;
                self.create_everywhere(&meta).await
            }
            None => self.create_everywhere(&meta).await,
        }
    }

    /// Cluster mode, on shard 0: the topic is gone from ZooKeeper; drop
    /// this broker's replicas of it (of incarnation `id`, or any with 0).
    pub async fn remove_cluster_topic(&self, name: &str, id: u64) -> Result<()> {
        let _one_at_a_time = self.topic_changes.lock().await;
        match self.partitions.topic(name) {
            // A topic from before this broker joined the cluster is not
            // ZooKeeper's to delete.
            Some(cur) if !cur.placement.is_empty() && (id == 0 || cur.id == id) => {
                self.drop_everywhere(&cur).await
            }
            _ => Ok(()),
        }
    }

    /// Cluster mode, on shard 0: every topic ZooKeeper records. Topics this
    /// broker holds that were created in the cluster but are no longer
    /// recorded were deleted while it was away: they are dropped.
    /// `drop_strays` is false when the cluster's tree was just created
    /// (an empty or new ZooKeeper): then nothing local is deleted.
    pub async fn reconcile_cluster_topics(
        &self,
        topics: Vec<TopicMeta>,
        drop_strays: bool,
    ) -> Result<()> {
        let recorded: std::collections::HashSet<String> =
            topics.iter().map(|t| t.name.clone()).collect();
        for cur in self.partitions.topics() {
            if recorded.contains(&cur.name) {
                continue;
            }
            if cur.placement.is_empty() {
                tracing::warn!(topic = %cur.name, "topic was created before this broker joined the cluster; it stays local to this broker");
            } else if drop_strays {
                tracing::info!(topic = %cur.name, "topic was deleted while this broker was away: dropping its replicas");
                self.remove_cluster_topic(&cur.name, cur.id).await?;
            } else {
                tracing::warn!(topic = %cur.name, "ZooKeeper has no record of this cluster topic (a new ZooKeeper?): keeping its files, not serving it");
                self.partitions.forget(&cur.name);
            }
        }
        let mut first_error = None;
        for meta in topics {
            let name = meta.name.clone();
            if let Err(e) = self.apply_cluster_topic(meta).await {
                tracing::error!(topic = %name, error = %e, "cannot open this broker's replicas of a topic");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    async fn drop_everywhere(&self, meta: &TopicMeta) -> Result<()> {
        let mut remaining = self.partitions.topic_map();
        remaining.remove(&meta.name);
        self.persist_topics(remaining).await?;
        self.broadcast(
            |reply| MeshMsg::DropTopic {
                meta: meta.clone(),
                reply,
            },
            self.drop_topic(meta),
        )
        .await
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
