//! One segment's read side: the file, its mapping and its indexes.
//!
//! Owned by the shard's core; shared by `Rc` with readers, so a segment
//! deleted by retention stays readable for whoever still holds a slice.

use crate::index::{IndexBytes, SegmentIndex};
use memmap2::{Mmap, MmapOptions};
use shoal_wire::batch::{check_header, BatchHeader};
use std::cell::{Cell, Ref, RefCell};
use std::fs::File;
use std::path::{Path, PathBuf};

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

pub struct Segment {
    pub base_offset: u64,
    pub path: PathBuf,
    file: File,
    map: Option<Mmap>,
    /// Bytes readers may see: whole batches, all written to the file.
    len: Cell<u64>,
    /// Offset after the last readable batch.
    next_offset: Cell<u64>,
    pub(crate) index: RefCell<SegmentIndex>,
}

impl Segment {
    /// Opens the read side of the segment file at `path`, mapping
    /// `capacity` bytes (at least the file's length).
    pub fn open(path: PathBuf, base_offset: u64, capacity: u64) -> std::io::Result<Segment> {
        let file = File::open(&path)?;
        let file_len = file.metadata()?.len();
        let cap = capacity.max(file_len);
        let map = if cap == 0 {
            None
        } else {
            // SAFETY: the mapping may extend past the end of the file; only
            // `[0, len)` is ever read, and `len` only covers bytes whose
            // direct-I/O write has completed. The only writer is this
            // shard's appender, which never rewrites bytes below `len`
            // (it rewrites the tail block with identical leading bytes).
            Some(unsafe { MmapOptions::new().len(cap as usize).map(&file)? })
        };
        Ok(Segment {
            base_offset,
            path,
            file,
            map,
            len: Cell::new(0),
            next_offset: Cell::new(base_offset),
            index: RefCell::new(SegmentIndex::default()),
        })
    }

    /// A regular (page-cache) descriptor for sendfile/splice.
    pub fn file(&self) -> &File {
        &self.file
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

    pub fn index(&self) -> Ref<'_, SegmentIndex> {
        self.index.borrow()
    }

    /// The readable bytes `[pos, pos + len)`.
    pub fn bytes(&self, pos: u64, len: u64) -> &[u8] {
        assert!(pos + len <= self.len.get(), "read past the visible end");
        match &self.map {
            Some(m) => &m[pos as usize..(pos + len) as usize],
            None => &[],
        }
    }

    pub(crate) fn header_at(&self, pos: u64, batch_bytes_max: usize) -> Option<BatchHeader> {
        let end = self.len.get();
        if pos >= end {
            return None;
        }
        check_header(self.bytes(pos, end - pos), batch_bytes_max).ok()
    }

    /// Position of the batch that holds `offset`, if this segment has it.
    pub fn find_batch(&self, offset: u64, batch_bytes_max: usize) -> Option<u64> {
        if offset < self.base_offset || offset >= self.next_offset.get() {
            return None;
        }
        let rel = u32::try_from(offset - self.base_offset).ok()?;
        let (_, mut pos) = {
            let (r, p) = self.index.borrow().floor_offset(rel);
            (r, u64::from(p))
        };
        while let Some(h) = self.header_at(pos, batch_bytes_max) {
            if h.next_offset() > offset {
                return Some(pos);
            }
            pos += u64::from(h.batch_len);
        }
        None
    }

    /// First batch whose max timestamp reaches `ts`: its base offset.
    pub fn find_timestamp(&self, ts: i64, batch_bytes_max: usize) -> Option<u64> {
        let rel = self.index.borrow().time_scan_start(ts)?;
        let (_, p) = self.index.borrow().floor_offset(rel);
        let mut pos = u64::from(p);
        while let Some(h) = self.header_at(pos, batch_bytes_max) {
            if h.max_timestamp_ms >= ts {
                return Some(h.base_offset);
            }
            pos += u64::from(h.batch_len);
        }
        None
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

    /// Largest timestamp of a readable batch, from the time index.
    pub fn max_timestamp(&self) -> Option<i64> {
        self.index.borrow().max_timestamp()
    }

    pub(crate) fn install_index(&self, offsets: IndexBytes, times: IndexBytes) {
        *self.index.borrow_mut() = SegmentIndex::from_parts(offsets, times);
    }
}
