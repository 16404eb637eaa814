//! The record batch: the unit of storage, replication and transfer.
//!
//! A batch is a 64-byte header followed by its records. The bytes a producer
//! sends are the bytes the log stores and the bytes a fetch returns; only the
//! two fields the broker owns (`base_offset`, `leader_epoch`) are rewritten on
//! append, and they sit outside the CRC so rewriting them never re-hashes the
//! batch. `wire/FORMAT.md` documents the layout byte by byte.

use crate::error::BatchError;

/// Size of the fixed batch header.
pub const BATCH_HEADER_BYTES: usize = 64;
/// Format version written in `magic`.
pub const MAGIC: u8 = 1;
/// The CRC covers `[CRC_START, batch_len)`: everything after the CRC field.
pub const CRC_START: usize = 20;
/// Fixed bytes of one record before its variable parts.
pub const RECORD_FIXED_BYTES: usize = 4 + 4 + 4 + 4 + 4 + 2;
/// No sequence (non-idempotent producer).
pub const NO_SEQUENCE: i32 = -1;
/// No producer id (non-idempotent producer).
pub const NO_PRODUCER_ID: i64 = -1;

// Field offsets inside the header.
const OFF_BASE_OFFSET: usize = 0;
const OFF_BATCH_LEN: usize = 8;
const OFF_LEADER_EPOCH: usize = 12;
const OFF_CRC: usize = 16;
const OFF_MAGIC: usize = 20;
const OFF_ATTRIBUTES: usize = 22;
const OFF_RECORD_COUNT: usize = 24;
const OFF_BASE_SEQUENCE: usize = 28;
const OFF_FIRST_TIMESTAMP: usize = 32;
const OFF_MAX_TIMESTAMP: usize = 40;
const OFF_PRODUCER_ID: usize = 48;
const OFF_PRODUCER_EPOCH: usize = 56;
const OFF_RESERVED: usize = 58;

const _: () = assert!(OFF_CRC + 4 == CRC_START);
const _: () = assert!(OFF_RESERVED + 6 == BATCH_HEADER_BYTES);
const _: () = assert!(BATCH_HEADER_BYTES.is_multiple_of(8));

/// Attribute bits; every bit not listed here must be zero.
pub mod attributes {
    /// Compression codec (bits 0-2). Only `0` (none) is accepted today.
    pub const COMPRESSION_MASK: u16 = 0b111;
    /// The batch is a control batch (transaction markers, reserved).
    pub const CONTROL: u16 = 1 << 5;
    /// All bits a valid batch may set.
    pub const KNOWN: u16 = COMPRESSION_MASK | CONTROL;
}

/// The decoded fixed header of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub base_offset: u64,
    /// Length of the whole batch, header included.
    pub batch_len: u32,
    pub leader_epoch: u32,
    pub crc: u32,
    pub magic: u8,
    pub attributes: u16,
    pub record_count: u32,
    pub base_sequence: i32,
    pub first_timestamp_ms: i64,
    pub max_timestamp_ms: i64,
    pub producer_id: i64,
    pub producer_epoch: i16,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn i32_at(b: &[u8], at: usize) -> i32 {
    u32_at(b, at) as i32
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}
fn i64_at(b: &[u8], at: usize) -> i64 {
    u64_at(b, at) as i64
}

impl BatchHeader {
    /// Decodes the header fields without validating the body.
    pub fn decode(bytes: &[u8]) -> Result<BatchHeader, BatchError> {
        if bytes.len() < BATCH_HEADER_BYTES {
            return Err(BatchError::Truncated {
                needed: BATCH_HEADER_BYTES,
                have: bytes.len(),
            });
        }
        Ok(BatchHeader {
            base_offset: u64_at(bytes, OFF_BASE_OFFSET),
            batch_len: u32_at(bytes, OFF_BATCH_LEN),
            leader_epoch: u32_at(bytes, OFF_LEADER_EPOCH),
            crc: u32_at(bytes, OFF_CRC),
            magic: bytes[OFF_MAGIC],
            attributes: u16_at(bytes, OFF_ATTRIBUTES),
            record_count: u32_at(bytes, OFF_RECORD_COUNT),
            base_sequence: i32_at(bytes, OFF_BASE_SEQUENCE),
            first_timestamp_ms: i64_at(bytes, OFF_FIRST_TIMESTAMP),
            max_timestamp_ms: i64_at(bytes, OFF_MAX_TIMESTAMP),
            producer_id: i64_at(bytes, OFF_PRODUCER_ID),
            producer_epoch: u16_at(bytes, OFF_PRODUCER_EPOCH) as i16,
        })
    }

    /// Writes the header into `out[..64]` (the CRC field as stored in `self`).
    pub fn encode(&self, out: &mut [u8]) {
        assert!(out.len() >= BATCH_HEADER_BYTES);
        out[OFF_BASE_OFFSET..OFF_BASE_OFFSET + 8].copy_from_slice(&self.base_offset.to_le_bytes());
        out[OFF_BATCH_LEN..OFF_BATCH_LEN + 4].copy_from_slice(&self.batch_len.to_le_bytes());
        out[OFF_LEADER_EPOCH..OFF_LEADER_EPOCH + 4]
            .copy_from_slice(&self.leader_epoch.to_le_bytes());
        out[OFF_CRC..OFF_CRC + 4].copy_from_slice(&self.crc.to_le_bytes());
        out[OFF_MAGIC] = self.magic;
        out[OFF_MAGIC + 1] = 0;
        out[OFF_ATTRIBUTES..OFF_ATTRIBUTES + 2].copy_from_slice(&self.attributes.to_le_bytes());
        out[OFF_RECORD_COUNT..OFF_RECORD_COUNT + 4]
            .copy_from_slice(&self.record_count.to_le_bytes());
        out[OFF_BASE_SEQUENCE..OFF_BASE_SEQUENCE + 4]
            .copy_from_slice(&self.base_sequence.to_le_bytes());
        out[OFF_FIRST_TIMESTAMP..OFF_FIRST_TIMESTAMP + 8]
            .copy_from_slice(&self.first_timestamp_ms.to_le_bytes());
        out[OFF_MAX_TIMESTAMP..OFF_MAX_TIMESTAMP + 8]
            .copy_from_slice(&self.max_timestamp_ms.to_le_bytes());
        out[OFF_PRODUCER_ID..OFF_PRODUCER_ID + 8].copy_from_slice(&self.producer_id.to_le_bytes());
        out[OFF_PRODUCER_EPOCH..OFF_PRODUCER_EPOCH + 2]
            .copy_from_slice(&self.producer_epoch.to_le_bytes());
        out[OFF_RESERVED..BATCH_HEADER_BYTES].fill(0);
    }

    /// Offset of the last record in the batch.
    pub fn last_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count.max(1)) - 1
    }

    /// Offset following the batch.
    pub fn next_offset(&self) -> u64 {
        self.base_offset + u64::from(self.record_count)
    }

    /// Whether the batch carries an idempotent producer id.
    pub fn is_idempotent(&self) -> bool {
        self.producer_id >= 0 && self.base_sequence >= 0
    }
}

/// Overwrites the broker-owned `base_offset` (outside the CRC).
pub fn set_base_offset(batch: &mut [u8], base_offset: u64) {
    batch[OFF_BASE_OFFSET..OFF_BASE_OFFSET + 8].copy_from_slice(&base_offset.to_le_bytes());
}

/// Overwrites the broker-owned `leader_epoch` (outside the CRC).
pub fn set_leader_epoch(batch: &mut [u8], epoch: u32) {
    batch[OFF_LEADER_EPOCH..OFF_LEADER_EPOCH + 4].copy_from_slice(&epoch.to_le_bytes());
}

/// CRC32C of a complete batch's covered region.
pub fn compute_crc(batch: &[u8]) -> u32 {
    crc32c::crc32c(&batch[CRC_START..])
}

/// Checks the header of the batch at the start of `bytes` against the limits
/// and the bytes available, without touching the body.
pub fn check_header(bytes: &[u8], batch_bytes_max: usize) -> Result<BatchHeader, BatchError> {
    let header = BatchHeader::decode(bytes)?;
    if header.magic != MAGIC {
        return Err(BatchError::BadMagic(header.magic));
    }
    let len = header.batch_len as usize;
    if len < BATCH_HEADER_BYTES {
        return Err(BatchError::BadLength(header.batch_len));
    }
    if len > batch_bytes_max {
        return Err(BatchError::TooLarge {
            len,
            max: batch_bytes_max,
        });
    }
    if header.record_count == 0 {
        return Err(BatchError::Empty);
    }
    if header.attributes & !attributes::KNOWN != 0
        || header.attributes & attributes::COMPRESSION_MASK != 0
    {
        return Err(BatchError::UnsupportedAttributes(header.attributes));
    }
    if bytes.len() < len {
        return Err(BatchError::Truncated {
            needed: len,
            have: bytes.len(),
        });
    }
    Ok(header)
}

/// Full validation of one batch that spans exactly `bytes`: header, length,
/// CRC and the record framing inside. This is what a log accepts.
pub fn validate_batch(bytes: &[u8], batch_bytes_max: usize) -> Result<BatchHeader, BatchError> {
    let header = check_header(bytes, batch_bytes_max)?;
    if header.batch_len as usize != bytes.len() {
        return Err(BatchError::BadLength(header.batch_len));
    }
    let crc = compute_crc(bytes);
    if crc != header.crc {
        return Err(BatchError::BadCrc {
            stored: header.crc,
            computed: crc,
        });
    }
    let mut count = 0u32;
    for record in Records::new(bytes) {
        let record = record?;
        if record.offset_delta != count {
            return Err(BatchError::BadRecord("offset deltas are not 0, 1, 2, ..."));
        }
        count += 1;
    }
    if count != header.record_count {
        return Err(BatchError::BadRecord(
            "record count does not match the header",
        ));
    }
    Ok(header)
}

/// One record inside a batch, borrowed from the batch bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub offset_delta: u32,
    pub timestamp_delta_ms: i32,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    headers: &'a [u8],
    header_count: u16,
}

impl<'a> Record<'a> {
    /// The record's headers as (name, value) pairs.
    pub fn headers(&self) -> RecordHeaders<'a> {
        RecordHeaders {
            rest: self.headers,
            left: self.header_count,
        }
    }
}

/// Iterator over a record's headers.
pub struct RecordHeaders<'a> {
    rest: &'a [u8],
    left: u16,
}

impl<'a> Iterator for RecordHeaders<'a> {
    type Item = (&'a [u8], &'a [u8]);
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // Bounds were verified when the record was parsed.
        let name_len = u16_at(self.rest, 0) as usize;
        let name = &self.rest[2..2 + name_len];
        let value_len = u32_at(self.rest, 2 + name_len) as usize;
        let start = 2 + name_len + 4;
        let value = &self.rest[start..start + value_len];
        self.rest = &self.rest[start + value_len..];
        Some((name, value))
    }
}

/// Iterator over the records of one batch.
pub struct Records<'a> {
    rest: &'a [u8],
    failed: bool,
}

impl<'a> Records<'a> {
    /// Iterates the records of the batch `batch` (header included; the
    /// caller has checked the header).
    pub fn new(batch: &'a [u8]) -> Records<'a> {
        let end = BatchHeader::decode(batch)
            .map(|h| (h.batch_len as usize).min(batch.len()))
            .unwrap_or(0);
        Records {
            rest: batch.get(BATCH_HEADER_BYTES..end).unwrap_or(&[]),
            failed: false,
        }
    }
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], BatchError> {
    if rest.len() < n {
        return Err(BatchError::BadRecord("record field runs past the batch"));
    }
    let (a, b) = rest.split_at(n);
    *rest = b;
    Ok(a)
}

fn take_nullable<'a>(rest: &mut &'a [u8]) -> Result<Option<&'a [u8]>, BatchError> {
    let len = i32_at(take(rest, 4)?, 0);
    if len < -1 {
        return Err(BatchError::BadRecord("negative length"));
    }
    if len == -1 {
        return Ok(None);
    }
    take(rest, len as usize).map(Some)
}

fn parse_record<'a>(rest: &mut &'a [u8]) -> Result<Record<'a>, BatchError> {
    let len = u32_at(take(rest, 4)?, 0) as usize;
    let mut body = take(rest, len)?;
    let offset_delta = u32_at(take(&mut body, 4)?, 0);
    let timestamp_delta_ms = i32_at(take(&mut body, 4)?, 0);
    let key = take_nullable(&mut body)?;
    let value = take_nullable(&mut body)?;
    let header_count = u16_at(take(&mut body, 2)?, 0);
    let headers = body;
    let mut check = body;
    for _ in 0..header_count {
        let name_len = u16_at(take(&mut check, 2)?, 0) as usize;
        take(&mut check, name_len)?;
        let value_len = u32_at(take(&mut check, 4)?, 0) as usize;
        take(&mut check, value_len)?;
    }
    if !check.is_empty() {
        return Err(BatchError::BadRecord("trailing bytes after record headers"));
    }
    Ok(Record {
        offset_delta,
        timestamp_delta_ms,
        key,
        value,
        headers,
        header_count,
    })
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, BatchError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        let r = parse_record(&mut self.rest);
        if r.is_err() {
            self.failed = true;
        }
        Some(r)
    }
}

/// Iterates the batches laid back to back in `bytes` (a fetch response body
/// or a log segment). Stops with an error at the first malformed batch; a
/// trailing partial batch is reported as `Truncated`.
pub struct Batches<'a> {
    rest: &'a [u8],
    batch_bytes_max: usize,
    failed: bool,
}

impl<'a> Batches<'a> {
    pub fn new(bytes: &'a [u8], batch_bytes_max: usize) -> Batches<'a> {
        Batches {
            rest: bytes,
            batch_bytes_max,
            failed: false,
        }
    }
}

impl<'a> Iterator for Batches<'a> {
    type Item = Result<(BatchHeader, &'a [u8]), BatchError>;
    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.rest.is_empty() {
            return None;
        }
        match check_header(self.rest, self.batch_bytes_max) {
            Ok(h) => {
                let (batch, rest) = self.rest.split_at(h.batch_len as usize);
                self.rest = rest;
                Some(Ok((h, batch)))
            }
            Err(e) => {
                self.failed = true;
                Some(Err(e))
            }
        }
    }
}

/// Builds a batch in a caller-owned buffer.
///
/// Producers fill one of these per partition; `finish` writes the header and
/// the CRC. The base offset is left at zero for the log to assign.
#[derive(Debug)]
pub struct BatchBuilder {
    buf: Vec<u8>,
    count: u32,
    first_timestamp_ms: i64,
    max_timestamp_ms: i64,
}

/// A record to add to a batch.
#[derive(Debug, Clone, Copy, Default)]
pub struct NewRecord<'a> {
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    pub headers: &'a [(&'a [u8], &'a [u8])],
    pub timestamp_ms: i64,
}

impl NewRecord<'_> {
    /// Encoded size of this record inside a batch.
    pub fn encoded_len(&self) -> usize {
        RECORD_FIXED_BYTES
            + self.key.map_or(0, <[u8]>::len)
            + self.value.map_or(0, <[u8]>::len)
            + self
                .headers
                .iter()
                .map(|(n, v)| 2 + n.len() + 4 + v.len())
                .sum::<usize>()
    }
}

impl Default for BatchBuilder {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl BatchBuilder {
    pub fn with_capacity(bytes: usize) -> BatchBuilder {
        let mut buf = Vec::with_capacity(bytes.max(BATCH_HEADER_BYTES));
        buf.resize(BATCH_HEADER_BYTES, 0);
        BatchBuilder {
            buf,
            count: 0,
            first_timestamp_ms: 0,
            max_timestamp_ms: 0,
        }
    }

    /// Bytes the batch would have if finished now.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn record_count(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends a record. Fails if a field is too large for the format.
    pub fn push(&mut self, record: &NewRecord<'_>) -> Result<(), BatchError> {
        if self.count == 0 {
            self.first_timestamp_ms = record.timestamp_ms;
            self.max_timestamp_ms = record.timestamp_ms;
        }
        let delta = record.timestamp_ms - self.first_timestamp_ms;
        let delta = i32::try_from(delta)
            .map_err(|_| BatchError::BadRecord("timestamp delta out of range"))?;
        if record.headers.len() > usize::from(u16::MAX) {
            return Err(BatchError::BadRecord("too many headers"));
        }
        let body_len = record.encoded_len() - 4;
        let body_len =
            u32::try_from(body_len).map_err(|_| BatchError::BadRecord("record too large"))?;
        let b = &mut self.buf;
        b.extend_from_slice(&body_len.to_le_bytes());
        b.extend_from_slice(&self.count.to_le_bytes());
        b.extend_from_slice(&delta.to_le_bytes());
        for field in [record.key, record.value] {
            match field {
                None => b.extend_from_slice(&(-1i32).to_le_bytes()),
                Some(f) => {
                    let len = i32::try_from(f.len())
                        .map_err(|_| BatchError::BadRecord("field too large"))?;
                    b.extend_from_slice(&len.to_le_bytes());
                    b.extend_from_slice(f);
                }
            }
        }
        b.extend_from_slice(&(record.headers.len() as u16).to_le_bytes());
        for (name, value) in record.headers {
            let name_len = u16::try_from(name.len())
                .map_err(|_| BatchError::BadRecord("header name too long"))?;
            b.extend_from_slice(&name_len.to_le_bytes());
            b.extend_from_slice(name);
            b.extend_from_slice(&(value.len() as u32).to_le_bytes());
            b.extend_from_slice(value);
        }
        self.count += 1;
        self.max_timestamp_ms = self.max_timestamp_ms.max(record.timestamp_ms);
        Ok(())
    }

    /// Writes header and CRC, returning the finished batch and resetting
    /// the builder for reuse. The batch's buffer is handed over (no copy);
    /// the builder starts again with a buffer of the same capacity, so the
    /// next batch of a similar size grows nothing.
    pub fn finish(&mut self, producer_id: i64, producer_epoch: i16, base_sequence: i32) -> Vec<u8> {
        let mut next = Vec::with_capacity(self.buf.capacity());
        next.resize(BATCH_HEADER_BYTES, 0);
        let mut out = std::mem::replace(&mut self.buf, next);
        let header = BatchHeader {
            base_offset: 0,
            batch_len: out.len() as u32,
            leader_epoch: 0,
            crc: 0,
            magic: MAGIC,
            attributes: 0,
            record_count: self.count,
            base_sequence,
            first_timestamp_ms: self.first_timestamp_ms,
            max_timestamp_ms: self.max_timestamp_ms,
            producer_id,
            producer_epoch,
        };
        header.encode(&mut out);
        let crc = compute_crc(&out);
        out[OFF_CRC..OFF_CRC + 4].copy_from_slice(&crc.to_le_bytes());
        self.count = 0;
        out
    }
}

/// Convenience: one batch from plain values (tests, CLI, perf).
pub fn build_batch(values: &[&[u8]], timestamp_ms: i64) -> Vec<u8> {
    let mut b = BatchBuilder::with_capacity(values.iter().map(|v| v.len() + 32).sum());
    for v in values {
        b.push(&NewRecord {
            value: Some(v),
            timestamp_ms,
            ..NewRecord::default()
        })
        .expect("plain values always fit the format");
    }
    b.finish(NO_PRODUCER_ID, 0, NO_SEQUENCE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_header_and_records() {
        let mut b = BatchBuilder::default();
        b.push(&NewRecord {
            key: Some(b"k"),
            value: Some(b"hello"),
            headers: &[(b"h1", b"v1")],
            timestamp_ms: 1000,
        })
        .unwrap();
        b.push(&NewRecord {
            key: None,
            value: Some(b""),
            headers: &[],
            timestamp_ms: 1005,
        })
        .unwrap();
        let mut batch = b.finish(7, 1, 42);
        set_base_offset(&mut batch, 99);
        set_leader_epoch(&mut batch, 3);
        let h = validate_batch(&batch, 1 << 20).unwrap();
        assert_eq!(h.base_offset, 99);
        assert_eq!(h.leader_epoch, 3);
        assert_eq!(h.record_count, 2);
        assert_eq!(h.last_offset(), 100);
        assert_eq!(h.producer_id, 7);
        assert_eq!(h.base_sequence, 42);
        assert_eq!(h.first_timestamp_ms, 1000);
        assert_eq!(h.max_timestamp_ms, 1005);
        let recs: Vec<_> = Records::new(&batch).map(Result::unwrap).collect();
        assert_eq!(recs[0].key, Some(&b"k"[..]));
        assert_eq!(recs[0].value, Some(&b"hello"[..]));
        assert_eq!(
            recs[0].headers().collect::<Vec<_>>(),
            vec![(&b"h1"[..], &b"v1"[..])]
        );
        assert_eq!(recs[1].key, None);
        assert_eq!(recs[1].timestamp_delta_ms, 5);
    }

    #[test]
    fn flipped_bit_fails_crc_and_truncation_is_caught() {
        let batch = build_batch(&[b"abc", b"defg"], 5);
        for i in CRC_START..batch.len() {
            let mut bad = batch.clone();
            bad[i] ^= 0x10;
            assert!(
                validate_batch(&bad, 1 << 20).is_err(),
                "flip at {i} not caught"
            );
        }
        assert!(matches!(
            validate_batch(&batch[..batch.len() - 1], 1 << 20),
            Err(BatchError::Truncated { .. }) | Err(BatchError::BadLength(_))
        ));
        assert!(matches!(
            validate_batch(&batch, 10),
            Err(BatchError::TooLarge { .. })
        ));
    }

    #[test]
    fn batches_iterator_walks_back_to_back() {
        let a = build_batch(&[b"1"], 0);
        let b = build_batch(&[b"2", b"3"], 0);
        let mut all = a.clone();
        all.extend_from_slice(&b);
        let got: Vec<_> = Batches::new(&all, 1 << 20)
            .map(|r| r.unwrap().0.record_count)
            .collect();
        assert_eq!(got, vec![1, 2]);
        let cut = &all[..all.len() - 3];
        let got: Vec<_> = Batches::new(cut, 1 << 20).collect();
        assert!(got[1].is_err());
    }

    #[test]
    fn finish_keeps_the_builders_capacity() {
        let mut b = BatchBuilder::with_capacity(64 * 1024);
        b.push(&NewRecord {
            value: Some(b"v"),
            ..NewRecord::default()
        })
        .unwrap();
        let batch = b.finish(NO_PRODUCER_ID, 0, NO_SEQUENCE);
        assert!(validate_batch(&batch, 1 << 20).is_ok());
        assert!(b.buf.capacity() >= 64 * 1024);
        assert_eq!(b.len(), BATCH_HEADER_BYTES);
        assert!(b.is_empty());
    }
}
