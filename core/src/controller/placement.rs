//! Where partitions go. On a single node: which shard owns each partition
//! of a topic. In a cluster: which brokers hold each partition's replicas
//! (rack-aware, leaders and replicas spread evenly, counting what the
//! brokers already hold), and which shard on each.

use crate::metadata::Replica;
use std::collections::{BTreeSet, HashMap};

/// Stable assignment of a topic's partitions to shards: spread round-robin
/// from a start derived from the name, so topics do not all begin on shard 0.
pub fn assign_shards(name: &str, partitions: u32, shards: usize) -> Vec<u16> {
    assert!(shards > 0, "a broker has at least one shard");
    let start = name
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    (0..partitions)
        .map(|p| ((start.wrapping_add(p)) as usize % shards) as u16)
        .collect()
}

/// A live broker that can take replicas.
#[derive(Debug, Clone)]
pub struct BrokerSlot {
    pub id: u32,
    pub rack: Option<String>,
    pub shards: usize,
}

/// What brokers (and their shards) hold already.
#[derive(Debug, Default, Clone)]
pub struct Load {
    pub replicas: HashMap<u32, usize>,
    pub leaders: HashMap<u32, usize>,
    pub per_shard: HashMap<(u32, u16), usize>,
}

impl Load {
    pub fn add(&mut self, replicas: &[Replica], leader: Option<u32>) {
        for r in replicas {
            *self.replicas.entry(r.broker).or_default() += 1;
            *self.per_shard.entry((r.broker, r.shard)).or_default() += 1;
        }
        if let Some(l) = leader {
            *self.leaders.entry(l).or_default() += 1;
        }
    }
}

/// Chooses `rf` brokers for each partition, preferred leader first.
///
/// Greedy, so it balances against what the cluster already holds: each
/// partition's leader is the broker leading the fewest partitions, each
/// follower the broker holding the fewest replicas, preferring a rack the
/// partition does not use yet (so losing a rack loses at most one replica
/// while there are as many racks as replicas). Ties go round-robin from a
/// start derived from the topic name. On each broker the replica goes to
/// its least-loaded shard.
pub fn place_replicas(
    name: &str,
    partitions: u32,
    rf: u16,
    brokers: &[BrokerSlot],
    load: &mut Load,
) -> Result<Vec<Vec<Replica>>, String> {
    let rf = usize::from(rf);
    if rf == 0 {
        return Err("replication factor must be at least 1".into());
    }
    if rf > brokers.len() {
        return Err(format!(
            "replication factor {rf} needs {rf} live brokers; {} are live",
            brokers.len()
        ));
    }
    let start = name_hash(name) as usize;
    let n = brokers.len();
    let mut out = Vec::with_capacity(partitions as usize);
    for p in 0..partitions as usize {
        // Rotation for ties: partition p prefers brokers from start + p on.
        let rank = |i: usize| (i + n - (start + p) % n) % n;
        let mut chosen: Vec<usize> = Vec::with_capacity(rf);
        let leader = (0..n)
            .min_by_key(|&i| {
                let id = brokers[i].id;
                (
                    load.leaders.get(&id).copied().unwrap_or(0),
                    load.replicas.get(&id).copied().unwrap_or(0),
                    rank(i),
                )
            })
            .unwrap_or(0);
        chosen.push(leader);
        while chosen.len() < rf {
            let racks: BTreeSet<&Option<String>> =
                chosen.iter().map(|&i| &brokers[i].rack).collect();
            let next = (0..n)
                .filter(|i| !chosen.contains(i))
                .min_by_key(|&i| {
                    let b = &brokers[i];
                    let same_rack = b.rack.is_some() && racks.contains(&b.rack);
                    (
                        same_rack,
                        load.replicas.get(&b.id).copied().unwrap_or(0),
                        rank(i),
                    )
                })
                .unwrap_or(0);
            chosen.push(next);
        }
        let replicas: Vec<Replica> = chosen
            .iter()
            .map(|&i| {
                let b = &brokers[i];
                let shards = b.shards.max(1);
                let shard = (0..shards)
                    .min_by_key(|&s| {
                        (
                            load.per_shard.get(&(b.id, s as u16)).copied().unwrap_or(0),
                            (s + shards - (start + p) % shards) % shards,
                        )
                    })
                    .unwrap_or(0) as u16;
                Replica {
                    broker: b.id,
                    shard,
                }
            })
            .collect();
        load.add(&replicas, Some(replicas[0].broker));
        out.push(replicas);
    }
    Ok(out)
}

fn name_hash(name: &str) -> u32 {
    name.bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(racks: &[Option<&str>]) -> Vec<BrokerSlot> {
        racks
            .iter()
            .enumerate()
            .map(|(i, r)| BrokerSlot {
                id: i as u32 + 1,
                rack: r.map(str::to_string),
                shards: 2,
            })
            .collect()
    }

    #[test]
    fn leaders_and_replicas_spread_evenly() {
        let b = slots(&[None, None, None]);
        let mut load = Load::default();
        let p = place_replicas("orders", 6, 2, &b, &mut load).unwrap();
        assert_eq!(p.len(), 6);
        for r in &p {
            assert_eq!(r.len(), 2);
            assert_ne!(r[0].broker, r[1].broker, "{p:?}");
        }
        for id in 1..=3 {
            assert_eq!(load.leaders[&id], 2, "{p:?}");
            assert_eq!(load.replicas[&id], 4, "{p:?}");
            // Within a broker, over its shards.
            assert_eq!(load.per_shard[&(id, 0)], 2, "{p:?}");
        }
        // A second topic balances against the first.
        let q = place_replicas("x", 3, 1, &b, &mut load).unwrap();
        let leaders: BTreeSet<u32> = q.iter().map(|r| r[0].broker).collect();
        assert_eq!(leaders.len(), 3, "{q:?}");
    }

    #[test]
    fn replicas_go_to_different_racks() {
        let b = slots(&[Some("a"), Some("a"), Some("b"), Some("b")]);
        let p = place_replicas("t", 8, 2, &b, &mut Load::default()).unwrap();
        for r in p {
            let racks: BTreeSet<_> = r.iter().map(|x| &b[x.broker as usize - 1].rack).collect();
            assert_eq!(racks.len(), 2, "{r:?}");
        }
    }

    #[test]
    fn too_few_brokers_is_an_error() {
        let e = place_replicas("t", 1, 3, &slots(&[None, None]), &mut Load::default()).unwrap_err();
        assert!(e.contains("needs 3 live brokers; 2 are live"), "{e}");
    }

    #[test]
    fn assignment_is_stable_and_spread() {
        let a = assign_shards("t", 8, 2);
        assert_eq!(a, assign_shards("t", 8, 2));
        assert_eq!(a.iter().filter(|&&s| s == 0).count(), 4);
    }
}
