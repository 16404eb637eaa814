//! Topic metadata: what topics exist, their settings and which shard owns
//! each partition. Persisted as `topics.json` in the data directory,
//! replaced atomically by the controller shard (shard 0); every shard keeps
//! its own copy, updated through the shard messaging.

use serde::{Deserialize, Serialize};
use shoal_shard::{LogConfig, SyncMode};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const TOPIC_NAME_BYTES_MAX: usize = 200;
pub const PARTITIONS_MAX: u32 = 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopicMeta {
    pub name: String,
    /// Owning shard of partition `i` at index `i`.
    pub shards: Vec<u16>,
    pub sync: String,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub segment_bytes: u64,
}

impl TopicMeta {
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
pub fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > TOPIC_NAME_BYTES_MAX {
        return Err(format!(
            "topic name must be 1 to {TOPIC_NAME_BYTES_MAX} bytes"
        ));
    }
    if name == "." || name == ".." {
        return Err("topic name cannot be . or ..".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name {name:?} has invalid character {c:?}: use A-Z a-z 0-9 . _ -"
        ));
    }
    Ok(())
}

/// Stable assignment of a topic's partitions to shards: spread round-robin
/// from a start derived from the name, so topics do not all begin on shard 0.
pub fn assign_shards(name: &str, partitions: u32, shards: usize) -> Vec<u16> {
    let start = name
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    (0..partitions)
        .map(|p| ((start.wrapping_add(p)) as usize % shards) as u16)
        .collect()
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Topics {
    pub topics: BTreeMap<String, TopicMeta>,
}

impl Topics {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("topics.json")
    }

    pub fn load(data_dir: &Path) -> Result<Topics, String> {
        let p = Topics::path(data_dir);
        match std::fs::read(&p) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| format!("corrupt {}: {e}", p.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Topics::default()),
            Err(e) => Err(format!("cannot read {}: {e}", p.display())),
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
    #[test]
    fn assignment_is_stable_and_spread() {
        let a = assign_shards("t", 8, 2);
        assert_eq!(a, assign_shards("t", 8, 2));
        assert_eq!(a.iter().filter(|&&s| s == 0).count(), 4);
    }
}
