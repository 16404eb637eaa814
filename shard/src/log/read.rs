//! The read side: [`ReadSlice`]s of whole batches (a file range for
//! sendfile, or bytes through the mapping), lookups by offset and by
//! timestamp, and the wake-up for readers waiting at the end of the log.
//! [`PartitionLog::read_ready`] is the read for the network path: it never
//! lets the shard's thread wait for the disk, and drives the read-ahead.

use super::PartitionLog;
use crate::error::{Error, Result};
use crate::limits::{DIRECT_IO_ALIGN, INDEX_INTERVAL_BYTES};
use crate::readahead::Advice;
use crate::rt;
use crate::segment::{Segment, SegmentFiles};
use crate::tail::TailBlock;
use std::rc::Rc;
use std::time::Duration;

/// Longest pause between residency checks while a slice is read into the
/// page cache: short, since a fresh block arrives in ~70-140 us and every
/// microsecond of pause is latency for the consumer.
const RESIDENT_POLL_MAX: std::time::Duration = std::time::Duration::from_micros(50);

/// Where a slice's bytes are: the segment's files (held open for as long
/// as the slice lives) or the tail cache's memory file.
#[derive(Clone)]
enum Source {
    Segment(Rc<SegmentFiles>),
    Cached(Rc<TailBlock>),
}

/// Whole batches of one segment, ready for sendfile (`file()`, `position`,
/// `len`) or for in-process reading (`bytes()`). The slice keeps the file
/// it reads open: a segment closed for the descriptor budget or deleted by
/// retention meanwhile stays readable through it.
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
    source: Source,
}

impl ReadSlice {
    pub fn bytes(&self) -> &[u8] {
        match &self.source {
            Source::Cached(b) => b.bytes(self.position, self.len),
            Source::Segment(f) => f.bytes(self.position, self.len),
        }
    }
    /// The file to sendfile from, at [`ReadSlice::file_position`]: the
    /// segment file, or the tail cache's memory file holding the same bytes.
    pub fn file(&self) -> &std::fs::File {
        match &self.source {
            Source::Cached(b) => b.file(),
            Source::Segment(f) => f.file(),
        }
    }
    /// A duplicate of [`ReadSlice::file`]'s descriptor for another core to
    /// send from (a tail cache block is then never reused).
    pub fn share_file(&self) -> std::io::Result<std::fs::File> {
        match &self.source {
            Source::Cached(b) => b.share_file(),
            Source::Segment(f) => f.file().try_clone(),
        }
    }
    /// Where the slice starts in [`ReadSlice::file`].
    pub fn file_position(&self) -> u64 {
        match &self.source {
            Source::Cached(b) => b.offset_of(self.position),
            Source::Segment(_) => self.position,
        }
    }
    /// Whether the slice is served from memory (the tail cache).
    pub fn is_cached(&self) -> bool {
        matches!(self.source, Source::Cached(_))
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Brings the slice into the page cache without blocking the shard:
    /// starts the reads, then yields until the pages are resident (or
    /// `limit` passes). A sendfile afterwards copies from memory instead of
    /// stalling every task of the core on the disk.
    pub async fn make_resident(&self, limit: std::time::Duration) {
        let Source::Segment(files) = &self.source else {
            return;
        };
        if files.resident(self.position, self.len) {
            return;
        }
        files.prefetch(self.position, self.len);
        let deadline = rt::now() + limit;
        let mut pause = std::time::Duration::from_micros(20);
        while !files.resident(self.position, self.len) && rt::now() < deadline {
            rt::sleep(pause).await;
            pause = (pause * 2).min(RESIDENT_POLL_MAX);
        }
    }
}

/// Waits, without blocking the shard, until `[start, end)` of `files` is
/// in the page cache or `wait_max` has passed. `advised_from` is where the
/// advice issued for this read begins: a hole before it (pages advised
/// long ago and reclaimed since, say) is advised again here.
async fn wait_resident(
    files: &Rc<SegmentFiles>,
    start: u64,
    end: u64,
    advised_from: u64,
    wait_max: Duration,
) {
    let mut at = files.resident_until(start, end);
    if at >= end {
        return;
    }
    if at < advised_from {
        Advice::new(files.clone(), at, advised_from.min(end)).issue();
    }
    let deadline = rt::now() + wait_max;
    let mut pause = Duration::from_micros(20);
    loop {
        rt::sleep(pause).await;
        at = files.resident_until(at, end);
        if at >= end || rt::now() >= deadline {
            return;
        }
        pause = (pause * 2).min(RESIDENT_POLL_MAX);
    }
}

impl PartitionLog {
    /// [`Self::read`] without waiting for the disk on the shard's thread.
    ///
    /// The pages the read will touch (its batch headers and the bytes a
    /// sendfile of the slice copies) are first brought into the page cache,
    /// waiting by polling (other tasks run meanwhile) for at most
    /// `wait_max`; only then are the headers walked. Each call also keeps
    /// the partition's read-ahead ([`crate::readahead`]) a window ahead of
    /// this reader, so a forward reader mostly finds its pages there
    /// already. Reads at the end of the log and from the tail cache never
    /// wait. Past `wait_max` the read goes ahead anyway (and may then wait
    /// for the disk in a page fault or in sendfile).
    pub async fn read_ready(
        &self,
        from: u64,
        max_bytes: u64,
        wait_max: Duration,
    ) -> Result<ReadSlice> {
        self.make_ready(from, max_bytes, wait_max).await;
        self.read(from, max_bytes)
    }

    /// [`Self::read_ready`] for a follower: up to the log's end, past the
    /// high watermark.
    pub async fn read_replica_ready(
        &self,
        from: u64,
        max_bytes: u64,
        wait_max: Duration,
    ) -> Result<ReadSlice> {
        self.make_ready(from, max_bytes, wait_max).await;
        self.read_replica(from, max_bytes)
    }

    /// Brings the pages a read of `from` touches into memory (bounded by
    /// `wait_max`) and keeps the read-ahead going.
    async fn make_ready(&self, from: u64, max_bytes: u64, wait_max: Duration) {
        if let Some(plan) = self.plan_read(from, max_bytes) {
            let (files, start, end, advised_from) = plan;
            wait_resident(&files, start, end, advised_from, wait_max).await;
        }
    }

    /// The segment bytes a read of `from` would touch, if it reads a
    /// segment file: the files, the range, and where the advice issued for
    /// it (read-ahead included) begins. `None` where [`Self::read`] answers
    /// without the disk (the end of the log, the tail cache) or fails.
    fn plan_read(&self, from: u64, max_bytes: u64) -> Option<(Rc<SegmentFiles>, u64, u64, u64)> {
        let st = self.inner.st.borrow();
        if from >= st.written_next {
            return None;
        }
        let seg = std::iter::once(&st.active)
            .chain(st.closed.iter().rev())
            .find(|s| s.base_offset <= from)?
            .clone();
        if st.tail.read(seg.base_offset, seg.len(), from, 1).is_some() {
            // Served from memory: a reader just behind the end keeps the
            // cache filling as much as one waiting at the end.
            drop(st);
            self.inner.st.borrow_mut().tail_interest = Some(rt::now());
            return None;
        }
        let files = seg.files().ok()?;
        let rel = u32::try_from(from - seg.base_offset).ok()?;
        let (_, floor) = files.index().floor_offset(rel);
        let start = u64::from(floor);
        // A reader within the cache's reach of the end (fallen a little
        // behind, catching up) starts the cache filling, so it is served
        // from memory once it reaches the bytes written from now on.
        let near_end = Rc::ptr_eq(&seg, &st.active)
            && st.active_bytes.saturating_sub(start) <= self.inner.config.tail_cache_bytes as u64;
        // The batch holding `from` starts at most an index interval and a
        // batch past the floor entry; the slice then covers up to
        // `max_bytes` (at least one batch) and the next batch's header.
        let bmax = self.inner.config.batch_bytes_max as u64;
        let reach = INDEX_INTERVAL_BYTES + bmax + max_bytes.max(bmax) + DIRECT_IO_ALIGN;
        let end = (start + reach).min(seg.len());
        let mut ra = self.inner.read_ahead.borrow_mut();
        // A window reaching past a closed segment's end goes on into the
        // next one, so a reader crossing segments finds its pages there.
        let next = if end + ra.window_bytes() >= seg.len() {
            let i = st.closed.iter().position(|s| Rc::ptr_eq(s, &seg));
            i.map(|i| st.closed.get(i + 1).unwrap_or(&st.active).clone())
        } else {
            None
        };
        drop(st);
        if near_end {
            self.inner.st.borrow_mut().tail_interest = Some(rt::now());
        }
        let advice = ra.on_read(&seg, &files, start, end);
        let advised_from = match advice {
            Some(a) => {
                let from = a.start();
                a.issue();
                from
            }
            None => end,
        };
        if let Some(next) = next {
            if let Ok(next_files) = next.files() {
                if let Some(a) = ra.on_read(&next, &next_files, 0, 0) {
                    a.issue();
                }
            }
        }
        Some((files, start, end, advised_from))
    }

    /// Bytes the partition's read-ahead holds advised ahead of its
    /// readers (they count in the shard's [`crate::ReadAheadBudget`]).
    pub fn read_ahead_bytes(&self) -> u64 {
        self.inner.read_ahead.borrow().ahead_bytes()
    }

    /// Waits until an offset at or past `offset` is readable (or the log
    /// closes). Long-polling is the broker's job; this is its wake-up.
    pub async fn wait_for_data(&self, offset: u64) {
        self.inner.st.borrow_mut().tail_interest = Some(rt::now());
        loop {
            let changed = self.inner.progress.changed();
            {
                let st = self.inner.st.borrow();
                if st.closing || st.writer_done || st.write_failure.is_some() {
                    return;
                }
            }
            if self.high_watermark() > offset {
                return;
            }
            changed.await;
        }
    }

    /// [`Self::wait_for_data`] for a follower: data past the high
    /// watermark counts.
    pub async fn wait_for_replica_data(&self, offset: u64) {
        self.inner.st.borrow_mut().tail_interest = Some(rt::now());
        let _ = self
            .wait_until(|st| st.written_next > offset || st.closing)
            .await;
    }

    /// Reads whole batches from the one holding `from`, up to `max_bytes`
    /// (at least one batch, so a consumer always progresses) and never
    /// past the high watermark. Never waits: at the high watermark the
    /// slice is empty.
    pub fn read(&self, from: u64, max_bytes: u64) -> Result<ReadSlice> {
        self.read_upto(from, max_bytes, self.high_watermark())
    }

    /// [`Self::read`] for a follower: up to the log's end.
    pub fn read_replica(&self, from: u64, max_bytes: u64) -> Result<ReadSlice> {
        self.read_upto(from, max_bytes, u64::MAX)
    }

    fn read_upto(&self, from: u64, max_bytes: u64, limit: u64) -> Result<ReadSlice> {
        let st = self.inner.st.borrow();
        let start = st
            .closed
            .first()
            .map_or(st.active.base_offset, |s| s.base_offset);
        let written = st.written_next;
        if from < start || from > written {
            return Err(Error::OffsetOutOfRange {
                offset: from,
                start,
                end: written,
            });
        }
        let end = limit.min(written);
        let seg = std::iter::once(&st.active)
            .chain(st.closed.iter().rev())
            .find(|s| s.base_offset <= from)
            .cloned()
            .unwrap_or_else(|| st.active.clone());
        let bmax = self.inner.config.batch_bytes_max;
        if from >= end {
            let active = st.active.clone();
            return Ok(ReadSlice {
                position: active.len(),
                len: 0,
                first_offset: from,
                next_offset: from,
                high_watermark: end,
                source: Source::Segment(active.open_files()),
                segment: active,
            });
        }
        if let Some(c) = st
            .tail
            .read(seg.base_offset, seg.len(), from, max_bytes)
            .filter(|c| c.next_offset <= end)
        {
            return Ok(ReadSlice {
                position: c.position,
                len: c.len,
                first_offset: c.first_offset,
                next_offset: c.next_offset,
                high_watermark: end,
                segment: seg,
                source: Source::Cached(c.block),
            });
        }
        let files = seg.files()?;
        let Some(position) = seg.find_batch(&files, from, bmax) else {
            return Err(Error::Corrupt(format!(
                "offset {from} is in range but segment {} has no batch for it",
                seg.path.display()
            )));
        };
        let mut pos = position;
        let mut first = None;
        let mut next = from;
        while let Some(h) = seg.header_at(&files, pos, bmax) {
            let blen = u64::from(h.batch_len);
            if h.next_offset() > end || (first.is_some() && pos + blen - position > max_bytes) {
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
            source: Source::Segment(files),
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
            .find_map(|s| match s.files() {
                Ok(files) => s.find_timestamp(&files, ts_ms, bmax),
                Err(e) => {
                    tracing::warn!(segment = %s.path.display(), error = %e, "cannot open segment for a timestamp lookup");
                    None
                }
            })
    }
}
