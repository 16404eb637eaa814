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
//! # Visibility
//! Readers see a segment up to `Segment::len`, which only ever covers whole
//! batches whose write has completed: the zero padding of the tail block is
//! never visible, so a visible byte range can be handed to sendfile as is.
//! While readers wait at the end of the log, accepted batches are also
//! copied into the tail cache ([`crate::tail`]), and reads of the newest
//! batches are served from its memory files instead of the disk.
//!
//! # Ownership
//! A `PartitionLog` belongs to the shard (core) that opened it: `Rc` and
//! `RefCell` inside, not `Send`. Other cores reach it through the broker's
//! messaging, never directly.

use crate::checkpoint::{self, Checkpoint};
use crate::config::{LogConfig, SyncMode};
use crate::error::{Error, Result};
use crate::index::{IndexBytes, SegmentIndex};
use crate::limits::{
    CHUNK_BYTES, DIRECT_IO_ALIGN, RECOVERY_CHECKPOINT_BYTES, ROUNDS_IN_FLIGHT_MAX,
};
use crate::notify::Notify;
use crate::producers::ProducerTable;
use crate::segment::{self, Segment};
use crate::tail::{TailBlock, TailCache, TAIL_INTEREST};
use glommio::io::{DmaBuffer, DmaFile, OpenOptions};
use shoal_wire::batch::{self, check_header, validate_batch, BatchHeader};
use shoal_wire::BATCH_HEADER_BYTES;
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};
use std::time::Instant;

/// Longest pause between residency checks while a slice is read into the
/// page cache: short, since a fresh block arrives in ~70-140 us and every
/// microsecond of pause is latency for the consumer.
const RESIDENT_POLL_MAX: std::time::Duration = std::time::Duration::from_micros(50);

fn align_down(v: u64) -> u64 {
    v / DIRECT_IO_ALIGN * DIRECT_IO_ALIGN
}
fn align_up(v: u64) -> u64 {
    v.div_ceil(DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN
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

/// Whole batches of one segment, ready for sendfile (`file()`, `position`,
/// `len`) or for in-process reading (`bytes()`).
#[derive(Clone)]
pub struct ReadSlice {
    pub segment: Rc<Segment>,
    pub position: u64,
    pub len: u64,
    /// Base offset of the first batch in the slice (may be below the
    /// requested offset: batches are never split).
    pub first_offset: u64,
    /// Offset after the last batch in the slice: where to read next.
    pub next_offset: u64,
    /// The log's visible end when the slice was taken.
    pub high_watermark: u64,
    /// Set when the bytes come from the tail cache's memory file.
    cached: Option<Rc<TailBlock>>,
}

impl ReadSlice {
    pub fn bytes(&self) -> &[u8] {
        match &self.cached {
            Some(b) => b.bytes(self.position, self.len),
            None => self.segment.bytes(self.position, self.len),
        }
    }
    /// The file to sendfile from, at [`ReadSlice::file_position`]: the
    /// segment file, or the tail cache's memory file holding the same bytes.
    pub fn file(&self) -> &std::fs::File {
        match &self.cached {
            Some(b) => b.file(),
            None => self.segment.file(),
        }
    }
    /// Where the slice starts in [`ReadSlice::file`].
    pub fn file_position(&self) -> u64 {
        match &self.cached {
            Some(b) => b.offset_of(self.position),
            None => self.position,
        }
    }
    /// Whether the slice is served from memory (the tail cache).
    pub fn is_cached(&self) -> bool {
        self.cached.is_some()
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Brings the slice into the page cache without blocking the shard:
    /// starts the reads, then yields until the pages are resident (or
    /// `limit` passes). A sendfile afterwards copies from memory instead of
    /// stalling every task of the core on the disk.
    pub async fn make_resident(&self, limit: std::time::Duration) {
        if self.cached.is_some() || self.segment.resident(self.position, self.len) {
            return;
        }
        self.segment.prefetch(self.position, self.len);
        let deadline = Instant::now() + limit;
        let mut pause = std::time::Duration::from_micros(20);
        while !self.segment.resident(self.position, self.len) && Instant::now() < deadline {
            glommio::timer::sleep(pause).await;
            pause = (pause * 2).min(RESIDENT_POLL_MAX);
        }
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
    poisoned: Option<String>,
    producers: ProducerTable,
    ckpt_pos: u64,
    ckpt_running: bool,
    /// Sequence number the next round gets.
    round_seq: u64,
    /// Rounds whose writes have all completed (they complete in order).
    rounds_written: u64,
    rounds_in_flight: usize,
    tail: TailCache,
    /// Last time a reader waited at the end of the log.
    tail_interest: Option<Instant>,
}

struct Inner {
    dir: PathBuf,
    config: LogConfig,
    st: RefCell<State>,
    /// `written_next` or `durable_next` moved, or the log failed/closed.
    progress: Notify,
    /// New pending bytes or a sync request for the writer.
    wake_writer: Notify,
    /// Buffer space freed or a roll finished.
    space: Notify,
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

struct Round {
    chunks: Vec<DmaBuffer>,
    file_pos: u64,
    len: usize,
    next_offset: u64,
    sync: bool,
    dma: Rc<DmaFile>,
    segment: Rc<Segment>,
}

/// Opens a non-empty file with direct I/O before any segment: glommio's
/// iopoll probe reads the first block of the first DMA file it sees on a
/// device and misjudges an empty one.
async fn dma_probe(dir: &Path) -> std::io::Result<()> {
    let p = dir.join(".dma-probe");
    if std::fs::metadata(&p)
        .map(|m| m.len() < DIRECT_IO_ALIGN)
        .unwrap_or(true)
    {
        std::fs::write(&p, vec![0x5a; DIRECT_IO_ALIGN as usize])?;
    }
    let f = DmaFile::open(&p).await?;
    let _ = f.read_at_aligned(0, DIRECT_IO_ALIGN as usize).await?;
    f.close().await?;
    Ok(())
}

/// Reserves the active segment's blocks and sets its length to the full
/// capacity. Appends then never extend the file: an extending O_DIRECT
/// write takes the inode lock exclusively (ext4) and serialises the writes
/// a round keeps in flight. The length past the log end reads as zeros,
/// which recovery stops at; roll and close truncate to the exact end.
/// Best effort: where fallocate is unsupported the file grows as written.
async fn preallocate(dma: &DmaFile, bytes: u64) {
    if let Err(e) = dma.pre_allocate(bytes, false).await {
        tracing::debug!(error = %e, "segment preallocation unavailable");
    }
}

fn list_segments(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut bases = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".log") {
            if let Ok(b) = stem.parse::<u64>() {
                bases.push(b);
            }
        } else if name.ends_with(".tmp") {
            let _ = std::fs::remove_file(dir.join(&*name));
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Rebuilds a closed segment's indexes by walking its batch headers.
fn rebuild_index(seg: &Segment, batch_bytes_max: usize) -> SegmentIndex {
    let mut idx = SegmentIndex::default();
    let mut pos = 0u64;
    let mut max_ts = None;
    while let Some(h) = seg.header_at(pos, batch_bytes_max) {
        idx.on_batch(
            (h.base_offset - seg.base_offset) as u32,
            pos as u32,
            h.max_timestamp_ms,
            max_ts,
        );
        max_ts = Some(max_ts.map_or(h.max_timestamp_ms, |m: i64| m.max(h.max_timestamp_ms)));
        pos += u64::from(h.batch_len);
    }
    idx
}

fn index_files(seg: &Segment, dir: &Path) -> (Vec<u8>, Vec<u8>, PathBuf, PathBuf) {
    let idx = seg.index();
    (
        idx.offsets.as_bytes().to_vec(),
        idx.times.as_bytes().to_vec(),
        segment::offset_index_path(dir, seg.base_offset),
        segment::time_index_path(dir, seg.base_offset),
    )
}

/// Result of scanning a segment's tail.
struct Scan {
    end: u64,
    next_offset: u64,
    max_ts: Option<i64>,
}

/// Validates batches from `from.end` (CRC, contiguous offsets) and
/// indexes them; returns where the valid log ends.
fn scan_tail(
    bytes: &[u8],
    from: Scan,
    base: u64,
    idx: &mut SegmentIndex,
    producers: &mut ProducerTable,
    batch_bytes_max: usize,
) -> Scan {
    let Scan {
        end: mut pos,
        mut next_offset,
        mut max_ts,
    } = from;
    loop {
        let rest = &bytes[pos as usize..];
        let Ok(h) = check_header(rest, batch_bytes_max) else {
            break;
        };
        let blen = h.batch_len as usize;
        if batch::compute_crc(&rest[..blen]) != h.crc || h.base_offset != next_offset {
            break;
        }
        idx.on_batch(
            (h.base_offset - base) as u32,
            pos as u32,
            h.max_timestamp_ms,
            max_ts,
        );
        max_ts = Some(max_ts.map_or(h.max_timestamp_ms, |m| m.max(h.max_timestamp_ms)));
        if h.is_idempotent() {
            producers.record(&h, h.base_offset);
        }
        next_offset = h.next_offset();
        pos += blen as u64;
    }
    Scan {
        end: pos,
        next_offset,
        max_ts,
    }
}

impl PartitionLog {
    /// Opens (or creates) the log in `dir`, recovering after a crash.
    ///
    /// After a clean close nothing is scanned: the checkpoint holds the
    /// active segment's index and end. After a crash only the bytes past the
    /// last recovery point are scanned; a torn or corrupt tail is truncated.
    pub async fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<PartitionLog> {
        config.validate().map_err(Error::Config)?;
        // Absolute: glommio opens directories by absolute path only.
        let dir = std::path::absolute(dir.as_ref())?;
        std::fs::create_dir_all(&dir)?;
        dma_probe(&dir).await?;
        let mut bases = list_segments(&dir)?;
        if bases.is_empty() {
            std::fs::File::create(segment::log_path(&dir, 0))?;
            bases.push(0);
        }
        let ckpt = Checkpoint::load(&dir);
        let bmax = config.batch_bytes_max;

        let mut closed = Vec::with_capacity(bases.len());
        for (i, &base) in bases[..bases.len() - 1].iter().enumerate() {
            let path = segment::log_path(&dir, base);
            let seg = Segment::open(path, base, 0)?;
            let len = seg.file().metadata()?.len();
            seg.set_visible(len, bases[i + 1]);
            let oi = segment::offset_index_path(&dir, base);
            let ti = segment::time_index_path(&dir, base);
            let loaded = match (IndexBytes::map(&oi), IndexBytes::map(&ti)) {
                (Ok(o), Ok(t)) => {
                    let idx = SegmentIndex::from_parts(o, t);
                    idx.validate(len).map(|_| idx)
                }
                (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
            };
            match loaded {
                Ok(idx) => *seg.index.borrow_mut() = idx,
                Err(why) => {
                    tracing::warn!(segment = %seg.path.display(), %why, "rebuilding segment index");
                    let idx = rebuild_index(&seg, bmax);
                    std::fs::write(&oi, idx.offsets.as_bytes())?;
                    std::fs::write(&ti, idx.times.as_bytes())?;
                    std::fs::File::open(&oi)?.sync_all()?;
                    std::fs::File::open(&ti)?.sync_all()?;
                    seg.install_index(IndexBytes::map(&oi)?, IndexBytes::map(&ti)?);
                }
            }
            closed.push(Rc::new(seg));
        }

        // The active segment.
        let base = *bases.last().unwrap_or(&0);
        let path = segment::log_path(&dir, base);
        let capacity = align_up(config.segment_bytes + config.batch_bytes_max as u64);
        let file_len = std::fs::metadata(&path)?.len();
        let (mut idx, mut start_pos, mut next_offset, mut max_ts, mut producers, trusted) =
            match &ckpt {
                Some(c) if c.active_base == base && c.recovery_pos <= file_len => {
                    let idx = SegmentIndex::from_parts(
                        IndexBytes::Mem(c.offset_index.clone()),
                        IndexBytes::Mem(c.time_index.clone()),
                    );
                    let trusted = c.clean && c.recovery_pos == file_len;
                    (
                        idx,
                        c.recovery_pos,
                        c.next_offset,
                        c.max_timestamp,
                        c.producers.clone(),
                        trusted,
                    )
                }
                Some(c) => (
                    SegmentIndex::default(),
                    0,
                    base,
                    None,
                    c.producers.clone(),
                    false,
                ),
                None => (
                    SegmentIndex::default(),
                    0,
                    base,
                    None,
                    ProducerTable::default(),
                    false,
                ),
            };
        if idx.validate(start_pos.max(1)).is_err() {
            idx = SegmentIndex::default();
            start_pos = 0;
            next_offset = base;
            max_ts = None;
        }
        let mut end = start_pos;
        if !trusted {
            let file = std::fs::File::open(&path)?;
            if file_len > start_pos {
                // SAFETY: read-only mapping of a file nothing else writes
                // during open; dropped before the appender starts.
                let map = unsafe { memmap2::Mmap::map(&file)? };
                let from = Scan {
                    end: start_pos,
                    next_offset,
                    max_ts,
                };
                let scan = scan_tail(&map, from, base, &mut idx, &mut producers, bmax);
                end = scan.end;
                next_offset = scan.next_offset;
                max_ts = scan.max_ts;
            }
            if end < file_len {
                tracing::warn!(segment = %path.display(), valid = end, file = file_len, "truncating torn or corrupt tail");
                let f = std::fs::OpenOptions::new().write(true).open(&path)?;
                f.set_len(end)?;
            }
            // What we scanned may still be only in the page cache: make it
            // durable before a checkpoint vouches for it.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)?
                .sync_data()?;
            producers.truncate_to(next_offset);
        }
        // Clear the clean flag before anything changes the files.
        let ck = Checkpoint {
            clean: false,
            active_base: base,
            recovery_pos: end,
            next_offset,
            max_timestamp: max_ts,
            offset_index: idx.offsets.as_bytes().to_vec(),
            time_index: idx.times.as_bytes().to_vec(),
            producers: producers.clone(),
        };
        checkpoint::write_durably(&dir, checkpoint::FILE_NAME, ck.encode()).await?;

        let active = Rc::new(Segment::open(path.clone(), base, capacity)?);
        *active.index.borrow_mut() = idx;
        active.set_visible(end, next_offset);
        let dma = Rc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .dma_open(&path)
                .await?,
        );
        preallocate(&dma, capacity).await;
        let mut pending = Pending {
            chunks: Vec::new(),
            file_pos: align_down(end),
            len: 0,
            prefix: 0,
            next_offset,
        };
        let prefix = (end - pending.file_pos) as usize;
        if prefix > 0 {
            let tail = active.bytes(pending.file_pos, prefix as u64).to_vec();
            pending.push(&dma, &tail);
            pending.prefix = prefix;
        }
        let first_offset = closed.first().map_or(base, |s| s.base_offset);
        tracing::debug!(dir = %dir.display(), segments = closed.len() + 1, first_offset, next_offset, trusted, "opened partition log");

        let inner = Rc::new(Inner {
            dir,
            st: RefCell::new(State {
                closed,
                active,
                dma,
                active_bytes: end,
                active_created: Instant::now(),
                active_max_ts: max_ts,
                next_offset,
                written_next: next_offset,
                durable_next: next_offset,
                pending,
                sync_requested: false,
                rolling: false,
                closing: false,
                writer_done: false,
                poisoned: None,
                producers,
                ckpt_pos: end,
                ckpt_running: false,
                round_seq: 0,
                rounds_written: 0,
                rounds_in_flight: 0,
                tail: TailCache::new(config.tail_cache_bytes),
                tail_interest: None,
            }),
            config,
            progress: Notify::default(),
            wake_writer: Notify::default(),
            space: Notify::default(),
        });
        glommio::spawn_local(writer_loop(inner.clone())).detach();
        if let SyncMode::Interval(d) = inner.config.sync {
            glommio::spawn_local(interval_sync_loop(Rc::downgrade(&inner), d)).detach();
        }
        Ok(PartitionLog { inner })
    }

    pub fn config(&self) -> &LogConfig {
        &self.inner.config
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
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
    pub async fn append_replica(&self, batch: &[u8]) -> Result<Appended> {
        let h = BatchHeader::decode(batch)?;
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
        if let Some(why) = &st.poisoned {
            return Err(Error::Poisoned(why.clone()));
        }
        if st.closing {
            return Err(Error::Closed);
        }
        if st.rolling {
            return Ok(Accept::WaitSpace);
        }
        if let Some(expected) = expect_base {
            if expected != st.next_offset {
                return Err(Error::OffsetMismatch {
                    expected: st.next_offset,
                    got: expected,
                });
            }
        }
        if header.is_idempotent() {
            if let Some(b) = st.producers.check(header)? {
                return Ok(Accept::Done(Appended {
                    base_offset: b.base_offset,
                    last_offset: b.last_offset,
                    duplicate: true,
                }));
            }
        }
        let age_due = st.active_created.elapsed() >= inner.config.segment_age;
        if st.active_bytes > 0
            && (st.active_bytes + blen as u64 > inner.config.segment_bytes || age_due)
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
        let st = &mut *st;
        st.pending.push(&st.dma, &head);
        st.pending.push(&st.dma, &batch[BATCH_HEADER_BYTES..]);
        let next = base + u64::from(header.record_count);
        if st.tail.enabled()
            && st
                .tail_interest
                .is_some_and(|t| t.elapsed() < TAIL_INTEREST)
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
        st.active.index.borrow_mut().on_batch(
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
                if let Some(why) = &st.poisoned {
                    return Err(Error::Poisoned(why.clone()));
                }
                if st.writer_done {
                    return Err(Error::Closed);
                }
            }
            changed.await;
        }
    }

    /// Waits until an offset at or past `offset` is readable (or the log
    /// closes). Long-polling is the broker's job; this is its wake-up.
    pub async fn wait_for_data(&self, offset: u64) {
        self.inner.st.borrow_mut().tail_interest = Some(Instant::now());
        let _ = self
            .wait_until(|st| st.written_next > offset || st.closing)
            .await;
    }

    /// Reads whole batches from the one holding `from`, up to `max_bytes`
    /// (at least one batch, so a consumer always progresses). Never waits:
    /// at the end of the log the slice is empty.
    pub fn read(&self, from: u64, max_bytes: u64) -> Result<ReadSlice> {
        let st = self.inner.st.borrow();
        let start = st
            .closed
            .first()
            .map_or(st.active.base_offset, |s| s.base_offset);
        let end = st.written_next;
        if from < start || from > end {
            return Err(Error::OffsetOutOfRange {
                offset: from,
                start,
                end,
            });
        }
        let seg = std::iter::once(&st.active)
            .chain(st.closed.iter().rev())
            .find(|s| s.base_offset <= from)
            .cloned()
            .unwrap_or_else(|| st.active.clone());
        let bmax = self.inner.config.batch_bytes_max;
        let empty = |seg: Rc<Segment>| ReadSlice {
            position: seg.len(),
            len: 0,
            first_offset: from,
            next_offset: from,
            high_watermark: end,
            segment: seg,
            cached: None,
        };
        if from == end {
            return Ok(empty(st.active.clone()));
        }
        if let Some(c) = st.tail.read(seg.base_offset, seg.len(), from, max_bytes) {
            return Ok(ReadSlice {
                position: c.position,
                len: c.len,
                first_offset: c.first_offset,
                next_offset: c.next_offset,
                high_watermark: end,
                segment: seg,
                cached: Some(c.block),
            });
        }
        let Some(position) = seg.find_batch(from, bmax) else {
            return Err(Error::Corrupt(format!(
                "offset {from} is in range but segment {} has no batch for it",
                seg.path.display()
            )));
        };
        let mut pos = position;
        let mut first = None;
        let mut next = from;
        while let Some(h) = seg.header_at(pos, bmax) {
            let blen = u64::from(h.batch_len);
            if first.is_some() && pos + blen - position > max_bytes {
                break;
            }
            first.get_or_insert(h.base_offset);
            next = h.next_offset();
            pos += blen;
        }
        Ok(ReadSlice {
            first_offset: first.unwrap_or(from),
            next_offset: next,
            high_watermark: end,
            position,
            len: pos - position,
            segment: seg,
            cached: None,
        })
    }

    /// Offset of the first batch whose timestamp is at or after `ts_ms`;
    /// `None` if every batch is older.
    pub fn offset_for_timestamp(&self, ts_ms: i64) -> Option<u64> {
        let st = self.inner.st.borrow();
        let bmax = self.inner.config.batch_bytes_max;
        st.closed
            .iter()
            .chain(std::iter::once(&st.active))
            .filter(|s| s.max_timestamp().is_some_and(|m| m >= ts_ms))
            .find_map(|s| s.find_timestamp(ts_ms, bmax))
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
        if let Err(e) = &r {
            st.poisoned.get_or_insert_with(|| e.to_string());
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
            st.durable_next == st.next_offset && st.written_next == st.next_offset
        })
        .await?;
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
        let (oi, ti, oi_path, ti_path) = index_files(&old, &inner.dir);
        let oname = oi_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tname = ti_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        checkpoint::write_durably(&inner.dir, &oname, oi).await?;
        checkpoint::write_durably(&inner.dir, &tname, ti).await?;
        old.install_index(IndexBytes::map(&oi_path)?, IndexBytes::map(&ti_path)?);

        let path = segment::log_path(&inner.dir, next_offset);
        let new_dma = Rc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .dma_open(&path)
                .await?,
        );
        let capacity = align_up(inner.config.segment_bytes + inner.config.batch_bytes_max as u64);
        preallocate(&new_dma, capacity).await;
        let d = glommio::io::Directory::open(&inner.dir).await?;
        d.sync().await?;
        d.close().await?;
        let seg = Rc::new(Segment::open(path, next_offset, capacity)?);
        seg.set_visible(0, next_offset);
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
        };
        checkpoint::write_durably(&inner.dir, checkpoint::FILE_NAME, ck.encode()).await?;
        let mut st = inner.st.borrow_mut();
        let st = &mut *st;
        st.closed.push(std::mem::replace(&mut st.active, seg));
        st.dma = new_dma;
        st.active_bytes = 0;
        st.active_created = Instant::now();
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

    /// Deletes whole closed segments past the retention limits; the log
    /// start moves to the first remaining segment. Returns how many.
    pub async fn enforce_retention(&self, now_ms: i64) -> Result<usize> {
        let cfg = &self.inner.config;
        let mut deleted = Vec::new();
        {
            let mut st = self.inner.st.borrow_mut();
            let mut total: u64 = st.closed.iter().map(|s| s.len()).sum::<u64>() + st.active_bytes;
            while let Some(first) = st.closed.first() {
                let too_old = match (cfg.retention_age, first.max_timestamp()) {
                    (Some(age), Some(ts)) => ts < now_ms.saturating_sub(age.as_millis() as i64),
                    _ => false,
                };
                let too_big = cfg.retention_bytes.is_some_and(|max| total > max);
                if !too_old && !too_big {
                    break;
                }
                total -= first.len();
                deleted.push(st.closed.remove(0));
            }
        }
        for seg in &deleted {
            for p in [
                seg.path.clone(),
                segment::offset_index_path(&self.inner.dir, seg.base_offset),
                segment::time_index_path(&self.inner.dir, seg.base_offset),
            ] {
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e.into()),
                }
            }
            tracing::info!(segment = %seg.path.display(), "retention deleted segment");
        }
        if !deleted.is_empty() {
            let d = glommio::io::Directory::open(&self.inner.dir).await?;
            d.sync().await?;
            d.close().await?;
        }
        Ok(deleted.len())
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
                if let Some(why) = &st.poisoned {
                    return Err(Error::Poisoned(why.clone()));
                }
                if st.writer_done {
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
            let idx = st.active.index();
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
        checkpoint::write_durably(&inner.dir, checkpoint::FILE_NAME, ck.encode()).await?;
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

fn take_round(st: &mut State) -> Option<Round> {
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

async fn writer_loop(inner: Rc<Inner>) {
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
            glommio::spawn_local(round_task(inner.clone(), round, seq)).detach();
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
    checkpoint::write_durably(&inner.dir, checkpoint::FILE_NAME, ck.encode()).await?;
    inner.st.borrow_mut().ckpt_pos = end;
    Ok(())
}

async fn interval_sync_loop(inner: Weak<Inner>, every: std::time::Duration) {
    loop {
        glommio::timer::sleep(every).await;
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
