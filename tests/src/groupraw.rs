//! Group requests over the raw protocol, routed to the group's
//! coordinator (retrying while it loads or moves), for tests of the
//! coordinator itself.

use crate::meta::{self, try_call};
use crate::raw;
use shoal_wire::fb;
use shoal_wire::group::{coordinator_partition, GROUPS_TOPIC};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

pub type Tps = BTreeSet<(String, u32)>;

pub const COORDINATOR_LOADING: u16 = 43;
pub const NOT_LEADER: u16 = 36;
pub const LEADER_NOT_AVAILABLE: u16 = 37;

/// The shard port that coordinates `group` on the broker at `port`.
pub fn coordinator_port(port: u16, group: &str) -> Option<u16> {
    let m = meta::try_metadata(port)?;
    let parts = m.topics.iter().find(|t| t.0 == GROUPS_TOPIC)?.1.clone();
    let p = coordinator_partition(group, parts.len() as u32);
    let part = &parts[p as usize];
    let leader = if m.cluster.is_empty() {
        m.brokers[0].0
    } else {
        part.leader
    };
    Some(m.shard_port(leader, part.shard))
}

/// Sends a group request to `group`'s coordinator, retrying while it loads
/// or moves; returns (error code, message, response header).
pub fn group_call(port: u16, group: &str, frame: impl Fn() -> Vec<u8>) -> (u16, String, Vec<u8>) {
    let mut last = (0, String::new(), Vec::new());
    for _ in 0..200 {
        let to = coordinator_port(port, group).unwrap_or(port);
        let Some(h) = try_call(to, frame()) else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let r = flatbuffers::root::<fb::Response>(&h).expect("response");
        last = (
            r.error_code(),
            r.error_message().unwrap_or_default().to_string(),
            h.clone(),
        );
        if ![COORDINATOR_LOADING, NOT_LEADER, LEADER_NOT_AVAILABLE].contains(&r.error_code()) {
            return last;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no coordinator for {group}: {} {}", last.0, last.1);
}

pub struct Beat {
    pub member_id: String,
    pub epoch: i32,
    pub assignment: Tps,
}

#[allow(clippy::too_many_arguments)]
pub fn heartbeat_frame(
    group: &str,
    member_id: &str,
    epoch: i32,
    topics: Option<&[&str]>,
    owned: Option<&Tps>,
    session_ms: u32,
    metadata: Option<&[u8]>,
) -> Vec<u8> {
    raw::request(1, fb::RequestBody::GroupHeartbeatRequest, |fbb| {
        let g = fbb.create_string(group);
        let m = fbb.create_string(member_id);
        let topics = topics.map(|ts| {
            let v: Vec<_> = ts.iter().map(|t| fbb.create_string(t)).collect();
            fbb.create_vector(&v)
        });
        let owned = owned.map(|o| {
            let mut by: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
            for (t, p) in o {
                by.entry(t).or_default().push(*p);
            }
            let v: Vec<_> = by
                .into_iter()
                .map(|(t, ps)| {
                    let t = fbb.create_string(t);
                    let ps = fbb.create_vector(&ps);
                    fb::TopicPartitions::create(
                        fbb,
                        &fb::TopicPartitionsArgs {
                            topic: Some(t),
                            partitions: Some(ps),
                        },
                    )
                })
                .collect();
            fbb.create_vector(&v)
        });
        let metadata = metadata.map(|m| fbb.create_vector(m));
        fb::GroupHeartbeatRequest::create(
            fbb,
            &fb::GroupHeartbeatRequestArgs {
                group: Some(g),
                member_id: Some(m),
                member_epoch: epoch,
                topics,
                owned,
                session_timeout_ms: session_ms,
                strategy: None,
                metadata,
            },
        )
        .as_union_value()
    })
}

pub fn beat(port: u16, group: &str, frame: impl Fn() -> Vec<u8>) -> Result<Beat, (u16, String)> {
    let (code, msg, h) = group_call(port, group, frame);
    if code != 0 {
        return Err((code, msg));
    }
    let r = flatbuffers::root::<fb::Response>(&h).expect("response");
    let b = r
        .body_as_group_heartbeat_response()
        .expect("heartbeat body");
    let mut assignment = Tps::new();
    for t in b.assignment().into_iter().flatten() {
        for p in t.partitions().into_iter().flatten() {
            assignment.insert((t.topic().unwrap_or_default().to_string(), p));
        }
    }
    Ok(Beat {
        member_id: b.member_id().unwrap_or_default().to_string(),
        epoch: b.member_epoch(),
        assignment,
    })
}

pub fn join(port: u16, group: &str, topic: &str, session_ms: u32) -> Beat {
    beat(port, group, || {
        heartbeat_frame(group, "", 0, Some(&[topic]), None, session_ms, None)
    })
    .expect("join")
}

pub fn again(port: u16, group: &str, b: &Beat, owned: &Tps) -> Result<Beat, (u16, String)> {
    beat(port, group, || {
        heartbeat_frame(group, &b.member_id, b.epoch, None, Some(owned), 0, None)
    })
}

pub fn commit_frame(
    group: &str,
    member: &str,
    epoch: i32,
    offsets: &[(&str, u32, i64)],
    meta: &str,
) -> Vec<u8> {
    raw::request(1, fb::RequestBody::OffsetCommitRequest, |fbb| {
        let g = fbb.create_string(group);
        let m = fbb.create_string(member);
        let mut by: BTreeMap<&str, Vec<(u32, i64)>> = BTreeMap::new();
        for (t, p, o) in offsets {
            by.entry(t).or_default().push((*p, *o));
        }
        let topics: Vec<_> = by
            .into_iter()
            .map(|(t, ps)| {
                let parts: Vec<_> = ps
                    .into_iter()
                    .map(|(p, o)| {
                        let md = fbb.create_string(meta);
                        fb::PartitionOffset::create(
                            fbb,
                            &fb::PartitionOffsetArgs {
                                partition: p,
                                offset: o,
                                metadata: Some(md),
                            },
                        )
                    })
                    .collect();
                let t = fbb.create_string(t);
                let parts = fbb.create_vector(&parts);
                fb::TopicOffsets::create(
                    fbb,
                    &fb::TopicOffsetsArgs {
                        topic: Some(t),
                        partitions: Some(parts),
                    },
                )
            })
            .collect();
        let topics = fbb.create_vector(&topics);
        fb::OffsetCommitRequest::create(
            fbb,
            &fb::OffsetCommitRequestArgs {
                group: Some(g),
                member_id: Some(m),
                member_epoch: epoch,
                topics: Some(topics),
            },
        )
        .as_union_value()
    })
}

pub fn commit(
    port: u16,
    group: &str,
    member: &str,
    epoch: i32,
    offsets: &[(&str, u32, i64)],
) -> (u16, String) {
    let (c, m, _) = group_call(port, group, || {
        commit_frame(group, member, epoch, offsets, "")
    });
    (c, m)
}

pub fn fetch_offsets(port: u16, group: &str) -> BTreeMap<(String, u32), i64> {
    let (code, msg, h) = group_call(port, group, || {
        raw::request(1, fb::RequestBody::OffsetFetchRequest, |fbb| {
            let g = fbb.create_string(group);
            fb::OffsetFetchRequest::create(
                fbb,
                &fb::OffsetFetchRequestArgs {
                    group: Some(g),
                    topics: None,
                },
            )
            .as_union_value()
        })
    });
    assert_eq!(code, 0, "offset fetch: {msg}");
    let r = flatbuffers::root::<fb::Response>(&h).expect("response");
    let b = r
        .body_as_offset_fetch_response()
        .expect("offset fetch body");
    let mut out = BTreeMap::new();
    for t in b.topics().into_iter().flatten() {
        for p in t.partitions().into_iter().flatten() {
            out.insert(
                (t.topic().unwrap_or_default().to_string(), p.partition()),
                p.offset(),
            );
        }
    }
    out
}

pub fn describe(port: u16, group: &str) -> (u16, String, Option<(String, usize)>) {
    let (code, msg, h) = group_call(port, group, || {
        raw::request(1, fb::RequestBody::DescribeGroupRequest, |fbb| {
            let g = fbb.create_string(group);
            fb::DescribeGroupRequest::create(fbb, &fb::DescribeGroupRequestArgs { group: Some(g) })
                .as_union_value()
        })
    });
    if code != 0 {
        return (code, msg, None);
    }
    let r = flatbuffers::root::<fb::Response>(&h).expect("response");
    let d = r.body_as_describe_group_response().expect("describe body");
    let members = d.members().map_or(0, |m| m.len());
    (
        code,
        msg,
        Some((d.state().unwrap_or_default().to_string(), members)),
    )
}

pub fn create(port: u16, name: &str, partitions: u32) {
    let (code, msg) = meta::create_topic(port, name, partitions, 1);
    assert_eq!(code, 0, "create {name}: {msg}");
}

/// Partitions of `__shoal_groups` with their log start offsets.
pub fn groups_log_starts(port: u16) -> Vec<u64> {
    let h = meta::call(
        port,
        raw::request(1, fb::RequestBody::DescribeTopicRequest, |fbb| {
            let n = fbb.create_string(GROUPS_TOPIC);
            fb::DescribeTopicRequest::create(fbb, &fb::DescribeTopicRequestArgs { name: Some(n) })
                .as_union_value()
        }),
    );
    let r = flatbuffers::root::<fb::Response>(&h).expect("response");
    // Not there before the first group request.
    let Some(t) = r.body_as_describe_topic_response().and_then(|d| d.topic()) else {
        return vec![0];
    };
    t.partitions()
        .expect("partitions")
        .iter()
        .map(|p| p.log_start_offset())
        .collect()
}
