//! Property test: random appends, rolls, clean and unclean reopenings and
//! retention, with every read compared against a plain in-memory model.
//! Readers waiting at the end turn the tail cache on and off, so reads are
//! served from both the segment files and the cache's memory files; the
//! bytes a sendfile would send (`file()` at `file_position()`) are checked
//! against `bytes()` either way.

mod common;
use common::*;
use proptest::prelude::*;
use shoal_shard::{LogConfig, PartitionLog, SyncMode};
use std::time::Duration;

#[derive(Debug, Clone)]
enum Op {
    Append {
        records: u32,
        size: usize,
    },
    ReopenClean,
    ReopenCrash,
    Retain,
    Read {
        at: u16,
        max: u32,
    },
    /// A reader waits at the end of the log (turns the tail cache on).
    Interest,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (1u32..6, 1usize..1500).prop_map(|(records, size)| Op::Append { records, size }),
        1 => Just(Op::ReopenClean),
        1 => Just(Op::ReopenCrash),
        1 => Just(Op::Retain),
        3 => (any::<u16>(), 1u32..20_000).prop_map(|(at, max)| Op::Read { at, max }),
        1 => Just(Op::Interest),
    ]
}

fn config(sync: SyncMode) -> LogConfig {
    LogConfig {
        sync,
        segment_bytes: 16 * 1024,
        test_segments: true,
        batch_bytes_max: 16 * 1024,
        write_buffer_bytes: 1024 * 1024,
        retention_bytes: Some(48 * 1024),
        retention_age: Some(Duration::from_secs(3600)),
        tail_cache_bytes: 128 * 1024,
        ..LogConfig::default()
    }
}

fn check(ops: Vec<Op>, sync: SyncMode) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        // Model: every record ever acknowledged, and the log start.
        let mut model: Vec<Vec<u8>> = Vec::new();
        let mut start = 0u64;
        let mut cached_reads = 0u64;
        let mut log = PartitionLog::open(&path, config(sync)).await.unwrap();
        for (step, op) in ops.into_iter().enumerate() {
            match op {
                Op::Append { records, size } => {
                    let a = log
                        .append_acked(&batch(step as u64, records, size, step as i64))
                        .await
                        .unwrap();
                    assert_eq!(a.base_offset, model.len() as u64);
                    for i in 0..records {
                        model.push(value(step as u64, i, size));
                    }
                }
                Op::ReopenClean => {
                    log.close().await.unwrap();
                    log = PartitionLog::open(&path, config(sync)).await.unwrap();
                }
                Op::ReopenCrash => {
                    log.crash_stop().await;
                    log = PartitionLog::open(&path, config(sync)).await.unwrap();
                }
                Op::Retain => {
                    log.enforce_retention(step as i64).await.unwrap();
                    assert!(log.start_offset() >= start);
                    start = log.start_offset();
                }
                Op::Interest => {
                    let _ = glommio::timer::timeout(Duration::from_micros(50), async {
                        log.wait_for_data(u64::MAX).await;
                        Ok(())
                    })
                    .await;
                }
                Op::Read { at, max } => {
                    let end = model.len() as u64;
                    let at = if end == 0 {
                        0
                    } else {
                        u64::from(at) % (end + 1)
                    };
                    match log.read(at, u64::from(max)) {
                        Ok(s) => {
                            assert!(at >= start);
                            let got = records(s.bytes());
                            if at == end {
                                assert!(got.is_empty());
                            } else {
                                assert!(!got.is_empty());
                                assert!(s.first_offset <= at && at < s.next_offset);
                                assert!(
                                    s.len <= u64::from(max)
                                        || got.iter().all(|r| r.0 < s.first_offset + 6)
                                );
                            }
                            for (o, v) in got {
                                assert_eq!(&model[o as usize], &v, "offset {o}");
                            }
                            let mut sent = vec![0u8; s.len as usize];
                            std::os::unix::fs::FileExt::read_exact_at(
                                s.file(),
                                &mut sent,
                                s.file_position(),
                            )
                            .unwrap();
                            assert_eq!(sent, s.bytes(), "cached: {}", s.is_cached());
                            cached_reads += u64::from(s.is_cached() && !s.is_empty());
                        }
                        Err(shoal_shard::Error::OffsetOutOfRange { .. }) => assert!(at < start),
                        Err(e) => panic!("read {at}: {e}"),
                    }
                }
            }
            assert_eq!(log.next_offset(), model.len() as u64);
            assert_eq!(log.start_offset(), start.max(log.start_offset()));
        }
        // Everything from the start reads back exactly.
        let mut at = log.start_offset();
        while at < model.len() as u64 {
            let s = log.read(at, 64 * 1024).unwrap();
            for (o, v) in records(s.bytes()) {
                assert_eq!(model[o as usize], v);
            }
            at = s.next_offset;
        }
        log.close().await.unwrap();
        cached_reads
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn log_matches_model_none(ops in proptest::collection::vec(op(), 1..120)) {
        check(ops, SyncMode::None);
    }
    #[test]
    fn log_matches_model_always(ops in proptest::collection::vec(op(), 1..60)) {
        check(ops, SyncMode::Always);
    }
}

#[test]
fn the_model_check_reaches_the_tail_cache() {
    // Interest, then appends across a roll, then reads of the newest
    // batches: some reads must come from the cache, or the property test
    // above would not be testing it.
    let mut ops = vec![Op::Interest];
    for _ in 0..30 {
        ops.push(Op::Append {
            records: 2,
            size: 700,
        });
    }
    for at in 40..60u16 {
        ops.push(Op::Read { at, max: 4000 });
    }
    ops.push(Op::ReopenCrash);
    ops.push(Op::Read { at: 55, max: 4000 });
    assert!(check(ops, SyncMode::None) > 0);
}
