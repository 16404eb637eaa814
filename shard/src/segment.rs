//! One segment's read side: the file, its mapping and its indexes, opened
//! on demand for closed segments within a per-shard [`FdBudget`].
//!
//! Owned by the shard's core; shared by `Rc` with readers, so a segment
//! deleted by retention stays readable for whoever still holds a slice.
//!
//! # Open files
//! A segment's open side ([`SegmentFiles`]: a descriptor, the log mapping
//! and the two index mappings) is what runs out when a shard holds many
//! segments (issue 9 #7: tiny segments hit the descriptor limit, rolls
//! failed with EMFILE). The active segment always keeps its files. A closed
//! segment opens them when a read needs them and joins its shard's
//! [`FdBudget`], a least-recently-used list; when the list is over budget
//! the coldest segment closes its files. A reader's slice holds an `Rc` to
//! the files it reads, so a descriptor under an in-flight sendfile is never
//! closed: the budget bounds the segments holding files, and descriptors
//! exceed it only by the slices in flight.
//!
//! Reopening is a few short system calls (open, fstat, three mmaps) on the
//! calling core: closed segments are read cold, and the budget keeps the
//! hot ones open.

use crate::index::{IndexBytes, SegmentIndex};
use crate::limits::{SEGMENT_BYTES_LIMIT, SEGMENT_FDS_DEFAULT};
use memmap2::{Mmap, MmapOptions};
use shoal_wire::batch::{check_header, BatchHeader};
use std::cell::{Cell, Ref, RefCell};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::rc::{Rc, Weak};

/// Bytes of mapping one `mincore` call of [`SegmentFiles::resident_until`]
/// looks at (its page vector lives on the stack).
const MINCORE_PIECE_BYTES: u64 = 4 * 1024 * 1024;

pub fn log_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}
pub fn offset_index_name(base: u64) -> String {
    format!("{base:020}.index")
}
pub fn time_index_name(base: u64) -> String {
    format!("{base:020}.timeindex")
}
pub fn offset_index_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(offset_index_name(base))
}
pub fn time_index_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(time_index_name(base))
}
/// Every file of the segment at `base`: its log and its two indexes.
pub fn segment_paths(dir: &Path, base: u64) -> [PathBuf; 3] {
    [
        log_path(dir, base),
        offset_index_path(dir, base),
        time_index_path(dir, base),
    ]
}

/// How many closed segments of one shard may hold their files open (one
/// descriptor and three mappings each), least recently read closed first.
///
/// One per shard, shared by `Rc` by every partition the shard owns; it
/// never crosses cores. [`FdBudget::shard_default`] is the one
/// [`crate::PartitionLog::open`] uses; the broker sets its size from its
/// configuration, or passes its own to
/// [`crate::PartitionLog::open_with_budget`].
pub struct FdBudget {
    segments_max: Cell<usize>,
    tick: Cell<u64>,
    /// Open closed segments by the tick of their last use.
    lru: RefCell<BTreeMap<u64, Weak<Segment>>>,
}

thread_local! {
    static SHARD_BUDGET: Rc<FdBudget> = FdBudget::new(SEGMENT_FDS_DEFAULT);
}

impl FdBudget {
    /// A budget of `segments_max` open closed segments (at least one).
    pub fn new(segments_max: usize) -> Rc<FdBudget> {
        Rc::new(FdBudget {
            segments_max: Cell::new(segments_max.max(1)),
            tick: Cell::new(0),
            lru: RefCell::new(BTreeMap::new()),
        })
    }

    /// The budget of the calling shard (a thread-local: one per core),
    /// [`SEGMENT_FDS_DEFAULT`] until [`FdBudget::set_segments_max`].
    pub fn shard_default() -> Rc<FdBudget> {
        SHARD_BUDGET.with(Rc::clone)
    }

    /// Changes the bound; closes the coldest segments' files at once if
    /// more are open.
    pub fn set_segments_max(&self, segments_max: usize) {
        self.segments_max.set(segments_max.max(1));
        self.evict();
    }

    pub fn segments_max(&self) -> usize {
        self.segments_max.get()
    }

    /// Closed segments holding their files open now.
    pub fn open_segments(&self) -> usize {
        self.lru.borrow().len()
    }

    /// Marks `seg` as just used (admitting it if new) and closes the
    /// coldest segments' files while over budget.
    fn touch(&self, seg: &Rc<Segment>) {
        let t = self.tick.get() + 1;
        self.tick.set(t);
        {
            let mut lru = self.lru.borrow_mut();
            if let Some(old) = seg.lru_tick.replace(Some(t)) {
                lru.remove(&old);
            }
            lru.insert(t, Rc::downgrade(seg));
        }
        self.evict();
    }

    fn evict(&self) {
        loop {
            let victim = {
                let mut lru = self.lru.borrow_mut();
                if lru.len() <= self.segments_max.get() {
                    return;
                }
                lru.pop_first()
            };
            // Outside the borrow: dropping the victim's last `Rc` runs its
            // `Drop`, which takes the list again.
            if let Some(seg) = victim.and_then(|(_, w)| w.upgrade()) {
                seg.lru_tick.set(None);
                seg.close_files();
            }
        }
    }

    fn forget(&self, seg: &Segment) {
        if let Some(t) = seg.lru_tick.take() {
            if let Ok(mut lru) = self.lru.try_borrow_mut() {
                lru.remove(&t);
            }
        }
    }
}

/// The open side of a segment: a regular (page-cache) descriptor for
/// sendfile, the mapping for in-process reads, and the indexes.
pub struct SegmentFiles {
    file: File,
    map: Option<Mmap>,
    pub(crate) index: RefCell<SegmentIndex>,
}

impl SegmentFiles {
    /// Opens `path` and maps `map_bytes` of it (at least its length).
    /// Blocking; `Send`, so it can run on the blocking thread.
    pub(crate) fn open(path: &Path, map_bytes: u64) -> std::io::Result<SegmentFiles> {
        let file = File::open(path)?;
        let file_len = file.metadata()?.len();
        let cap = map_bytes.max(file_len);
        let map = if cap == 0 {
            None
        } else {
            // SAFETY: the mapping may extend past the end of the file; only
            // `[0, len)` of the owning segment is ever read, and `len` only
            // covers bytes whose direct-I/O write has completed. The only
            // writer is this shard's appender, which never rewrites bytes
            // below `len` (it rewrites the tail block with identical
            // leading bytes); closed segments are never written.
            Some(unsafe { MmapOptions::new().len(cap as usize).map(&file)? })
        };
        Ok(SegmentFiles {
            file,
            map,
            index: RefCell::new(SegmentIndex::default()),
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Bytes `[pos, pos + len)` of the mapping. The caller vouches that
    /// they are readable (below the segment's visible length).
    pub fn bytes(&self, pos: u64, len: u64) -> &[u8] {
        match &self.map {
            Some(m) => &m[pos as usize..(pos + len) as usize],
            None => {
                assert_eq!(len, 0, "read from an unmapped segment");
                &[]
            }
        }
    }

    pub fn index(&self) -> Ref<'_, SegmentIndex> {
        self.index.borrow()
    }

    /// Whether every page of `[pos, pos + len)` is in the page cache, so a
    /// sendfile of it will not wait for the disk. Appends bypass the cache
    /// (direct I/O), so fresh data is not.
    pub fn resident(&self, pos: u64, len: u64) -> bool {
        let Some(map) = &self.map else { return true };
        if len == 0 {
            return true;
        }
        let page = 4096u64;
        let start = pos / page * page;
        let end = (pos + len).div_ceil(page) * page;
        let end = end.min(map.len() as u64);
        if start >= end {
            return true;
        }
        let pages = ((end - start) / page) as usize;
        let mut vec = vec![0u8; pages];
        // SAFETY: the range lies inside our mapping (clamped to its length
        // and page-aligned); `vec` has one byte per page of it.
        let r = unsafe {
            libc::mincore(
                map.as_ptr().add(start as usize) as *mut libc::c_void,
                (end - start) as usize,
                vec.as_mut_ptr(),
            )
        };
        r == 0 && vec.iter().all(|b| b & 1 == 1)
    }

    /// The first position in `[pos, end)` whose page is not in the page
    /// cache (`end` if all are), so a wait for a range can go on from where
    /// the pages stopped arriving instead of checking all of them again.
    pub fn resident_until(&self, pos: u64, end: u64) -> u64 {
        let Some(map) = &self.map else { return end };
        let page = 4096u64;
        let end_max = end.min(map.len() as u64);
        let mut at = pos / page * page;
        while at < end_max {
            // A bounded piece per call, so the scratch vector stays small.
            let piece_end = (at + MINCORE_PIECE_BYTES).min(end_max.div_ceil(page) * page);
            let piece_end = piece_end.min(map.len() as u64);
            let pages = (piece_end - at).div_ceil(page) as usize;
            let mut vec = [0u8; (MINCORE_PIECE_BYTES / 4096) as usize];
            // SAFETY: `[at, piece_end)` lies inside our mapping (clamped to
            // its length, `at` page-aligned); `vec` has a byte for each of
            // its pages (a piece is at most MINCORE_PIECE_BYTES).
            let r = unsafe {
                libc::mincore(
                    map.as_ptr().add(at as usize) as *mut libc::c_void,
                    (piece_end - at) as usize,
                    vec.as_mut_ptr(),
                )
            };
            if r != 0 {
                // Cannot tell: say resident, so no one waits for nothing.
                return end;
            }
            if let Some(i) = vec[..pages].iter().position(|b| b & 1 == 0) {
                return (at + i as u64 * page).max(pos);
            }
            at = piece_end;
        }
        end
    }

    /// Asks the kernel to read `[pos, pos + len)` into the page cache,
    /// without waiting for it.
    pub fn prefetch(&self, pos: u64, len: u64) {
        // SAFETY: advice on a descriptor we own; no memory is passed.
        unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(&self.file),
                pos as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
    }
}

pub struct Segment {
    pub base_offset: u64,
    pub path: PathBuf,
    /// Bytes readers may see: whole batches, all written to the file.
    len: Cell<u64>,
    /// Offset after the last readable batch.
    next_offset: Cell<u64>,
    /// How much of the file to map when opening it.
    map_bytes: u64,
    /// Largest timestamp of a readable batch, kept while the files are
    /// closed (retention and timestamp lookups ask every segment).
    max_timestamp: Cell<Option<i64>>,
    files: RefCell<Option<Rc<SegmentFiles>>>,
    /// The shard's budget, for a closed segment; `None` for the active
    /// one, which keeps its files.
    budget: RefCell<Option<Rc<FdBudget>>>,
    lru_tick: Cell<Option<u64>>,
}

impl Segment {
    /// Opens the segment file at `path` with its files open, mapping
    /// `capacity` bytes (at least the file's length).
    pub fn open(path: PathBuf, base_offset: u64, capacity: u64) -> std::io::Result<Segment> {
        let files = SegmentFiles::open(&path, capacity)?;
        Ok(Segment::new(path, base_offset, capacity, Some(files)))
    }

    /// A segment whose files are `files` (opened with `map_bytes`), or
    /// closed until read. Readers see nothing until [`Self::set_visible`].
    pub(crate) fn new(
        path: PathBuf,
        base_offset: u64,
        map_bytes: u64,
        files: Option<SegmentFiles>,
    ) -> Segment {
        Segment {
            base_offset,
            path,
            len: Cell::new(0),
            next_offset: Cell::new(base_offset),
            map_bytes,
            max_timestamp: Cell::new(None),
            files: RefCell::new(files.map(Rc::new)),
            budget: RefCell::new(None),
            lru_tick: Cell::new(None),
        }
    }

    /// What the time index said, for a segment created closed.
    pub(crate) fn set_max_timestamp(&self, ts: Option<i64>) {
        self.max_timestamp.set(ts);
    }

    pub fn len(&self) -> u64 {
        self.len.get()
    }

    pub fn is_empty(&self) -> bool {
        self.len.get() == 0
    }

    pub fn next_offset(&self) -> u64 {
        self.next_offset.get()
    }

    pub(crate) fn set_visible(&self, len: u64, next_offset: u64) {
        debug_assert!(len >= self.len.get());
        debug_assert!(next_offset >= self.next_offset.get());
        self.len.set(len);
        self.next_offset.set(next_offset);
    }

    /// The open files, opening them (and taking a place in the budget) if
    /// this closed segment had closed them.
    pub fn files(self: &Rc<Self>) -> std::io::Result<Rc<SegmentFiles>> {
        let open = self.files.borrow().clone();
        let files = match open {
            Some(f) => f,
            None => {
                let f = Rc::new(self.reopen()?);
                *self.files.borrow_mut() = Some(f.clone());
                f
            }
        };
        let budget = self.budget.borrow().clone();
        if let Some(b) = budget {
            b.touch(self);
        }
        Ok(files)
    }

    /// The files of a segment that keeps them (the active one, or one
    /// being opened or rolled).
    ///
    /// # Panics
    /// If the files were closed: only closed segments in a budget close
    /// them, and those are reached through [`Segment::files`].
    pub(crate) fn open_files(&self) -> Rc<SegmentFiles> {
        self.files
            .borrow()
            .clone()
            .expect("the segment keeps its files open")
    }

    fn reopen(&self) -> std::io::Result<SegmentFiles> {
        let files = SegmentFiles::open(&self.path, self.map_bytes)?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let (oi, ti) = (
            offset_index_path(dir, self.base_offset),
            time_index_path(dir, self.base_offset),
        );
        let loaded = match (IndexBytes::map(&oi), IndexBytes::map(&ti)) {
            (Ok(o), Ok(t)) => {
                let idx = SegmentIndex::from_parts(o, t);
                idx.validate(self.len()).map(|()| idx)
            }
            (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
        };
        let idx = match loaded {
            Ok(idx) => idx,
            // Gone or damaged since the partition opened, or never saved
            // (a full disk then): walk the batches again.
            Err(why) => {
                tracing::debug!(segment = %self.path.display(), %why, "index unusable on reopen; rebuilding it in memory");
                rebuild_index(
                    &files,
                    self.base_offset,
                    self.len(),
                    SEGMENT_BYTES_LIMIT as usize,
                )
            }
        };
        *files.index.borrow_mut() = idx;
        Ok(files)
    }

    /// Puts this closed segment under `budget`: from now on its files may
    /// be closed whenever it is the coldest of the shard's open segments.
    pub(crate) fn join_budget(self: &Rc<Self>, budget: &Rc<FdBudget>) {
        *self.budget.borrow_mut() = Some(budget.clone());
        if self.files.borrow().is_some() {
            budget.touch(self);
        }
    }

    /// Closes the files (a reader's slice keeps them until it is done).
    pub(crate) fn close_files(&self) {
        if let Ok(mut files) = self.files.try_borrow_mut() {
            if let Some(f) = files.take() {
                self.max_timestamp.set(f.index().max_timestamp());
            }
        }
    }

    /// Leaves the budget and closes the files: the segment is deleted.
    pub(crate) fn retire(&self) {
        if let Some(b) = self.budget.borrow_mut().take() {
            b.forget(self);
        }
        self.close_files();
    }

    /// Whether the files are open now.
    pub fn is_open(&self) -> bool {
        self.files.borrow().is_some()
    }

    pub(crate) fn header_at(
        &self,
        files: &SegmentFiles,
        pos: u64,
        batch_bytes_max: usize,
    ) -> Option<BatchHeader> {
        let end = self.len.get();
        if pos >= end {
            return None;
        }
        check_header(files.bytes(pos, end - pos), batch_bytes_max).ok()
    }

    /// The readable bytes `[pos, pos + len)` of `files`, this segment's.
    pub fn bytes<'f>(&self, files: &'f SegmentFiles, pos: u64, len: u64) -> &'f [u8] {
        assert!(pos + len <= self.len.get(), "read past the visible end");
        files.bytes(pos, len)
    }

    /// Position of the batch that holds `offset`, if this segment has it.
    pub fn find_batch(
        &self,
        files: &SegmentFiles,
        offset: u64,
        batch_bytes_max: usize,
    ) -> Option<u64> {
        if offset < self.base_offset || offset >= self.next_offset.get() {
            return None;
        }
        let rel = u32::try_from(offset - self.base_offset).ok()?;
        let (_, p) = files.index().floor_offset(rel);
        let mut pos = u64::from(p);
        while let Some(h) = self.header_at(files, pos, batch_bytes_max) {
            if h.next_offset() > offset {
                return Some(pos);
            }
            pos += u64::from(h.batch_len);
        }
        None
    }

    /// First batch whose max timestamp reaches `ts`: its base offset.
    pub fn find_timestamp(
        &self,
        files: &SegmentFiles,
        ts: i64,
        batch_bytes_max: usize,
    ) -> Option<u64> {
        let rel = files.index().time_scan_start(ts)?;
        let (_, p) = files.index().floor_offset(rel);
        let mut pos = u64::from(p);
        while let Some(h) = self.header_at(files, pos, batch_bytes_max) {
            if h.max_timestamp_ms >= ts {
                return Some(h.base_offset);
            }
            pos += u64::from(h.batch_len);
        }
        None
    }

    /// Largest timestamp of a readable batch, from the time index (or what
    /// it said when the files were closed).
    pub fn max_timestamp(&self) -> Option<i64> {
        match &*self.files.borrow() {
            Some(f) => f.index().max_timestamp(),
            None => self.max_timestamp.get(),
        }
    }

    pub(crate) fn install_index(&self, offsets: IndexBytes, times: IndexBytes) {
        *self.open_files().index.borrow_mut() = SegmentIndex::from_parts(offsets, times);
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if let Some(b) = self.budget.get_mut().take() {
            b.forget(self);
        }
    }
}

/// Rebuilds a segment's indexes by walking its batch headers up to `len`.
pub(crate) fn rebuild_index(
    files: &SegmentFiles,
    base_offset: u64,
    len: u64,
    batch_bytes_max: usize,
) -> SegmentIndex {
    let mut idx = SegmentIndex::default();
    let mut pos = 0u64;
    let mut max_ts = None;
    while pos < len {
        let Ok(h) = check_header(files.bytes(pos, len - pos), batch_bytes_max) else {
            break;
        };
        let Some(rel) = h.base_offset.checked_sub(base_offset) else {
            break;
        };
        idx.on_batch(rel as u32, pos as u32, h.max_timestamp_ms, max_ts);
        max_ts = Some(max_ts.map_or(h.max_timestamp_ms, |m: i64| m.max(h.max_timestamp_ms)));
        pos += u64::from(h.batch_len);
    }
    idx
}
