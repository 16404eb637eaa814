//! ACLs: which principal may do which operation on which resource, and the
//! per-shard cache of those decisions.
//!
//! Semantics (documented in README "Security"):
//! - a rule only allows; without a rule that allows it, a request is
//!   denied (when auth is on). Superusers and the inter-broker user are
//!   allowed everything, without rules;
//! - resources: a topic by exact name or by prefix, a group by exact name
//!   or by prefix, and the cluster (metrics, user and ACL administration);
//! - operations: `produce`, `consume`, `describe`, `admin`. Any of
//!   produce, consume or admin on a resource implies describe on it (a
//!   producer may read the metadata of the topic it writes).
//!
//! The cache holds, per principal and resource name, the bit set of the
//! operations allowed, computed on first use from the shard's snapshot
//! and dropped whole when a new snapshot arrives: a check on the data path
//! is two hash lookups by `&str`, with no allocation once warm.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    Produce,
    Consume,
    Describe,
    Admin,
}

impl Operation {
    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    pub fn parse(s: &str) -> Option<Operation> {
        Some(match s {
            "produce" => Operation::Produce,
            "consume" => Operation::Consume,
            "describe" => Operation::Describe,
            "admin" => Operation::Admin,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Operation::Produce => "produce",
            Operation::Consume => "consume",
            Operation::Describe => "describe",
            Operation::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", content = "name")]
pub enum Resource {
    Topic(String),
    TopicPrefix(String),
    Group(String),
    GroupPrefix(String),
    Cluster,
}

/// Longest resource name or prefix in a rule.
const RESOURCE_BYTES_MAX: usize = 255;

impl Resource {
    pub fn validate(&self) -> Result<()> {
        match self {
            Resource::Topic(n) | Resource::Group(n) if n.is_empty() => Err(Error::InvalidConfig(
                "an ACL names an empty topic or group (use a prefix rule for all)".into(),
            )),
            Resource::Topic(n)
            | Resource::TopicPrefix(n)
            | Resource::Group(n)
            | Resource::GroupPrefix(n)
                if n.len() > RESOURCE_BYTES_MAX =>
            {
                Err(Error::InvalidConfig(format!(
                    "an ACL's resource name is over {RESOURCE_BYTES_MAX} bytes"
                )))
            }
            _ => Ok(()),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Resource::Topic(n) => format!("topic {n:?}"),
            Resource::TopicPrefix(n) => format!("topics starting with {n:?}"),
            Resource::Group(n) => format!("group {n:?}"),
            Resource::GroupPrefix(n) => format!("groups starting with {n:?}"),
            Resource::Cluster => "the cluster".into(),
        }
    }
}

/// One rule: `principal` may do `operation` on `resource`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AclRule {
    pub principal: String,
    pub resource: Resource,
    pub operation: Operation,
}

/// What a request is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Topic,
    Group,
    Cluster,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Topic => "topic",
            Kind::Group => "group",
            Kind::Cluster => "cluster",
        }
    }
}

fn matches(rule: &Resource, kind: Kind, name: &str) -> bool {
    match (rule, kind) {
        (Resource::Topic(n), Kind::Topic) | (Resource::Group(n), Kind::Group) => n == name,
        (Resource::TopicPrefix(p), Kind::Topic) | (Resource::GroupPrefix(p), Kind::Group) => {
            name.starts_with(p.as_str())
        }
        (Resource::Cluster, Kind::Cluster) => true,
        _ => false,
    }
}

/// The operations `principal` may do on the resource, as a bit set.
pub fn allowed_ops<'a>(
    rules: impl IntoIterator<Item = &'a AclRule>,
    principal: &str,
    kind: Kind,
    name: &str,
) -> u8 {
    let mut bits = 0u8;
    for r in rules {
        if r.principal == principal && matches(&r.resource, kind, name) {
            bits |= r.operation.bit() | Operation::Describe.bit();
        }
    }
    bits
}

/// Entries one principal's cache may hold per resource kind before it is
/// emptied (a client naming endless topics must not grow it without end).
const CACHE_ENTRIES_MAX: usize = 4096;

#[derive(Default)]
struct PrincipalCache {
    topics: HashMap<String, u8>,
    groups: HashMap<String, u8>,
    cluster: Option<u8>,
}

/// Per shard: decisions by principal and resource, valid for one snapshot.
#[derive(Default)]
pub struct AclCache {
    principals: HashMap<String, PrincipalCache>,
}

impl AclCache {
    pub fn clear(&mut self) {
        self.principals.clear();
    }

    /// Whether `principal` may do `op` on the resource; `compute` gives the
    /// bit set on a miss.
    pub fn allows(
        &mut self,
        principal: &str,
        kind: Kind,
        name: &str,
        op: Operation,
        compute: impl FnOnce() -> u8,
    ) -> bool {
        let bits = match self.principals.get_mut(principal) {
            Some(p) => match kind {
                Kind::Topic => p.topics.get(name).copied(),
                Kind::Group => p.groups.get(name).copied(),
                Kind::Cluster => p.cluster,
            },
            None => None,
        };
        let bits = match bits {
            Some(b) => b,
            None => {
                let b = compute();
                if self.principals.len() >= CACHE_ENTRIES_MAX {
                    self.principals.clear();
                }
                let p = self.principals.entry(principal.to_string()).or_default();
                let map = match kind {
                    Kind::Topic => Some(&mut p.topics),
                    Kind::Group => Some(&mut p.groups),
                    Kind::Cluster => None,
                };
                match map {
                    Some(m) => {
                        if m.len() >= CACHE_ENTRIES_MAX {
                            m.clear();
                        }
                        m.insert(name.to_string(), b);
                    }
                    None => p.cluster = Some(b),
                }
                b
            }
        };
        bits & op.bit() != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(p: &str, r: Resource, op: Operation) -> AclRule {
        AclRule {
            principal: p.into(),
            resource: r,
            operation: op,
        }
    }

    #[test]
    fn matching() {
        let rules = [
            rule(
                "alice",
                Resource::Topic("orders".into()),
                Operation::Produce,
            ),
            rule(
                "alice",
                Resource::TopicPrefix("logs.".into()),
                Operation::Consume,
            ),
            rule("alice", Resource::Group("g1".into()), Operation::Consume),
            rule("bob", Resource::Cluster, Operation::Describe),
        ];
        let may = |p, k, n, op: Operation| allowed_ops(&rules, p, k, n) & op.bit() != 0;
        assert!(may("alice", Kind::Topic, "orders", Operation::Produce));
        assert!(may("alice", Kind::Topic, "orders", Operation::Describe));
        assert!(!may("alice", Kind::Topic, "orders", Operation::Consume));
        assert!(!may("alice", Kind::Topic, "orders2", Operation::Produce));
        assert!(!may("alice", Kind::Topic, "order", Operation::Produce));
        assert!(may("alice", Kind::Topic, "logs.a", Operation::Consume));
        assert!(!may("alice", Kind::Topic, "logs", Operation::Consume));
        assert!(!may("alice", Kind::Topic, "logs.a", Operation::Admin));
        // A topic rule says nothing of a group of the same name.
        assert!(!may("alice", Kind::Group, "orders", Operation::Describe));
        assert!(may("alice", Kind::Group, "g1", Operation::Consume));
        assert!(!may("bob", Kind::Topic, "orders", Operation::Describe));
        assert!(may("bob", Kind::Cluster, "", Operation::Describe));
        assert!(!may("alice", Kind::Cluster, "", Operation::Describe));
        assert!(!may("carol", Kind::Topic, "orders", Operation::Describe));
    }

    #[test]
    fn cache_answers_like_the_rules_until_cleared() {
        let mut rules = vec![rule("a", Resource::Topic("t".into()), Operation::Produce)];
        let mut cache = AclCache::default();
        let ask = |rules: &Vec<AclRule>, cache: &mut AclCache| {
            cache.allows("a", Kind::Topic, "t", Operation::Produce, || {
                allowed_ops(rules.iter(), "a", Kind::Topic, "t")
            })
        };
        assert!(ask(&rules, &mut cache));
        rules.clear();
        // Still cached: the snapshot it came from is what the shard has.
        assert!(ask(&rules, &mut cache));
        cache.clear();
        assert!(!ask(&rules, &mut cache));
    }

    #[test]
    fn operations_parse() {
        for op in [
            Operation::Produce,
            Operation::Consume,
            Operation::Describe,
            Operation::Admin,
        ] {
            assert_eq!(Operation::parse(op.name()), Some(op));
        }
        assert_eq!(Operation::parse("write"), None);
        assert!(Resource::Topic(String::new()).validate().is_err());
        assert!(Resource::TopicPrefix(String::new()).validate().is_ok());
    }
}
