//! One core's broker: the state a shard's executor owns and the messages
//! it serves for other cores.
//!
//! A [`Reactor`] lives on one glommio executor pinned to one core and is
//! single-threaded on purpose (`Rc`, `Cell`, `RefCell`): the partition logs
//! it owns (`shoal_shard::PartitionLog`, the storage engine), its copy of
//! the topic metadata, its counters, its ends of the [`Mesh`]. Its
//! operations live with their subject: partitions (produce, fetch) in
//! [`crate::partitions`], topic changes in [`crate::controller`],
//! connections in [`crate::conn`].

use crate::config::Config;
use crate::conn::RecvBudget;
use crate::error::Result;
use crate::mesh::{FetchReply, FileRange, Mesh, MeshMsg, Rest};
use crate::metadata::TopicMeta;
use crate::metrics::Metrics;
use crate::partitions::{FetchData, Partitions};
use std::cell::Cell;
use std::rc::Rc;

pub struct Reactor {
    /// This shard's index (its core is `config.cores[id]`).
    pub id: usize,
    pub nshards: usize,
    pub config: Rc<Config>,
    pub partitions: Partitions,
    pub mesh: Mesh,
    pub metrics: Metrics,
    /// Memory the connections of this shard may hold for partial frames.
    pub recv_budget: RecvBudget,
    /// Every connection's writer, for the slow-consumer sweeper.
    pub writers: crate::conn::writer::Watches,
    pub stopping: Cell<bool>,
    /// Controller only: names of topics being created.
    pub creating: std::cell::RefCell<std::collections::BTreeSet<String>>,
    /// Controller only: topic changes run one at a time, so each rewrite
    /// of `topics.json` starts from the one before (two concurrent changes
    /// would each write a map without the other's topic).
    pub topic_changes: futures::lock::Mutex<()>,
    /// Cluster mode: the membership and controller this shard last heard
    /// of (`None` on a single node, or before the first word from
    /// ZooKeeper).
    pub cluster: std::cell::RefCell<Option<std::sync::Arc<crate::cluster::ClusterView>>>,
    /// Cluster mode: each local partition's replication role.
    pub replication: Rc<crate::replication::Replicas>,
    /// Cluster mode: the way to the ZooKeeper thread (topic changes).
    pub control: Option<crate::cluster::ControlSender>,
    /// The group coordinators this shard runs.
    pub groups: crate::group::Coordinators,
    /// Users and ACLs as this shard last heard (and its decision cache).
    pub security: crate::auth::Security,
    /// One line per period about refused TLS handshakes.
    pub tls_log: crate::metrics::LogLimiter,
    next_subscription: Cell<u64>,
}

impl Reactor {
    pub fn new(
        id: usize,
        config: Rc<Config>,
        topics: impl IntoIterator<Item = TopicMeta>,
        mesh: Mesh,
        control: Option<crate::cluster::ControlSender>,
    ) -> Reactor {
        Reactor {
            id,
            nshards: config.cores.len(),
            recv_budget: RecvBudget::new(config.partial_frames_bytes_max),
            security: crate::auth::Security::new(config.auth.clone(), Default::default()),
            writers: Default::default(),
            config,
            partitions: Partitions::new(topics),
            mesh,
            metrics: Metrics::default(),
            stopping: Cell::new(false),
            creating: Default::default(),
            topic_changes: futures::lock::Mutex::new(()),
            cluster: Default::default(),
            replication: Rc::new(crate::replication::Replicas::new(control.is_some())),
            control,
            groups: Default::default(),
            tls_log: crate::metrics::LogLimiter::new(std::time::Duration::from_secs(10)),
            next_subscription: Cell::new(1),
        }
    }

    /// This broker's id in its cluster; `None` on a single node.
    pub fn broker_id(&self) -> Option<u32> {
        self.config.cluster.as_ref().map(|c| c.broker_id)
    }

    pub fn next_subscription_id(&self) -> u64 {
        let id = self.next_subscription.get();
        self.next_subscription.set(id + 1);
        id
    }

    /// Serves an unordered message from another shard.
    pub async fn handle(self: Rc<Self>, msg: MeshMsg) {
        match msg {
            MeshMsg::Produce { .. } => {
                if let Some(rest) = self.start_ordered(msg).await {
                    rest.await;
                }
            }
            MeshMsg::Fetch { params, reply } => {
                let r = self.fetch_local(&params).await.and_then(|ok| {
                    let data = match ok.data {
                        Some(FetchData::Local(s)) => Some(FileRange {
                            file: s.share_file().map_err(|e| {
                                crate::error::Error::io("share a log file with another core", e)
                            })?,
                            position: s.file_position(),
                            len: s.len,
                        }),
                        Some(FetchData::Remote(range)) => Some(range),
                        None => None,
                    };
                    Ok(FetchReply {
                        data,
                        high_watermark: ok.high_watermark,
                        log_start_offset: ok.log_start_offset,
                        next_offset: ok.next_offset,
                        appended_at: ok.appended_at,
                        leader_epoch: ok.leader_epoch,
                        diverging: ok.diverging,
                    })
                });
                let _ = reply.send(r);
            }
            MeshMsg::PartitionState {
                topic,
                partition,
                reply,
            } => {
                let _ = reply.send(self.partition_state(&topic, partition).await);
            }
            MeshMsg::PartitionStates { topics, reply } => {
                let _ = reply.send(Ok(self.local_partition_states(topics.as_deref())));
            }
            MeshMsg::CreateTopic { spec, reply } => {
                let _ = reply.send(self.create_topic(spec).await);
            }
            MeshMsg::DeleteTopic { name, reply } => {
                let _ = reply.send(self.delete_topic(name).await);
            }
            MeshMsg::StageTopic { meta, reply } => {
                let _ = reply.send(self.stage_topic(&meta).await);
            }
            MeshMsg::CommitTopic { name, reply } => {
                let _ = reply.send(self.commit_topic(&name));
            }
            MeshMsg::DropTopic { meta, reply } => {
                let _ = reply.send(self.drop_topic(&meta).await);
            }
            MeshMsg::UpdateTopic { meta, reply } => {
                self.partitions.reserve(&meta);
                self.replication.mark(&meta.name);
                let _ = reply.send(Ok(()));
            }
            MeshMsg::Fence { fenced } => self.replication.set_fenced(fenced),
            MeshMsg::ClusterView { view } => {
                *self.cluster.borrow_mut() = Some(view);
            }
            MeshMsg::Security { state, reply } => {
                self.security.install(state);
                let _ = reply.send(Ok(()));
            }
            MeshMsg::SecurityChange { change, reply } => {
                let _ = reply.send(self.security_change(change).await);
            }
            MeshMsg::Metrics { reply } => {
                let _ = reply.send(self.metrics.snapshot());
            }
            MeshMsg::Scrape { reply } => {
                let _ = reply.send(Ok(self.scrape_local().await));
            }
        }
    }

    /// Runs the order-sensitive part of an ordered message (in its lane)
    /// and returns the rest, which may run beside later messages.
    pub async fn start_ordered(self: Rc<Self>, msg: MeshMsg) -> Option<Rest> {
        match msg {
            MeshMsg::Produce {
                topic,
                topic_id,
                partition,
                payload,
                acks,
                reply,
            } => match self
                .produce_append(&topic, topic_id, partition, &payload, acks)
                .await
            {
                Err(e) => {
                    let _ = reply.send(Err(e));
                    None
                }
                Ok((log, ok)) => Some(Box::pin(async move {
                    let next = ok.last_offset + 1;
                    let r: Result<_> = match acks {
                        crate::partitions::Acks::Leader => {
                            log.wait_acked(next).await.map(|()| ok).map_err(Into::into)
                        }
                        crate::partitions::Acks::All { .. } => {
                            match self.all_wait(&topic, partition, acks) {
                                Some(all) => all.wait(&log, next).await.map(|()| ok),
                                None => Ok(ok),
                            }
                        }
                        crate::partitions::Acks::None => Ok(ok),
                    };
                    let _ = reply.send(r);
                })),
            },
            // Unordered messages never reach a lane; should one, it still
            // gets served.
            other => Some(Box::pin(self.handle(other))),
        }
    }
}
