//! Behaviour of one partition log: appends, reads, rolls, sync modes,
//! idempotence, retention and recovery from damaged files.

mod common;
use common::*;
use shoal_shard::log::TailEnd;
use shoal_shard::{Error, LogConfig, PartitionLog, SyncMode};
use std::path::PathBuf;
use std::time::Duration;

/// Appended batches read back in order with their offsets, across rolls and
/// a clean reopen that scans nothing.
#[test]
fn append_read_roll_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().into();
    run(move || async move {
        let log = PartitionLog::open(&path, small(SyncMode::None))
            .await
            .unwrap();
        let mut expect = Vec::new();
        for t in 0..100u64 {
            let a = log.append_acked(&batch(t, 3, 700, t as i64)).await.unwrap();
            assert_eq!(a.base_offset, t * 3);
            for i in 0..3 {
                expect.push((t * 3 + u64::from(i), value(t, i, 700)));
            }
        }
        assert!(
            log.segment_count() > 2,
            "100 batches of ~2 KiB roll 64 KiB segments"
        );
        assert_eq!(read_all(&log), expect);
        // Reading from the middle of a batch returns the whole batch.
        let s = log.read(4, 1).unwrap();
        assert_eq!(s.first_offset, 3);
        assert_eq!(s.next_offset, 6);
        log.close().await.unwrap();

        let log = PartitionLog::open(&path, small(SyncMode::None))
            .await
            .unwrap();
        assert_eq!(log.next_offset(), 300);
        assert_eq!(read_all(&log), expect);
        let a = log.append_acked(&batch(100, 1, 10, 100)).await.unwrap();
        assert_eq!(a.base_offset, 300);
        log.close().await.unwrap();
    });
}

/// Every sync mode acknowledges, and `always` acknowledges only durable data.
#[test]
fn sync_modes_and_group_commit() {
    for mode in [
        SyncMode::Always,
        SyncMode::Interval(Duration::from_millis(5)),
        SyncMode::None,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path: PathBuf = dir.path().into();
        run(move || async move {
            let log = std::rc::Rc::new(PartitionLog::open(&path, small(mode)).await.unwrap());
            let mut tasks = Vec::new();
            for w in 0..8u64 {
                let log = log.clone();
                tasks.push(glommio::spawn_local(async move {
                    for i in 0..20u64 {
                        let a = log
                            .append_acked(&batch(w * 100 + i, 2, 100, 0))
                            .await
                            .unwrap();
                        assert!(log.end_offset() >= a.next_offset());
                        if mode == SyncMode::Always {
                            assert!(log.durable_offset() >= a.next_offset());
                        }
                    }
                }));
            }
            for t in tasks {
                t.await;
            }
            assert_eq!(log.next_offset(), 320);
            if let SyncMode::Interval(_) = mode {
                glommio::timer::sleep(Duration::from_millis(30)).await;
                assert_eq!(log.durable_offset(), 320, "interval sync catches up");
            }
            let all = read_all(&log);
            assert_eq!(all.len(), 320);
            assert!(all.windows(2).all(|w| w[1].0 == w[0].0 + 1));
            std::rc::Rc::try_unwrap(log)
                .ok()
                .unwrap()
                .close()
                .await
                .unwrap();
        });
    }
}

/// A bad CRC, an oversized batch, a wrong replica base offset: refused, and
/// nothing is written.
#[test]
fn invalid_batches_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().into();
    run(move || async move {
        let log = PartitionLog::open(&path, small(SyncMode::Always))
            .await
            .unwrap();
        log.append_acked(&batch(1, 1, 10, 0)).await.unwrap();
        let mut bad = batch(2, 2, 10, 0);
        let n = bad.len();
        bad[n - 1] ^= 0xff;
        assert!(matches!(
            log.append(&bad).await,
            Err(Error::Batch(shoal_wire::BatchError::BadCrc { .. }))
        ));
        let huge = batch(3, 1, 20_000, 0);
        assert!(matches!(
            log.append(&huge).await,
            Err(Error::Batch(shoal_wire::BatchError::TooLarge { .. }))
        ));
        assert!(log.append(&bad[..30]).await.is_err());
        let mut replica = batch(4, 1, 10, 0);
        shoal_wire::batch::set_base_offset(&mut replica, 7);
        assert!(matches!(
            log.append_replica(&replica).await,
            Err(Error::OffsetMismatch {
                expected: 1,
                got: 7
            })
        ));
        shoal_wire::batch::set_base_offset(&mut replica, 1);
        assert_eq!(log.append_replica(&replica).await.unwrap().base_offset, 1);
        log.flush().await.unwrap();
        assert_eq!(log.next_offset(), 2);
        assert_eq!(read_all(&log).len(), 2);
        log.close().await.unwrap();
    });
}

/// A retried idempotent batch gets its original offsets and is not written
/// twice; a sequence gap is refused; the state survives a reopen.
#[test]
fn idempotent_retry_is_not_written_twice() {
    use shoal_wire::batch::{BatchBuilder, NewRecord};
    let mk = |seq: i32, n: u32| {
        let mut b = BatchBuilder::default();
        for _ in 0..n {
            b.push(&NewRecord {
                value: Some(b"v"),
                ..Default::default()
            })
            .unwrap();
        }
        b.finish(42, 0, seq)
    };
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().into();
    run(move || async move {
        let log = PartitionLog::open(&path, small(SyncMode::Always))
            .await
            .unwrap();
        let a = log.append_acked(&mk(0, 3)).await.unwrap();
        let again = log.append_acked(&mk(0, 3)).await.unwrap();
        assert!(again.duplicate);
        assert_eq!(
            (again.base_offset, again.last_offset),
            (a.base_offset, a.last_offset)
        );
        assert!(matches!(
            log.append(&mk(5, 1)).await,
            Err(Error::OutOfOrderSequence {
                expected: 3,
                got: 5,
                ..
            })
        ));
        log.append_acked(&mk(3, 1)).await.unwrap();
        log.close().await.unwrap();
        let log = PartitionLog::open(&path, small(SyncMode::Always))
            .await
            .unwrap();
        assert!(log.append_acked(&mk(3, 1)).await.unwrap().duplicate);
        assert_eq!(log.next_offset(), 4);
        log.crash_stop().await;
        let log = PartitionLog::open(&path, small(SyncMode::Always))
            .await
            .unwrap();
        assert!(
            log.append_acked(&mk(0, 3)).await.unwrap().duplicate,
            "rebuilt by the crash scan"
        );
        log.close().await.unwrap();
    });
}

/// Lookup by timestamp finds the first batch at or after the time.
#[test]
fn lookup_by_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().into();
    run(move || async move {
        let log = PartitionLog::open(&path, small(SyncMode::None))
            .await
            .unwrap();
        for t in 0..200u64 {
            log.append_acked(&batch(t, 1, 500, 1000 + t as i64 * 10))
                .await
                .unwrap();
        }
        assert!(log.segment_count() > 1);
        assert_eq!(log.offset_for_timestamp(0), Some(0));
        assert_eq!(log.offset_for_timestamp(1000 + 57 * 10), Some(57));
        assert_eq!(log.offset_for_timestamp(1000 + 57 * 10 - 3), Some(57));
        assert_eq!(log.offset_for_timestamp(1000 + 199 * 10), Some(199));
        assert_eq!(log.offset_for_timestamp(1000 + 200 * 10), None);
        log.close().await.unwrap();
        let log = PartitionLog::open(&path, small(SyncMode::None))
            .await
            .unwrap();
        assert_eq!(log.offset_for_timestamp(1000 + 123 * 10), Some(123));
        log.close().await.unwrap();
    });
}

/// Retention deletes whole old segments; reads below the new start fail
/// with a clear error; the active segment is never deleted.
#[test]
fn retention_by_size_and_age() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().into();
    run(move || async move {
        let cfg = LogConfig {
            retention_bytes: Some(200 * 1024),
            ..small(SyncMode::None)
        };
        let log = PartitionLog::open(&path, cfg.clone()).await.unwrap();
        for t in 0..400u64 {
            log.append_acked(&batch(t, 1, 1000, t as i64))
                .await
                .unwrap();
        }
        let before = log.segment_count();
        let n = log.enforce_retention(400).await.unwrap();
        assert!(n > 0);
        assert_eq!(log.segment_count(), before - n);
        assert!(log.size_bytes() <= 200 * 1024 + 64 * 1024);
        let start = log.start_offset();
        assert!(start > 0);
        match log.read(0, 100) {
            Err(Error::OffsetOutOfRange {
                offset: 0,
                start: s,
                end: 400,
            }) => assert_eq!(s, start),
            other => panic!(
                "expected out of range, got {:?}",
                other.map(|s| s.first_offset)
            ),
        }
        assert_eq!(read_all(&log).first().map(|r| r.0), Some(start));
        log.close().await.unwrap();
        let log = PartitionLog::open(&path, cfg).await.unwrap();
        assert_eq!(log.start_offset(), start);
        log.close().await.unwrap();

        let cfg = LogConfig {
            retention_age: Some(Duration::from_millis(100)),
            ..small(SyncMode::None)
        };
        let log = PartitionLog::open(&path, cfg).await.unwrap();
        // Timestamps are 0..400 ms: everything closed is older than 10_000 - 100.
        log.enforce_retention(10_000).await.unwrap();
        assert_eq!(log.segment_count(), 1);
        assert!(log.read(log.start_offset(), 100).is_ok());
        log.close().await.unwrap();
    });
}

fn active_segment(dir: &std::path::Path) -> PathBuf {
    let mut logs: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs.pop().unwrap()
}

/// Crash-damaged tails: a truncated last batch, flipped bits, zeroed blocks.
/// Recovery keeps exactly the valid prefix, and appends continue after it.
#[test]
fn torn_and_corrupt_tails_are_truncated() {
    for damage in ["truncate", "flip", "zero"] {
        let dir = tempfile::tempdir().unwrap();
        let path: PathBuf = dir.path().into();
        run(move || async move {
            let cfg = LogConfig {
                segment_bytes: 1 << 20,
                ..small(SyncMode::None)
            };
            let log = PartitionLog::open(&path, cfg.clone()).await.unwrap();
            for t in 0..50u64 {
                log.append_acked(&batch(t, 2, 300, 0)).await.unwrap();
            }
            log.crash_stop().await;
            let seg = active_segment(&path);
            let data = std::fs::read(&seg).unwrap();
            // The file may be longer than the log (preallocated): aim by
            // batch size so the damage lands inside batch 40.
            let hit = 40 * batch(0, 2, 300, 0).len() + 100;
            match damage {
                "truncate" => std::fs::OpenOptions::new()
                    .write(true)
                    .open(&seg)
                    .unwrap()
                    .set_len(hit as u64)
                    .unwrap(),
                "flip" => {
                    let mut d = data.clone();
                    d[hit] ^= 0x04;
                    std::fs::write(&seg, d).unwrap();
                }
                _ => {
                    let mut d = data.clone();
                    let b = hit / 4096 * 4096;
                    d[b..(b + 4096).min(data.len())].fill(0);
                    std::fs::write(&seg, d).unwrap();
                }
            }
            let log = PartitionLog::open(&path, cfg).await.unwrap();
            assert!(
                matches!(log.recovered_tail(), TailEnd::Damaged { .. }),
                "{damage}: {:?}",
                log.recovered_tail()
            );
            let all = read_all(&log);
            let n = log.next_offset();
            assert!((2 * 30..100).contains(&n), "{damage}: kept {n} records");
            assert_eq!(all.len() as u64, n);
            for (o, v) in &all {
                assert_eq!(
                    *v,
                    value(o / 2, (*o % 2) as u32, 300),
                    "{damage}: offset {o}"
                );
            }
            let a = log.append_acked(&batch(999, 1, 10, 0)).await.unwrap();
            assert_eq!(a.base_offset, n);
            log.close().await.unwrap();
        });
    }
}

/// Missing or damaged index files of closed segments are rebuilt; lookups
/// stay exact.
#[test]
fn missing_or_damaged_indexes_are_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().into();
    run(move || async move {
        let log = PartitionLog::open(&path, small(SyncMode::None))
            .await
            .unwrap();
        for t in 0..150u64 {
            log.append_acked(&batch(t, 1, 900, t as i64)).await.unwrap();
        }
        let expect = read_all(&log);
        log.close().await.unwrap();
        let mut idx: Vec<_> = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|e| e == "index" || e == "timeindex")
            })
            .collect();
        idx.sort();
        assert!(idx.len() >= 4);
        std::fs::remove_file(&idx[0]).unwrap();
        std::fs::write(&idx[1], b"garbage").unwrap();
        let mut d = std::fs::read(&idx[2]).unwrap();
        d[12] ^= 0x80;
        std::fs::write(&idx[2], d).unwrap();
        std::fs::remove_file(path.join("recovery.ckpt")).unwrap();
        let log = PartitionLog::open(&path, small(SyncMode::None))
            .await
            .unwrap();
        assert_eq!(read_all(&log), expect);
        for o in [0u64, 17, 64, 99, 149] {
            assert_eq!(log.read(o, 1).unwrap().first_offset, o);
            assert_eq!(log.offset_for_timestamp(o as i64), Some(o));
        }
        log.close().await.unwrap();
        assert!(std::fs::metadata(&idx[0]).is_ok(), "index rewritten");
    });
}

/// Reading at the end returns an empty slice at once; `wait_for_data`
/// wakes when an append becomes visible.
#[test]
fn read_at_the_end_waits_nowhere_and_wakes_on_append() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().into();
    run(move || async move {
        let log = std::rc::Rc::new(
            PartitionLog::open(&path, small(SyncMode::None))
                .await
                .unwrap(),
        );
        assert!(log.read(0, 100).unwrap().is_empty());
        assert!(matches!(
            log.read(1, 100),
            Err(Error::OffsetOutOfRange { .. })
        ));
        let l2 = log.clone();
        let waiter = glommio::spawn_local(async move {
            l2.wait_for_data(0).await;
            l2.read(0, 100).unwrap().next_offset
        });
        glommio::timer::sleep(Duration::from_millis(20)).await;
        log.append(&batch(1, 4, 10, 0)).await.unwrap();
        assert_eq!(waiter.await, 4);
        std::rc::Rc::try_unwrap(log)
            .ok()
            .unwrap()
            .close()
            .await
            .unwrap();
    });
}

/// With the tail cache on, a read returns only batches whose write to the
/// log file completed, although the cache already holds the newer ones:
/// nothing a process crash could take back is ever shown.
#[test]
fn the_tail_cache_shows_only_written_batches() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let log = PartitionLog::open(&path, small(SyncMode::None))
            .await
            .unwrap();
        // A reader waits at the end: the cache turns on.
        let _ = glommio::timer::timeout(Duration::from_micros(50), async {
            log.wait_for_data(u64::MAX).await;
            Ok(())
        })
        .await;
        log.append_acked(&batch(1, 2, 100, 0)).await.unwrap();
        // Accepted, not yet written (the writer task has not run).
        let b = log.append(&batch(2, 3, 100, 0)).await.unwrap();
        assert_eq!(b.base_offset, 2);
        let s = log.read(0, 1 << 20).unwrap();
        assert!(s.is_cached(), "served from the cache");
        assert_eq!(s.next_offset, 2, "only the written batch");
        assert_eq!(records(s.bytes()).len(), 2);
        log.wait_written(5).await.unwrap();
        let s = log.read(0, 1 << 20).unwrap();
        assert!(s.is_cached());
        assert_eq!(s.next_offset, 5);
        assert_eq!(records(s.bytes()).len(), 5);
        log.close().await.unwrap();
    });
}

/// A reader catching up within the tail cache's reach of the end (not
/// waiting there) starts the cache filling, so once it reaches the bytes
/// written after its read it is served from memory; a reader far behind
/// does not.
#[test]
fn a_reader_near_the_end_starts_the_tail_cache() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    run(move || async move {
        let config = LogConfig {
            segment_bytes: 1 << 20,
            tail_cache_bytes: 8 * 1024,
            ..small(SyncMode::None)
        };
        let log = PartitionLog::open(&path, config).await.unwrap();
        // 40 batches of ~1 KiB: nobody reads, nothing is cached.
        for i in 0..40u64 {
            log.append_acked(&batch(i, 1, 1000, 0)).await.unwrap();
        }
        assert!(!log.read(39, 1).unwrap().is_cached());
        // Far behind (offset 0, ~40 KiB from the end): still nothing.
        let far = log.read_ready(0, 1, Duration::from_secs(1)).await.unwrap();
        assert!(!far.is_cached());
        log.append_acked(&batch(40, 1, 1000, 0)).await.unwrap();
        assert!(!log.read(40, 1).unwrap().is_cached());
        // Near the end (~4 KiB behind): the next appends are cached.
        let near = log.read_ready(37, 1, Duration::from_secs(1)).await.unwrap();
        assert!(!near.is_cached());
        log.append_acked(&batch(41, 1, 1000, 0)).await.unwrap();
        assert!(log.read(41, 1).unwrap().is_cached(), "served from memory");
        log.close().await.unwrap();
    });
}

/// A partition with 1 GiB segments reserves one preallocation step of disk,
/// not the whole segment, and keeps its reservation ahead of the writer as
/// it fills (issue 9 #2: one topic could reserve a terabyte).
#[test]
fn preallocation_is_a_bounded_step_ahead_of_the_writer() {
    use shoal_shard::limits::PREALLOCATE_STEP_BYTES;
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().into();
    let config = LogConfig {
        sync: SyncMode::None,
        ..LogConfig::default()
    };
    assert!(config.segment_bytes >= 1 << 30);
    let reserved_max = config.reserved_bytes_max();
    assert!(reserved_max < config.segment_bytes / 8);
    run(move || async move {
        let log = PartitionLog::open(&path, config).await.unwrap();
        let active = path.join(format!("{:020}.log", 0));
        let allocated = |p: &PathBuf| std::fs::metadata(p).unwrap().blocks() * 512;
        log.append_acked(&batch(0, 1, 100, 0)).await.unwrap();
        assert!(
            allocated(&active) <= reserved_max,
            "a fresh segment holds {} bytes of disk, more than the {reserved_max} reserved at most",
            allocated(&active)
        );
        // Fill well past a few steps: the reservation follows.
        let b = batch(1, 64, 4000, 1);
        let mut next = 0;
        while log.size_bytes() < 3 * PREALLOCATE_STEP_BYTES + PREALLOCATE_STEP_BYTES / 4 {
            for _ in 0..64 {
                next = log.append(&b).await.unwrap().next_offset();
            }
            log.wait_written(next).await.unwrap();
        }
        let size = log.size_bytes();
        let ahead = |len: u64| len >= size + PREALLOCATE_STEP_BYTES / 2;
        for _ in 0..200 {
            if ahead(std::fs::metadata(&active).unwrap().len()) {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        let len = std::fs::metadata(&active).unwrap().len();
        assert!(
            ahead(len),
            "file length {len} is not ahead of the {size} bytes written"
        );
        assert!(
            allocated(&active) <= size + reserved_max,
            "{} bytes of disk for {size} bytes of log",
            allocated(&active)
        );
        log.close().await.unwrap();
        let len = std::fs::metadata(&active).unwrap().len();
        assert_eq!(len, size, "close trims the reservation");
    });
}

/// A crash leaves the preallocated zeros after the last batch: recovery
/// trims them as the normal end, not as damage, and keeps every batch; a
/// clean close is recovered without a scan (issue 9 #10: every crash
/// recovery warned of a torn or corrupt tail).
#[test]
fn preallocated_zeros_after_a_crash_are_no_damage() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().into();
    run(move || async move {
        let cfg = LogConfig {
            segment_bytes: 1 << 30,
            ..small(SyncMode::Always)
        };
        let log = PartitionLog::open(&path, cfg.clone()).await.unwrap();
        assert_eq!(log.recovered_tail(), &TailEnd::Zeros, "a new log");
        for t in 0..20u64 {
            log.append_acked(&batch(t, 2, 300, 0)).await.unwrap();
        }
        log.crash_stop().await;
        let seg = active_segment(&path);
        let file_len = std::fs::metadata(&seg).unwrap().len();
        let log = PartitionLog::open(&path, cfg.clone()).await.unwrap();
        assert!(
            file_len > log.size_bytes(),
            "the crash left preallocated bytes"
        );
        assert_eq!(log.recovered_tail(), &TailEnd::Zeros);
        assert_eq!(log.next_offset(), 40);
        assert_eq!(read_all(&log).len(), 40);
        log.close().await.unwrap();
        let log = PartitionLog::open(&path, cfg).await.unwrap();
        assert_eq!(log.recovered_tail(), &TailEnd::Clean);
        log.close().await.unwrap();
    });
}

/// Tag of each batch in the log, in order (values are `tag:i:...`).
fn batch_tags(log: &PartitionLog) -> Vec<u64> {
    let mut tags: Vec<u64> = Vec::new();
    for (_, v) in read_all(log) {
        let s = String::from_utf8_lossy(&v);
        let (tag, rest) = s.split_once(':').unwrap();
        if rest.starts_with("0:") {
            tags.push(tag.parse().unwrap());
        }
    }
    tags
}

/// Appends `b` until it is acknowledged, failing after `limit`.
async fn append_until_accepted(log: &PartitionLog, b: &[u8], limit: Duration) -> u64 {
    let t0 = std::time::Instant::now();
    loop {
        match log.append_acked(b).await {
            Ok(a) => return a.base_offset,
            Err(Error::Poisoned(_)) => {
                assert!(
                    t0.elapsed() < limit,
                    "appends did not resume within {limit:?}"
                );
                glommio::timer::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("unexpected error while waiting to resume: {e}"),
        }
    }
}

/// A failed write (an injected ENOSPC, three times in a row) refuses
/// appends until a retry of the same round succeeds, then appends resume
/// on their own. Every acknowledged batch is in the log exactly once; the
/// batch whose write failed was never acknowledged and is written by the
/// retry, once (issue 9 #4: a full disk used to poison the log for good).
#[test]
fn a_failed_write_is_retried_and_appends_resume() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().into();
    run(move || async move {
        let log = PartitionLog::open(&path, small(SyncMode::Always))
            .await
            .unwrap();
        for t in 0..10u64 {
            log.append_acked(&batch(t, 2, 300, 0)).await.unwrap();
        }
        log.inject_write_failures(3);
        let failed = log.append_acked(&batch(10, 2, 300, 0)).await;
        assert!(matches!(failed, Err(Error::Poisoned(_))), "{failed:?}");
        assert!(log.failure().is_some());
        let refused = log.append(&batch(11, 2, 300, 0)).await;
        assert!(
            matches!(refused, Err(Error::Poisoned(_))),
            "appends are refused at once while the write fails: {refused:?}"
        );
        let at = append_until_accepted(&log, &batch(12, 2, 300, 0), Duration::from_secs(10)).await;
        assert_eq!(at, 22, "the retried batch kept its offsets");
        assert_eq!(log.failure(), None);
        let expect: Vec<u64> = (0..=10).chain([12]).collect();
        assert_eq!(batch_tags(&log), expect);
        log.close().await.unwrap();
        let log = PartitionLog::open(&path, small(SyncMode::Always))
            .await
            .unwrap();
        assert_eq!(batch_tags(&log), expect);
        log.close().await.unwrap();
    });
}

/// A tmpfs of a few MiB, unmounted when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` (with the reason printed) where mounting is not allowed.
    fn mount(size: &str) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Some(SmallDisk { dir }),
            Ok(o) => {
                eprintln!(
                    "skipped: cannot mount a tmpfs ({})",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("skipped: cannot run mount ({e})");
                None
            }
        }
    }
    fn path(&self) -> PathBuf {
        self.dir.path().into()
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut c = std::process::Command::new("umount");
            if lazy {
                c.arg("-l");
            }
            // Files glommio closes lazily can keep the mount busy; the lazy
            // unmount then detaches it.
            c.arg(self.dir.path())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !umount(false) {
            umount(true);
        }
    }
}

/// Appends acknowledged batches tagged from `*tag` until one fails;
/// returns the acknowledged tags.
async fn fill_until_full(log: &PartitionLog, tag: &mut u64) -> Vec<u64> {
    let mut acked = Vec::new();
    loop {
        let t = *tag;
        *tag += 1;
        match log.append_acked(&batch(t, 4, 4000, 0)).await {
            Ok(_) => acked.push(t),
            Err(Error::Poisoned(_)) => return acked,
            Err(e) => panic!("a full disk gives a storage error, not {e}"),
        }
        assert!(acked.len() < 10_000, "the small disk never filled");
    }
}

/// No batch twice, and every acknowledged batch at or after the log's
/// first batch is there (retention may have deleted a prefix).
fn check_acked(log: &PartitionLog, acked: &[u64]) {
    let tags = batch_tags(log);
    let mut seen = std::collections::HashSet::new();
    for t in &tags {
        assert!(seen.insert(*t), "batch {t} is in the log twice");
    }
    let first = tags.first().copied().unwrap_or(u64::MAX);
    for t in acked.iter().filter(|t| **t >= first) {
        assert!(seen.contains(t), "acknowledged batch {t} is missing");
    }
}

/// On a real full disk (an 8 MiB tmpfs): appends fail with a storage
/// error and resume on their own once space is freed; after a crash on the
/// full disk the log opens without needing new space, and retention can
/// free room. No acknowledged batch is lost or written twice (issue 9 #4).
#[test]
fn a_full_disk_refuses_appends_and_resumes_when_space_returns() {
    let Some(disk) = SmallDisk::mount("8m") else {
        return;
    };
    let root = disk.path();
    run(move || async move {
        let path = root.join("p");
        let ballast = root.join("ballast");
        std::fs::write(&ballast, vec![1u8; 3 << 20]).unwrap();
        let cfg = LogConfig {
            sync: SyncMode::Always,
            segment_bytes: 1 << 20,
            batch_bytes_max: 64 * 1024,
            write_buffer_bytes: 1 << 20,
            ..LogConfig::default()
        };
        let log = PartitionLog::open(&path, cfg.clone()).await.unwrap();
        let mut tag = 0;
        let mut acked = fill_until_full(&log, &mut tag).await;
        assert!(!acked.is_empty());
        assert!(log.failure().is_some());
        check_acked(&log, &acked);

        // Space returns: appends resume without anyone touching the log.
        std::fs::remove_file(&ballast).unwrap();
        let t = tag;
        tag += 1;
        append_until_accepted(&log, &batch(t, 4, 4000, 0), Duration::from_secs(10)).await;
        acked.push(t);
        assert_eq!(log.failure(), None);
        check_acked(&log, &acked);

        // Full again, then a crash: the log opens on the full disk, and
        // retention (which needs no space) makes room for appends.
        acked.extend(fill_until_full(&log, &mut tag).await);
        log.crash_stop().await;
        let cfg = LogConfig {
            retention_bytes: Some(2 << 20),
            ..cfg
        };
        let log = PartitionLog::open(&path, cfg).await.unwrap();
        check_acked(&log, &acked);
        assert!(log.enforce_retention(0).await.unwrap() > 0);
        let t = tag;
        append_until_accepted(&log, &batch(t, 4, 4000, 0), Duration::from_secs(10)).await;
        acked.push(t);
        check_acked(&log, &acked);
        log.close().await.unwrap();
    });
    drop(disk);
}

/// Descriptors of `dir`'s segment files (`*.log`) this process holds.
fn open_segment_fds(dir: &std::path::Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|p| p.starts_with(dir) && p.extension().is_some_and(|e| e == "log"))
        .count()
}

/// Closed segments hold descriptors only while read, never more than the
/// shard's budget at a time, and a restart opens none; reads, timestamp
/// lookups and retention work across closed and reopened segments (issue 9
/// #7: every segment kept a descriptor, and tiny segments ran the broker
/// out of them).
#[test]
fn closed_segments_hold_descriptors_within_the_budget() {
    use shoal_shard::FdBudget;
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().into();
    run(move || async move {
        // The active segment holds two: its read side and its writer.
        const ACTIVE_FDS: usize = 2;
        let budget = FdBudget::new(3);
        let cfg = small(SyncMode::None);
        let log = PartitionLog::open_with_budget(&path, cfg.clone(), budget.clone())
            .await
            .unwrap();
        let mut expect = Vec::new();
        for t in 0..120u64 {
            log.append_acked(&batch(t, 8, 2000, t as i64))
                .await
                .unwrap();
            expect.extend((0..8).map(|i| (t * 8 + u64::from(i), value(t, i, 2000))));
        }
        assert!(
            log.segment_count() >= 20,
            "{} segments",
            log.segment_count()
        );
        // Descriptors of rolled writers are closed by the executor soon.
        glommio::timer::sleep(Duration::from_millis(50)).await;
        let settled = |what: &str| {
            let fds = open_segment_fds(&path);
            assert!(
                fds <= budget.segments_max() + ACTIVE_FDS,
                "{what}: {fds} segment descriptors open"
            );
            assert!(budget.open_segments() <= budget.segments_max());
        };
        settled("after the rolls");
        assert_eq!(read_all(&log), expect);
        settled("after reading every segment");
        let at = log.offset_for_timestamp(7).unwrap();
        assert_eq!(at, 7 * 8);
        settled("after a timestamp lookup");
        log.close().await.unwrap();
        glommio::timer::sleep(Duration::from_millis(50)).await;

        let log = PartitionLog::open_with_budget(&path, cfg.clone(), budget.clone())
            .await
            .unwrap();
        glommio::timer::sleep(Duration::from_millis(50)).await;
        assert_eq!(
            budget.open_segments(),
            0,
            "a restart opens no closed segment"
        );
        assert!(open_segment_fds(&path) <= ACTIVE_FDS);
        assert_eq!(log.offset_for_timestamp(100), Some(100 * 8));
        assert_eq!(read_all(&log), expect);
        settled("after reading again");
        log.close().await.unwrap();

        let cfg = LogConfig {
            retention_bytes: Some(256 * 1024),
            ..cfg
        };
        let log = PartitionLog::open_with_budget(&path, cfg, budget.clone())
            .await
            .unwrap();
        read_all(&log);
        let deleted = log.enforce_retention(0).await.unwrap();
        assert!(deleted > 10);
        assert!(budget.open_segments() <= log.segment_count());
        let rest = read_all(&log);
        assert_eq!(rest.as_slice(), &expect[expect.len() - rest.len()..]);
        log.close().await.unwrap();
    });
}

/// Bytes of `[start, end)` of the file at `path` that are in the page
/// cache, counted page by page from `start` until the first missing one.
fn resident_prefix(path: &std::path::Path, start: u64, end: u64) -> u64 {
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: read-only mapping of a file no one writes meanwhile; only
    // its residency is asked, no byte is read.
    let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
    let (page, start) = (4096u64, start / 4096 * 4096);
    let end = end.min(map.len() as u64);
    let mut vec = vec![0u8; (end - start).div_ceil(page) as usize];
    // SAFETY: the range lies inside the mapping; one byte per page.
    let r = unsafe {
        libc::mincore(
            map.as_ptr().add(start as usize) as *mut libc::c_void,
            (end - start) as usize,
            vec.as_mut_ptr(),
        )
    };
    assert_eq!(r, 0);
    let pages = vec.iter().take_while(|b| **b & 1 == 1).count() as u64;
    (pages * page).min(end - start)
}

/// A forward reader through `read_ready` gets the same slices as `read`,
/// and the log ahead of it arrives in the page cache before it asks
/// (appends bypass the page cache, so without read-ahead every read of a
/// consumer catching up waited for the disk, one slice at a time; issue 16).
#[test]
fn read_ready_keeps_the_log_ahead_of_a_forward_reader_in_memory() {
    use shoal_shard::limits::READ_AHEAD_WINDOW_BYTES;
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().into();
    run(move || async move {
        let cfg = LogConfig {
            sync: SyncMode::None,
            ..LogConfig::default()
        };
        let log = PartitionLog::open(&path, cfg.clone()).await.unwrap();
        let b = batch(1, 60, 1000, 0);
        let mut next = 0;
        while log.size_bytes() < 3 * READ_AHEAD_WINDOW_BYTES {
            for _ in 0..64 {
                next = log.append(&b).await.unwrap().next_offset();
            }
            log.wait_written(next).await.unwrap();
        }
        log.close().await.unwrap();
        let log = PartitionLog::open(&path, cfg).await.unwrap();
        let seg = active_segment(&path);
        assert_eq!(resident_prefix(&seg, 0, 1 << 20), 0, "nothing cached yet");

        let wait = Duration::from_secs(5);
        let first = log.read_ready(0, 1 << 20, wait).await.unwrap();
        let plain = log.read(0, 1 << 20).unwrap();
        assert_eq!((first.position, first.len), (plain.position, plain.len));
        assert_eq!(first.next_offset, plain.next_offset);
        assert!(log.read_ahead_bytes() > 0);
        // The window past the first slice arrives without another read.
        let want = first.len + READ_AHEAD_WINDOW_BYTES / 2;
        let mut have = 0;
        for _ in 0..400 {
            have = resident_prefix(&seg, 0, want);
            if have >= want {
                break;
            }
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
        assert!(have >= want, "{have} of {want} bytes read ahead");
        // Reading on: the same batches as `read`, to the end.
        let mut at = first.next_offset;
        while at < log.end_offset() {
            let s = log.read_ready(at, 1 << 20, wait).await.unwrap();
            let p = log.read(at, 1 << 20).unwrap();
            assert_eq!(
                (s.position, s.len, s.next_offset),
                (p.position, p.len, p.next_offset)
            );
            at = s.next_offset;
        }
        assert!(log.read_ready(at, 1 << 20, wait).await.unwrap().is_empty());
        log.close().await.unwrap();
    });
}

/// A closed segment ends wherever its last batch does, mid-page, and the
/// kernel's read-ahead never reads a partial last page: a reader waiting
/// for it to become resident waited its whole limit at the end of every
/// segment. `read_ready` brings it in too.
#[test]
fn read_ready_does_not_wait_for_a_segments_partial_last_page() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().into();
    run(move || async move {
        let cfg = LogConfig {
            sync: SyncMode::None,
            segment_bytes: 1 << 20,
            ..LogConfig::default()
        };
        let log = PartitionLog::open(&path, cfg.clone()).await.unwrap();
        let b = batch(2, 3, 997, 0);
        let mut next = 0;
        while log.segment_count() < 4 {
            next = log.append(&b).await.unwrap().next_offset();
        }
        log.wait_written(next).await.unwrap();
        log.close().await.unwrap();
        let log = PartitionLog::open(&path, cfg).await.unwrap();
        let wait = Duration::from_secs(5);
        let mut at = log.start_offset();
        while at < log.end_offset() {
            let t = std::time::Instant::now();
            let s = log.read_ready(at, 64 * 1024, wait).await.unwrap();
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "read_ready of offset {at} (segment {}, {} bytes at {}) waited {:?}",
                s.segment.base_offset,
                s.len,
                s.position,
                t.elapsed()
            );
            at = s.next_offset;
        }
        log.close().await.unwrap();
    });
}
