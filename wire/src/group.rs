//! Consumer-group conventions shared by brokers and clients: the internal
//! topic that holds group state, and which of its partitions coordinates a
//! group.

/// The internal, replicated topic whose partition leaders coordinate the
/// groups (and whose log holds their state and committed offsets).
pub const GROUPS_TOPIC: &str = "__shoal_groups";

/// Longest group name, in bytes.
pub const GROUP_NAME_MAX: usize = 255;

/// Largest member metadata a member may attach, in bytes.
pub const MEMBER_METADATA_MAX: usize = 4096;

/// The partition of [`GROUPS_TOPIC`] (of `partitions`) that coordinates
/// `group`: FNV-1a 32-bit over the name's UTF-8 bytes, modulo the count.
pub fn coordinator_partition(group: &str, partitions: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in group.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a_matches_the_reference_values() {
        // FNV-1a 32 of "" is the offset basis; of "a" is 0xe40c292c. Each
        // is below u32::MAX, so the modulo leaves it whole.
        assert_eq!(coordinator_partition("", u32::MAX), 0x811c_9dc5);
        assert_eq!(coordinator_partition("a", u32::MAX), 0xe40c_292c);
        assert_eq!(coordinator_partition("foobar", u32::MAX), 0xbf9c_f968);
        assert!(coordinator_partition("anything", 8) < 8);
        assert_eq!(coordinator_partition("g", 0), 0);
    }
}
