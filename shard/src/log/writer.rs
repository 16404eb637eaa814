//! The writer pipeline: one writer task per partition turns the pending
//! chunks into *rounds* of concurrent direct-I/O writes, with one
//! fdatasync per durable round (group commit), a background fdatasync for
//! `interval` mode, and recovery points every `RECOVERY_CHECKPOINT_BYTES`.
//! See the parent module for the ordering rules.

use super::{align_down, align_up, Inner, State};
use crate::checkpoint::{self, Checkpoint};
use crate::config::SyncMode;
use crate::durable;
use crate::limits::{
    CHUNK_BYTES, PREALLOCATE_STEP_BYTES, RECOVERY_CHECKPOINT_BYTES, ROUNDS_IN_FLIGHT_MAX,
};
use crate::rt;
use crate::segment::Segment;
use glommio::io::{DmaBuffer, DmaFile};
use std::rc::{Rc, Weak};

pub(super) struct Round {
    chunks: Vec<DmaBuffer>,
    file_pos: u64,
    len: usize,
    next_offset: u64,
    sync: bool,
    dma: Rc<DmaFile>,
    segment: Rc<Segment>,
}

/// Preallocation of the active segment, kept [`PREALLOCATE_STEP_BYTES`]
/// ahead of the accepted bytes.
///
/// Appends should never extend the file: an extending O_DIRECT write takes
/// the inode lock exclusively (ext4) and serialises the writes a round
/// keeps in flight. So the file's blocks are reserved (and its length set)
/// ahead of the writer, but only a step ahead, not the whole segment: a
/// segment of 1 GiB no longer takes 1 GiB of disk the moment it is created
/// (issue 9 #2). The length past the log end reads as zeros, which recovery
/// stops at; roll and close truncate to the exact end.
///
/// Best effort: where fallocate is unsupported the file grows as written;
/// where it fails (a full disk) it is tried again after a pause, and the
/// writes themselves report the error.
pub(super) struct Prealloc {
    /// File length reserved so far.
    end: u64,
    /// An extension is in flight; roll and close wait for it, so it never
    /// lengthens a file they truncated.
    pub(super) running: bool,
    /// The file system has no fallocate.
    unsupported: bool,
    /// After a failure, no new attempt before this.
    resume_at: Option<std::time::Instant>,
}

/// Pause after a failed preallocation before the next attempt.
const PREALLOCATE_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

impl Prealloc {
    /// A segment whose file is `len` bytes long and reserved no further.
    pub(super) fn new(len: u64) -> Prealloc {
        Prealloc {
            end: len,
            running: false,
            unsupported: false,
            resume_at: None,
        }
    }

    /// The file length to reserve now that `accepted` bytes of the segment
    /// are accepted, if an extension is due.
    pub(super) fn due(&self, accepted: u64, capacity: u64) -> Option<u64> {
        if self.running || self.unsupported || self.end >= capacity {
            return None;
        }
        if accepted + PREALLOCATE_STEP_BYTES / 2 < self.end {
            return None;
        }
        if self.resume_at.is_some_and(|t| rt::now() < t) {
            return None;
        }
        Some(preallocation_target(accepted, capacity))
    }

    fn finish(&mut self, target: u64, result: std::io::Result<()>) {
        self.running = false;
        match result {
            Ok(()) => {
                self.end = self.end.max(target);
                self.resume_at = None;
            }
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                tracing::debug!(error = %e, "segment preallocation unavailable");
                self.unsupported = true;
            }
            Err(e) => {
                tracing::debug!(error = %e, "segment preallocation failed; retrying later");
                self.resume_at = Some(rt::now() + PREALLOCATE_RETRY);
            }
        }
    }
}

/// The file length to reserve for a segment whose bytes end at `end`.
pub(super) fn preallocation_target(end: u64, capacity: u64) -> u64 {
    (align_up(end) + PREALLOCATE_STEP_BYTES).min(capacity)
}

/// Reserves `[0, target)` of a new active segment's file (open, roll).
pub(super) async fn preallocate(dma: &DmaFile, len: u64, target: u64) -> Prealloc {
    let mut p = Prealloc::new(len);
    let result = dma.pre_allocate(target, false).await.map_err(Into::into);
    p.finish(target, result);
    p
}

/// Extends the active segment's reservation to `target`, beside the writer.
pub(super) async fn extend_preallocation(inner: Rc<Inner>, dma: Rc<DmaFile>, target: u64) {
    let result = dma.pre_allocate(target, false).await.map_err(Into::into);
    {
        let mut st = inner.st.borrow_mut();
        debug_assert!(Rc::ptr_eq(&st.dma, &dma), "a roll waits for extensions");
        st.prealloc.finish(target, result);
    }
    inner.progress.notify_all();
}

pub(super) fn take_round(st: &mut State) -> Option<Round> {
    let sync = st.sync_requested;
    if !st.pending.has_new_bytes() && !sync {
        return None;
    }
    st.sync_requested = false;
    if !st.pending.has_new_bytes() {
        // Sync only: rewriting the tail block would gain nothing.
        return Some(Round {
            chunks: Vec::new(),
            file_pos: st.pending.file_pos,
            len: st.pending.prefix,
            next_offset: st.pending.next_offset,
            sync,
            dma: st.dma.clone(),
            segment: st.active.clone(),
        });
    }
    let p = &mut st.pending;
    let len = p.len;
    let file_pos = p.file_pos;
    let next_offset = p.next_offset;
    let chunks = std::mem::take(&mut p.chunks);
    let tail_start = align_down(len as u64) as usize;
    p.file_pos = file_pos + tail_start as u64;
    p.len = 0;
    p.prefix = 0;
    if tail_start < len {
        let tail = {
            let c = &chunks[tail_start / CHUNK_BYTES];
            let at = tail_start % CHUNK_BYTES;
            c.as_bytes()[at..at + (len - tail_start)].to_vec()
        };
        p.push(&st.dma, &tail);
        p.prefix = tail.len();
    }
    debug_assert_eq!(chunks.len(), len.div_ceil(CHUNK_BYTES));
    Some(Round {
        chunks,
        file_pos,
        len,
        next_offset,
        sync,
        dma: st.dma.clone(),
        segment: st.active.clone(),
    })
}

/// Waits until every round before `seq` has completed its writes.
async fn wait_predecessors(inner: &Inner, seq: u64) -> std::io::Result<()> {
    loop {
        let changed = inner.progress.changed();
        {
            let st = inner.st.borrow();
            if st.rounds_written >= seq {
                return Ok(());
            }
            if let Some(why) = &st.poisoned {
                return Err(std::io::Error::other(why.clone()));
            }
        }
        changed.await;
    }
}

/// Writes one round. Its first chunk rewrites the previous round's tail
/// block, so it is submitted only after every earlier round's writes are
/// done; the other chunks go at once. Rounds therefore complete in order.
async fn write_round(
    inner: &Inner,
    chunks: Vec<DmaBuffer>,
    file_pos: u64,
    len: usize,
    dma: &Rc<DmaFile>,
    seq: u64,
) -> std::io::Result<()> {
    let mut writes = Vec::with_capacity(chunks.len());
    for (i, mut chunk) in chunks.into_iter().enumerate() {
        let valid = (len - i * CHUNK_BYTES).min(CHUNK_BYTES);
        let aligned = align_up(valid as u64) as usize;
        chunk.as_bytes_mut()[valid..aligned].fill(0);
        chunk.trim_to_size(aligned);
        let pos = file_pos + (i * CHUNK_BYTES) as u64;
        let dma = dma.clone();
        writes.push(async move {
            if i == 0 {
                wait_predecessors(inner, seq).await?;
            }
            let n = dma.write_at(chunk, pos).await?;
            if n != aligned {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::WriteZero,
                    format!("short direct write: {n} of {aligned} bytes at {pos}"),
                ));
            }
            Ok::<(), std::io::Error>(())
        });
    }
    for r in futures::future::join_all(writes).await {
        r?;
    }
    wait_predecessors(inner, seq).await
}

async fn round_task(inner: Rc<Inner>, round: Round, seq: u64) {
    let always = inner.config.sync == SyncMode::Always;
    let Round {
        chunks,
        file_pos,
        len,
        next_offset: next,
        sync,
        dma,
        segment,
    } = round;
    let end = file_pos + len as u64;
    let mut result = write_round(&inner, chunks, file_pos, len, &dma, seq).await;
    if result.is_ok() {
        {
            let mut st = inner.st.borrow_mut();
            debug_assert_eq!(st.rounds_written, seq, "rounds complete in order");
            st.rounds_written = seq + 1;
            segment.set_visible(end.max(segment.len()), next.max(segment.next_offset()));
            st.written_next = st.written_next.max(next);
        }
        inner.progress.notify_all();
        inner.space.notify_all();
        if sync || always {
            result = dma.fdatasync().await.map_err(Into::into);
            if result.is_ok() {
                let mut st = inner.st.borrow_mut();
                st.durable_next = st.durable_next.max(next);
            }
        }
    }
    match result {
        Ok(()) => {
            let ckpt_due = {
                let mut st = inner.st.borrow_mut();
                let due = !st.ckpt_running
                    && Rc::ptr_eq(&st.active, &segment)
                    && end >= st.ckpt_pos + RECOVERY_CHECKPOINT_BYTES;
                st.ckpt_running |= due;
                due
            };
            if ckpt_due {
                if let Err(e) = write_recovery_point(&inner, &segment, end, next).await {
                    tracing::warn!(error = %e, "recovery checkpoint failed; a crash recovery will scan more");
                }
                inner.st.borrow_mut().ckpt_running = false;
            }
        }
        Err(e) => {
            tracing::error!(error = %e, dir = %inner.dir.display(), "log write failed; refusing further appends");
            inner
                .st
                .borrow_mut()
                .poisoned
                .get_or_insert_with(|| e.to_string());
        }
    }
    inner.st.borrow_mut().rounds_in_flight -= 1;
    inner.progress.notify_all();
    inner.space.notify_all();
    inner.wake_writer.notify_all();
}

pub(super) async fn writer_loop(inner: Rc<Inner>) {
    loop {
        let wake = inner.wake_writer.changed();
        let round = {
            let mut st = inner.st.borrow_mut();
            if st.poisoned.is_some() || st.rounds_in_flight >= ROUNDS_IN_FLIGHT_MAX {
                None
            } else {
                take_round(&mut st).map(|r| {
                    let seq = st.round_seq;
                    st.round_seq += 1;
                    st.rounds_in_flight += 1;
                    (r, seq)
                })
            }
        };
        if let Some((round, seq)) = round {
            rt::spawn_detached(round_task(inner.clone(), round, seq));
            continue;
        }
        {
            let mut st = inner.st.borrow_mut();
            if (st.closing || st.poisoned.is_some()) && st.rounds_in_flight == 0 {
                st.writer_done = true;
                drop(st);
                inner.progress.notify_all();
                return;
            }
        }
        wake.await;
    }
}

/// Makes `[0, end)` of the active segment durable and records it, with its
/// index, as the recovery point: a crash recovery scans only past it.
async fn write_recovery_point(
    inner: &Rc<Inner>,
    segment: &Rc<Segment>,
    end: u64,
    next: u64,
) -> std::io::Result<()> {
    let dma = inner.st.borrow().dma.clone();
    if !Rc::ptr_eq(&inner.st.borrow().active, segment) {
        return Ok(());
    }
    dma.fdatasync().await?;
    {
        let mut st = inner.st.borrow_mut();
        st.durable_next = st.durable_next.max(next);
    }
    let ck = {
        let st = inner.st.borrow();
        if !Rc::ptr_eq(&st.active, segment) {
            return Ok(());
        }
        let idx = segment.index();
        let rel_end = next - segment.base_offset;
        let mut offsets = Vec::new();
        for i in 0..idx.offset_entries() {
            let Some(e) = idx.offset_entry(i) else { break };
            if u64::from(e.1) >= end {
                break;
            }
            offsets.extend_from_slice(&e.0.to_le_bytes());
            offsets.extend_from_slice(&e.1.to_le_bytes());
        }
        let mut times = Vec::new();
        let mut max_ts = None;
        for i in 0..idx.time_entries() {
            let Some(e) = idx.time_entry(i) else { break };
            if u64::from(e.1) >= rel_end {
                break;
            }
            times.extend_from_slice(&e.0.to_le_bytes());
            times.extend_from_slice(&e.1.to_le_bytes());
            max_ts = Some(e.0);
        }
        let mut producers = st.producers.clone();
        producers.truncate_to(next);
        Checkpoint {
            clean: false,
            active_base: segment.base_offset,
            recovery_pos: end,
            next_offset: next,
            max_timestamp: max_ts,
            offset_index: offsets,
            time_index: times,
            producers,
        }
    };
    durable::write_durably(&inner.dir, checkpoint::FILE_NAME, ck.encode()).await?;
    inner.st.borrow_mut().ckpt_pos = end;
    Ok(())
}

pub(super) async fn interval_sync_loop(inner: Weak<Inner>, every: std::time::Duration) {
    loop {
        rt::sleep(every).await;
        let Some(inner) = inner.upgrade() else { return };
        let (target, dma) = {
            let st = inner.st.borrow();
            if st.closing || st.poisoned.is_some() {
                return;
            }
            if st.durable_next >= st.written_next {
                continue;
            }
            (st.written_next, st.dma.clone())
        };
        match dma.fdatasync().await {
            Ok(()) => {
                let mut st = inner.st.borrow_mut();
                st.durable_next = st.durable_next.max(target);
                drop(st);
                inner.progress.notify_all();
            }
            Err(e) => tracing::warn!(error = %e, "background fdatasync failed"),
        }
    }
}
