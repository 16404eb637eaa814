//! Idempotent-producer state of one partition (C3).
//!
//! For each producer id, the epoch and the last few batches (sequence range
//! and offsets), so a retried batch is recognised and answered with its
//! original offsets instead of being written twice. Rebuilt from the log on
//! recovery; part of the recovery checkpoint.

use crate::error::{Error, Result};
use crate::limits::{PRODUCERS_MAX, PRODUCER_BATCHES_KEPT};
use shoal_wire::BatchHeader;
use std::collections::{HashMap, VecDeque};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProducerBatch {
    pub first_seq: i32,
    pub last_seq: i32,
    pub base_offset: u64,
    pub last_offset: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerEntry {
    pub epoch: i16,
    pub batches: VecDeque<ProducerBatch>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerTable {
    pub entries: HashMap<i64, ProducerEntry>,
}

/// `seq + n` in sequence space: sequences run 0..=i32::MAX and wrap to
/// 0, as Kafka's do (a negative sequence means "not idempotent").
fn seq_add(seq: i32, n: i64) -> i32 {
    (i64::from(seq) + n).rem_euclid(1 << 31) as i32
}

fn last_seq(h: &BatchHeader) -> i32 {
    seq_add(h.base_sequence, i64::from(h.record_count) - 1)
}

impl ProducerTable {
    /// `Ok(Some(batch))` if `h` repeats a batch already in the log.
    pub fn check(&self, h: &BatchHeader) -> Result<Option<ProducerBatch>> {
        let Some(e) = self.entries.get(&h.producer_id) else {
            return Ok(None);
        };
        if h.producer_epoch < e.epoch {
            return Err(Error::FencedProducer {
                producer_id: h.producer_id,
                current: e.epoch,
                got: h.producer_epoch,
            });
        }
        if h.producer_epoch > e.epoch {
            return Ok(None);
        }
        if let Some(b) = e
            .batches
            .iter()
            .find(|b| b.first_seq == h.base_sequence && b.last_seq == last_seq(h))
        {
            return Ok(Some(*b));
        }
        let expected = e.batches.back().map_or(0, |b| seq_add(b.last_seq, 1));
        if h.base_sequence != expected {
            return Err(Error::OutOfOrderSequence {
                producer_id: h.producer_id,
                expected,
                got: h.base_sequence,
            });
        }
        Ok(None)
    }

    /// Records an appended idempotent batch.
    pub fn record(&mut self, h: &BatchHeader, base_offset: u64) {
        if !self.entries.contains_key(&h.producer_id) && self.entries.len() >= PRODUCERS_MAX {
            // Forget the producer that wrote longest ago.
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.batches.back().map_or(0, |b| b.last_offset))
                .map(|(id, _)| *id)
            {
                self.entries.remove(&oldest);
            }
        }
        let e = self.entries.entry(h.producer_id).or_default();
        if h.producer_epoch != e.epoch {
            e.epoch = h.producer_epoch;
            e.batches.clear();
        }
        if e.batches.len() == PRODUCER_BATCHES_KEPT {
            e.batches.pop_front();
        }
        e.batches.push_back(ProducerBatch {
            first_seq: h.base_sequence,
            last_seq: last_seq(h),
            base_offset,
            last_offset: base_offset + u64::from(h.record_count) - 1,
        });
    }

    /// Drops what refers to offsets at or past `next_offset` (lost in a
    /// crash), so a retry of a lost batch is written again.
    pub fn truncate_to(&mut self, next_offset: u64) {
        self.entries.retain(|_, e| {
            e.batches.retain(|b| b.last_offset < next_offset);
            !e.batches.is_empty()
        });
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for (id, e) in &self.entries {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&e.epoch.to_le_bytes());
            out.extend_from_slice(&(e.batches.len() as u16).to_le_bytes());
            for b in &e.batches {
                out.extend_from_slice(&b.first_seq.to_le_bytes());
                out.extend_from_slice(&b.last_seq.to_le_bytes());
                out.extend_from_slice(&b.base_offset.to_le_bytes());
                out.extend_from_slice(&b.last_offset.to_le_bytes());
            }
        }
    }

    pub fn decode(r: &mut crate::checkpoint::Reader<'_>) -> Option<ProducerTable> {
        let n = r.u32()? as usize;
        if n > PRODUCERS_MAX {
            return None;
        }
        let mut t = ProducerTable::default();
        for _ in 0..n {
            let id = r.u64()? as i64;
            let epoch = r.u16()? as i16;
            let nb = r.u16()? as usize;
            if nb > PRODUCER_BATCHES_KEPT {
                return None;
            }
            let mut batches = VecDeque::with_capacity(nb);
            for _ in 0..nb {
                batches.push_back(ProducerBatch {
                    first_seq: r.u32()? as i32,
                    last_seq: r.u32()? as i32,
                    base_offset: r.u64()?,
                    last_offset: r.u64()?,
                });
            }
            t.entries.insert(id, ProducerEntry { epoch, batches });
        }
        Some(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(seq: i32, records: u32) -> BatchHeader {
        BatchHeader {
            base_offset: 0,
            batch_len: 0,
            leader_epoch: 0,
            crc: 0,
            magic: 1,
            attributes: 0,
            record_count: records,
            base_sequence: seq,
            first_timestamp_ms: 0,
            max_timestamp_ms: 0,
            producer_id: 7,
            producer_epoch: 0,
        }
    }

    /// A batch spanning i32::MAX wraps to 0, and the next batch is expected
    /// where the wrapped one ended.
    #[test]
    fn sequences_wrap_to_zero() {
        let mut t = ProducerTable::default();
        let h = header(i32::MAX - 1, 3);
        assert_eq!(last_seq(&h), 0);
        assert_eq!(t.check(&h).unwrap(), None);
        t.record(&h, 10);
        assert!(t.check(&h).unwrap().is_some(), "a retry is a duplicate");
        assert_eq!(t.check(&header(1, 1)).unwrap(), None);
        assert!(matches!(
            t.check(&header(0, 1)),
            Err(Error::OutOfOrderSequence {
                expected: 1,
                got: 0,
                ..
            })
        ));
    }
}
