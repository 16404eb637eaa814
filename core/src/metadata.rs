//! Topic metadata: what topics exist, their settings and which shard owns
//! each partition. Persisted as `topics.json` in the data directory,
//! replaced atomically by the controller ([`crate::controller`]); every
//! shard keeps its own copy ([`crate::partitions::Partitions`]), updated
//! through the mesh.

use crate::error::{Error, Result};
use crate::limits::TOPIC_NAME_BYTES_MAX;
use serde::{Deserialize, Serialize};
use shoal_shard::{LogConfig, SyncMode};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopicMeta {
    pub name: String,
    /// This incarnation of the topic: a topic deleted and created again
    /// under the same name gets a new id, so a client that still means the
    /// old one is refused (`UnknownTopicId`) instead of writing into the
    /// new. 0 for topics created before ids (never refused).
    #[serde(default)]
    pub id: u64,
    /// Owning shard of partition `i` at index `i`.
    pub shards: Vec<u16>,
    pub sync: String,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub segment_bytes: u64,
    /// Cluster only (empty on a single node): partition `i`'s replicas,
    /// leader and in-sync set at index `i`, as recorded in ZooKeeper.
    /// `shards[i]` is then this broker's shard for its replica (or, when it
    /// holds none, the leader's, for information).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub placement: Vec<Placement>,
    /// Cluster only: acks=all needs this many in-sync replicas (0 in
    /// records that predate the setting: min(2, RF)).
    #[serde(default)]
    pub min_insync_replicas: u16,
    #[serde(default)]
    pub unclean_leader_election: bool,
}

/// Where one partition lives in a cluster and who leads it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Placement {
    /// Preferred leader first.
    pub replicas: Vec<Replica>,
    pub leader: Option<u32>,
    /// Bumped by every change of leader (replication fences on it).
    pub leader_epoch: u32,
    pub isr: Vec<u32>,
}

/// One replica of a partition: a broker and the shard on it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Replica {
    pub broker: u32,
    pub shard: u16,
}

impl Placement {
    pub fn replica_on(&self, broker: u32) -> Option<Replica> {
        self.replicas.iter().copied().find(|r| r.broker == broker)
    }
}

impl TopicMeta {
    /// Whether this broker (`None`: a single node) holds a replica of
    /// `partition`.
    pub fn is_local(&self, partition: u32, me: Option<u32>) -> bool {
        match (me, self.placement.get(partition as usize)) {
            (Some(me), Some(p)) => p.replica_on(me).is_some(),
            (Some(_), None) => self.placement.is_empty(),
            (None, _) => true,
        }
    }

    /// The in-sync replicas acks=all needs for `partition`.
    pub fn min_insync(&self, partition: u32) -> usize {
        let rf = self
            .placement
            .get(partition as usize)
            .map_or(1, |p| p.replicas.len());
        match self.min_insync_replicas {
            0 => rf.min(2),
            m => usize::from(m).min(rf),
        }
    }

    pub fn partitions(&self) -> u32 {
        self.shards.len() as u32
    }

    pub fn sync_mode(&self) -> SyncMode {
        self.sync
            .parse()
            .unwrap_or(SyncMode::Interval(Duration::from_millis(100)))
    }

    pub fn log_config(&self) -> LogConfig {
        LogConfig {
            sync: self.sync_mode(),
            segment_bytes: self.segment_bytes,
            retention_age: self.retention_ms.map(Duration::from_millis),
            retention_bytes: self.retention_bytes,
            ..LogConfig::default()
        }
    }

    pub fn partition_dir(&self, data_dir: &Path, partition: u32) -> PathBuf {
        data_dir
            .join("topics")
            .join(format!("{}-{partition}", self.name))
    }
}

/// Kafka's rule, shorter: 1-200 of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn validate_topic_name(name: &str) -> Result<()> {
    let bad = |m: String| Err(Error::InvalidTopicName(m));
    if name.is_empty() || name.len() > TOPIC_NAME_BYTES_MAX {
        return bad(format!(
            "topic name must be 1 to {TOPIC_NAME_BYTES_MAX} bytes"
        ));
    }
    if name == "." || name == ".." {
        return bad("topic name cannot be . or ..".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return bad(format!(
            "topic name {name:?} has invalid character {c:?}: use A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

/// Refuses a client's create, delete or produce on a broker-internal
/// topic (`__shoal_*`, e.g. `__shoal_groups`); fetches are allowed.
pub fn check_not_internal(name: &str) -> Result<()> {
    if name.starts_with("__shoal") {
        return Err(Error::InvalidTopicName(format!(
            "topic {name:?} is internal to the broker (names starting with __shoal are reserved)"
        )));
    }
    Ok(())
}

/// A cluster name is a ZooKeeper path element: the topic-name rule.
pub fn validate_cluster_name(name: &str) -> Result<()> {
    validate_topic_name(name).map_err(|_| {
        Error::Config(format!(
            "invalid cluster name {name:?}: use 1-200 of A-Z a-z 0-9 . _ -"
        ))
    })
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Topics {
    pub topics: BTreeMap<String, TopicMeta>,
}

impl Topics {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("topics.json")
    }

    pub fn load(data_dir: &Path) -> Result<Topics> {
        let p = Topics::path(data_dir);
        match std::fs::read(&p) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::Config(format!("corrupt {}: {e}", p.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Topics::default()),
            Err(e) => Err(Error::io(format!("read {}", p.display()), e)),
        }
    }

    /// Re-maps partitions whose shard no longer exists (fewer cores than
    /// when the topic was created) onto the shards there are.
    pub fn fit_to(&mut self, shards: usize) {
        for t in self.topics.values_mut() {
            for s in &mut t.shards {
                if usize::from(*s) >= shards {
                    *s = (usize::from(*s) % shards) as u16;
                }
            }
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn names() {
        for ok in ["a", "orders.v1", "A_b-c"] {
            validate_topic_name(ok).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a b", "ü", &"x".repeat(201)] {
            assert!(validate_topic_name(bad).is_err(), "{bad}");
        }
    }
}
