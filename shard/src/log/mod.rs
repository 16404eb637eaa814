//! The partition log (S1, S3, S4, S5): append, read, roll, recover, retain.
//!
//! # Write path
//! `append` validates a batch, assigns its offsets and copies it into the
//! partition's pending DMA chunks (4096-aligned buffers) — no other copy and
//! no I/O on the caller's task. A single writer task per partition takes all
//! pending chunks as one *round*: the chunks are written concurrently with
//! O_DIRECT at their file positions (the last one zero-padded to the block),
//! then, if the round must be durable, one `fdatasync` covers every batch in
//! it (group commit). The partially filled last block is copied to the front
//! of the next round, which rewrites that block with the same leading bytes.
//! Up to `ROUNDS_IN_FLIGHT_MAX` rounds are in flight; a round's first chunk
//! (the only one overlapping its predecessor) is submitted only after every
//! earlier round's writes completed, so overlapping writes never reorder and
//! rounds complete in order.
//!
//! # Failures
//! A write, fdatasync or roll that fails (a full disk, say) does not end
//! the log. Its waiters get [`Error::Poisoned`] (a retriable storage
//! error), appends are refused at once, and a warning says so. A round's
//! chunks are kept, so after a pause (`WRITE_RETRY_PAUSE_MIN`, doubling up
//! to `WRITE_RETRY_PAUSE_MAX`) the writer writes the failed rounds again,
//! in order, at the same positions with the same offsets; once they land,
//! an info line says so and appends resume. What was acknowledged is never
//! rewritten; what was not may be written by the retry, once, so a
//! producer's retry of it is at least once (exactly once with idempotence).
//!
//! # Visibility
//! Readers see a segment up to `Segment::len`, which only ever covers whole
//! batches whose write has completed: the zero padding of the tail block is
//! never visible, so a visible byte range can be handed to sendfile as is.
//! While readers wait at the end of the log, accepted batches are also
//! copied into the tail cache ([`crate::tail`]), and reads of the newest
//! batches are served from its memory files instead of the disk. Readers
//! behind it go through [`PartitionLog::read_ready`], which waits for the
//! pages without blocking the shard and keeps the partition's read-ahead
//! ([`crate::readahead`]) ahead of them.
//!
//! # Ownership
//! A `PartitionLog` belongs to the shard (core) that opened it: `Rc` and
//! `RefCell` inside, not `Send`. Other cores reach it through the broker's
//! messaging, never directly.
//!
//! # Files
//! - `mod.rs`: the [`PartitionLog`] type, its state, append (accept into
//!   the pending chunks), roll, close.
//! - `recover.rs`: open and crash recovery (segment listing, tail scan,
//!   index rebuild, the glommio iopoll probe).
//! - `writer.rs`: the writer pipeline (rounds, group commit, interval sync,
//!   recovery points).
//! - `read.rs`: [`ReadSlice`], reads by offset and by timestamp.
//! - `retention.rs`: deleting whole segments past the retention limits.

mod read;
mod recover;
mod replica;
mod retention;
mod writer;

pub use read::ReadSlice;
pub use recover::{TailDamage, TailEnd};
use writer::{clear_failure, extend_preallocation, record_failure, Failure, Prealloc, Round};

use crate::checkpoint::{self, Checkpoint};
use crate::config::{LogConfig, SyncMode};
use crate::durable;
use crate::error::{Error, Result};
use crate::index::IndexBytes;
use crate::limits::{CHUNK_BYTES, DIRECT_IO_ALIGN};
use crate::notify::Notify;
use crate::producers::ProducerTable;
use crate::readahead::ReadAhead;
use crate::rt;
use crate::segment::{self, FdBudget, Segment, SegmentFiles};
use crate::tail::{TailCache, TAIL_INTEREST};
use glommio::io::{DmaBuffer, DmaFile, OpenOptions};
use shoal_wire::batch::{self, validate_batch, BatchHeader};
use shoal_wire::BATCH_HEADER_BYTES;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Instant;

fn align_down(v: u64) -> u64 {
    v / DIRECT_IO_ALIGN * DIRECT_IO_ALIGN
}
fn align_up(v: u64) -> u64 {
    v.div_ceil(DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN
}

fn capacity_bytes(config: &LogConfig) -> u64 {
    config.segment_file_bytes_max()
}

/// Where an appended batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub base_offset: u64,
    pub last_offset: u64,
    /// The batch repeated one already in the log (idempotent retry); the
    /// offsets are the original ones and nothing new was written.
    pub duplicate: bool,
}

impl Appended {
    pub fn next_offset(&self) -> u64 {
        self.last_offset + 1
    }
}

/// Batches appended but not yet written, in DMA chunks.
struct Pending {
    chunks: Vec<DmaBuffer>,
    /// Aligned file position of `chunks[0][0]`.
    file_pos: u64,
    /// Valid bytes across the chunks, the already-written prefix included.
    len: usize,
    /// Leading bytes copied from the previous round's tail block.
    prefix: usize,
    /// Offset after the last batch in the chunks.
    next_offset: u64,
}

impl Pending {
    fn has_new_bytes(&self) -> bool {
        self.len > self.prefix
    }
    fn new_bytes(&self) -> usize {
        self.len - self.prefix
    }
    fn push(&mut self, dma: &DmaFile, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let at = self.len % CHUNK_BYTES;
            if at == 0 && self.len / CHUNK_BYTES == self.chunks.len() {
                self.chunks.push(dma.alloc_dma_buffer(CHUNK_BYTES));
            }
            let chunk = &mut self.chunks[self.len / CHUNK_BYTES];
            let n = bytes.len().min(CHUNK_BYTES - at);
            chunk.as_bytes_mut()[at..at + n].copy_from_slice(&bytes[..n]);
            self.len += n;
            bytes = &bytes[n..];
        }
    }
}

struct State {
    closed: Vec<Rc<Segment>>,
    active: Rc<Segment>,
    dma: Rc<DmaFile>,
    /// Bytes appended to the active segment, pending included.
    active_bytes: u64,
    active_created: Instant,
    /// Running maximum timestamp of the active segment's batches.
    active_max_ts: Option<i64>,
    next_offset: u64,
    written_next: u64,
    durable_next: u64,
    pending: Pending,
    sync_requested: bool,
    rolling: bool,
    closing: bool,
    writer_done: bool,
    /// A write or fdatasync failed: appends are refused and the writer
    /// retries the failed rounds after a pause.
    write_failure: Option<Failure>,
    /// A roll failed: appends are refused until the pause is over, then
    /// the next append rolls again.
    roll_failure: Option<Failure>,
    /// Write failures so far; a round dispatched before the latest one
    /// cannot complete (its predecessor failed) and is retried too.
    failures: u64,
    /// Rounds whose write failed, by sequence number, written again in
    /// order when the writer retries.
    retry: BTreeMap<u64, Round>,
    /// A roll started changing files and has not finished: the active
    /// segment takes no more batches, the next append rolls.
    roll_needed: bool,
    producers: ProducerTable,
    ckpt_pos: u64,
    ckpt_running: bool,
    /// Sequence number the next round gets.
    round_seq: u64,
    /// Rounds whose writes have all completed (they complete in order).
    rounds_written: u64,
    rounds_in_flight: usize,
    /// How far the active segment's file is reserved.
    prealloc: Prealloc,
    tail: TailCache,
    /// Last time a reader waited at the end of the log.
    tail_interest: Option<Instant>,
}

struct Inner {
    dir: PathBuf,
    /// The shard's bound on closed segments with open files.
    budget: Rc<FdBudget>,
    /// What the open found at the end of the log.
    tail_end: TailEnd,
    config: LogConfig,
    st: RefCell<State>,
    /// `written_next` or `durable_next` moved, or the log failed/closed.
    progress: Notify,
    /// New pending bytes or a sync request for the writer.
    wake_writer: Notify,
    /// Buffer space freed or a roll finished.
    space: Notify,
    /// Round writes still to fail on purpose (tests of the retry).
    injected_failures: Cell<u32>,
    /// The forward readers' read-ahead streams.
    read_ahead: RefCell<ReadAhead>,
    /// Leader epochs and the high watermark ([`replica`]).
    replica: RefCell<replica::ReplicaState>,
    /// Bumped when a truncation reopens the state: background loops of
    /// the state before end.
    generation: Cell<u64>,
}

impl Inner {
    fn take_injected_failure(&self) -> bool {
        let n = self.injected_failures.get();
        self.injected_failures.set(n.saturating_sub(1));
        n > 0
    }
}

/// A partition's append-only log. See the module docs for the write path
/// and [`SyncMode`] for what each acknowledgement level guarantees.
pub struct PartitionLog {
    inner: Rc<Inner>,
}

enum Accept {
    Done(Appended),
    Roll,
    WaitSpace,
}

impl PartitionLog {
    pub fn config(&self) -> &LogConfig {
        &self.inner.config
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Why appends are refused for now, if they are: a write, fdatasync or
    /// roll failed (a full disk, say) and is retried after a pause of at
    /// most `WRITE_RETRY_PAUSE_MAX`; appends resume once it succeeds.
    pub fn failure(&self) -> Option<String> {
        let st = self.inner.st.borrow();
        let f = st.write_failure.as_ref().or(st.roll_failure.as_ref());
        f.map(|f| f.why.clone())
    }

    /// Makes the next `n` round writes fail with ENOSPC, as a full disk
    /// would. For tests of the retry.
    #[doc(hidden)]
    pub fn inject_write_failures(&self, n: u32) {
        self.inner.injected_failures.set(n);
    }

    /// What opening the log found past its last valid batch: whether a
    /// crash recovery met only the preallocated zeros or real damage.
    pub fn recovered_tail(&self) -> &TailEnd {
        &self.inner.tail_end
    }

    /// First offset still in the log.
    pub fn start_offset(&self) -> u64 {
        let st = self.inner.st.borrow();
        st.closed
            .first()
            .map_or(st.active.base_offset, |s| s.base_offset)
    }

    /// Offset after the last batch readers can see (the high watermark of
    /// a single node).
    pub fn end_offset(&self) -> u64 {
        self.inner.st.borrow().written_next
    }

    /// Offset the next append will get.
    pub fn next_offset(&self) -> u64 {
        self.inner.st.borrow().next_offset
    }

    /// Offset after the last batch known to be on stable storage.
    pub fn durable_offset(&self) -> u64 {
        self.inner.st.borrow().durable_next
    }

    pub fn segment_count(&self) -> usize {
        self.inner.st.borrow().closed.len() + 1
    }

    /// Bytes readers can see, over all segments.
    pub fn size_bytes(&self) -> u64 {
        let st = self.inner.st.borrow();
        st.closed.iter().map(|s| s.len()).sum::<u64>() + st.active.len()
    }

    /// Appends a batch, assigning its offsets (the `base_offset` in `batch`
    /// is ignored). Returns once the batch is accepted: ordered and given
    /// offsets, but not yet in the file. Use [`Self::append_acked`] for an
    /// acknowledgement, or [`Self::wait_written`] / [`Self::wait_durable`].
    pub async fn append(&self, batch: &[u8]) -> Result<Appended> {
        self.append_inner(batch, None).await
    }

    /// Appends a batch that already carries its offsets (a replica copying
    /// its leader): its `base_offset` must equal [`Self::next_offset`].
    ///
    /// The batch keeps its leader epoch; the first batch of a newer epoch
    /// than the log's last records that epoch (durably) before it is
    /// accepted, and an older epoch is refused. The idempotent-producer
    /// check is skipped (a follower stores whatever its leader stored) but
    /// the producer state is kept, so this replica dedupes retries as its
    /// leader did if it leads next.
    pub async fn append_replica(&self, batch: &[u8]) -> Result<Appended> {
        let h = BatchHeader::decode(batch)?;
        let last = self.last_epoch();
        if last.is_some_and(|l| h.leader_epoch < l) {
            return Err(Error::Corrupt(format!(
                "replica batch at {} has leader epoch {}, older than the log's last {}",
                h.base_offset,
                h.leader_epoch,
                last.unwrap_or(0)
            )));
        }
        if last != Some(h.leader_epoch) && h.base_offset == self.next_offset() {
            self.record_epoch(h.leader_epoch, h.base_offset).await?;
        }
        self.append_inner(batch, Some(h.base_offset)).await
    }

    /// Appends and waits for the acknowledgement the sync mode promises:
    /// durable under `always`, in the file under `interval` and `none`.
    pub async fn append_acked(&self, batch: &[u8]) -> Result<Appended> {
        let a = self.append(batch).await?;
        self.wait_acked(a.next_offset()).await?;
        Ok(a)
    }

    /// Waits for the sync mode's acknowledgement of offsets below `next`.
    pub async fn wait_acked(&self, next: u64) -> Result<()> {
        match self.inner.config.sync {
            SyncMode::Always => self.wait_durable(next).await,
            _ => self.wait_written(next).await,
        }
    }

    async fn append_inner(&self, batch: &[u8], expect_base: Option<u64>) -> Result<Appended> {
        let header = validate_batch(batch, self.inner.config.batch_bytes_max)?;
        loop {
            let space = self.inner.space.changed();
            match self.try_accept(batch, &header, expect_base)? {
                Accept::Done(a) => return Ok(a),
                Accept::Roll => self.roll().await?,
                Accept::WaitSpace => space.await,
            }
        }
    }

    /// One attempt to take a validated batch into the pending chunks.
    fn try_accept(
        &self,
        batch: &[u8],
        header: &BatchHeader,
        expect_base: Option<u64>,
    ) -> Result<Accept> {
        let inner = &self.inner;
        let blen = batch.len();
        let mut st = inner.st.borrow_mut();
        if st.closing {
            return Err(Error::Closed);
        }
        if st.rolling {
            return Ok(Accept::WaitSpace);
        }
        if let Some(f) = &st.write_failure {
            return Err(Error::Poisoned(f.why.clone()));
        }
        if let Some(f) = &st.roll_failure {
            if !f.retry_due() {
                return Err(Error::Poisoned(f.why.clone()));
            }
        }
        if let Some(expected) = expect_base {
            if expected != st.next_offset {
                return Err(Error::OffsetMismatch {
                    expected: st.next_offset,
                    got: expected,
                });
            }
        }
        if header.is_idempotent() && expect_base.is_none() {
            if let Some(b) = st.producers.check(header)? {
                return Ok(Accept::Done(Appended {
                    base_offset: b.base_offset,
                    last_offset: b.last_offset,
                    duplicate: true,
                }));
            }
        }
        let age_due = rt::since(st.active_created) >= inner.config.segment_age;
        if st.active_bytes > 0
            && (st.roll_needed
                || st.active_bytes + blen as u64 > inner.config.segment_bytes
                || age_due)
        {
            return Ok(Accept::Roll);
        }
        if st.pending.new_bytes() + blen > inner.config.write_buffer_bytes {
            inner.wake_writer.notify_all();
            return Ok(Accept::WaitSpace);
        }
        let base = st.next_offset;
        let pos = st.active_bytes;
        let mut head = [0u8; BATCH_HEADER_BYTES];
        head.copy_from_slice(&batch[..BATCH_HEADER_BYTES]);
        batch::set_base_offset(&mut head, base);
        if expect_base.is_none() {
            batch::set_leader_epoch(&mut head, inner.replica.borrow().stamp);
        }
        let st = &mut *st;
        st.pending.push(&st.dma, &head);
        st.pending.push(&st.dma, &batch[BATCH_HEADER_BYTES..]);
        let next = base + u64::from(header.record_count);
        if st.tail.enabled()
            && st
                .tail_interest
                .is_some_and(|t| rt::since(t) < TAIL_INTEREST)
        {
            let body = &batch[BATCH_HEADER_BYTES..];
            let seg_base = st.active.base_offset;
            if let Err(e) = st.tail.append(seg_base, pos, (base, next), &head, body) {
                tracing::warn!(dir = %inner.dir.display(), "tail cache resting for 10 s: {e}");
            }
        } else if !st.tail.is_empty() {
            st.tail.clear();
        }
        let rel = (base - st.active.base_offset) as u32;
        st.active.open_files().index.borrow_mut().on_batch(
            rel,
            pos as u32,
            header.max_timestamp_ms,
            st.active_max_ts,
        );
        st.active_max_ts = Some(
            st.active_max_ts
                .map_or(header.max_timestamp_ms, |m| m.max(header.max_timestamp_ms)),
        );
        if header.is_idempotent() {
            st.producers.record(header, base);
        }
        st.next_offset = next;
        st.pending.next_offset = st.next_offset;
        st.active_bytes += blen as u64;
        if let Some(target) = st
            .prealloc
            .due(st.active_bytes, capacity_bytes(&inner.config))
        {
            st.prealloc.running = true;
            rt::spawn_detached(extend_preallocation(inner.clone(), st.dma.clone(), target));
        }
        inner.wake_writer.notify_all();
        Ok(Accept::Done(Appended {
            base_offset: base,
            last_offset: st.next_offset - 1,
            duplicate: false,
        }))
    }

    /// Waits until offsets below `next` are in the file (visible to readers,
    /// safe from a process crash).
    pub async fn wait_written(&self, next: u64) -> Result<()> {
        self.wait_until(|st| st.written_next >= next).await
    }

    /// Waits until offsets below `next` are on stable storage, asking the
    /// writer for an fdatasync if the sync mode would not do one soon.
    pub async fn wait_durable(&self, next: u64) -> Result<()> {
        {
            let mut st = self.inner.st.borrow_mut();
            if st.durable_next < next && self.inner.config.sync != SyncMode::Always {
                st.sync_requested = true;
            }
        }
        self.inner.wake_writer.notify_all();
        self.wait_until(|st| st.durable_next >= next).await
    }

    /// Everything appended so far, durable.
    pub async fn flush(&self) -> Result<()> {
        let next = self.next_offset();
        self.wait_durable(next).await
    }

    async fn wait_until(&self, done: impl Fn(&State) -> bool) -> Result<()> {
        loop {
            let changed = self.inner.progress.changed();
            {
                let st = self.inner.st.borrow();
                if done(&st) {
                    return Ok(());
                }
                if let Some(f) = &st.write_failure {
                    return Err(Error::Poisoned(f.why.clone()));
                }
                if st.writer_done {
                    return Err(Error::Closed);
                }
            }
            changed.await;
        }
    }

    /// Ends the active segment and starts a new one at the next offset.
    async fn roll(&self) -> Result<()> {
        let inner = &self.inner;
        let space = inner.space.changed();
        let already_rolling = {
            let mut st = inner.st.borrow_mut();
            let busy = st.rolling;
            if !busy {
                st.rolling = true;
                st.sync_requested = true;
                if let Some(f) = &mut st.roll_failure {
                    f.retrying = true;
                }
            }
            busy
        };
        if already_rolling {
            space.await;
            return Ok(());
        }
        let r = self.roll_inner().await;
        let mut st = inner.st.borrow_mut();
        st.rolling = false;
        match &r {
            Ok(()) => clear_failure(&mut st.roll_failure, "roll", &inner.dir),
            // Failing before it changed anything (a write failed, the log
            // closed), the roll has nothing to retry of its own.
            Err(e) if st.roll_needed => record_failure(&mut st.roll_failure, "roll", &inner.dir, e),
            Err(_) => {}
        }
        drop(st);
        inner.space.notify_all();
        inner.progress.notify_all();
        r
    }

    async fn roll_inner(&self) -> Result<()> {
        let inner = &self.inner;
        inner.wake_writer.notify_all();
        self.wait_until(|st| {
            st.durable_next == st.next_offset
                && st.written_next == st.next_offset
                && !st.prealloc.running
        })
        .await?;
        // From here on the old segment changes (truncated, its index
        // mapped): it must take no more batches, even if the roll fails.
        inner.st.borrow_mut().roll_needed = true;
        let (old, dma, active_bytes, next_offset) = {
            let st = inner.st.borrow();
            (
                st.active.clone(),
                st.dma.clone(),
                st.active_bytes,
                st.next_offset,
            )
        };
        // Drop the padding of the tail block: a closed segment's length is
        // exactly its batches.
        dma.truncate(active_bytes).await?;
        dma.fdatasync().await?;
        let (oi, ti) = {
            let files = old.open_files();
            let idx = files.index();
            (
                idx.offsets.as_bytes().to_vec(),
                idx.times.as_bytes().to_vec(),
            )
        };
        let (dir, base) = (inner.dir.clone(), old.base_offset);
        let (oi, ti) = rt::spawn_blocking(move || -> std::io::Result<_> {
            durable::write_durably_blocking(&dir, &segment::offset_index_name(base), &oi)?;
            durable::write_durably_blocking(&dir, &segment::time_index_name(base), &ti)?;
            Ok((
                IndexBytes::map(&segment::offset_index_path(&dir, base))?,
                IndexBytes::map(&segment::time_index_path(&dir, base))?,
            ))
        })
        .await?;
        old.install_index(oi, ti);
        old.join_budget(&inner.budget);

        let path = segment::log_path(&inner.dir, next_offset);
        let new_dma = Rc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .dma_open(&path)
                .await?,
        );
        let capacity = capacity_bytes(&inner.config);
        // As on open: the new segment reserves its first step when its first
        // batch is accepted, not before.
        let prealloc = Prealloc::new(0);
        let producers = inner.st.borrow().producers.clone();
        let ck = Checkpoint {
            clean: false,
            active_base: next_offset,
            recovery_pos: 0,
            next_offset,
            max_timestamp: None,
            offset_index: Vec::new(),
            time_index: Vec::new(),
            producers,
        }
        .encode();
        let dir = inner.dir.clone();
        let seg = rt::spawn_blocking(move || -> std::io::Result<_> {
            // The new segment's entry is durable before a checkpoint names it.
            durable::sync_dir_blocking(&dir)?;
            let files = SegmentFiles::open(&path, capacity)?;
            durable::write_durably_blocking(&dir, checkpoint::FILE_NAME, &ck)?;
            Ok((path, files))
        })
        .await?;
        let seg = Rc::new(Segment::new(seg.0, next_offset, capacity, Some(seg.1)));
        seg.set_visible(0, next_offset);
        let mut st = inner.st.borrow_mut();
        let st = &mut *st;
        st.closed.push(std::mem::replace(&mut st.active, seg));
        st.dma = new_dma;
        st.prealloc = prealloc;
        st.roll_needed = false;
        st.active_bytes = 0;
        st.active_created = rt::now();
        st.active_max_ts = None;
        st.ckpt_pos = 0;
        st.pending = Pending {
            chunks: Vec::new(),
            file_pos: 0,
            len: 0,
            prefix: 0,
            next_offset,
        };
        drop(dma);
        Ok(())
    }

    /// Flushes everything, writes a clean checkpoint and closes. The next
    /// open scans nothing.
    pub async fn close(self) -> Result<()> {
        self.shutdown().await
    }

    /// [`Self::close`] for a log shared by `Rc`: afterwards appends fail
    /// with [`Error::Closed`]; reads keep working.
    pub async fn shutdown(&self) -> Result<()> {
        let inner = self.inner.clone();
        if inner.st.borrow().writer_done {
            return Ok(());
        }
        loop {
            let space = inner.space.changed();
            {
                let mut st = inner.st.borrow_mut();
                if !st.rolling {
                    st.closing = true;
                    st.sync_requested = true;
                    break;
                }
            }
            space.await;
        }
        inner.wake_writer.notify_all();
        // The writer makes its last (durable) round and stops; only then is
        // the file ours to truncate.
        loop {
            let changed = inner.progress.changed();
            {
                let st = inner.st.borrow();
                if let Some(f) = &st.write_failure {
                    return Err(Error::Poisoned(f.why.clone()));
                }
                if st.writer_done && !st.prealloc.running {
                    break;
                }
            }
            changed.await;
        }
        let (dma, ck) = {
            let st = inner.st.borrow();
            assert_eq!(
                st.written_next, st.next_offset,
                "writer stopped with pending batches"
            );
            let files = st.active.open_files();
            let idx = files.index();
            let ck = Checkpoint {
                clean: true,
                active_base: st.active.base_offset,
                recovery_pos: st.active_bytes,
                next_offset: st.next_offset,
                max_timestamp: st.active_max_ts,
                offset_index: idx.offsets.as_bytes().to_vec(),
                time_index: idx.times.as_bytes().to_vec(),
                producers: st.producers.clone(),
            };
            drop(idx);
            (st.dma.clone(), ck)
        };
        dma.truncate(ck.recovery_pos).await?;
        dma.fdatasync().await?;
        durable::write_durably(&inner.dir, checkpoint::FILE_NAME, ck.encode()).await?;
        Ok(())
    }
}

impl PartitionLog {
    /// Stops like a crash would: pending batches are written, but nothing
    /// is synced, truncated or checkpointed. For recovery tests.
    #[doc(hidden)]
    pub async fn crash_stop(self) {
        let inner = self.inner.clone();
        inner.st.borrow_mut().closing = true;
        inner.wake_writer.notify_all();
        loop {
            let changed = inner.progress.changed();
            if inner.st.borrow().writer_done {
                return;
            }
            changed.await;
        }
    }
}

impl Drop for PartitionLog {
    fn drop(&mut self) {
        if let Ok(mut st) = self.inner.st.try_borrow_mut() {
            st.closing = true;
        }
        self.inner.wake_writer.notify_all();
        self.inner.progress.notify_all();
        self.inner.space.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::PREALLOCATE_STEP_BYTES;
    use shoal_wire::batch::{BatchBuilder, NewRecord, NO_PRODUCER_ID, NO_SEQUENCE};
    use std::os::unix::fs::MetadataExt;

    fn batch() -> Vec<u8> {
        let mut b = BatchBuilder::default();
        b.push(&NewRecord {
            value: Some(&[7u8; 1000]),
            ..Default::default()
        })
        .unwrap();
        b.finish(NO_PRODUCER_ID, 0, NO_SEQUENCE)
    }

    fn allocated_bytes(path: &Path) -> u64 {
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    /// Waits for the active segment's preallocation in flight, if any.
    async fn settle(log: &PartitionLog) {
        for _ in 0..1000 {
            if !log.inner.st.borrow().prealloc.running {
                return;
            }
            rt::sleep(std::time::Duration::from_millis(1)).await;
        }
        panic!("the preallocation never finished");
    }

    /// A freshly opened or rolled segment holds no preallocated block until
    /// its first batch is accepted; that batch reserves a step. (Opening
    /// and rolling used to reserve the step at once: 8,000 idle partitions
    /// held 256 GB and the broker refused topics that never wrote.)
    #[test]
    fn an_unwritten_segment_holds_no_preallocated_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let config = LogConfig {
                    sync: SyncMode::None,
                    ..LogConfig::default()
                };
                let log = PartitionLog::open(&path, config.clone()).await.unwrap();
                let first = segment::log_path(&path, 0);
                settle(&log).await;
                assert_eq!(
                    allocated_bytes(&first),
                    0,
                    "a new partition reserves nothing"
                );
                let mut total = allocated_bytes(&path);
                for e in std::fs::read_dir(&path).unwrap() {
                    total += allocated_bytes(&e.unwrap().path());
                }
                assert!(
                    total <= config.created_bytes_max(),
                    "a new partition takes {total} bytes, more than {}",
                    config.created_bytes_max()
                );

                let a = log.append_acked(&batch()).await.unwrap();
                settle(&log).await;
                assert!(
                    allocated_bytes(&first) >= PREALLOCATE_STEP_BYTES,
                    "the first append reserves a step: {} bytes",
                    allocated_bytes(&first)
                );

                log.roll().await.unwrap();
                let rolled = segment::log_path(&path, a.next_offset());
                settle(&log).await;
                assert_eq!(
                    allocated_bytes(&rolled),
                    0,
                    "a rolled segment reserves nothing"
                );
                assert!(
                    allocated_bytes(&first) <= 4096,
                    "the roll trims the old one"
                );

                log.append_acked(&batch()).await.unwrap();
                settle(&log).await;
                assert!(allocated_bytes(&rolled) >= PREALLOCATE_STEP_BYTES);
                log.close().await.unwrap();

                // Reopened (clean or not), a segment with batches holds its
                // batches' blocks and no lead until it is written again.
                let log = PartitionLog::open(&path, config).await.unwrap();
                settle(&log).await;
                assert!(allocated_bytes(&rolled) <= 4096);
                assert_eq!(log.next_offset(), a.next_offset() + 1);
                log.append_acked(&batch()).await.unwrap();
                settle(&log).await;
                assert!(allocated_bytes(&rolled) >= PREALLOCATE_STEP_BYTES);
                log.close().await.unwrap();
            })
            .expect("executor starts")
            .join()
            .expect("executor finishes");
    }
}
