//! Sparse per-segment indexes (S2).
//!
//! - Offset index: entries of (`relative_offset: u32`, `position: u32`),
//!   little-endian, one every [`INDEX_INTERVAL_BYTES`] of log, pointing at
//!   the start of a batch.
//! - Time index: entries of (`max_timestamp_ms: i64`, `relative_offset: u32`):
//!   the running maximum timestamp and the batch that raised it.
//!
//! The active segment keeps both in memory (plain `Vec<u8>` in the file
//! encoding); a closed segment maps its `.index` / `.timeindex` files.

use memmap2::Mmap;
use std::fs::File;
use std::path::Path;

pub use crate::limits::INDEX_INTERVAL_BYTES;

pub const OFFSET_ENTRY_BYTES: usize = 8;
pub const TIME_ENTRY_BYTES: usize = 12;

/// Bytes of one index, in memory or mapped.
pub enum IndexBytes {
    Mem(Vec<u8>),
    Mapped(Mmap),
}

impl IndexBytes {
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            IndexBytes::Mem(v) => v,
            IndexBytes::Mapped(m) => m,
        }
    }

    /// Maps an index file read-only. An empty file maps to an empty index.
    pub fn map(path: &Path) -> std::io::Result<IndexBytes> {
        let file = File::open(path)?;
        if file.metadata()?.len() == 0 {
            return Ok(IndexBytes::Mem(Vec::new()));
        }
        // SAFETY: index files are written once (at roll) and renamed into
        // place; nothing writes them while they are mapped. Truncation by
        // another process would be an operator error outside our contract.
        let map = unsafe { Mmap::map(&file)? };
        Ok(IndexBytes::Mapped(map))
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn i64_at(b: &[u8], at: usize) -> i64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    i64::from_le_bytes(x)
}

/// The two indexes of one segment.
pub struct SegmentIndex {
    pub offsets: IndexBytes,
    pub times: IndexBytes,
    /// Log position when the last offset entry was added.
    last_indexed_pos: Option<u64>,
}

impl Default for SegmentIndex {
    fn default() -> Self {
        SegmentIndex {
            offsets: IndexBytes::Mem(Vec::new()),
            times: IndexBytes::Mem(Vec::new()),
            last_indexed_pos: None,
        }
    }
}

impl SegmentIndex {
    pub fn from_parts(offsets: IndexBytes, times: IndexBytes) -> SegmentIndex {
        let mut idx = SegmentIndex {
            offsets,
            times,
            last_indexed_pos: None,
        };
        idx.last_indexed_pos = idx
            .offset_entry(idx.offset_entries().saturating_sub(1))
            .map(|e| u64::from(e.1));
        idx
    }

    pub fn offset_entries(&self) -> usize {
        self.offsets.as_bytes().len() / OFFSET_ENTRY_BYTES
    }

    pub fn time_entries(&self) -> usize {
        self.times.as_bytes().len() / TIME_ENTRY_BYTES
    }

    pub fn offset_entry(&self, i: usize) -> Option<(u32, u32)> {
        let b = self.offsets.as_bytes();
        let at = i.saturating_mul(OFFSET_ENTRY_BYTES);
        (at + OFFSET_ENTRY_BYTES <= b.len()).then(|| (u32_at(b, at), u32_at(b, at + 4)))
    }

    pub fn time_entry(&self, i: usize) -> Option<(i64, u32)> {
        let b = self.times.as_bytes();
        let at = i.saturating_mul(TIME_ENTRY_BYTES);
        (at + TIME_ENTRY_BYTES <= b.len()).then(|| (i64_at(b, at), u32_at(b, at + 8)))
    }

    /// The segment's largest timestamp recorded in the time index.
    pub fn max_timestamp(&self) -> Option<i64> {
        self.time_entry(self.time_entries().checked_sub(1)?)
            .map(|e| e.0)
    }

    /// Records a batch starting at `pos` (an active-segment index only).
    /// `max_ts_before` is the running max before this batch.
    pub fn on_batch(
        &mut self,
        rel_offset: u32,
        pos: u32,
        batch_max_ts: i64,
        max_ts_before: Option<i64>,
    ) {
        let due = match self.last_indexed_pos {
            None => true,
            Some(last) => u64::from(pos) >= last + INDEX_INTERVAL_BYTES,
        };
        let IndexBytes::Mem(offsets) = &mut self.offsets else {
            panic!("appending to a mapped index");
        };
        if due {
            offsets.extend_from_slice(&rel_offset.to_le_bytes());
            offsets.extend_from_slice(&pos.to_le_bytes());
            self.last_indexed_pos = Some(u64::from(pos));
        }
        let raised = max_ts_before.is_none_or(|m| batch_max_ts > m);
        let last_time_rel = self
            .time_entries()
            .checked_sub(1)
            .and_then(|i| self.time_entry(i))
            .map(|e| e.1);
        if raised {
            let IndexBytes::Mem(times) = &mut self.times else {
                panic!("appending to a mapped index");
            };
            // Collapse repeated raises inside one index interval: keep the
            // time index as sparse as the offset index.
            if !due && last_time_rel.is_some() && times.len() >= TIME_ENTRY_BYTES {
                let at = times.len() - TIME_ENTRY_BYTES;
                times[at..at + 8].copy_from_slice(&batch_max_ts.to_le_bytes());
                // Keep the earlier relative offset: scanning from there finds
                // every batch up to this one.
            } else {
                times.extend_from_slice(&batch_max_ts.to_le_bytes());
                times.extend_from_slice(&rel_offset.to_le_bytes());
            }
        }
    }

    /// The entry at or before `rel_offset`: (relative offset, position).
    pub fn floor_offset(&self, rel_offset: u32) -> (u32, u32) {
        let n = self.offset_entries();
        // First entry whose offset is greater, minus one.
        let (mut lo, mut hi) = (0usize, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let (o, _) = self.offset_entry(mid).unwrap_or((u32::MAX, 0));
            if o <= rel_offset {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if lo == 0 {
            (0, 0)
        } else {
            self.offset_entry(lo - 1).unwrap_or((0, 0))
        }
    }

    /// Where to start scanning for the first batch with max timestamp >= `ts`:
    /// the relative offset of the first entry whose running maximum reaches
    /// `ts` (no batch before it can: the running maximum there was lower).
    /// `None` if no batch in this segment reaches `ts`.
    pub fn time_scan_start(&self, ts: i64) -> Option<u32> {
        let n = self.time_entries();
        let (mut lo, mut hi) = (0usize, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let (t, _) = self.time_entry(mid).unwrap_or((i64::MAX, 0));
            if t < ts {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if lo == n {
            return None;
        }
        self.time_entry(lo).map(|e| e.1)
    }

    /// Structural check of a loaded index against its segment's size.
    pub fn validate(&self, segment_len: u64) -> Result<(), String> {
        if !self
            .offsets
            .as_bytes()
            .len()
            .is_multiple_of(OFFSET_ENTRY_BYTES)
        {
            return Err("offset index length is not a whole number of entries".into());
        }
        if !self.times.as_bytes().len().is_multiple_of(TIME_ENTRY_BYTES) {
            return Err("time index length is not a whole number of entries".into());
        }
        let mut prev: Option<(u32, u32)> = None;
        for i in 0..self.offset_entries() {
            let e = self.offset_entry(i).unwrap_or_default();
            if u64::from(e.1) >= segment_len.max(1) {
                return Err(format!(
                    "offset index entry {i} points past the segment end"
                ));
            }
            if let Some(p) = prev {
                if e.0 <= p.0 || e.1 <= p.1 {
                    return Err(format!("offset index entry {i} is not increasing"));
                }
            } else if e != (0, 0) {
                return Err("offset index does not start at the segment start".into());
            }
            prev = Some(e);
        }
        let mut prev_t: Option<(i64, u32)> = None;
        for i in 0..self.time_entries() {
            let e = self.time_entry(i).unwrap_or_default();
            if let Some(p) = prev_t {
                if e.0 < p.0 || e.1 < p.1 {
                    return Err(format!("time index entry {i} is not increasing"));
                }
            }
            prev_t = Some(e);
        }
        Ok(())
    }
}
