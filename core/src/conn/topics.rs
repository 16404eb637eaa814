//! Topic requests: create, delete, list, describe, and the metadata
//! clients route by (brokers, shard ports, partition owners and offsets).

use crate::cluster::ClusterView;
use crate::conn::dispatch::{body_mismatch, s};
use crate::conn::Conn;
use crate::controller::TopicSpec;
use crate::error::{Error, Result};
use crate::metadata::TopicMeta;
use crate::partitions::PartitionState;
use flatbuffers::{FlatBufferBuilder, WIPOffset};
use shoal_wire::fb;

/// A topic with each partition's owner and current offsets.
struct TopicInfo {
    meta: TopicMeta,
    parts: Vec<(u32, u16, PartitionState)>,
}

impl Conn {
    pub async fn create_topic(&self, corr: u32, req: fb::Request<'_>) -> std::io::Result<()> {
        let Some(c) = req.body_as_create_topic_request() else {
            return self.fail(corr, body_mismatch()).await;
        };
        let opt = |v: i64| (v >= 0).then_some(v as u64);
        let spec = TopicSpec {
            name: s(c.name()).to_string(),
            partitions: c.partitions(),
            replication_factor: c.replication_factor(),
            sync: c.sync().filter(|s| !s.is_empty()).map(str::to_string),
            retention_ms: opt(c.retention_ms()),
            retention_bytes: opt(c.retention_bytes()),
            segment_bytes: opt(c.segment_bytes()),
            min_insync_replicas: u16::try_from(c.min_insync_replicas()).ok(),
            unclean_leader_election: c.unclean_leader_election(),
        };
        if let Err(e) = crate::metadata::check_not_internal(&spec.name) {
            return self.fail(corr, e).await;
        }
        match self.reactor.create_topic(spec).await {
            Ok(()) => {
                self.respond(corr, fb::ResponseBody::CreateTopicResponse, |fbb| {
                    fb::CreateTopicResponse::create(fbb, &fb::CreateTopicResponseArgs {})
                        .as_union_value()
                })
                .await
            }
            Err(e) => self.fail(corr, e).await,
        }
    }

    pub async fn delete_topic(&self, corr: u32, req: fb::Request<'_>) -> std::io::Result<()> {
        let Some(d) = req.body_as_delete_topic_request() else {
            return self.fail(corr, body_mismatch()).await;
        };
        if let Err(e) = crate::metadata::check_not_internal(s(d.name())) {
            return self.fail(corr, e).await;
        }
        match self.reactor.delete_topic(s(d.name()).to_string()).await {
            Ok(()) => {
                self.respond(corr, fb::ResponseBody::DeleteTopicResponse, |fbb| {
                    fb::DeleteTopicResponse::create(fbb, &fb::DeleteTopicResponseArgs {})
                        .as_union_value()
                })
                .await
            }
            Err(e) => self.fail(corr, e).await,
        }
    }

    pub async fn list_topics(&self, corr: u32) -> std::io::Result<()> {
        let mut infos = match self.topic_infos(None).await {
            Ok(t) => t,
            Err(e) => return self.fail(corr, e).await,
        };
        infos.retain(|t| self.may_describe_topic(&t.meta.name));
        let view = self.reactor.cluster.borrow().clone();
        let me = self.reactor.broker_id();
        self.respond(corr, fb::ResponseBody::ListTopicsResponse, |fbb| {
            let topics = build_topics(fbb, &infos, view.as_deref(), me);
            fb::ListTopicsResponse::create(
                fbb,
                &fb::ListTopicsResponseArgs {
                    topics: Some(topics),
                },
            )
            .as_union_value()
        })
        .await
    }

    pub async fn describe_topic(&self, corr: u32, req: fb::Request<'_>) -> std::io::Result<()> {
        let Some(d) = req.body_as_describe_topic_request() else {
            return self.fail(corr, body_mismatch()).await;
        };
        let name = s(d.name()).to_string();
        let infos = match self.topic_infos(Some(vec![name])).await {
            Ok(t) => t,
            Err(e) => return self.fail(corr, e).await,
        };
        let view = self.reactor.cluster.borrow().clone();
        let me = self.reactor.broker_id();
        self.respond(corr, fb::ResponseBody::DescribeTopicResponse, |fbb| {
            let topic = build_topic(fbb, &infos[0], view.as_deref(), me);
            fb::DescribeTopicResponse::create(
                fbb,
                &fb::DescribeTopicResponseArgs { topic: Some(topic) },
            )
            .as_union_value()
        })
        .await
    }

    pub async fn metadata(&self, corr: u32, req: fb::Request<'_>) -> std::io::Result<()> {
        let wanted: Option<Vec<String>> = req
            .body_as_metadata_request()
            .and_then(|m| m.topics())
            .map(|t| t.iter().map(str::to_string).collect())
            .filter(|v: &Vec<String>| !v.is_empty());
        let mut topics = match self.topic_infos(wanted).await {
            Ok(t) => t,
            Err(e) => return self.fail(corr, e).await,
        };
        topics.retain(|t| self.may_describe_topic(&t.meta.name));
        let cfg = self.reactor.config.clone();
        let view = self.reactor.cluster.borrow().clone();
        let me = self.reactor.broker_id();
        self.respond(corr, fb::ResponseBody::MetadataResponse, |fbb| {
            let version = fbb.create_string(env!("CARGO_PKG_VERSION"));
            let brokers: Vec<_> = match (&view, &cfg.cluster) {
                (Some(view), _) => view
                    .brokers
                    .values()
                    .map(|b| {
                        let host = fbb.create_string(&b.host);
                        let ports = fbb.create_vector(&b.shard_ports);
                        let version = fbb.create_string(&b.version);
                        let rack = b.rack.as_deref().map(|r| fbb.create_string(r));
                        fb::BrokerInfo::create(
                            fbb,
                            &fb::BrokerInfoArgs {
                                id: b.id,
                                host: Some(host),
                                port: b.port,
                                shard_ports: Some(ports),
                                version: Some(version),
                                rack,
                            },
                        )
                    })
                    .collect(),
                (None, cluster) => {
                    let host = fbb.create_string(&cfg.advertised_host);
                    let ports: Vec<u16> = (0..cfg.cores.len()).map(|i| cfg.shard_port(i)).collect();
                    let ports = fbb.create_vector(&ports);
                    let rack = cluster
                        .as_ref()
                        .and_then(|c| c.rack.as_deref())
                        .map(|r| fbb.create_string(r));
                    vec![fb::BrokerInfo::create(
                        fbb,
                        &fb::BrokerInfoArgs {
                            id: me.unwrap_or(0),
                            host: Some(host),
                            port: cfg.listen.port(),
                            shard_ports: Some(ports),
                            version: Some(version),
                            rack,
                        },
                    )]
                }
            };
            let brokers = fbb.create_vector(&brokers);
            let topics = build_topics(fbb, &topics, view.as_deref(), me);
            let cluster = cfg.cluster.as_ref().map(|c| fbb.create_string(&c.name));
            let (controller_id, controller_epoch) = match (&view, me) {
                (Some(v), _) => v.controller.map_or((-1, 0), |(id, e)| (id as i32, e)),
                (None, Some(_)) => (-1, 0),
                (None, None) => (0, 0),
            };
            fb::MetadataResponse::create(
                fbb,
                &fb::MetadataResponseArgs {
                    brokers: Some(brokers),
                    topics: Some(topics),
                    cluster,
                    controller_id,
                    controller_epoch,
                },
            )
            .as_union_value()
        })
        .await
    }

    /// Topic descriptions with each partition's current offsets.
    async fn topic_infos(&self, names: Option<Vec<String>>) -> Result<Vec<TopicInfo>> {
        let partitions = &self.reactor.partitions;
        let names_given = names.is_some();
        let metas: Vec<TopicMeta> = match names {
            None => partitions.topics(),
            Some(names) => names
                .into_iter()
                .map(|n| partitions.topic(&n).ok_or(Error::UnknownTopic(n)))
                .collect::<Result<_>>()?,
        };
        let wanted = names_given.then(|| metas.iter().map(|m| m.name.clone()).collect());
        let mut states = self.reactor.partition_states(wanted).await;
        let out = metas
            .into_iter()
            .map(|meta| {
                let parts = meta
                    .shards
                    .iter()
                    .enumerate()
                    .map(|(p, &shard)| {
                        let st = states
                            .remove(&(meta.name.clone(), p as u32))
                            .unwrap_or_default();
                        (p as u32, shard, st)
                    })
                    .collect();
                TopicInfo { meta, parts }
            })
            .collect();
        Ok(out)
    }
}

fn build_topic<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    t: &TopicInfo,
    view: Option<&ClusterView>,
    me: Option<u32>,
) -> WIPOffset<fb::TopicInfo<'a>> {
    let parts: Vec<_> = t
        .parts
        .iter()
        .map(|(p, shard, st)| match t.meta.placement.get(*p as usize) {
            None => fb::PartitionInfo::create(
                fbb,
                &fb::PartitionInfoArgs {
                    partition: *p,
                    leader_broker: me.unwrap_or(0),
                    shard: *shard,
                    log_start_offset: st.log_start_offset,
                    high_watermark: st.high_watermark,
                    ..Default::default()
                },
            ),
            Some(pl) => {
                let leader = pl.leader.and_then(|l| {
                    let reg = view.and_then(|v| v.brokers.get(&l))?;
                    let shard = pl.replica_on(l)?.shard;
                    Some((l, (usize::from(shard) % reg.shards().max(1)) as u16))
                });
                let replicas: Vec<u32> = pl.replicas.iter().map(|r| r.broker).collect();
                let replicas = fbb.create_vector(&replicas);
                let isr = fbb.create_vector(&pl.isr);
                // Offsets are the leader's: another broker's copy would
                // mislead.
                let st = if pl.leader.is_some() && pl.leader == me {
                    *st
                } else {
                    PartitionState::default()
                };
                fb::PartitionInfo::create(
                    fbb,
                    &fb::PartitionInfoArgs {
                        partition: *p,
                        leader_broker: leader.map_or(pl.leader.unwrap_or(0), |l| l.0),
                        shard: leader.map_or(0, |l| l.1),
                        leader_epoch: pl.leader_epoch,
                        log_start_offset: st.log_start_offset,
                        high_watermark: st.high_watermark,
                        replicas: Some(replicas),
                        isr: Some(isr),
                        offline: leader.is_none(),
                    },
                )
            }
        })
        .collect();
    let parts = fbb.create_vector(&parts);
    let name = fbb.create_string(&t.meta.name);
    let sync = fbb.create_string(&t.meta.sync);
    fb::TopicInfo::create(
        fbb,
        &fb::TopicInfoArgs {
            name: Some(name),
            partitions: Some(parts),
            replication_factor: t
                .meta
                .placement
                .first()
                .map_or(1, |p| p.replicas.len() as u16),
            sync: Some(sync),
            retention_ms: t.meta.retention_ms.map_or(-1, |v| v as i64),
            retention_bytes: t.meta.retention_bytes.map_or(-1, |v| v as i64),
            segment_bytes: t.meta.segment_bytes as i64,
            topic_id: t.meta.id,
            min_insync_replicas: t.meta.min_insync(0) as u16,
            unclean_leader_election: t.meta.unclean_leader_election,
        },
    )
}

fn build_topics<'a>(
    fbb: &mut FlatBufferBuilder<'a>,
    topics: &[TopicInfo],
    view: Option<&ClusterView>,
    me: Option<u32>,
) -> WIPOffset<flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<fb::TopicInfo<'a>>>> {
    let items: Vec<_> = topics
        .iter()
        .map(|t| build_topic(fbb, t, view, me))
        .collect();
    fbb.create_vector(&items)
}
