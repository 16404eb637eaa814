//! The metadata log's records and checkpoints.
//!
//! Each change to a group is one record of the group's `__shoal_groups`
//! partition (ordinary record batches, so the partition replicates like
//! any other):
//! - key `[1] group`, value `topic partition offset metadata at_ms`: an
//!   offset commit (one record per partition).
//! - key `[2] group`, value: the group's membership and assignment, whole
//!   (no offsets). A group with no members and no offsets is forgotten.
//!
//! A checkpoint is every group of the partition, offsets included, as of
//! an offset of the log (everything below it applied), with a CRC-32C:
//! `SHOALGC1 | u64 offset | u32 groups | group... | u32 crc`.
//!
//! Integers are little-endian; strings and byte strings carry a u32
//! length. Decoding checks every length against what is left.

use super::assign::{Strategy, Tp};
use super::state::{Committed, Group, Member};
use std::collections::{BTreeMap, BTreeSet};

pub const KIND_OFFSET: u8 = 1;
pub const KIND_GROUP: u8 = 2;
const CHECKPOINT_MAGIC: &[u8; 8] = b"SHOALGC1";

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Offset {
        group: String,
        tp: Tp,
        committed: Committed,
    },
    Group(Group),
}

#[derive(Default)]
struct Out(Vec<u8>);

impl Out {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn tps(&mut self, tps: &BTreeSet<Tp>) {
        self.u32(tps.len() as u32);
        for (t, p) in tps {
            self.str(t);
            self.u32(*p);
        }
    }
}

struct In<'a>(&'a [u8]);

type Decoded<T> = Result<T, String>;

impl<'a> In<'a> {
    fn take(&mut self, n: usize) -> Decoded<&'a [u8]> {
        if self.0.len() < n {
            return Err(format!(
                "truncated: {n} bytes wanted, {} left",
                self.0.len()
            ));
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Ok(h)
    }
    fn u32(&mut self) -> Decoded<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn i32(&mut self) -> Decoded<i32> {
        Ok(self.u32()? as i32)
    }
    fn i64(&mut self) -> Decoded<i64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_le_bytes(a))
    }
    fn bytes(&mut self) -> Decoded<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn str(&mut self) -> Decoded<String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "a string is not UTF-8".to_string())
    }
    /// A count of items each at least `min` bytes long: refused when it
    /// cannot fit, so a bad count allocates nothing.
    fn count(&mut self, min: usize) -> Decoded<usize> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min) > self.0.len() {
            return Err(format!("count {n} exceeds what is left"));
        }
        Ok(n)
    }
    fn tps(&mut self) -> Decoded<BTreeSet<Tp>> {
        let n = self.count(8)?;
        (0..n).map(|_| Ok((self.str()?, self.u32()?))).collect()
    }
}

/// Key and value of an offset-commit record.
pub fn offset_record(group: &str, tp: &Tp, c: &Committed) -> (Vec<u8>, Vec<u8>) {
    let mut key = vec![KIND_OFFSET];
    key.extend_from_slice(group.as_bytes());
    let mut v = Out::default();
    v.str(&tp.0);
    v.u32(tp.1);
    v.i64(c.offset);
    v.str(&c.metadata);
    v.i64(c.at_ms);
    (key, v.0)
}

/// Key and value of a group-state record.
pub fn group_record(g: &Group) -> (Vec<u8>, Vec<u8>) {
    let mut key = vec![KIND_GROUP];
    key.extend_from_slice(g.name.as_bytes());
    let mut v = Out::default();
    put_group(&mut v, g);
    (key, v.0)
}

fn put_group(v: &mut Out, g: &Group) {
    v.i32(g.epoch);
    v.str(g.strategy.name());
    v.u32(g.members.len() as u32);
    for m in g.members.values() {
        v.str(&m.id);
        v.str(&m.client_id);
        v.i32(m.epoch);
        v.i32(m.prev_epoch);
        v.u32(m.topics.len() as u32);
        for t in &m.topics {
            v.str(t);
        }
        v.u32(m.session_timeout_ms);
        v.bytes(&m.metadata);
        v.tps(&m.target);
        v.tps(&m.given);
        v.u32(m.held.len() as u32);
        for ((t, p), since) in &m.held {
            v.str(t);
            v.u32(*p);
            v.i32(*since);
        }
    }
}

fn get_group(r: &mut In<'_>, name: &str) -> Decoded<Group> {
    let epoch = r.i32()?;
    let strategy = r.str()?;
    let strategy =
        Strategy::parse(&strategy).ok_or_else(|| format!("unknown strategy {strategy:?}"))?;
    let n = r.count(8)?;
    let mut members = BTreeMap::new();
    for _ in 0..n {
        let id = r.str()?;
        let client_id = r.str()?;
        let epoch = r.i32()?;
        let prev_epoch = r.i32()?;
        let nt = r.count(4)?;
        let topics = (0..nt).map(|_| r.str()).collect::<Decoded<Vec<_>>>()?;
        let session_timeout_ms = r.u32()?;
        let metadata = r.bytes()?.to_vec();
        let target = r.tps()?;
        let given = r.tps()?;
        let nh = r.count(12)?;
        let mut held = BTreeMap::new();
        for _ in 0..nh {
            let tp = (r.str()?, r.u32()?);
            held.insert(tp, r.i32()?);
        }
        members.insert(
            id.clone(),
            Member {
                id,
                client_id,
                epoch,
                prev_epoch,
                topics,
                session_timeout_ms,
                metadata,
                target,
                given,
                held,
            },
        );
    }
    Ok(Group {
        name: name.to_string(),
        epoch,
        strategy,
        members,
        offsets: BTreeMap::new(),
    })
}

/// Decodes one record of the metadata log.
pub fn decode(key: &[u8], value: &[u8]) -> Decoded<Change> {
    let (&kind, name) = key.split_first().ok_or("an empty key")?;
    let group = std::str::from_utf8(name)
        .map_err(|_| "a group name is not UTF-8".to_string())?
        .to_string();
    let mut r = In(value);
    match kind {
        KIND_OFFSET => {
            let tp = (r.str()?, r.u32()?);
            let committed = Committed {
                offset: r.i64()?,
                metadata: r.str()?,
                at_ms: r.i64()?,
            };
            Ok(Change::Offset {
                group,
                tp,
                committed,
            })
        }
        KIND_GROUP => Ok(Change::Group(get_group(&mut r, &group)?)),
        k => Err(format!("unknown record kind {k}")),
    }
}

/// Applies a decoded change to the groups of a partition.
pub fn apply(groups: &mut BTreeMap<String, Group>, change: Change) {
    match change {
        Change::Offset {
            group,
            tp,
            committed,
        } => {
            groups
                .entry(group.clone())
                .or_insert_with(|| Group::new(&group))
                .offsets
                .insert(tp, committed);
        }
        Change::Group(g) => {
            let offsets = groups
                .remove(&g.name)
                .map(|old| old.offsets)
                .unwrap_or_default();
            if g.members.is_empty() && offsets.is_empty() {
                return;
            }
            groups.insert(g.name.clone(), Group { offsets, ..g });
        }
    }
}

/// A checkpoint of `groups` as of log offset `offset`.
pub fn encode_checkpoint(offset: u64, groups: &BTreeMap<String, Group>) -> Vec<u8> {
    let mut v = Out::default();
    v.0.extend_from_slice(CHECKPOINT_MAGIC);
    v.0.extend_from_slice(&offset.to_le_bytes());
    v.u32(groups.len() as u32);
    for g in groups.values() {
        v.str(&g.name);
        put_group(&mut v, g);
        v.u32(g.offsets.len() as u32);
        for ((t, p), c) in &g.offsets {
            v.str(t);
            v.u32(*p);
            v.i64(c.offset);
            v.str(&c.metadata);
            v.i64(c.at_ms);
        }
    }
    let crc = crc32c::crc32c(&v.0);
    v.u32(crc);
    v.0
}

/// Decodes a checkpoint: its offset and groups.
pub fn decode_checkpoint(bytes: &[u8]) -> Decoded<(u64, BTreeMap<String, Group>)> {
    if bytes.len() < CHECKPOINT_MAGIC.len() + 8 + 4 + 4 || !bytes.starts_with(CHECKPOINT_MAGIC) {
        return Err("not a group checkpoint".into());
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32c::crc32c(body) != crc {
        return Err("checkpoint CRC mismatch".into());
    }
    let mut r = In(&body[CHECKPOINT_MAGIC.len()..]);
    let offset = r.i64()? as u64;
    let n = r.count(8)?;
    let mut groups = BTreeMap::new();
    for _ in 0..n {
        let name = r.str()?;
        let mut g = get_group(&mut r, &name)?;
        let no = r.count(24)?;
        for _ in 0..no {
            let tp = (r.str()?, r.u32()?);
            let c = Committed {
                offset: r.i64()?,
                metadata: r.str()?,
                at_ms: r.i64()?,
            };
            g.offsets.insert(tp, c);
        }
        groups.insert(name, g);
    }
    Ok((offset, groups))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Group {
        let mut g = Group::new("g1");
        g.epoch = 3;
        g.strategy = Strategy::Range;
        let tp = |p| ("t".to_string(), p);
        g.members.insert(
            "m".into(),
            Member {
                id: "m".into(),
                client_id: "cli".into(),
                epoch: 2,
                prev_epoch: 1,
                topics: vec!["t".into(), "u".into()],
                session_timeout_ms: 3000,
                metadata: vec![1, 2, 3],
                target: [tp(0), tp(1)].into(),
                given: [tp(0)].into(),
                held: [(tp(0), 2), (tp(5), 1)].into(),
            },
        );
        g
    }

    #[test]
    fn records_round_trip() {
        let g = sample();
        let (k, v) = group_record(&g);
        assert_eq!(decode(&k, &v), Ok(Change::Group(g.clone())));
        let c = Committed {
            offset: 42,
            metadata: "m".into(),
            at_ms: 7,
        };
        let (k, v) = offset_record("g1", &("t".into(), 3), &c);
        let mut groups = BTreeMap::new();
        apply(&mut groups, decode(&k, &v).unwrap());
        apply(&mut groups, Change::Group(g));
        assert_eq!(groups["g1"].offsets[&("t".to_string(), 3)], c);
        assert_eq!(groups["g1"].members.len(), 1);
        let ck = encode_checkpoint(99, &groups);
        assert_eq!(decode_checkpoint(&ck), Ok((99, groups)));
    }

    #[test]
    fn damaged_input_is_an_error_not_a_panic() {
        let (k, v) = group_record(&sample());
        for cut in 0..v.len() {
            assert!(decode(&k, &v[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode(&[9, b'g'], &v).is_err());
        assert!(decode(&[], &v).is_err());
        let mut huge = vec![0u8; 8];
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&k, &huge).is_err());
        let mut ck = encode_checkpoint(1, &BTreeMap::new());
        ck[9] ^= 1;
        assert!(decode_checkpoint(&ck).is_err());
    }

    #[test]
    fn an_empty_group_without_offsets_is_forgotten() {
        let mut groups = BTreeMap::new();
        apply(&mut groups, Change::Group(sample()));
        apply(&mut groups, Change::Group(Group::new("g1")));
        assert!(groups.is_empty());
    }
}
