//! Consumer groups (C6): [`GroupConsumer`], a member of a group that
//! consumes the partitions the coordinator assigns it and commits its
//! positions, and the group admin calls on [`Client`] (list, describe,
//! committed offsets, commits from outside the group).
//!
//! A group's coordinator is the leader of partition
//! [`coordinator_partition`]`(group, N)` of [`GROUPS_TOPIC`]; group
//! requests are routed and retried like any request to that partition
//! (`NotLeader` hints, `LeaderNotAvailable`, lost connections), and
//! `CoordinatorLoading` is waited out. Before any group exists the topic
//! does not either: the request then goes to any broker, which creates it
//! and answers `CoordinatorLoading` until its coordinators are up.
//!
//! Membership follows the broker-side assignment protocol: the coordinator
//! answers every heartbeat with the partitions the member may consume. A
//! partition taken away is given up at the next [`GroupConsumer::poll`]
//! (fetching stops, its position is committed under auto-commit, then
//! [`RebalanceEvent::Revoked`]); only after that does the next heartbeat
//! stop reporting it as owned, and only then may the coordinator hand it
//! to another member. So no two members of a group read one partition at
//! once, provided each polls: a member that stops polling holds on to the
//! partitions it is giving up.

use crate::client::Client;
use crate::connection::Connection;
use crate::consumer::{ConsumedRecord, Consumer, ConsumerConfig, StartAt};
use crate::error::{Error, Result};
use crate::retry::{Retrier, RetryPolicy};
use flatbuffers::{FlatBufferBuilder, ForwardsUOffset, Vector, WIPOffset};
use futures::FutureExt;
use shoal_wire::group::{coordinator_partition, GROUPS_TOPIC, MEMBER_METADATA_MAX};
use shoal_wire::{fb, ErrorCode};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// A partition of a topic.
pub type TopicPartition = (String, u32);

/// How the coordinator spreads a group's partitions over its members. The
/// first member to join an empty group chooses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AssignmentStrategy {
    /// Balanced, moving as few partitions as possible on a change.
    #[default]
    Sticky,
    /// Per topic, contiguous ranges of partitions.
    Range,
    /// All partitions dealt out one by one.
    RoundRobin,
}

impl AssignmentStrategy {
    /// The name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            AssignmentStrategy::Sticky => "sticky",
            AssignmentStrategy::Range => "range",
            AssignmentStrategy::RoundRobin => "roundrobin",
        }
    }
}

/// Where a newly assigned partition starts when the group has no
/// committed offset for it, or the committed one is outside the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OffsetReset {
    /// The log start: everything still retained.
    Earliest,
    /// The high watermark: only records produced from now on.
    #[default]
    Latest,
}

/// How a [`GroupConsumer`] takes part in its group. Its own type rather
/// than fields of [`ConsumerConfig`]: none of it applies to assigned
/// partitions or push subscriptions, and the fetch settings are reused
/// whole in [`GroupConfig::fetch`].
#[derive(Debug, Clone)]
pub struct GroupConfig {
    /// The coordinator removes a member it has not heard from for this
    /// long and gives its partitions to others; a member that could not
    /// reach the coordinator for this long counts its partitions as lost.
    /// 0.5 s to 300 s. Default 10 s.
    pub session_timeout: Duration,
    /// Time between heartbeats until the coordinator names one (its value
    /// wins: shorter while partitions move). Default 3 s.
    pub heartbeat_interval: Duration,
    /// Chosen by the first member of an empty group. Default sticky.
    pub strategy: AssignmentStrategy,
    /// Start of a partition without a usable committed offset. Default
    /// [`OffsetReset::Latest`].
    pub offset_reset: OffsetReset,
    /// Commit the positions of what `poll` returned every
    /// `auto_commit_interval` (in the background), before giving a
    /// partition up, and on [`GroupConsumer::close`]. Default on.
    pub auto_commit: bool,
    /// Default 5 s.
    pub auto_commit_interval: Duration,
    /// Opaque bytes shown by describe, at most
    /// [`MEMBER_METADATA_MAX`]. Default none.
    pub metadata: Vec<u8>,
    /// How partitions are fetched and ride out a failover.
    pub fetch: ConsumerConfig,
}

impl Default for GroupConfig {
    fn default() -> Self {
        GroupConfig {
            session_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(3),
            strategy: AssignmentStrategy::Sticky,
            offset_reset: OffsetReset::Latest,
            auto_commit: true,
            auto_commit_interval: Duration::from_secs(5),
            metadata: Vec::new(),
            fetch: ConsumerConfig::default(),
        }
    }
}

/// A change of what a [`GroupConsumer`] reads, reported to the listener
/// set by [`GroupConsumer::set_rebalance_listener`] from within `poll`
/// (or `close`), before the next fetch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebalanceEvent {
    /// Newly assigned; reading starts at the committed offset, else at
    /// the [`OffsetReset`] policy's end.
    Assigned(Vec<TopicPartition>),
    /// Given up in an orderly way: no longer fetched, and under
    /// auto-commit their positions were committed first.
    Revoked(Vec<TopicPartition>),
    /// Membership was lost (fenced, expired, or the coordinator out of
    /// reach for the session timeout): others may already read these;
    /// nothing was committed. The consumer joins again by itself.
    Lost(Vec<TopicPartition>),
}

/// One group, as [`Client::list_groups`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupListing {
    pub group: String,
    /// `empty`, `stable` or `reconciling`.
    pub state: String,
    pub members: u32,
}

/// A member, as [`Client::describe_group`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMember {
    pub member_id: String,
    pub client_id: String,
    pub member_epoch: i32,
    pub topics: Vec<String>,
    /// What it may consume now.
    pub assignment: Vec<TopicPartition>,
    /// What it still reads: its assignment plus partitions being given up.
    pub owned: Vec<TopicPartition>,
    pub session_timeout_ms: u32,
    pub metadata: Vec<u8>,
}

/// A committed offset: the next offset the group will consume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub metadata: String,
}

/// A group, as [`Client::describe_group`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    pub group: String,
    /// `empty`, `stable` or `reconciling`.
    pub state: String,
    pub group_epoch: i32,
    pub strategy: String,
    pub members: Vec<GroupMember>,
    pub offsets: Vec<CommittedOffset>,
}

/// What the assignment changes for a member that reads `owned`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct AssignmentDiff {
    pub added: Vec<TopicPartition>,
    pub revoked: Vec<TopicPartition>,
}

pub(crate) fn diff_assignment(
    owned: &BTreeSet<TopicPartition>,
    assignment: &BTreeSet<TopicPartition>,
) -> AssignmentDiff {
    AssignmentDiff {
        added: assignment.difference(owned).cloned().collect(),
        revoked: owned.difference(assignment).cloned().collect(),
    }
}

/// Where a newly assigned partition starts: the committed offset if the
/// log still holds it (`start..=end`), else the reset policy's end.
pub(crate) fn start_position(
    committed: Option<u64>,
    start: u64,
    end: u64,
    reset: OffsetReset,
) -> u64 {
    match committed {
        Some(c) if (start..=end).contains(&c) => c,
        _ => match reset {
            OffsetReset::Earliest => start,
            OffsetReset::Latest => end,
        },
    }
}

// ---- wire -------------------------------------------------------------------

type Fbb = FlatBufferBuilder<'static>;
type TpsVector<'a> = Vector<'a, ForwardsUOffset<fb::TopicPartitions<'a>>>;
type OffsetsVector<'a> = Vector<'a, ForwardsUOffset<fb::TopicOffsets<'a>>>;

fn put_tps<'a>(
    fbb: &mut Fbb,
    tps: &BTreeSet<TopicPartition>,
) -> WIPOffset<Vector<'a, ForwardsUOffset<fb::TopicPartitions<'a>>>> {
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

fn read_tps(v: Option<TpsVector<'_>>) -> BTreeSet<TopicPartition> {
    v.into_iter()
        .flatten()
        .flat_map(|t| {
            let topic = t.topic().unwrap_or_default().to_string();
            t.partitions()
                .into_iter()
                .flatten()
                .map(move |p| (topic.clone(), p))
        })
        .collect()
}

/// The committed offsets of a response; "none" (-1) left out.
fn read_offsets(v: Option<OffsetsVector<'_>>) -> Vec<CommittedOffset> {
    let mut out = Vec::new();
    for t in v.into_iter().flatten() {
        let topic = t.topic().unwrap_or_default();
        for p in t.partitions().into_iter().flatten() {
            if let Ok(offset) = u64::try_from(p.offset()) {
                out.push(CommittedOffset {
                    topic: topic.to_string(),
                    partition: p.partition(),
                    offset,
                    metadata: p.metadata().unwrap_or_default().to_string(),
                });
            }
        }
    }
    out
}

/// One heartbeat: a join (`member_epoch` 0), a beat, or a leave (-1).
struct Beat<'a> {
    group: &'a str,
    member_id: &'a str,
    member_epoch: i32,
    /// Sent on a join only.
    topics: Option<&'a [String]>,
    /// Sent on every beat: the coordinator hands a partition on only once
    /// its previous owner stops listing it.
    owned: Option<&'a BTreeSet<TopicPartition>>,
    session_timeout_ms: u32,
    strategy: Option<&'static str>,
    metadata: Option<&'a [u8]>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct BeatAnswer {
    member_id: String,
    member_epoch: i32,
    heartbeat_interval_ms: u32,
    assignment: BTreeSet<TopicPartition>,
}

async fn heartbeat_on(conn: &Connection, b: &Beat<'_>) -> Result<BeatAnswer> {
    let f = conn
        .request(
            fb::RequestBody::GroupHeartbeatRequest,
            |fbb| {
                let group = fbb.create_string(b.group);
                let member_id = fbb.create_string(b.member_id);
                let topics = b.topics.map(|ts| {
                    let v: Vec<_> = ts.iter().map(|t| fbb.create_string(t)).collect();
                    fbb.create_vector(&v)
                });
                let owned = b.owned.map(|o| put_tps(fbb, o));
                let strategy = b.strategy.map(|s| fbb.create_string(s));
                let metadata = b.metadata.map(|m| fbb.create_vector(m));
                fb::GroupHeartbeatRequest::create(
                    fbb,
                    &fb::GroupHeartbeatRequestArgs {
                        group: Some(group),
                        member_id: Some(member_id),
                        member_epoch: b.member_epoch,
                        topics,
                        owned,
                        session_timeout_ms: b.session_timeout_ms,
                        strategy,
                        metadata,
                    },
                )
                .as_union_value()
            },
            &[],
        )
        .await?;
    let r = f.response();
    let h = r
        .body_as_group_heartbeat_response()
        .ok_or_else(|| Error::Protocol("expected a group heartbeat response".into()))?;
    Ok(BeatAnswer {
        member_id: h.member_id().unwrap_or_default().to_string(),
        member_epoch: h.member_epoch(),
        heartbeat_interval_ms: h.heartbeat_interval_ms(),
        assignment: read_tps(h.assignment()),
    })
}

async fn commit_on(
    conn: &Connection,
    group: &str,
    member_id: &str,
    member_epoch: i32,
    offsets: &[(TopicPartition, u64)],
) -> Result<()> {
    let mut by_topic: BTreeMap<&str, Vec<(u32, u64)>> = BTreeMap::new();
    for ((t, p), o) in offsets {
        by_topic.entry(t).or_default().push((*p, *o));
    }
    conn.request(
        fb::RequestBody::OffsetCommitRequest,
        |fbb| {
            let topics: Vec<_> = by_topic
                .iter()
                .map(|(t, ps)| {
                    let parts: Vec<_> = ps
                        .iter()
                        .map(|&(partition, offset)| {
                            fb::PartitionOffset::create(
                                fbb,
                                &fb::PartitionOffsetArgs {
                                    partition,
                                    offset: i64::try_from(offset).unwrap_or(i64::MAX),
                                    metadata: None,
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
            let topics = fbb.create_vector(&topics);
            let group = fbb.create_string(group);
            let member_id = fbb.create_string(member_id);
            fb::OffsetCommitRequest::create(
                fbb,
                &fb::OffsetCommitRequestArgs {
                    group: Some(group),
                    member_id: Some(member_id),
                    member_epoch,
                    topics: Some(topics),
                },
            )
            .as_union_value()
        },
        &[],
    )
    .await?;
    Ok(())
}

async fn offset_fetch_on(
    conn: &Connection,
    group: &str,
    topics: &[&str],
) -> Result<Vec<CommittedOffset>> {
    let f = conn
        .request(
            fb::RequestBody::OffsetFetchRequest,
            |fbb| {
                let names: Vec<_> = topics.iter().map(|t| fbb.create_string(t)).collect();
                let topics = fbb.create_vector(&names);
                let group = fbb.create_string(group);
                fb::OffsetFetchRequest::create(
                    fbb,
                    &fb::OffsetFetchRequestArgs {
                        group: Some(group),
                        topics: Some(topics),
                    },
                )
                .as_union_value()
            },
            &[],
        )
        .await?;
    let r = f.response();
    let o = r
        .body_as_offset_fetch_response()
        .ok_or_else(|| Error::Protocol("expected an offset fetch response".into()))?;
    Ok(read_offsets(o.topics()))
}

async fn list_on(conn: &Connection, partition: u32) -> Result<Vec<GroupListing>> {
    let f = conn
        .request(
            fb::RequestBody::ListGroupsRequest,
            |fbb| {
                fb::ListGroupsRequest::create(fbb, &fb::ListGroupsRequestArgs { partition })
                    .as_union_value()
            },
            &[],
        )
        .await?;
    let r = f.response();
    let l = r
        .body_as_list_groups_response()
        .ok_or_else(|| Error::Protocol("expected a group list".into()))?;
    Ok(l.groups()
        .into_iter()
        .flatten()
        .map(|g| GroupListing {
            group: g.group().unwrap_or_default().to_string(),
            state: g.state().unwrap_or_default().to_string(),
            members: g.members(),
        })
        .collect())
}

async fn describe_on(conn: &Connection, group: &str) -> Result<GroupDescription> {
    let f = conn
        .request(
            fb::RequestBody::DescribeGroupRequest,
            |fbb| {
                let group = fbb.create_string(group);
                fb::DescribeGroupRequest::create(
                    fbb,
                    &fb::DescribeGroupRequestArgs { group: Some(group) },
                )
                .as_union_value()
            },
            &[],
        )
        .await?;
    let r = f.response();
    let d = r
        .body_as_describe_group_response()
        .ok_or_else(|| Error::Protocol("expected a group description".into()))?;
    let members = d
        .members()
        .into_iter()
        .flatten()
        .map(|m| GroupMember {
            member_id: m.member_id().unwrap_or_default().to_string(),
            client_id: m.client_id().unwrap_or_default().to_string(),
            member_epoch: m.member_epoch(),
            topics: m
                .topics()
                .into_iter()
                .flatten()
                .map(str::to_string)
                .collect(),
            assignment: read_tps(m.assignment()).into_iter().collect(),
            owned: read_tps(m.owned()).into_iter().collect(),
            session_timeout_ms: m.session_timeout_ms(),
            metadata: m.metadata().map(|b| b.bytes().to_vec()).unwrap_or_default(),
        })
        .collect();
    Ok(GroupDescription {
        group: d.group().unwrap_or_default().to_string(),
        state: d.state().unwrap_or_default().to_string(),
        group_epoch: d.group_epoch(),
        strategy: d.strategy().unwrap_or_default().to_string(),
        members,
        offsets: read_offsets(d.offsets()),
    })
}

// ---- routing and admin ------------------------------------------------------

/// Admin group requests: retried through a failover for up to 30 s.
fn admin_policy() -> RetryPolicy {
    RetryPolicy {
        retries: u32::MAX,
        backoff: Duration::from_millis(50),
        backoff_max: Duration::from_secs(1),
        timeout: Duration::from_secs(30),
    }
}

fn is_fenced(e: &Error) -> bool {
    matches!(
        e.code(),
        Some(ErrorCode::UnknownMemberId | ErrorCode::FencedMemberEpoch)
    )
}

impl Client {
    /// Runs `f` at `group`'s coordinator, retrying as `policy` says while
    /// the coordinator moves, loads, or does not exist yet (then any broker
    /// takes the request and creates [`GROUPS_TOPIC`]).
    pub(crate) async fn with_coordinator<T, F, Fut>(
        &self,
        group: &str,
        policy: RetryPolicy,
        mut f: F,
    ) -> Result<T>
    where
        F: FnMut(Arc<Connection>) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut retry = Retrier::new(policy);
        loop {
            let e = match self.partition_count(GROUPS_TOPIC).await {
                Ok(n) => {
                    let p = coordinator_partition(group, n);
                    match self
                        .with_partition(GROUPS_TOPIC, p, policy, Duration::ZERO, &mut f)
                        .await
                    {
                        Ok(v) => return Ok(v),
                        Err(e) if e.is_unknown_placement() => {
                            self.invalidate_topic(GROUPS_TOPIC);
                            e
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(e) if e.code() == Some(ErrorCode::UnknownTopic) => {
                    let r = match self.any_connection().await {
                        Ok(conn) => self.within(conn.clone(), Duration::ZERO, f(conn)).await,
                        Err(e) => Err(e),
                    };
                    match r {
                        Ok(v) => return Ok(v),
                        Err(e) if e.is_retriable() => {
                            self.invalidate_topic(GROUPS_TOPIC);
                            e
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(e) if e.is_retriable() => e,
                Err(e) => return Err(e),
            };
            match retry.next_wait(false) {
                Some(wait) => {
                    tracing::debug!(group, error = %e, ?wait, "group coordinator not available; retrying");
                    tokio::time::sleep(wait).await;
                }
                None => return Err(e),
            }
        }
    }

    /// Every group of the cluster: one request to each partition leader of
    /// [`GROUPS_TOPIC`] (none before the first group was formed).
    pub async fn list_groups(&self) -> Result<Vec<GroupListing>> {
        let n = match self.topic(GROUPS_TOPIC).await {
            Ok(t) => t.partitions.len() as u32,
            Err(e) if e.code() == Some(ErrorCode::UnknownTopic) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for p in 0..n {
            let listed = self
                .with_partition(
                    GROUPS_TOPIC,
                    p,
                    admin_policy(),
                    Duration::ZERO,
                    |conn| async move { list_on(&conn, p).await },
                )
                .await?;
            out.extend(listed);
        }
        out.sort_by(|a, b| a.group.cmp(&b.group));
        Ok(out)
    }

    /// `group`'s members, their assignments and its committed offsets;
    /// `UnknownGroup` if it has neither members nor offsets.
    pub async fn describe_group(&self, group: &str) -> Result<GroupDescription> {
        self.with_coordinator(group, admin_policy(), |conn| async move {
            describe_on(&conn, group).await
        })
        .await
    }

    /// `group`'s committed offsets of `topics` (all if empty): the next
    /// offset to consume per partition that has one.
    pub async fn fetch_committed(
        &self,
        group: &str,
        topics: &[&str],
    ) -> Result<BTreeMap<TopicPartition, u64>> {
        let offsets = self
            .with_coordinator(group, admin_policy(), |conn| async move {
                offset_fetch_on(&conn, group, topics).await
            })
            .await?;
        Ok(offsets
            .into_iter()
            .map(|o| ((o.topic, o.partition), o.offset))
            .collect())
    }

    /// Commits `offsets` (the next offset to consume, per partition) for
    /// `group` from outside it: only while it has no members (else
    /// `GroupNotEmpty`). All or none; returns once the commit is on every
    /// in-sync replica of the coordinator's partition.
    pub async fn commit_offsets_standalone(
        &self,
        group: &str,
        offsets: &BTreeMap<TopicPartition, u64>,
    ) -> Result<()> {
        let offsets: Vec<(TopicPartition, u64)> =
            offsets.iter().map(|(tp, o)| (tp.clone(), *o)).collect();
        self.commit_as(group, "", -1, &offsets, admin_policy())
            .await
    }

    /// An offset commit by `member_id` at `member_epoch`.
    async fn commit_as(
        &self,
        group: &str,
        member_id: &str,
        member_epoch: i32,
        offsets: &[(TopicPartition, u64)],
        policy: RetryPolicy,
    ) -> Result<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        self.with_coordinator(group, policy, |conn| async move {
            commit_on(&conn, group, member_id, member_epoch, offsets).await
        })
        .await
    }
}

// ---- the member --------------------------------------------------------------

/// Membership as the heartbeat task and `poll` share it.
#[derive(Default)]
struct Shared {
    /// Empty: not a member (joining, or lost and waiting to rejoin).
    member_id: String,
    member_epoch: i32,
    /// What the coordinator last said this member may consume.
    assignment: BTreeSet<TopicPartition>,
    /// What the consumer reads now (set by `poll`), reported as owned.
    owned: BTreeSet<TopicPartition>,
    /// Membership lost while partitions were owned: `poll` drops them
    /// (without committing) before the heartbeat task joins again.
    lost: bool,
    interval: Duration,
    /// An error retries cannot cure (the heartbeat task has stopped).
    fatal: Option<Error>,
    closing: bool,
}

struct Membership {
    state: Mutex<Shared>,
    /// To the heartbeat task: beat now.
    beat: Notify,
    /// To `poll`: the assignment or the membership changed.
    changed: Notify,
}

impl Membership {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a heartbeat's answer.
    fn joined(&self, a: BeatAnswer, fallback_interval: Duration) {
        let mut s = self.lock();
        if s.closing {
            return;
        }
        s.member_id = a.member_id;
        s.member_epoch = a.member_epoch;
        s.interval = if a.heartbeat_interval_ms == 0 {
            fallback_interval
        } else {
            Duration::from_millis(u64::from(a.heartbeat_interval_ms))
        };
        if s.assignment != a.assignment {
            s.assignment = a.assignment;
            self.changed.notify_one();
        }
    }

    /// The membership is gone: forget it; rejoin at once if nothing is
    /// owned, else once `poll` dropped what was.
    fn lose(&self) {
        let mut s = self.lock();
        s.member_id.clear();
        s.member_epoch = 0;
        s.assignment.clear();
        s.lost = !s.owned.is_empty();
        self.changed.notify_one();
    }
}

/// What the heartbeat task needs besides the shared state.
struct Member {
    client: Client,
    group: String,
    topics: Vec<String>,
    session_timeout: Duration,
    heartbeat_interval: Duration,
    strategy: AssignmentStrategy,
    metadata: Vec<u8>,
}

impl Member {
    fn session_timeout_ms(&self) -> u32 {
        u32::try_from(self.session_timeout.as_millis()).unwrap_or(u32::MAX)
    }

    /// How long without an answered heartbeat (counted from its send)
    /// before this member counts its partitions as lost: nine tenths of
    /// the session, so it stops before the coordinator moves them.
    fn lost_after(&self) -> Duration {
        self.session_timeout * 9 / 10
    }

    /// Heartbeats are retried within the session timeout; past it the
    /// membership is presumed gone anyway.
    fn policy(&self) -> RetryPolicy {
        RetryPolicy {
            retries: u32::MAX,
            backoff: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            timeout: self.session_timeout,
        }
    }

    /// Joins under a member id of our own, the same for every retry of
    /// this join, so a retry whose first attempt reached the coordinator
    /// (its answer lost) finds that member instead of adding a second one
    /// that would hold partitions until its session ran out.
    async fn join(&self, policy: RetryPolicy) -> Result<BeatAnswer> {
        let member_id = format!(
            "{}-{:016x}{:016x}",
            self.group.chars().take(64).collect::<String>(),
            rand::random::<u64>(),
            rand::random::<u64>()
        );
        let beat = Beat {
            group: &self.group,
            member_id: &member_id,
            member_epoch: 0,
            topics: Some(&self.topics),
            owned: None,
            session_timeout_ms: self.session_timeout_ms(),
            strategy: Some(self.strategy.name()),
            metadata: (!self.metadata.is_empty()).then_some(&self.metadata[..]),
        };
        let beat = &beat;
        self.client
            .with_coordinator(&self.group, policy, |conn| async move {
                heartbeat_on(&conn, beat).await
            })
            .await
    }

    async fn beat(
        &self,
        member_id: &str,
        epoch: i32,
        owned: &BTreeSet<TopicPartition>,
    ) -> Result<BeatAnswer> {
        let beat = Beat {
            group: &self.group,
            member_id,
            member_epoch: epoch,
            topics: None,
            owned: Some(owned),
            session_timeout_ms: self.session_timeout_ms(),
            strategy: None,
            metadata: None,
        };
        let beat = &beat;
        self.client
            .with_coordinator(&self.group, self.policy(), |conn| async move {
                heartbeat_on(&conn, beat).await
            })
            .await
    }

    async fn leave(&self, member_id: &str) -> Result<()> {
        let beat = Beat {
            group: &self.group,
            member_id,
            member_epoch: -1,
            topics: None,
            owned: None,
            session_timeout_ms: self.session_timeout_ms(),
            strategy: None,
            metadata: None,
        };
        let beat = &beat;
        let policy = RetryPolicy {
            timeout: self.session_timeout.min(Duration::from_secs(10)),
            ..self.policy()
        };
        match self
            .client
            .with_coordinator(&self.group, policy, |conn| async move {
                heartbeat_on(&conn, beat).await
            })
            .await
        {
            Ok(_) => Ok(()),
            // Already out of the group.
            Err(e) if is_fenced(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Beats every interval (or when woken), joins again after a loss, and
    /// declares the membership lost when the coordinator is out of reach
    /// for the session timeout.
    async fn run(self, m: Arc<Membership>) {
        let mut last_ok = Instant::now();
        loop {
            let interval = m.lock().interval;
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = m.beat.notified() => {}
            }
            let (member_id, epoch, owned) = {
                let s = m.lock();
                if s.closing {
                    return;
                }
                if s.lost {
                    continue;
                }
                (s.member_id.clone(), s.member_epoch, s.owned.clone())
            };
            let joining = member_id.is_empty();
            let attempt = async {
                if joining {
                    self.join(self.policy()).await
                } else {
                    self.beat(&member_id, epoch, &owned).await
                }
            };
            // The coordinator counts the session from when it handled the
            // last heartbeat, which is after it was sent: counting here
            // from the send, and giving up a little early, this member
            // stops reading before the coordinator hands its partitions
            // on.
            let sent = Instant::now();
            let budget = if joining {
                self.session_timeout
            } else {
                self.lost_after()
                    .saturating_sub(last_ok.elapsed())
                    .max(Duration::from_millis(50))
            };
            let r = match tokio::time::timeout(budget, attempt).await {
                Ok(r) => r,
                Err(_) => Err(Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no heartbeat answer within the session timeout",
                ))),
            };
            match r {
                Ok(a) => {
                    last_ok = sent;
                    if joining {
                        tracing::info!(group = %self.group, member = %a.member_id, "joined the group");
                    }
                    m.joined(a, self.heartbeat_interval);
                }
                Err(e) if is_fenced(&e) => {
                    tracing::warn!(group = %self.group, error = %e, "group membership lost; joining again");
                    m.lose();
                }
                Err(e) if !e.is_retriable() && !e.is_unknown_placement() => {
                    tracing::error!(group = %self.group, error = %e, "heartbeat refused");
                    m.lock().fatal = Some(e);
                    m.changed.notify_one();
                    return;
                }
                Err(e) => {
                    tracing::warn!(group = %self.group, error = %e, "heartbeat failed");
                    if !joining && last_ok.elapsed() >= self.lost_after() {
                        tracing::warn!(group = %self.group, "no heartbeat answered for the session timeout; partitions count as lost");
                        m.lose();
                    }
                }
            }
        }
    }
}

/// A commit running in the background: the offsets it commits.
type InFlight = tokio::task::JoinHandle<Result<Vec<(TopicPartition, u64)>>>;

/// A member of a consumer group: reads the partitions the group's
/// coordinator assigns it (of the subscribed topics) and commits its
/// positions. The group counterpart of [`Consumer::subscribe`], which
/// subscribes one partition to pushes and has nothing to do with groups.
///
/// Heartbeats run in a background tokio task, so the time an application
/// spends between polls does not cost it its membership (on a
/// current-thread runtime the task runs only while the application
/// awaits: do not block it for longer than the session timeout);
/// assignment changes are applied within [`poll`](Self::poll). Delivery is at least
/// once: records returned after the last commit are read again by
/// whoever reads the partition next.
///
/// ```no_run
/// # async fn demo() -> shoal_client::Result<()> {
/// use shoal_client::{Client, GroupConfig, GroupConsumer};
/// let client = Client::connect("127.0.0.1:9400").await?;
/// let mut c = GroupConsumer::subscribe(client, "billing", &["orders"], GroupConfig::default()).await?;
/// for _ in 0..10 {
///     for r in c.poll().await? {
///         println!("{}-{} @{}", r.topic, r.partition, r.offset);
///     }
/// }
/// c.close().await?;
/// # Ok(()) }
/// ```
pub struct GroupConsumer {
    client: Client,
    group: String,
    config: GroupConfig,
    consumer: Consumer,
    membership: Arc<Membership>,
    heartbeats: tokio::task::JoinHandle<()>,
    /// What `consumer` reads.
    owned: BTreeSet<TopicPartition>,
    /// The last offset known committed per owned partition.
    committed: BTreeMap<TopicPartition, u64>,
    in_flight: Option<InFlight>,
    /// The error of the last background commit, for the next
    /// [`Self::commit_async`].
    async_error: Option<Error>,
    last_auto_commit: Instant,
    listener: Option<Box<dyn FnMut(RebalanceEvent) + Send>>,
    closed: bool,
}

impl GroupConsumer {
    /// Joins `group` subscribed to `topics` and starts heartbeating. The
    /// first assignment arrives with the join or a later heartbeat;
    /// [`Self::poll`] starts reading it.
    pub async fn subscribe(
        client: Client,
        group: &str,
        topics: &[&str],
        config: GroupConfig,
    ) -> Result<GroupConsumer> {
        if topics.is_empty() {
            return Err(Error::Invalid("subscribe to at least one topic".into()));
        }
        if config.metadata.len() > MEMBER_METADATA_MAX {
            return Err(Error::Invalid(format!(
                "member metadata of {} bytes exceeds {MEMBER_METADATA_MAX}",
                config.metadata.len()
            )));
        }
        let member = Member {
            client: client.clone(),
            group: group.to_string(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            session_timeout: config.session_timeout,
            heartbeat_interval: config.heartbeat_interval,
            strategy: config.strategy,
            metadata: config.metadata.clone(),
        };
        let first = member
            .join(RetryPolicy {
                timeout: config.fetch.unavailable_max,
                ..member.policy()
            })
            .await?;
        tracing::info!(group, member = %first.member_id, "joined the group");
        let membership = Arc::new(Membership {
            state: Mutex::new(Shared {
                interval: config.heartbeat_interval,
                ..Shared::default()
            }),
            beat: Notify::new(),
            changed: Notify::new(),
        });
        membership.joined(first, config.heartbeat_interval);
        let heartbeats = tokio::spawn(member.run(membership.clone()));
        Ok(GroupConsumer {
            consumer: Consumer::new(client.clone(), config.fetch.clone()),
            client,
            group: group.to_string(),
            config,
            membership,
            heartbeats,
            owned: BTreeSet::new(),
            committed: BTreeMap::new(),
            in_flight: None,
            async_error: None,
            last_auto_commit: Instant::now(),
            listener: None,
            closed: false,
        })
    }

    /// Calls `f` with every change of what this consumer reads, from
    /// within `poll` or `close`. Under manual commit, commit what was
    /// processed before each `poll`: a partition revoked during it is not
    /// committed for you.
    pub fn set_rebalance_listener(&mut self, f: impl FnMut(RebalanceEvent) + Send + 'static) {
        self.listener = Some(Box::new(f));
    }

    /// The group's name.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The member id and epoch the coordinator gave; `None` while joining.
    pub fn member(&self) -> Option<(String, i32)> {
        let s = self.membership.lock();
        (!s.member_id.is_empty()).then(|| (s.member_id.clone(), s.member_epoch))
    }

    /// The partitions this consumer reads now.
    pub fn assignment(&self) -> Vec<TopicPartition> {
        self.owned.iter().cloned().collect()
    }

    /// The next offset per partition read now: what a commit would store.
    pub fn positions(&self) -> BTreeMap<TopicPartition, u64> {
        self.consumer
            .positions()
            .into_iter()
            .map(|(t, p, o)| ((t, p), o))
            .collect()
    }

    /// Reads `partition` of `topic` from `offset` on (it must be read now).
    pub fn seek(&mut self, topic: &str, partition: u32, offset: u64) -> Result<()> {
        if self.consumer.seek(topic, partition, offset) {
            Ok(())
        } else {
            Err(Error::Invalid(format!(
                "{topic}-{partition} is not assigned to this consumer"
            )))
        }
    }

    fn check_open(&mut self) -> Result<()> {
        if self.closed {
            return Err(Error::Closed);
        }
        match self.membership.lock().fatal.take() {
            Some(e) => {
                self.closed = true;
                Err(e)
            }
            None => Ok(()),
        }
    }

    fn emit(&mut self, e: RebalanceEvent) {
        tracing::info!(group = %self.group, event = ?e, "rebalance");
        if let Some(f) = self.listener.as_mut() {
            f(e);
        }
    }

    /// Applies what the coordinator said since the last poll, then returns
    /// the next records of the partitions read now (as
    /// [`Consumer::poll`]: empty after `fetch.max_wait` if none came).
    pub async fn poll(&mut self) -> Result<Vec<ConsumedRecord>> {
        self.check_open()?;
        self.reap_commit();
        self.rebalance().await?;
        if self.config.auto_commit
            && self.last_auto_commit.elapsed() >= self.config.auto_commit_interval
        {
            self.last_auto_commit = Instant::now();
            self.start_commit();
        }
        if self.consumer.is_idle() {
            let wait = self.consumer.config().max_wait;
            let _ = tokio::time::timeout(wait, self.membership.changed.notified()).await;
            return Ok(Vec::new());
        }
        self.consumer.poll().await
    }

    /// Brings what the consumer reads in line with the assignment.
    async fn rebalance(&mut self) -> Result<()> {
        let (lost, assignment) = {
            let s = self.membership.lock();
            (s.lost, s.assignment.clone())
        };
        if lost {
            let gone: Vec<TopicPartition> = std::mem::take(&mut self.owned).into_iter().collect();
            for (t, p) in &gone {
                self.consumer.unassign(t, *p);
            }
            self.committed.clear();
            {
                let mut s = self.membership.lock();
                s.owned.clear();
                s.lost = false;
            }
            self.membership.beat.notify_one();
            if !gone.is_empty() {
                self.emit(RebalanceEvent::Lost(gone));
            }
            return Ok(());
        }
        let diff = diff_assignment(&self.owned, &assignment);
        if !diff.revoked.is_empty() {
            // A background commit still retrying must not land after the
            // commit of what is given up (it would move offsets back).
            self.settle_commit().await;
            if self.config.auto_commit {
                let positions = self.positions();
                let offsets: Vec<(TopicPartition, u64)> = diff
                    .revoked
                    .iter()
                    .filter_map(|tp| positions.get(tp).map(|o| (tp.clone(), *o)))
                    .filter(|(tp, o)| self.committed.get(tp) != Some(o))
                    .collect();
                if let Err(e) = self.commit_now(offsets).await {
                    tracing::warn!(group = %self.group, error = %e, "could not commit partitions given up");
                }
            }
            for tp in &diff.revoked {
                self.consumer.unassign(&tp.0, tp.1);
                self.owned.remove(tp);
                self.committed.remove(tp);
            }
            self.membership.lock().owned = self.owned.clone();
            self.membership.beat.notify_one();
            self.emit(RebalanceEvent::Revoked(diff.revoked));
        }
        if !diff.added.is_empty() {
            let topics: BTreeSet<&str> = diff.added.iter().map(|(t, _)| t.as_str()).collect();
            let topics: Vec<&str> = topics.into_iter().collect();
            let committed = self.client.fetch_committed(&self.group, &topics).await?;
            for tp in &diff.added {
                let (t, p) = (tp.0.as_str(), tp.1);
                let (start, end) = self.client.partition_offsets(t, p).await?;
                let c = committed.get(tp).copied();
                let at = start_position(c, start, end, self.config.offset_reset);
                self.consumer.assign(t, p, StartAt::Offset(at)).await?;
                tracing::debug!(group = %self.group, topic = t, partition = p, committed = ?c, at, "reading an assigned partition");
                self.owned.insert(tp.clone());
                if c == Some(at) {
                    self.committed.insert(tp.clone(), at);
                }
                self.membership.lock().owned = self.owned.clone();
            }
            self.emit(RebalanceEvent::Assigned(diff.added));
        }
        Ok(())
    }

    /// Positions not yet known committed.
    fn uncommitted(&self) -> Vec<(TopicPartition, u64)> {
        self.positions()
            .into_iter()
            .filter(|(tp, o)| self.committed.get(tp) != Some(o))
            .collect()
    }

    /// The member id and epoch commits carry, or why there are none.
    fn membership_for_commit(&self) -> Result<(String, i32)> {
        self.member().ok_or_else(|| Error::Broker {
            code: ErrorCode::UnknownMemberId,
            message: format!("not a member of group {:?} right now (joining)", self.group),
        })
    }

    fn commit_policy(&self) -> RetryPolicy {
        RetryPolicy {
            retries: u32::MAX,
            backoff: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            timeout: self.config.session_timeout,
        }
    }

    async fn commit_now(&mut self, offsets: Vec<(TopicPartition, u64)>) -> Result<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        let (id, epoch) = self.membership_for_commit()?;
        self.client
            .commit_as(&self.group, &id, epoch, &offsets, self.commit_policy())
            .await?;
        for (tp, o) in offsets {
            if self.owned.contains(&tp) {
                self.committed.insert(tp, o);
            }
        }
        Ok(())
    }

    /// Takes the result of a finished background commit.
    fn reap_commit(&mut self) {
        let Some(h) = self.in_flight.take_if(|h| h.is_finished()) else {
            return;
        };
        match h.now_or_never() {
            Some(r) => self.settled(r),
            None => tracing::error!("a finished commit task had no result"),
        }
    }

    fn settled(
        &mut self,
        r: std::result::Result<Result<Vec<(TopicPartition, u64)>>, tokio::task::JoinError>,
    ) {
        match r {
            Ok(Ok(done)) => {
                for (tp, o) in done {
                    if self.owned.contains(&tp) {
                        let c = self.committed.entry(tp).or_insert(o);
                        *c = (*c).max(o);
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(group = %self.group, error = %e, "background commit failed");
                self.async_error = Some(e);
            }
            Err(e) => tracing::error!(group = %self.group, error = %e, "commit task failed"),
        }
    }

    /// Waits for a background commit, so none lands after a later one.
    async fn settle_commit(&mut self) {
        if let Some(h) = self.in_flight.take() {
            let r = h.await;
            self.settled(r);
        }
    }

    /// Starts committing the current positions in the background unless a
    /// commit is still running (one at a time, so they land in order).
    fn start_commit(&mut self) {
        if self.in_flight.is_some() {
            return;
        }
        let offsets = self.uncommitted();
        if offsets.is_empty() {
            return;
        }
        let Some((id, epoch)) = self.member() else {
            return;
        };
        let (client, group, policy) = (
            self.client.clone(),
            self.group.clone(),
            self.commit_policy(),
        );
        self.in_flight = Some(tokio::spawn(async move {
            client
                .commit_as(&group, &id, epoch, &offsets, policy)
                .await
                .map(|()| offsets)
        }));
    }

    /// Commits the positions of every record returned so far and waits
    /// until the coordinator has them on every in-sync replica.
    pub async fn commit(&mut self) -> Result<()> {
        self.check_open()?;
        self.settle_commit().await;
        let offsets = self.uncommitted();
        let r = self.commit_now(offsets).await;
        if r.is_ok() {
            self.async_error = None;
        }
        r
    }

    /// Starts committing the positions of every record returned so far
    /// and returns at once; at most one such commit runs at a time (a call
    /// meanwhile does nothing: the next one covers it). Returns the error
    /// of the previous background commit, if it failed (it was logged).
    pub fn commit_async(&mut self) -> Result<()> {
        self.check_open()?;
        self.reap_commit();
        self.start_commit();
        match self.async_error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Commits `offsets` (the next offset to consume, per partition; each
    /// must be read by this consumer now) and waits for them to be stored.
    pub async fn commit_offsets(&mut self, offsets: &BTreeMap<TopicPartition, u64>) -> Result<()> {
        self.check_open()?;
        self.settle_commit().await;
        if let Some((tp, _)) = offsets.iter().find(|(tp, _)| !self.owned.contains(*tp)) {
            return Err(Error::Invalid(format!(
                "{}-{} is not assigned to this consumer",
                tp.0, tp.1
            )));
        }
        self.commit_now(offsets.iter().map(|(tp, o)| (tp.clone(), *o)).collect())
            .await
    }

    /// Commits the positions (under auto-commit), leaves the group, and
    /// reports the partitions read as revoked. The commit's error, if any,
    /// is returned after leaving.
    pub async fn close(mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        self.settle_commit().await;
        let committed = if self.config.auto_commit && self.member().is_some() {
            let offsets = self.uncommitted();
            self.commit_now(offsets).await
        } else {
            Ok(())
        };
        self.closed = true;
        let member_id = {
            let mut s = self.membership.lock();
            s.closing = true;
            std::mem::take(&mut s.member_id)
        };
        self.heartbeats.abort();
        let member = Member {
            client: self.client.clone(),
            group: self.group.clone(),
            topics: Vec::new(),
            session_timeout: self.config.session_timeout,
            heartbeat_interval: self.config.heartbeat_interval,
            strategy: self.config.strategy,
            metadata: Vec::new(),
        };
        if !member_id.is_empty() {
            match member.leave(&member_id).await {
                Ok(()) => {
                    tracing::info!(group = %self.group, member = %member_id, "left the group")
                }
                Err(e) => {
                    tracing::warn!(group = %self.group, error = %e, "could not leave the group; the session will expire")
                }
            }
        }
        let gone: Vec<TopicPartition> = std::mem::take(&mut self.owned).into_iter().collect();
        if !gone.is_empty() {
            self.emit(RebalanceEvent::Revoked(gone));
        }
        committed
    }
}

impl Drop for GroupConsumer {
    /// Without [`GroupConsumer::close`], the member stays in the group
    /// (its partitions unread) until its session times out.
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tps(v: &[(&str, u32)]) -> BTreeSet<TopicPartition> {
        v.iter().map(|(t, p)| (t.to_string(), *p)).collect()
    }

    /// Applications move consumers and their polls between tasks.
    #[test]
    fn a_group_consumer_and_its_futures_are_send() {
        fn is_send<T: Send>(_: &T) {}
        #[allow(dead_code)]
        async fn check(mut c: GroupConsumer) {
            is_send(&c);
            is_send(&c.poll());
            is_send(&c.commit());
            is_send(&c.commit_offsets(&BTreeMap::new()));
            is_send(&c.close());
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let c = GroupConfig::default();
        assert_eq!(c.session_timeout, Duration::from_secs(10));
        assert_eq!(c.heartbeat_interval, Duration::from_secs(3));
        assert_eq!(c.strategy, AssignmentStrategy::Sticky);
        assert_eq!(c.offset_reset, OffsetReset::Latest);
        assert!(c.auto_commit);
        assert_eq!(c.auto_commit_interval, Duration::from_secs(5));
        assert!(c.metadata.is_empty());
        assert_eq!(c.fetch.max_wait, ConsumerConfig::default().max_wait);
    }

    #[test]
    fn strategies_have_the_broker_s_names() {
        assert_eq!(AssignmentStrategy::Sticky.name(), "sticky");
        assert_eq!(AssignmentStrategy::Range.name(), "range");
        assert_eq!(AssignmentStrategy::RoundRobin.name(), "roundrobin");
    }

    /// A committed offset inside the log wins; none, or one the log no
    /// longer (or not yet) holds, falls back to the reset policy.
    #[test]
    fn start_position_prefers_a_committed_offset_in_the_log() {
        use OffsetReset::*;
        assert_eq!(start_position(Some(7), 5, 10, Latest), 7);
        assert_eq!(start_position(Some(5), 5, 10, Latest), 5);
        assert_eq!(start_position(Some(10), 5, 10, Earliest), 10);
        assert_eq!(start_position(None, 5, 10, Earliest), 5);
        assert_eq!(start_position(None, 5, 10, Latest), 10);
        assert_eq!(start_position(Some(2), 5, 10, Earliest), 5);
        assert_eq!(start_position(Some(2), 5, 10, Latest), 10);
        assert_eq!(start_position(Some(11), 5, 10, Earliest), 5);
    }

    #[test]
    fn assignment_diff_names_what_was_added_and_revoked() {
        let owned = tps(&[("a", 0), ("a", 1), ("b", 0)]);
        let d = diff_assignment(&owned, &tps(&[("a", 1), ("b", 0), ("b", 1)]));
        assert_eq!(d.added, vec![("b".to_string(), 1)]);
        assert_eq!(d.revoked, vec![("a".to_string(), 0)]);
        assert_eq!(diff_assignment(&owned, &owned), AssignmentDiff::default());
        let d = diff_assignment(&BTreeSet::new(), &owned);
        assert_eq!(d.added.len(), 3);
        assert!(d.revoked.is_empty());
        let d = diff_assignment(&owned, &BTreeSet::new());
        assert_eq!(d.revoked.len(), 3);
    }

    /// Partitions reach the wire grouped by topic and come back the same.
    #[test]
    fn topic_partitions_round_trip() {
        let set = tps(&[("b", 2), ("a", 0), ("b", 0)]);
        let mut fbb = FlatBufferBuilder::new();
        let v = put_tps(&mut fbb, &set);
        let group = fbb.create_string("g");
        let r = fb::GroupHeartbeatResponse::create(
            &mut fbb,
            &fb::GroupHeartbeatResponseArgs {
                member_id: Some(group),
                member_epoch: 3,
                heartbeat_interval_ms: 100,
                assignment: Some(v),
            },
        );
        fbb.finish(r, None);
        let h =
            flatbuffers::root::<fb::GroupHeartbeatResponse>(fbb.finished_data()).expect("valid");
        assert_eq!(h.assignment().map(|a| a.len()), Some(2));
        assert_eq!(read_tps(h.assignment()), set);
    }

    /// A lost membership rejoins at once when nothing was owned, else
    /// waits for `poll` to drop what was.
    #[test]
    fn a_loss_waits_for_poll_only_when_something_was_owned() {
        let m = Membership {
            state: Mutex::new(Shared::default()),
            beat: Notify::new(),
            changed: Notify::new(),
        };
        m.joined(
            BeatAnswer {
                member_id: "m".into(),
                member_epoch: 2,
                heartbeat_interval_ms: 0,
                assignment: tps(&[("a", 0)]),
            },
            Duration::from_secs(3),
        );
        assert_eq!(m.lock().interval, Duration::from_secs(3));
        m.lose();
        assert!(!m.lock().lost);
        assert!(m.lock().member_id.is_empty());
        m.lock().owned = tps(&[("a", 0)]);
        m.lose();
        let s = m.lock();
        assert!(s.lost);
        assert!(s.assignment.is_empty());
        assert_eq!(s.member_epoch, 0);
    }
}
