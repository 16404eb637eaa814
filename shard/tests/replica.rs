//! What replication needs of a partition log: leader epochs stamped and
//! recorded, `epoch_end`, the high watermark bounding consumer reads, and
//! an exact, crash-safe `truncate_to`.

mod common;
use common::*;
use shoal_shard::{PartitionLog, SyncMode};
use shoal_wire::batch::{BatchBuilder, BatchHeader, NewRecord};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The stored batches' (base offset, leader epoch).
fn epochs_of(log: &PartitionLog) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    let mut at = log.start_offset();
    loop {
        let s = log.read_replica(at, 1 << 20).unwrap();
        if s.is_empty() {
            return out;
        }
        for b in shoal_wire::batch::Batches::new(s.bytes(), usize::MAX) {
            let (h, _) = b.unwrap();
            out.push((h.base_offset, h.leader_epoch));
        }
        at = s.next_offset;
    }
}

fn idem(pid: i64, seq: i32) -> Vec<u8> {
    let mut b = BatchBuilder::default();
    b.push(&NewRecord {
        value: Some(b"v"),
        ..Default::default()
    })
    .unwrap();
    b.finish(pid, 0, seq)
}

fn segments(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "log")
        })
        .count()
}

/// A leader stamps its epoch on what it appends, the epochs are recorded
/// where they start and survive a reopen; `epoch_end` answers where an
/// epoch ends; an older epoch is refused.
#[test]
fn epochs_are_stamped_recorded_and_answered() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().into();
    run(move || async move {
        let log = PartitionLog::open(&path, small(SyncMode::Always))
            .await
            .unwrap();
        assert_eq!(log.last_epoch(), None);
        log.set_leader_epoch(0).await.unwrap();
        log.append_acked(&batch(0, 2, 10, 1)).await.unwrap();
        log.set_leader_epoch(3).await.unwrap();
        log.append_acked(&batch(1, 2, 10, 1)).await.unwrap();
        log.append_acked(&batch(2, 1, 10, 1)).await.unwrap();
        assert_eq!(epochs_of(&log), vec![(0, 0), (2, 3), (4, 3)]);
        assert_eq!(log.epoch_end(0), Some((0, 2)));
        assert_eq!(log.epoch_end(2), Some((0, 2)));
        assert_eq!(log.epoch_end(3), Some((3, 5)));
        assert_eq!(log.epoch_end(9), Some((3, 5)));
        assert!(
            log.set_leader_epoch(2).await.is_err(),
            "epochs never go back"
        );
        log.crash_stop().await;
        let log = PartitionLog::open(&path, small(SyncMode::Always))
            .await
            .unwrap();
        assert_eq!(log.last_epoch(), Some(3));
        assert_eq!(log.epoch_end(0), Some((0, 2)));
        log.close().await.unwrap();
    });
}

/// A follower's appends keep the leader's epochs and offsets, record a new
/// epoch where it starts, accept idempotent batches whatever their
/// sequence, and keep the producer state so this replica dedupes retries
/// once it leads.
#[test]
fn replica_appends_keep_epochs_and_producer_state() {
    let dir = tempfile::tempdir().unwrap();
    let leader_dir = tempfile::tempdir().unwrap();
    let (path, lpath): (PathBuf, PathBuf) = (dir.path().into(), leader_dir.path().into());
    run(move || async move {
        let leader = PartitionLog::open(&lpath, small(SyncMode::Always))
            .await
            .unwrap();
        leader.set_leader_epoch(1).await.unwrap();
        leader.append_acked(&idem(9, 0)).await.unwrap();
        leader.append_acked(&idem(9, 1)).await.unwrap();
        leader.set_leader_epoch(4).await.unwrap();
        leader.append_acked(&idem(9, 2)).await.unwrap();
        let f = PartitionLog::open(&path, small(SyncMode::Always))
            .await
            .unwrap();
        let s = leader.read_replica(0, 1 << 20).unwrap();
        for b in shoal_wire::batch::Batches::new(s.bytes(), usize::MAX) {
            let (_, bytes) = b.unwrap();
            f.append_replica(bytes).await.unwrap();
        }
        f.flush().await.unwrap();
        assert_eq!(epochs_of(&f), vec![(0, 1), (1, 1), (2, 4)]);
        assert_eq!(f.epoch_end(1), Some((1, 2)));
        // An older epoch after a newer one is refused.
        let mut old = idem(9, 3);
        let mut h = BatchHeader::decode(&old).unwrap();
        h.base_offset = 3;
        h.leader_epoch = 2;
        h.encode(&mut old);
        assert!(f.append_replica(&old).await.is_err());
        // Leading now: the producer's retry of sequence 2 is a duplicate.
        f.set_leader_epoch(5).await.unwrap();
        let again = f.append_acked(&idem(9, 2)).await.unwrap();
        assert!(again.duplicate);
        assert_eq!(again.base_offset, 2);
        f.close().await.unwrap();
        leader.close().await.unwrap();
    });
}

/// Consumers read below the high watermark only; a read at an offset
/// between it and the end is empty, not an error; a long poll wakes when
/// it moves; replica reads go to the end; it is checkpointed.
#[test]
fn the_high_watermark_bounds_consumers() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().into();
    run(move || async move {
        let log = PartitionLog::open(&path, small(SyncMode::Always))
            .await
            .unwrap();
        for t in 0..4 {
            log.append_acked(&batch(t, 1, 10, 1)).await.unwrap();
        }
        assert_eq!(log.high_watermark(), 4, "unset: the end");
        log.set_high_watermark(2);
        assert_eq!(log.high_watermark(), 2);
        let s = log.read(0, 1 << 20).unwrap();
        assert_eq!((s.next_offset, s.high_watermark), (2, 2));
        assert!(log.read(3, 1 << 20).unwrap().is_empty());
        assert_eq!(log.read_replica(0, 1 << 20).unwrap().next_offset, 4);
        let log = std::rc::Rc::new(log);
        let waiter = {
            let log = log.clone();
            glommio::spawn_local(async move { log.wait_for_data(2).await })
        };
        glommio::timer::sleep(Duration::from_millis(20)).await;
        log.set_high_watermark(u64::MAX);
        glommio::timer::timeout(Duration::from_secs(5), async {
            waiter.await;
            Ok(())
        })
        .await
        .expect("the waiter wakes when the mark moves");
        assert_eq!(log.high_watermark(), 4, "MAX follows the end");
        log.set_high_watermark(3);
        log.checkpoint_high_watermark().await.unwrap();
        let log = std::rc::Rc::try_unwrap(log).ok().unwrap();
        log.close().await.unwrap();
        let log = PartitionLog::open(&path, small(SyncMode::Always))
            .await
            .unwrap();
        assert_eq!(log.high_watermark(), 3, "the checkpoint survives a reopen");
        log.close().await.unwrap();
    });
}

/// Truncation in the active segment and in a closed one: exactly the
/// batches below the offset remain, appends continue there, the epochs
/// and the producer state are cut with them, and a reopen agrees.
#[test]
fn truncate_to_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().into();
    run(move || async move {
        let log = PartitionLog::open(&path, small(SyncMode::Always))
            .await
            .unwrap();
        log.set_leader_epoch(1).await.unwrap();
        for t in 0..60u64 {
            log.append_acked(&batch(t, 2, 1500, 1)).await.unwrap();
        }
        log.set_leader_epoch(2).await.unwrap();
        log.append_acked(&idem(5, 0)).await.unwrap();
        log.append_acked(&idem(5, 1)).await.unwrap();
        let before = read_all(&log);
        assert!(log.segment_count() > 2);
        // In the active segment: the last idempotent batch goes.
        log.truncate_to(121).await.unwrap();
        assert_eq!(log.next_offset(), 121);
        assert_eq!(read_all(&log), before[..121].to_vec());
        assert_eq!(log.epoch_end(2), Some((2, 121)));
        // The kept batch's retry is a duplicate; the cut one's is new.
        assert!(log.append_acked(&idem(5, 0)).await.unwrap().duplicate);
        let a = log.append_acked(&idem(5, 1)).await.unwrap();
        assert!(!a.duplicate);
        assert_eq!(a.base_offset, 121);
        // Into a closed segment: epoch 2 goes entirely.
        let segs = segments(&path);
        log.truncate_to(20).await.unwrap();
        assert!(segments(&path) < segs, "later segments are deleted");
        assert_eq!(log.next_offset(), 20);
        assert_eq!(read_all(&log), before[..20].to_vec());
        assert_eq!(log.last_epoch(), Some(1));
        assert_eq!(log.epoch_end(2), Some((1, 20)));
        // Not a batch boundary: refused, nothing lost.
        assert!(log.truncate_to(19).await.is_err());
        assert_eq!(log.next_offset(), 20);
        let n = log.next_offset();
        log.set_leader_epoch(3).await.unwrap();
        let a = log.append_acked(&batch(99, 1, 10, 1)).await.unwrap();
        assert_eq!(a.base_offset, n);
        let expect = read_all(&log);
        log.close().await.unwrap();
        let log = PartitionLog::open(&path, small(SyncMode::Always))
            .await
            .unwrap();
        assert_eq!(read_all(&log), expect);
        assert_eq!(log.last_epoch(), Some(3));
        log.close().await.unwrap();
    });
}

/// A crash in the middle of a truncation (its intent written, the files
/// not yet cut, or cut halfway) is finished by the next open: the log is
/// cut, never in between.
#[test]
fn an_interrupted_truncation_is_finished_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().into();
    run(move || async move {
        let log = PartitionLog::open(&path, small(SyncMode::Always))
            .await
            .unwrap();
        for t in 0..60u64 {
            log.append_acked(&batch(t, 2, 1500, 1)).await.unwrap();
        }
        let before = read_all(&log);
        log.crash_stop().await;
        // The intent is durable; the crash came before any file changed.
        std::fs::write(path.join("truncate.intent"), "30\n").unwrap();
        let log = PartitionLog::open(&path, small(SyncMode::Always))
            .await
            .unwrap();
        assert_eq!(log.next_offset(), 30);
        assert_eq!(read_all(&log), before[..30].to_vec());
        assert!(!path.join("truncate.intent").exists());
        log.crash_stop().await;
        // Halfway: later segments already gone, the intent still there.
        std::fs::write(path.join("truncate.intent"), "10\n").unwrap();
        let log = PartitionLog::open(&path, small(SyncMode::Always))
            .await
            .unwrap();
        assert_eq!(log.next_offset(), 10);
        assert_eq!(read_all(&log), before[..10].to_vec());
        log.close().await.unwrap();
    });
}

/// A follower whose leader no longer holds what it lacks starts over: the
/// log empties and continues at the leader's start, takes the leader's
/// batches from there, and an interrupted start-over is finished on open.
#[test]
fn a_log_can_start_over_further_on() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().into();
    run(move || async move {
        let log = PartitionLog::open(&path, small(SyncMode::Always))
            .await
            .unwrap();
        log.set_leader_epoch(2).await.unwrap();
        for t in 0..40u64 {
            log.append_acked(&batch(t, 2, 1500, 1)).await.unwrap();
        }
        log.start_over_at(500).await.unwrap();
        assert_eq!((log.start_offset(), log.next_offset()), (500, 500));
        assert!(read_all(&log).is_empty());
        assert_eq!(log.last_epoch(), None, "no epoch of the old data is left");
        let mut b = batch(99, 3, 10, 1);
        let mut h = BatchHeader::decode(&b).unwrap();
        h.base_offset = 500;
        h.leader_epoch = 7;
        h.encode(&mut b);
        log.append_replica(&b).await.unwrap();
        log.flush().await.unwrap();
        assert_eq!(log.epoch_end(7), Some((7, 503)));
        log.crash_stop().await;
        std::fs::write(path.join("truncate.intent"), "start 900\n").unwrap();
        let log = PartitionLog::open(&path, small(SyncMode::Always))
            .await
            .unwrap();
        assert_eq!((log.start_offset(), log.next_offset()), (900, 900));
        log.close().await.unwrap();
    });
}
