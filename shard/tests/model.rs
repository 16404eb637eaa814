//! Property test: random appends, rolls, clean and unclean reopenings and
//! retention, with every read compared against a plain in-memory model.

mod common;
use common::*;
use proptest::prelude::*;
use shoal_shard::{LogConfig, PartitionLog, SyncMode};
use std::time::Duration;

#[derive(Debug, Clone)]
enum Op {
    Append { records: u32, size: usize },
    ReopenClean,
    ReopenCrash,
    Retain,
    Read { at: u16, max: u32 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (1u32..6, 1usize..1500).prop_map(|(records, size)| Op::Append { records, size }),
        1 => Just(Op::ReopenClean),
        1 => Just(Op::ReopenCrash),
        1 => Just(Op::Retain),
        3 => (any::<u16>(), 1u32..20_000).prop_map(|(at, max)| Op::Read { at, max }),
    ]
}

fn config(sync: SyncMode) -> LogConfig {
    LogConfig {
        sync,
        segment_bytes: 16 * 1024,
        batch_bytes_max: 16 * 1024,
        write_buffer_bytes: 1024 * 1024,
        retention_bytes: Some(48 * 1024),
        retention_age: Some(Duration::from_secs(3600)),
        ..LogConfig::default()
    }
}

fn check(ops: Vec<Op>, sync: SyncMode) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        // Model: every record ever acknowledged, and the log start.
        let mut model: Vec<Vec<u8>> = Vec::new();
        let mut start = 0u64;
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
    });
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
