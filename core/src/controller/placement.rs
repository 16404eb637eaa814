//! Where partitions go. On a single node: which shard owns each partition
//! of a topic. The cluster's placement (replicas over brokers, rack-aware)
//! will live here too.

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

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn assignment_is_stable_and_spread() {
        let a = assign_shards("t", 8, 2);
        assert_eq!(a, assign_shards("t", 8, 2));
        assert_eq!(a.iter().filter(|&&s| s == 0).count(), 4);
    }
}
