//! Consumer-group requests: heartbeat (join, leave), offset commit and
//! fetch, list, describe, and a follower's checkpoint. Changes are queued
//! for the metadata log in request order by the read loop and answered by
//! a task of their own once acknowledged, like produces.

use crate::conn::dispatch::{body_mismatch, s};
use crate::conn::Conn;
use crate::error::{Error, Result};
use crate::group::assign::{Strategy, Tp};
use crate::group::coordinator::Acked;
use crate::group::state::{Committed, Group, Heartbeat};
use crate::limits::PRODUCES_IN_FLIGHT_MAX;
use crate::rt;
use flatbuffers::{FlatBufferBuilder, WIPOffset};
use shoal_wire::fb;
use shoal_wire::group::MEMBER_METADATA_MAX;
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::rc::Rc;

type Fbb = FlatBufferBuilder<'static>;

fn tps_of(
    v: Option<flatbuffers::Vector<'_, flatbuffers::ForwardsUOffset<fb::TopicPartitions<'_>>>>,
) -> Option<BTreeSet<Tp>> {
    v.map(|v| {
        v.iter()
            .flat_map(|t| {
                let topic = s(t.topic()).to_string();
                t.partitions()
                    .into_iter()
                    .flatten()
                    .map(move |p| (topic.clone(), p))
            })
            .collect()
    })
}

fn put_tps<'a>(
    fbb: &mut Fbb,
    tps: &BTreeSet<Tp>,
) -> WIPOffset<flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<fb::TopicPartitions<'a>>>> {
    let mut by_topic: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for (t, p) in tps {
        by_topic.entry(t).or_default().push(*p);
    }
    let items: Vec<_> = by_topic
        .into_iter()
        .map(|(t, ps)| {
            let topic = fbb.create_string(t);
            let partitions = fbb.create_vector(&ps);
            fb::TopicPartitions::create(
                fbb,
                &fb::TopicPartitionsArgs {
                    topic: Some(topic),
                    partitions: Some(partitions),
                },
            )
        })
        .collect();
    fbb.create_vector(&items)
}

fn put_offsets<'a>(
    fbb: &mut Fbb,
    offsets: &[(Tp, Committed)],
) -> WIPOffset<flatbuffers::Vector<'a, flatbuffers::ForwardsUOffset<fb::TopicOffsets<'a>>>> {
    let mut by_topic: BTreeMap<&str, Vec<(u32, &Committed)>> = BTreeMap::new();
    for ((t, p), c) in offsets {
        by_topic.entry(t).or_default().push((*p, c));
    }
    let items: Vec<_> = by_topic
        .into_iter()
        .map(|(t, ps)| {
            let parts: Vec<_> = ps
                .into_iter()
                .map(|(p, c)| {
                    let metadata = fbb.create_string(&c.metadata);
                    fb::PartitionOffset::create(
                        fbb,
                        &fb::PartitionOffsetArgs {
                            partition: p,
                            offset: c.offset,
                            metadata: Some(metadata),
                        },
                    )
                })
                .collect();
            let topic = fbb.create_string(t);
            let partitions = fbb.create_vector(&parts);
            fb::TopicOffsets::create(
                fbb,
                &fb::TopicOffsetsArgs {
                    topic: Some(topic),
                    partitions: Some(partitions),
                },
            )
        })
        .collect();
    fbb.create_vector(&items)
}

impl Conn {
    /// Answers `corr` with `answer` once `acked` (if any) resolves, beside
    /// the read loop (a bounded number per connection; past it, inline).
    async fn answer_after<F>(
        self: &Rc<Self>,
        corr: u32,
        acked: Option<Acked>,
        answer: impl FnOnce(Rc<Conn>) -> F + 'static,
    ) -> std::io::Result<()>
    where
        F: Future<Output = std::io::Result<()>> + 'static,
    {
        let Some(acked) = acked else {
            return answer(self.clone()).await;
        };
        let conn = self.clone();
        let job = async move {
            match acked.wait().await {
                Ok(()) => answer(conn).await,
                Err(e) => conn.fail(corr, e).await,
            }
        };
        if self.produces_in_flight.get() >= PRODUCES_IN_FLIGHT_MAX {
            return job.await;
        }
        self.produces_in_flight
            .set(self.produces_in_flight.get() + 1);
        let conn = self.clone();
        rt::spawn_detached(async move {
            let r = job.await;
            conn.produces_in_flight
                .set(conn.produces_in_flight.get() - 1);
            if r.is_err() {
                conn.closed.set(true);
            }
        });
        Ok(())
    }

    pub async fn group_heartbeat(
        self: &Rc<Self>,
        corr: u32,
        req: fb::Request<'_>,
    ) -> std::io::Result<()> {
        let Some(h) = req.body_as_group_heartbeat_request() else {
            return self.fail(corr, body_mismatch()).await;
        };
        let group = s(h.group());
        let metadata = h.metadata().map(|m| m.bytes());
        if let Some(m) = metadata.filter(|m| m.len() > MEMBER_METADATA_MAX) {
            let e = Error::Malformed(format!(
                "member metadata of {} bytes exceeds the limit of {MEMBER_METADATA_MAX}",
                m.len()
            ));
            return self.fail(corr, e).await;
        }
        let topics: Option<Vec<String>> =
            h.topics().map(|v| v.iter().map(str::to_string).collect());
        if let Some(t) = &topics {
            if t.len() > crate::group::state::SUBSCRIPTION_TOPICS_MAX {
                let e = Error::Malformed(format!(
                    "a subscription of {} topics exceeds the limit of {}",
                    t.len(),
                    crate::group::state::SUBSCRIPTION_TOPICS_MAX
                ));
                return self.fail(corr, e).await;
            }
            if let Some(bad) = t
                .iter()
                .find(|t| crate::metadata::validate_topic_name(t).is_err())
            {
                let e = Error::InvalidTopicName(format!(
                    "cannot subscribe to {bad:?}: not a topic name"
                ));
                return self.fail(corr, e).await;
            }
        }
        let Some(strategy) = Strategy::parse(s(h.strategy())) else {
            let e = Error::InvalidConfig(format!(
                "unknown assignment strategy {:?}: sticky, range or roundrobin",
                s(h.strategy())
            ));
            return self.fail(corr, e).await;
        };
        let hb = Heartbeat {
            member_id: s(h.member_id()),
            member_epoch: h.member_epoch(),
            client_id: s(req.client_id()),
            topics,
            owned: tps_of(h.owned()),
            session_timeout_ms: h.session_timeout_ms(),
            strategy,
            metadata,
        };
        let r = match self.reactor.coordinator(group) {
            Ok(c) => c.heartbeat(&self.reactor, group, hb).await,
            Err(e) => Err(e),
        };
        let (ok, acked) = match r {
            Ok(x) => x,
            Err(e) => return self.fail(corr, e).await,
        };
        self.answer_after(corr, acked, move |conn| async move {
            conn.respond(corr, fb::ResponseBody::GroupHeartbeatResponse, |fbb| {
                let member_id = fbb.create_string(&ok.member_id);
                let assignment = put_tps(fbb, &ok.assignment);
                fb::GroupHeartbeatResponse::create(
                    fbb,
                    &fb::GroupHeartbeatResponseArgs {
                        member_id: Some(member_id),
                        member_epoch: ok.member_epoch,
                        heartbeat_interval_ms: ok.heartbeat_interval_ms,
                        assignment: Some(assignment),
                    },
                )
                .as_union_value()
            })
            .await
        })
        .await
    }

    pub async fn offset_commit(
        self: &Rc<Self>,
        corr: u32,
        req: fb::Request<'_>,
    ) -> std::io::Result<()> {
        let Some(c) = req.body_as_offset_commit_request() else {
            return self.fail(corr, body_mismatch()).await;
        };
        let group = s(c.group());
        let mut offsets = Vec::new();
        for t in c.topics().into_iter().flatten() {
            for p in t.partitions().into_iter().flatten() {
                offsets.push((
                    (s(t.topic()).to_string(), p.partition()),
                    p.offset(),
                    s(p.metadata()).to_string(),
                ));
            }
        }
        if offsets.is_empty() {
            let e = Error::Malformed("an offset commit names no partition".into());
            return self.fail(corr, e).await;
        }
        let r = match self.reactor.coordinator(group) {
            Ok(co) => {
                co.commit(
                    &self.reactor,
                    group,
                    s(c.member_id()),
                    c.member_epoch(),
                    offsets,
                )
                .await
            }
            Err(e) => Err(e),
        };
        let acked = match r {
            Ok(a) => a,
            Err(e) => return self.fail(corr, e).await,
        };
        self.answer_after(corr, Some(acked), move |conn| async move {
            conn.respond(corr, fb::ResponseBody::OffsetCommitResponse, |fbb| {
                fb::OffsetCommitResponse::create(fbb, &fb::OffsetCommitResponseArgs {})
                    .as_union_value()
            })
            .await
        })
        .await
    }

    pub async fn offset_fetch(
        self: &Rc<Self>,
        corr: u32,
        req: fb::Request<'_>,
    ) -> std::io::Result<()> {
        let Some(f) = req.body_as_offset_fetch_request() else {
            return self.fail(corr, body_mismatch()).await;
        };
        let group = s(f.group());
        let topics: Vec<String> = f
            .topics()
            .map(|v| v.iter().map(str::to_string).collect())
            .unwrap_or_default();
        let offsets = match self.reactor.coordinator(group) {
            Ok(c) => c.offsets(group, &topics),
            Err(e) => return self.fail(corr, e).await,
        };
        self.respond(corr, fb::ResponseBody::OffsetFetchResponse, |fbb| {
            let topics = put_offsets(fbb, &offsets);
            fb::OffsetFetchResponse::create(
                fbb,
                &fb::OffsetFetchResponseArgs {
                    topics: Some(topics),
                },
            )
            .as_union_value()
        })
        .await
    }

    pub async fn list_groups(
        self: &Rc<Self>,
        corr: u32,
        req: fb::Request<'_>,
    ) -> std::io::Result<()> {
        let Some(l) = req.body_as_list_groups_request() else {
            return self.fail(corr, body_mismatch()).await;
        };
        let mut groups = match self.list_groups_of(l.partition()) {
            Ok(g) => g,
            Err(e) => return self.fail(corr, e).await,
        };
        groups.retain(|(name, _, _)| self.may_describe_group(name));
        self.respond(corr, fb::ResponseBody::ListGroupsResponse, |fbb| {
            let items: Vec<_> = groups
                .iter()
                .map(|(name, state, members)| {
                    let group = fbb.create_string(name);
                    let state = fbb.create_string(state);
                    fb::GroupListing::create(
                        fbb,
                        &fb::GroupListingArgs {
                            group: Some(group),
                            state: Some(state),
                            members: *members as u32,
                        },
                    )
                })
                .collect();
            let groups = fbb.create_vector(&items);
            fb::ListGroupsResponse::create(
                fbb,
                &fb::ListGroupsResponseArgs {
                    groups: Some(groups),
                },
            )
            .as_union_value()
        })
        .await
    }

    fn list_groups_of(&self, p: u32) -> Result<Vec<(String, &'static str, usize)>> {
        use shoal_wire::group::GROUPS_TOPIC;
        let Some(meta) = self.reactor.partitions.topic(GROUPS_TOPIC) else {
            // No group was ever formed.
            return Ok(Vec::new());
        };
        if p >= meta.partitions() {
            return Err(Error::UnknownPartition {
                topic: GROUPS_TOPIC.into(),
                partition: p,
                count: meta.partitions(),
            });
        }
        Ok(self.reactor.coordinator_of(p, "")?.list())
    }

    pub async fn describe_group(
        self: &Rc<Self>,
        corr: u32,
        req: fb::Request<'_>,
    ) -> std::io::Result<()> {
        let Some(d) = req.body_as_describe_group_request() else {
            return self.fail(corr, body_mismatch()).await;
        };
        let group = s(d.group());
        let g = match self.reactor.coordinator(group) {
            Ok(c) => c.describe(group),
            Err(e) => return self.fail(corr, e).await,
        };
        let Some(g) = g else {
            return self
                .fail(corr, Error::UnknownGroup(group.to_string()))
                .await;
        };
        self.respond(corr, fb::ResponseBody::DescribeGroupResponse, |fbb| {
            describe_body(fbb, &g).as_union_value()
        })
        .await
    }

    pub async fn group_checkpoint(
        self: &Rc<Self>,
        corr: u32,
        req: fb::Request<'_>,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let Some(c) = req.body_as_group_checkpoint_request() else {
            return self.fail(corr, body_mismatch()).await;
        };
        let r = match self.peer_is_broker(c.replica_id()) {
            Err(e) => Err(e),
            Ok(()) if payload.is_empty() => {
                self.reactor
                    .group_checkpoint_of(c.partition(), c.replica_id())
                    .await
            }
            Ok(()) => self
                .reactor
                .accept_group_checkpoint(
                    c.partition(),
                    c.offset(),
                    c.leader_epoch(),
                    c.replica_id(),
                    payload,
                )
                .await
                .map(|()| Vec::new()),
        };
        match r {
            Ok(bytes) => {
                self.respond(corr, fb::ResponseBody::GroupCheckpointResponse, |fbb| {
                    let checkpoint = fbb.create_vector(&bytes);
                    fb::GroupCheckpointResponse::create(
                        fbb,
                        &fb::GroupCheckpointResponseArgs {
                            checkpoint: Some(checkpoint),
                        },
                    )
                    .as_union_value()
                })
                .await
            }
            Err(e) => self.fail(corr, e).await,
        }
    }

    /// Checkpoints come only from brokers of this cluster: the connection
    /// must come from the address broker `replica_id` registered. (Not a
    /// substitute for authenticating brokers; see the security work.)
    fn peer_is_broker(&self, replica_id: i32) -> Result<()> {
        let refuse = || {
            Error::Malformed(format!(
                "group checkpoints are taken only from brokers of this cluster (not from broker {replica_id} at this address)"
            ))
        };
        let view = self.reactor.cluster.borrow().clone();
        let Some(view) = view else {
            return Err(refuse());
        };
        let broker = u32::try_from(replica_id)
            .ok()
            .and_then(|r| view.brokers.get(&r))
            .ok_or_else(refuse)?;
        let Some(peer) = self.peer else {
            return Err(refuse());
        };
        let registered: Vec<std::net::IpAddr> =
            std::net::ToSocketAddrs::to_socket_addrs(&(broker.host.as_str(), 0))
                .map(|a| a.map(|a| a.ip()).collect())
                .unwrap_or_default();
        if registered.contains(&peer.ip()) {
            Ok(())
        } else {
            Err(refuse())
        }
    }
}

fn describe_body<'a>(fbb: &mut Fbb, g: &Group) -> WIPOffset<fb::DescribeGroupResponse<'a>> {
    let members: Vec<_> = g
        .members
        .values()
        .map(|m| {
            let member_id = fbb.create_string(&m.id);
            let client_id = fbb.create_string(&m.client_id);
            let names: Vec<_> = m.topics.iter().map(|t| fbb.create_string(t)).collect();
            let topics = fbb.create_vector(&names);
            let assignment = put_tps(fbb, &m.given);
            let held: BTreeSet<Tp> = m.held.keys().cloned().collect();
            let owned = put_tps(fbb, &held);
            let metadata = fbb.create_vector(&m.metadata);
            fb::MemberInfo::create(
                fbb,
                &fb::MemberInfoArgs {
                    member_id: Some(member_id),
                    client_id: Some(client_id),
                    member_epoch: m.epoch,
                    topics: Some(topics),
                    assignment: Some(assignment),
                    owned: Some(owned),
                    session_timeout_ms: m.session_timeout_ms,
                    metadata: Some(metadata),
                },
            )
        })
        .collect();
    let offsets: Vec<(Tp, Committed)> = g
        .offsets
        .iter()
        .map(|(tp, c)| (tp.clone(), c.clone()))
        .collect();
    let offsets = put_offsets(fbb, &offsets);
    let members = fbb.create_vector(&members);
    let group = fbb.create_string(&g.name);
    let state = fbb.create_string(g.state());
    let strategy = fbb.create_string(g.strategy.name());
    fb::DescribeGroupResponse::create(
        fbb,
        &fb::DescribeGroupResponseArgs {
            group: Some(group),
            state: Some(state),
            group_epoch: g.epoch,
            strategy: Some(strategy),
            members: Some(members),
            offsets: Some(offsets),
        },
    )
}
