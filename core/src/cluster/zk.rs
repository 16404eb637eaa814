//! The cluster's layout in ZooKeeper and its records (JSON).
//!
//! ```text
//! <chroot>/shoal/<cluster>/
//!   brokers/ids/<id>             ephemeral: BrokerReg (a live broker)
//!   controller                   ephemeral: ControllerRec (who controls)
//!   controller_epoch             the epoch as text; its version fences every
//!                                controller write (a multi checks it)
//!   topics/<name>                TopicRecord: id, settings, replicas
//!   topics/<name>/partitions/<p> PartitionStateRec: leader, epoch, ISR
//!   security/users/<name>        UserRecord: a SCRAM credential (no password)
//!   security/acls/<hex>          AclRule (the name: the rule's text in hex)
//! ```
//! Partition state has a node per partition so that a leader changing
//! its ISR (replication) rewrites one small node, conditioned on its
//! version, without touching the topic's record.

use crate::error::{Error, Result};
use crate::metadata::{Placement, Replica, TopicMeta};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone)]
pub struct Layout {
    pub root: String,
}

impl Layout {
    pub fn new(chroot: &str, cluster: &str) -> Layout {
        Layout {
            root: format!("{}/shoal/{cluster}", chroot.trim_end_matches('/')),
        }
    }
    pub fn brokers(&self) -> String {
        format!("{}/brokers/ids", self.root)
    }
    pub fn broker(&self, id: u32) -> String {
        format!("{}/brokers/ids/{id}", self.root)
    }
    pub fn controller(&self) -> String {
        format!("{}/controller", self.root)
    }
    pub fn controller_epoch(&self) -> String {
        format!("{}/controller_epoch", self.root)
    }
    pub fn topics(&self) -> String {
        format!("{}/topics", self.root)
    }
    pub fn topic(&self, name: &str) -> String {
        format!("{}/topics/{name}", self.root)
    }
    pub fn partitions(&self, name: &str) -> String {
        format!("{}/topics/{name}/partitions", self.root)
    }
    pub fn partition(&self, name: &str, p: u32) -> String {
        format!("{}/topics/{name}/partitions/{p}", self.root)
    }

    pub fn users(&self) -> String {
        format!("{}/security/users", self.root)
    }
    pub fn user(&self, name: &str) -> String {
        format!("{}/security/users/{name}", self.root)
    }
    pub fn acls(&self) -> String {
        format!("{}/security/acls", self.root)
    }
    pub fn acl(&self, key: &str) -> String {
        format!("{}/security/acls/{key}", self.root)
    }

    /// What a watched path is about.
    pub fn classify<'a>(&self, path: &'a str) -> Changed<'a> {
        let Some(rest) = path.strip_prefix(self.root.as_str()) else {
            return Changed::Other;
        };
        let rest = rest.trim_start_matches('/');
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["brokers", ..] => Changed::Brokers,
            ["controller"] => Changed::Controller,
            ["topics", name, ..] => Changed::Topic(name),
            ["security", ..] => Changed::Security,
            _ => Changed::Other,
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Changed<'a> {
    Brokers,
    Controller,
    Topic(&'a str),
    Security,
    Other,
}

/// Splits `host:port[,host:port...][/chroot]` into the hosts and the
/// chroot ("" for none).
pub fn split_connect(s: &str) -> Result<(String, String)> {
    let (hosts, chroot) = match s.find('/') {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let chroot = chroot.trim_end_matches('/');
    if hosts.is_empty()
        || hosts.split(',').any(|h| {
            h.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        })
    {
        return Err(Error::Config(format!(
            "invalid --zookeeper {s:?}: expected host:port[,host:port...][/chroot]"
        )));
    }
    if chroot
        .split('/')
        .skip(1)
        .any(|e| e.is_empty() || e == "." || e == "..")
    {
        return Err(Error::Config(format!(
            "invalid ZooKeeper chroot {chroot:?}"
        )));
    }
    Ok((hosts.to_string(), chroot.to_string()))
}

/// A topic as the controller records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TopicRecord {
    pub id: u64,
    pub replication_factor: u16,
    pub sync: String,
    pub retention_ms: Option<u64>,
    pub retention_bytes: Option<u64>,
    pub segment_bytes: u64,
    /// Partition `i`'s replicas at index `i`, preferred leader first.
    pub replicas: Vec<Vec<Replica>>,
    /// `None` in records that predate the setting: min(2, RF).
    #[serde(default)]
    pub min_insync_replicas: Option<u16>,
    #[serde(default)]
    pub unclean_leader_election: bool,
}

/// One partition's leader and in-sync replicas.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartitionStateRec {
    pub leader: Option<u32>,
    pub leader_epoch: u32,
    pub isr: Vec<u32>,
    /// The controller epoch that wrote this state.
    pub controller_epoch: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ControllerRec {
    pub broker_id: u32,
    pub epoch: u64,
}

/// Decodes a node's JSON; a malformed node is an error naming it, never a
/// panic.
pub fn decode<T: DeserializeOwned>(path: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| Error::ClusterUnavailable(format!("malformed ZooKeeper node {path}: {e}")))
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

/// The topic as broker `me` (running `nshards` shards) holds it: its own
/// replica's shard per partition where it has one, else the leader's.
pub fn topic_meta(
    name: &str,
    rec: &TopicRecord,
    states: &[PartitionStateRec],
    me: u32,
    nshards: usize,
) -> TopicMeta {
    let nshards = nshards.max(1);
    let placement: Vec<Placement> = rec
        .replicas
        .iter()
        .zip(states)
        .map(|(replicas, st)| Placement {
            replicas: replicas.clone(),
            leader: st.leader,
            leader_epoch: st.leader_epoch,
            isr: st.isr.clone(),
        })
        .collect();
    let shards = placement
        .iter()
        .map(|p| {
            let mine = p
                .replica_on(me)
                .map(|r| (usize::from(r.shard) % nshards) as u16);
            let leader = p.leader.and_then(|l| p.replica_on(l)).map(|r| r.shard);
            mine.or(leader)
                .or(p.replicas.first().map(|r| r.shard))
                .unwrap_or(0)
        })
        .collect();
    TopicMeta {
        name: name.to_string(),
        id: rec.id,
        shards,
        sync: rec.sync.clone(),
        retention_ms: rec.retention_ms,
        retention_bytes: rec.retention_bytes,
        segment_bytes: rec.segment_bytes,
        placement,
        min_insync_replicas: rec.min_insync_replicas.unwrap_or(0),
        unclean_leader_election: rec.unclean_leader_election,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_strings() {
        assert_eq!(
            split_connect("a:1,b:2/x/y").unwrap(),
            ("a:1,b:2".to_string(), "/x/y".to_string())
        );
        assert_eq!(
            split_connect("127.0.0.1:2181").unwrap(),
            ("127.0.0.1:2181".to_string(), String::new())
        );
        for bad in ["", "/x", "a", "a:x", "a:1,/x", "a:1/x//y", "a:1/.."] {
            assert!(split_connect(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn paths_are_classified() {
        let l = Layout::new("/c", "prod");
        assert_eq!(l.root, "/c/shoal/prod");
        assert_eq!(l.classify(&l.broker(3)), Changed::Brokers);
        assert_eq!(l.classify(&l.controller()), Changed::Controller);
        assert_eq!(l.classify(&l.partition("t", 2)), Changed::Topic("t"));
        assert_eq!(l.classify(&l.topic("t")), Changed::Topic("t"));
        assert_eq!(l.classify("/elsewhere"), Changed::Other);
        assert_eq!(l.classify(&l.controller_epoch()), Changed::Other);
        assert_eq!(l.classify(&l.user("alice")), Changed::Security);
        assert_eq!(l.classify(&l.acl("00")), Changed::Security);
    }

    #[test]
    fn malformed_nodes_are_errors() {
        let e = decode::<TopicRecord>("/x", b"{not json").unwrap_err();
        assert!(e.to_string().contains("malformed ZooKeeper node /x"), "{e}");
    }

    #[test]
    fn a_broker_sees_its_own_shard() {
        let rec = TopicRecord {
            id: 7,
            replication_factor: 2,
            sync: "none".into(),
            retention_ms: None,
            retention_bytes: None,
            segment_bytes: 1 << 20,
            replicas: vec![vec![
                Replica {
                    broker: 1,
                    shard: 3,
                },
                Replica {
                    broker: 2,
                    shard: 1,
                },
            ]],
            min_insync_replicas: None,
            unclean_leader_election: false,
        };
        let st = vec![PartitionStateRec {
            leader: Some(1),
            leader_epoch: 0,
            isr: vec![1, 2],
            controller_epoch: 1,
        }];
        assert_eq!(topic_meta("t", &rec, &st, 2, 4).shards, vec![1]);
        // Fewer shards than recorded: mapped onto those there are.
        assert_eq!(topic_meta("t", &rec, &st, 1, 2).shards, vec![1]);
        // No replica here: the leader's shard, for information.
        let m = topic_meta("t", &rec, &st, 9, 4);
        assert_eq!(m.shards, vec![3]);
        assert!(!m.is_local(0, Some(9)));
        assert!(m.is_local(0, Some(2)));
    }
}
