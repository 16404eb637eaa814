//! The writer pipeline: one writer task per partition turns the pending
//! chunks into *rounds* of concurrent direct-I/O writes, with one
//! fdatasync per durable round (group commit), a background fdatasync for
//! `interval` mode, recovery points every `RECOVERY_CHECKPOINT_BYTES`, the
//! preallocation that stays ahead of it, and the retry of failed rounds.
//! See the parent module for the ordering rules and the failure model.

use super::{align_down, align_up, Inner, State};
use crate::checkpoint::{self, Checkpoint};
use crate::config::SyncMode;
use crate::durable;
use crate::limits::{
    CHUNK_BYTES, PREALLOCATE_STEP_BYTES, RECOVERY_CHECKPOINT_BYTES, ROUNDS_IN_FLIGHT_MAX,
    WRITE_RETRY_PAUSE_MAX, WRITE_RETRY_PAUSE_MIN,
};
use crate::rt;
use crate::segment::Segment;
use glommio::io::{DmaBuffer, DmaFile};
use std::path::Path;
use std::rc::{Rc, Weak};
use std::time::{Duration, Instant};

/// One write of the pending chunks, with at most one fdatasync.
pub(super) struct Round {
    /// The chunks still to write, by index in the round, ready to write
    /// (zero-padded to the block). A chunk's buffer is freed as soon as its
    /// write lands, as with an owned write (it goes back to the executor's
    /// registered DMA memory at once); a failed round keeps only the chunks
    /// it must write again.
    chunks: Vec<(usize, Rc<DmaBuffer>)>,
    file_pos: u64,
    len: usize,
    next_offset: u64,
    sync: bool,
    dma: Rc<DmaFile>,
    segment: Rc<Segment>,
}

/// Preallocation of the active segment, kept [`PREALLOCATE_STEP_BYTES`]
/// ahead of the accepted bytes once the segment takes batches.
///
/// Appends should never extend the file: an extending O_DIRECT write takes
/// the inode lock exclusively (ext4) and serialises the writes a round
/// keeps in flight. So the file's blocks are reserved (and its length set)
/// ahead of the writer, but only a step ahead, not the whole segment: a
/// segment of 1 GiB no longer takes 1 GiB of disk the moment it is created
/// (issue 9 #2). The length past the log end reads as zeros, which recovery
/// stops at; roll and close truncate to the exact end.
///
/// An opened or freshly rolled segment reserves nothing: its first accepted
/// batch starts the first step, in the background like every later one, so
/// a partition that is never written holds no preallocated block (8,000
/// idle partitions would otherwise hold 256 GiB). The writer holds a round
/// that would reach past the reservation while that step is in flight
/// ([`Prealloc::holds_back`]; a fallocate takes ~30 us here), so even the
/// first write lands inside reserved blocks instead of extending the file.
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

    /// Whether a round whose writes end at `end` should wait for the
    /// extension in flight: it would extend the file itself otherwise.
    /// Only a segment's first round meets this in practice (its step starts
    /// with its first append); later steps start half a step early.
    pub(super) fn holds_back(&self, end: u64) -> bool {
        self.running && end > self.end
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

/// Extends the active segment's reservation to `target`, beside the writer.
pub(super) async fn extend_preallocation(inner: Rc<Inner>, dma: Rc<DmaFile>, target: u64) {
    let result = dma.pre_allocate(target, false).await.map_err(Into::into);
    {
        let mut st = inner.st.borrow_mut();
        debug_assert!(Rc::ptr_eq(&st.dma, &dma), "a roll waits for extensions");
        st.prealloc.finish(target, result);
    }
    inner.progress.notify_all();
    // A round may be held for this step (`Prealloc::holds_back`).
    inner.wake_writer.notify_all();
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
    let chunks = chunks
        .into_iter()
        .enumerate()
        .map(|(i, mut chunk)| {
            let valid = (len - i * CHUNK_BYTES).min(CHUNK_BYTES);
            let aligned = align_up(valid as u64) as usize;
            chunk.as_bytes_mut()[valid..aligned].fill(0);
            chunk.trim_to_size(aligned);
            (i, Rc::new(chunk))
        })
        .collect();
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

/// Waits until every round before `seq` has completed its writes. Fails if
/// a write failed since the round was dispatched (`failures` moved past
/// `gen`): an earlier round will not complete until it is retried.
async fn wait_predecessors(inner: &Inner, seq: u64, gen: u64) -> std::io::Result<()> {
    loop {
        let changed = inner.progress.changed();
        {
            let st = inner.st.borrow();
            if st.rounds_written >= seq {
                return Ok(());
            }
            if st.failures != gen {
                return Err(std::io::Error::other("an earlier round failed"));
            }
        }
        changed.await;
    }
}

/// Writes one round. Its first chunk rewrites the previous round's tail
/// block, so it is submitted only after every earlier round's writes are
/// done; the other chunks go at once. Rounds therefore complete in order.
///
/// The chunks that did not land stay in `round` for a retry.
async fn write_round(inner: &Inner, round: &mut Round, seq: u64, gen: u64) -> std::io::Result<()> {
    let mut writes = Vec::with_capacity(round.chunks.len());
    for (i, chunk) in std::mem::take(&mut round.chunks) {
        let pos = round.file_pos + (i * CHUNK_BYTES) as u64;
        let dma = round.dma.clone();
        writes.push(async move {
            let written = async {
                if i == 0 {
                    wait_predecessors(inner, seq, gen).await?;
                    if inner.take_injected_failure() {
                        return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
                    }
                }
                let aligned = chunk.len();
                let n = dma.write_rc_at(chunk.clone(), pos).await?;
                if n != aligned {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::WriteZero,
                        format!("short direct write: {n} of {aligned} bytes at {pos}"),
                    ));
                }
                Ok(())
            }
            .await;
            // Landed: the buffer is freed here, not when the round ends.
            written.map_err(|e| (i, chunk, e))
        });
    }
    let mut failed = None;
    for r in futures::future::join_all(writes).await {
        if let Err((i, chunk, e)) = r {
            round.chunks.push((i, chunk));
            failed.get_or_insert(e);
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    wait_predecessors(inner, seq, gen).await
}

async fn round_task(inner: Rc<Inner>, mut round: Round, seq: u64, gen: u64) {
    let always = inner.config.sync == SyncMode::Always;
    let end = round.file_pos + round.len as u64;
    let next = round.next_offset;
    let segment = round.segment.clone();
    match write_round(&inner, &mut round, seq, gen).await {
        Ok(()) => {
            {
                let mut st = inner.st.borrow_mut();
                debug_assert_eq!(st.rounds_written, seq, "rounds complete in order");
                st.rounds_written = seq + 1;
                segment.set_visible(end.max(segment.len()), next.max(segment.next_offset()));
                st.written_next = st.written_next.max(next);
            }
            inner.progress.notify_all();
            inner.space.notify_all();
            let synced: std::io::Result<()> = if round.sync || always {
                round.dma.fdatasync().await.map_err(std::io::Error::from)
            } else {
                Ok(())
            };
            match synced {
                Ok(()) if round.sync || always => {
                    let mut st = inner.st.borrow_mut();
                    st.durable_next = st.durable_next.max(next);
                }
                Ok(()) => {}
                Err(e) => {
                    // The bytes are written (readers may have seen them);
                    // only their durability is owed: the retry syncs.
                    let mut st = inner.st.borrow_mut();
                    st.sync_requested = true;
                    record_write_failure(&mut st, &inner.dir, &e);
                }
            }
        }
        Err(e) => {
            let mut st = inner.st.borrow_mut();
            // A round failing only because an earlier one did is no news.
            if st.failures == gen {
                record_write_failure(&mut st, &inner.dir, &e);
            }
            st.retry.insert(seq, round);
        }
    }
    let ckpt_due = {
        let mut st = inner.st.borrow_mut();
        let due = st.write_failure.is_none()
            && !st.ckpt_running
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
    inner.st.borrow_mut().rounds_in_flight -= 1;
    inner.progress.notify_all();
    inner.space.notify_all();
    inner.wake_writer.notify_all();
}

/// Why appends are refused for now, and when to try again.
pub(super) struct Failure {
    pub(super) why: String,
    since: Instant,
    retry_at: Instant,
    pause: Duration,
    /// The retry is under way (for a write: the failed rounds are being
    /// written again; for a roll: an append is rolling again).
    pub(super) retrying: bool,
}

impl Failure {
    /// Whether the next attempt is due.
    pub(super) fn retry_due(&self) -> bool {
        !self.retrying && rt::now() >= self.retry_at
    }
}

/// Records a failed write, roll or fdatasync in `slot`. The first failure
/// of a streak is a warning; later ones only push the next retry out.
pub(super) fn record_failure(
    slot: &mut Option<Failure>,
    what: &'static str,
    dir: &Path,
    e: &dyn std::fmt::Display,
) {
    let now = rt::now();
    match slot {
        None => {
            tracing::warn!(dir = %dir.display(), error = %e, "log {what} failed; appends are refused until a retry succeeds");
            *slot = Some(Failure {
                why: e.to_string(),
                since: now,
                retry_at: now + WRITE_RETRY_PAUSE_MIN,
                pause: WRITE_RETRY_PAUSE_MIN,
                retrying: false,
            });
        }
        Some(f) => {
            tracing::debug!(dir = %dir.display(), error = %e, "log {what} retry failed");
            f.why = e.to_string();
            f.pause = (f.pause * 2).min(WRITE_RETRY_PAUSE_MAX);
            f.retry_at = now + f.pause;
            f.retrying = false;
        }
    }
}

/// Ends a failure streak in `slot`, with the one line that says so.
pub(super) fn clear_failure(slot: &mut Option<Failure>, what: &'static str, dir: &Path) {
    if let Some(f) = slot.take() {
        tracing::info!(dir = %dir.display(), after_ms = rt::since(f.since).as_millis() as u64, "log {what} succeeded again; appends resume");
    }
}

fn record_write_failure(st: &mut State, dir: &Path, e: &dyn std::fmt::Display) {
    st.failures += 1;
    record_failure(&mut st.write_failure, "write", dir, e);
}

pub(super) async fn writer_loop(inner: Rc<Inner>) {
    loop {
        let wake = inner.wake_writer.changed();
        let mut pause_until = None;
        let mut held = false;
        let dispatch = {
            let mut st = inner.st.borrow_mut();
            let st = &mut *st;
            let may_write = match &mut st.write_failure {
                None => true,
                Some(_) if st.closing => false,
                Some(f) if f.retrying => true,
                // The rounds in flight settle before anything is retried.
                Some(_) if st.rounds_in_flight > 0 => false,
                Some(f) if f.retry_due() => {
                    f.retrying = true;
                    true
                }
                Some(f) => {
                    pause_until = Some(f.retry_at);
                    false
                }
            };
            if !may_write || st.rounds_in_flight >= ROUNDS_IN_FLIGHT_MAX {
                None
            } else if let Some((seq, round)) = st.retry.pop_first() {
                st.rounds_in_flight += 1;
                Some((round, seq, st.failures))
            } else if st.pending.has_new_bytes()
                && st
                    .prealloc
                    .holds_back(st.pending.file_pos + align_up(st.pending.len as u64))
            {
                // `extend_preallocation` wakes the writer when it lands.
                held = true;
                None
            } else {
                take_round(st).map(|r| {
                    let seq = st.round_seq;
                    st.round_seq += 1;
                    st.rounds_in_flight += 1;
                    (r, seq, st.failures)
                })
            }
        };
        if let Some((round, seq, gen)) = dispatch {
            rt::spawn_detached(round_task(inner.clone(), round, seq, gen));
            continue;
        }
        {
            let mut st = inner.st.borrow_mut();
            let retried_all = st.write_failure.as_ref().is_some_and(|f| f.retrying)
                && st.rounds_in_flight == 0
                && st.retry.is_empty()
                && !st.pending.has_new_bytes()
                && !st.sync_requested;
            if retried_all {
                clear_failure(&mut st.write_failure, "write", &inner.dir);
                drop(st);
                inner.progress.notify_all();
                inner.space.notify_all();
                continue;
            }
            if st.closing && st.rounds_in_flight == 0 && !held {
                st.writer_done = true;
                drop(st);
                inner.progress.notify_all();
                return;
            }
        }
        match pause_until {
            Some(at) => {
                let _ = rt::timeout(at.saturating_duration_since(rt::now()), wake).await;
            }
            None => wake.await,
        }
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
        let files = segment.open_files();
        let idx = files.index();
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

/// Starts the writer (and the interval syncer, under `interval`) of the
/// log's current state.
pub(super) fn start(inner: &Rc<Inner>) {
    rt::spawn_detached(writer_loop(inner.clone()));
    if let crate::config::SyncMode::Interval(d) = inner.config.sync {
        rt::spawn_detached(interval_sync_loop(
            Rc::downgrade(inner),
            d,
            inner.generation.get(),
        ));
    }
}

pub(super) async fn interval_sync_loop(
    inner: Weak<Inner>,
    every: std::time::Duration,
    generation: u64,
) {
    // Warn once per streak of failures, not every interval.
    let mut failing = false;
    loop {
        rt::sleep(every).await;
        let Some(inner) = inner.upgrade() else { return };
        let (target, dma) = {
            let st = inner.st.borrow();
            if st.closing || inner.generation.get() != generation {
                return;
            }
            // A failed write is retried by the writer, which syncs then.
            if st.write_failure.is_some() || st.durable_next >= st.written_next {
                continue;
            }
            (st.written_next, st.dma.clone())
        };
        match dma.fdatasync().await {
            Ok(()) => {
                if failing {
                    tracing::info!(dir = %inner.dir.display(), "background fdatasync succeeded again");
                    failing = false;
                }
                let mut st = inner.st.borrow_mut();
                st.durable_next = st.durable_next.max(target);
                drop(st);
                inner.progress.notify_all();
            }
            Err(e) if !failing => {
                tracing::warn!(dir = %inner.dir.display(), error = %e, "background fdatasync failed");
                failing = true;
            }
            Err(e) => tracing::debug!(error = %e, "background fdatasync failed again"),
        }
    }
}
