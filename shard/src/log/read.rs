//! The read side: [`ReadSlice`]s of whole batches (a file range for
//! sendfile, or bytes through the mapping), lookups by offset and by
//! timestamp, and the wake-up for readers waiting at the end of the log.

use super::PartitionLog;
use crate::error::{Error, Result};
use crate::rt;
use crate::segment::{Segment, SegmentFiles};
use crate::tail::TailBlock;
use std::rc::Rc;

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

impl PartitionLog {
    /// Waits until an offset at or past `offset` is readable (or the log
    /// closes). Long-polling is the broker's job; this is its wake-up.
    pub async fn wait_for_data(&self, offset: u64) {
        self.inner.st.borrow_mut().tail_interest = Some(rt::now());
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
        if from == end {
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
        if let Some(c) = st.tail.read(seg.base_offset, seg.len(), from, max_bytes) {
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
