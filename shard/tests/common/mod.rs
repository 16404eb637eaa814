#![allow(dead_code)]
use shoal_shard::{LogConfig, PartitionLog, SyncMode};
use shoal_wire::batch::{BatchBuilder, NewRecord, NO_PRODUCER_ID, NO_SEQUENCE};
use std::future::Future;

/// Runs `f` on a fresh glommio executor, like a shard would.
pub fn run<F, Fut, T>(f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    glommio::LocalExecutorBuilder::default()
        .spawn(f)
        .expect("executor starts")
        .join()
        .expect("executor finishes")
}

/// A batch of `n` records whose values encode (tag, i) and are `size` long.
pub fn batch(tag: u64, n: u32, size: usize, ts: i64) -> Vec<u8> {
    let mut b = BatchBuilder::default();
    for i in 0..n {
        let v = value(tag, i, size);
        b.push(&NewRecord {
            value: Some(&v),
            timestamp_ms: ts,
            ..Default::default()
        })
        .unwrap();
    }
    b.finish(NO_PRODUCER_ID, 0, NO_SEQUENCE)
}

pub fn value(tag: u64, i: u32, size: usize) -> Vec<u8> {
    let mut v = format!("{tag}:{i}:").into_bytes();
    while v.len() < size {
        v.push(b'a' + (v.len() % 26) as u8);
    }
    v
}

/// All (offset, value) pairs in a byte run of batches.
pub fn records(bytes: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    for b in shoal_wire::batch::Batches::new(bytes, usize::MAX) {
        let (h, batch) = b.expect("valid batch");
        shoal_wire::batch::validate_batch(batch, usize::MAX).expect("batch passes validation");
        for r in shoal_wire::batch::Records::new(batch) {
            let r = r.unwrap();
            out.push((
                h.base_offset + u64::from(r.offset_delta),
                r.value.unwrap_or_default().to_vec(),
            ));
        }
    }
    out
}

/// Small segments (many rolls of little data).
pub fn small(sync: SyncMode) -> LogConfig {
    LogConfig {
        sync,
        segment_bytes: 64 * 1024,
        // Many rolls of little data, below the product's 1 MiB floor.
        test_segments: true,
        batch_bytes_max: 16 * 1024,
        write_buffer_bytes: 1024 * 1024,
        ..LogConfig::default()
    }
}

pub fn read_all(log: &PartitionLog) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut at = log.start_offset();
    loop {
        let s = log.read(at, 1 << 20).unwrap();
        if s.is_empty() {
            return out;
        }
        out.extend(records(s.bytes()).into_iter().filter(|(o, _)| *o >= at));
        at = s.next_offset;
    }
}
