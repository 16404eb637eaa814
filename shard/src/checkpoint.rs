//! The recovery checkpoint (S4): what lets a partition open without
//! scanning its log.
//!
//! One file per partition, `recovery.ckpt`, replaced atomically with
//! [`crate::durable::write_durably`] (write a temporary, fdatasync, rename,
//! sync the directory). It names the active segment, a *recovery point* in
//! it (every byte before it is durable and indexed), the active segment's
//! index up to that point and the producer table. `clean` is set only by a clean close, where the recovery point is
//! the end of the log; the first thing an open does is clear it again.
//!
//! Layout (little-endian): magic `SHCK`, version u32, flags u32, crc32c u32
//! over the rest; active_base u64, recovery_pos u64, next_offset u64,
//! max_timestamp i64 (`i64::MIN` = none), offset-entry bytes u32, time-entry
//! bytes u32, the two index byte runs, then the producer table.

use crate::producers::ProducerTable;
use std::path::Path;

const MAGIC: u32 = u32::from_le_bytes(*b"SHCK");
const VERSION: u32 = 1;
const FLAG_CLEAN: u32 = 1;
pub const FILE_NAME: &str = "recovery.ckpt";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    pub clean: bool,
    pub active_base: u64,
    pub recovery_pos: u64,
    pub next_offset: u64,
    pub max_timestamp: Option<i64>,
    pub offset_index: Vec<u8>,
    pub time_index: Vec<u8>,
    pub producers: ProducerTable,
}

pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Some(a)
    }
    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(|b| u16::from_le_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Option<u64> {
        self.bytes(8).map(|b| {
            let mut x = [0u8; 8];
            x.copy_from_slice(b);
            u64::from_le_bytes(x)
        })
    }
}

/// Largest encoding of a checkpoint whose active segment is at most
/// `segment_file_bytes` long: the header, an index entry pair per
/// `INDEX_INTERVAL_BYTES` (the time index is no denser than the offset
/// index), and a full producer table.
pub fn encoded_bytes_max(segment_file_bytes: u64) -> u64 {
    use crate::index::{OFFSET_ENTRY_BYTES, TIME_ENTRY_BYTES};
    use crate::limits::{INDEX_INTERVAL_BYTES, PRODUCERS_MAX, PRODUCER_BATCHES_KEPT};
    let header = 16 + 4 * 8 + 2 * 4;
    let index_entries = segment_file_bytes / INDEX_INTERVAL_BYTES + 1;
    let index = index_entries * (OFFSET_ENTRY_BYTES + TIME_ENTRY_BYTES) as u64;
    let producer = 8 + 2 + 2 + PRODUCER_BATCHES_KEPT as u64 * (4 + 4 + 8 + 8);
    header + index + 4 + PRODUCERS_MAX as u64 * producer
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(64 + self.offset_index.len() + self.time_index.len());
        body.extend_from_slice(&self.active_base.to_le_bytes());
        body.extend_from_slice(&self.recovery_pos.to_le_bytes());
        body.extend_from_slice(&self.next_offset.to_le_bytes());
        body.extend_from_slice(&self.max_timestamp.unwrap_or(i64::MIN).to_le_bytes());
        body.extend_from_slice(&(self.offset_index.len() as u32).to_le_bytes());
        body.extend_from_slice(&(self.time_index.len() as u32).to_le_bytes());
        body.extend_from_slice(&self.offset_index);
        body.extend_from_slice(&self.time_index);
        self.producers.encode(&mut body);
        let mut out = Vec::with_capacity(16 + body.len());
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.extend_from_slice(&VERSION.to_le_bytes());
        let flags = if self.clean { FLAG_CLEAN } else { 0 };
        out.extend_from_slice(&flags.to_le_bytes());
        out.extend_from_slice(
            &crc32c::crc32c_append(crc32c::crc32c(&flags.to_le_bytes()), &body).to_le_bytes(),
        );
        out.extend_from_slice(&body);
        out
    }

    /// Decodes a checkpoint; `None` for anything damaged or foreign.
    pub fn decode(bytes: &[u8]) -> Option<Checkpoint> {
        let mut r = Reader { rest: bytes };
        if r.u32()? != MAGIC || r.u32()? != VERSION {
            return None;
        }
        let flags = r.u32()?;
        let crc = r.u32()?;
        if crc32c::crc32c_append(crc32c::crc32c(&flags.to_le_bytes()), r.rest) != crc {
            return None;
        }
        let active_base = r.u64()?;
        let recovery_pos = r.u64()?;
        let next_offset = r.u64()?;
        let max_ts = r.u64()? as i64;
        let n_off = r.u32()? as usize;
        let n_time = r.u32()? as usize;
        let offset_index = r.bytes(n_off)?.to_vec();
        let time_index = r.bytes(n_time)?.to_vec();
        let producers = ProducerTable::decode(&mut r)?;
        Some(Checkpoint {
            clean: flags & FLAG_CLEAN != 0,
            active_base,
            recovery_pos,
            next_offset,
            max_timestamp: (max_ts != i64::MIN).then_some(max_ts),
            offset_index,
            time_index,
            producers,
        })
    }

    /// Reads and decodes `dir`'s checkpoint; `None` if missing or damaged.
    /// Blocking: call it on the blocking thread (an open does).
    pub fn load(dir: &Path) -> Option<Checkpoint> {
        let bytes = std::fs::read(dir.join(FILE_NAME)).ok()?;
        let c = Checkpoint::decode(&bytes);
        if c.is_none() {
            tracing::warn!(dir = %dir.display(), "recovery checkpoint is damaged; recovering by scanning");
        }
        c
    }
}

/// Kept here for the broker, which writes its own files with it.
pub use crate::durable::write_durably;

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn roundtrip_and_damage() {
        let mut c = Checkpoint {
            clean: true,
            active_base: 10,
            recovery_pos: 4096,
            next_offset: 77,
            max_timestamp: Some(5),
            offset_index: vec![0; 16],
            time_index: vec![1; 12],
            producers: ProducerTable::default(),
        };
        let h = shoal_wire::BatchHeader::decode(&{
            let mut b = shoal_wire::batch::BatchBuilder::default();
            b.push(&shoal_wire::NewRecord {
                value: Some(b"x"),
                ..Default::default()
            })
            .unwrap();
            b.finish(3, 0, 0)
        })
        .unwrap();
        c.producers.record(&h, 12);
        let bytes = c.encode();
        assert_eq!(Checkpoint::decode(&bytes), Some(c.clone()));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert_ne!(Checkpoint::decode(&bad), Some(c.clone()), "flip at {i}");
        }
        assert_eq!(Checkpoint::decode(&bytes[..bytes.len() - 1]), None);
    }
}
