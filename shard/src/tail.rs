//! The tail cache: the newest bytes of a partition, in memory files, so that
//! consumers at the end of the log never wait for the disk.
//!
//! Appends are written with direct I/O, which bypasses the page cache. A
//! consumer that follows the tail would otherwise have every batch read
//! back from the disk a few microseconds after it was written, and those
//! reads queue with the writes (measured: one disk read per delivered
//! message, and ack latency 2-4× that of a produce without consumers).
//!
//! While a partition has readers waiting at its end (long-poll fetches, push
//! subscriptions), every accepted batch is also copied into a *block*: an
//! anonymous memory file (`memfd_create`) mapped into the process. A read
//! that falls inside a block is served from it with `sendfile`, like any
//! other log read: the bytes go from kernel pages to the socket, never
//! through a user-space buffer on the read path (S6). The block holds exactly
//! the bytes of the log file at the same positions (base offset already
//! assigned), and a read only ever covers batches whose write to the log
//! file has completed, so a consumer sees nothing a process crash could take
//! back.
//!
//! Blocks are append-only and hold whole batches. The cache keeps at most
//! `tail_cache_bytes` per partition by dropping its oldest blocks; a reader
//! holding a slice keeps its block (an `Rc`) alive until the send is done,
//! so a dropped block is never overwritten under an in-flight sendfile.
//! Without tail readers for [`TAIL_INTEREST`] the cache empties and appends
//! cost nothing extra.

use memmap2::{MmapOptions, MmapRaw};
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How long after the last reader waited at the end of the log the cache
/// keeps filling.
pub const TAIL_INTEREST: Duration = Duration::from_secs(10);

/// One batch inside a block.
#[derive(Debug, Clone, Copy)]
struct Entry {
    base_offset: u64,
    next_offset: u64,
    /// Position in the block.
    at: usize,
    len: usize,
}

/// An append-only memory file holding whole batches of one segment.
pub struct TailBlock {
    file: File,
    map: MmapRaw,
    /// Segment position of the block's byte 0.
    seg_pos: u64,
    /// Bytes copied in so far.
    len: Cell<usize>,
    entries: RefCell<Vec<Entry>>,
}

impl TailBlock {
    fn create(seg_pos: u64, cap: usize) -> std::io::Result<TailBlock> {
        let cap = cap.div_ceil(4096) * 4096;
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it
        // returns a new descriptor or -1.
        let fd = unsafe { libc::memfd_create(c"shoal-tail".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor that nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(cap as u64)?;
        let map = MmapOptions::new().len(cap).map_raw(&file)?;
        Ok(TailBlock {
            file,
            map,
            seg_pos,
            len: Cell::new(0),
            entries: RefCell::new(Vec::new()),
        })
    }

    fn cap(&self) -> usize {
        self.map.len()
    }

    fn end_pos(&self) -> u64 {
        self.seg_pos + self.len.get() as u64
    }

    fn copy_in(&self, bytes: &[u8]) {
        let len = self.len.get();
        assert!(len + bytes.len() <= self.cap(), "tail block overflow");
        // SAFETY: the destination `[len, len + bytes.len())` lies inside the
        // mapping (checked above). Bytes at or past `len` were never handed
        // to a reader (readers only get ranges of recorded entries, which
        // are below `len`), and a block is only touched from its shard's
        // thread, so nothing reads this range while it is written.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(len),
                bytes.len(),
            );
        }
        self.len.set(len + bytes.len());
    }

    /// The memory file, for sendfile.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Position in [`TailBlock::file`] of segment position `seg_pos`.
    pub fn offset_of(&self, seg_pos: u64) -> u64 {
        seg_pos - self.seg_pos
    }

    /// The block's copy of segment bytes `[seg_pos, seg_pos + len)`, which
    /// must be recorded batches.
    pub fn bytes(&self, seg_pos: u64, len: u64) -> &[u8] {
        let at = (seg_pos - self.seg_pos) as usize;
        let len = len as usize;
        assert!(at + len <= self.len.get(), "read past the tail block");
        // SAFETY: `[at, at + len)` lies below `self.len`: bytes copied in
        // before and never written again (blocks are append-only), inside
        // a mapping that lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(at), len) }
    }
}

/// A read served from the cache: `len` bytes at segment position `position`.
pub struct CachedRead {
    pub block: Rc<TailBlock>,
    pub position: u64,
    pub len: u64,
    pub first_offset: u64,
    pub next_offset: u64,
}

/// The blocks of one partition's active segment.
pub struct TailCache {
    cap: usize,
    block_bytes: usize,
    seg_base: u64,
    blocks: VecDeque<Rc<TailBlock>>,
    bytes: usize,
    /// After a failure to make a block, the cache rests until then (one
    /// warning, not one per append).
    resting_until: Option<Instant>,
}

impl TailCache {
    /// A cache keeping about `cap` bytes (0: disabled).
    pub fn new(cap: usize) -> TailCache {
        TailCache {
            cap,
            block_bytes: (cap / 4).clamp(64 * 1024, 4 * 1024 * 1024),
            seg_base: 0,
            blocks: VecDeque::new(),
            bytes: 0,
            resting_until: None,
        }
    }

    pub fn enabled(&self) -> bool {
        self.cap > 0
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Bytes of memory the blocks take.
    pub fn memory_bytes(&self) -> usize {
        self.bytes
    }

    pub fn clear(&mut self) {
        self.blocks.clear();
        self.bytes = 0;
    }

    /// Copies a batch accepted at `seg_pos` of the segment based at
    /// `seg_base` (`head` is its header with the base offset set, `body` the
    /// rest). On error the cache is emptied and rests for [`TAIL_INTEREST`],
    /// and the caller goes on: the cache is an optimisation, the log file
    /// stays the truth.
    pub fn append(
        &mut self,
        seg_base: u64,
        seg_pos: u64,
        offsets: (u64, u64),
        head: &[u8],
        body: &[u8],
    ) -> std::io::Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        if let Some(t) = self.resting_until {
            if crate::rt::now() < t {
                return Ok(());
            }
            self.resting_until = None;
        }
        if seg_base != self.seg_base {
            self.clear();
            self.seg_base = seg_base;
        }
        let blen = head.len() + body.len();
        let fits = self
            .blocks
            .back()
            .is_some_and(|b| b.end_pos() == seg_pos && b.len.get() + blen <= b.cap());
        if !fits {
            let cap = self.block_bytes.max(blen);
            if self.blocks.back().is_some_and(|b| b.end_pos() != seg_pos) {
                // A gap (the cache was off for a while): older blocks no
                // longer join up with the new one.
                self.clear();
            }
            let block = match TailBlock::create(seg_pos, cap) {
                Ok(b) => b,
                Err(e) => {
                    self.clear();
                    self.resting_until = Some(crate::rt::now() + TAIL_INTEREST);
                    return Err(e);
                }
            };
            self.bytes += block.cap();
            self.blocks.push_back(Rc::new(block));
        }
        let Some(block) = self.blocks.back() else {
            unreachable!("a block was just made if there was none");
        };
        let at = block.len.get();
        block.copy_in(head);
        block.copy_in(body);
        block.entries.borrow_mut().push(Entry {
            base_offset: offsets.0,
            next_offset: offsets.1,
            at,
            len: blen,
        });
        while self.bytes > self.cap && self.blocks.len() > 1 {
            if let Some(old) = self.blocks.pop_front() {
                self.bytes -= old.cap();
            }
        }
        Ok(())
    }

    /// Whole batches from the one holding `from`, up to `max_bytes` (at
    /// least one), within one block and below `visible` (the segment's
    /// readable length). `None` if the cache does not hold `from`.
    pub fn read(
        &self,
        seg_base: u64,
        visible: u64,
        from: u64,
        max_bytes: u64,
    ) -> Option<CachedRead> {
        if seg_base != self.seg_base {
            return None;
        }
        let block = self.blocks.iter().rev().find(|b| {
            let entries = b.entries.borrow();
            matches!((entries.first(), entries.last()),
                (Some(f), Some(l)) if f.base_offset <= from && from < l.next_offset)
        })?;
        let entries = block.entries.borrow();
        let i = entries.partition_point(|e| e.next_offset <= from);
        let first = entries.get(i)?;
        let start = block.seg_pos + first.at as u64;
        let mut end = start;
        let mut next = first.base_offset;
        for e in &entries[i..] {
            let e_end = block.seg_pos + (e.at + e.len) as u64;
            if e_end > visible || (end > start && e_end - start > max_bytes) {
                break;
            }
            end = e_end;
            next = e.next_offset;
        }
        if end == start {
            return None;
        }
        Some(CachedRead {
            block: block.clone(),
            position: start,
            len: end - start,
            first_offset: first.base_offset,
            next_offset: next,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::fs::FileExt;

    fn batch(i: u8, n: usize) -> (Vec<u8>, Vec<u8>) {
        (vec![i; 8], vec![i.wrapping_add(1); n])
    }

    #[test]
    fn serves_visible_whole_batches_from_the_memory_file() {
        let mut c = TailCache::new(1 << 20);
        let mut pos = 0u64;
        for i in 0..10u8 {
            let (h, b) = batch(i, 100);
            c.append(0, pos, (u64::from(i) * 2, u64::from(i) * 2 + 2), &h, &b)
                .unwrap();
            pos += 108;
        }
        // Offset 5 is in the third batch (offsets 4, 5); only 5 batches are
        // visible.
        let r = c.read(0, 5 * 108, 5, 1 << 20).unwrap();
        assert_eq!((r.position, r.len), (2 * 108, 3 * 108));
        assert_eq!((r.first_offset, r.next_offset), (4, 10));
        let mut via_file = vec![0u8; r.len as usize];
        r.block
            .file()
            .read_exact_at(&mut via_file, r.block.offset_of(r.position))
            .unwrap();
        assert_eq!(via_file, r.block.bytes(r.position, r.len));
        assert_eq!(&via_file[..8], &[2u8; 8]);
        // max_bytes limits the slice, but never below one batch.
        assert_eq!(c.read(0, pos, 0, 1).unwrap().len, 108);
        assert_eq!(c.read(0, pos, 0, 250).unwrap().len, 216);
        // Nothing visible at `from`, another segment, or past the end.
        assert!(c.read(0, 0, 0, 1 << 20).is_none());
        assert!(c.read(7, pos, 0, 1 << 20).is_none());
        assert!(c.read(0, pos, 20, 1 << 20).is_none());
    }

    #[test]
    fn stays_within_its_bound_and_keeps_blocks_readers_hold() {
        let mut c = TailCache::new(256 * 1024);
        assert_eq!(c.block_bytes, 64 * 1024);
        let mut pos = 0u64;
        let held = {
            let (h, b) = batch(1, 1000);
            c.append(0, 0, (0, 1), &h, &b).unwrap();
            pos += 1008;
            c.read(0, pos, 0, 1 << 20).unwrap()
        };
        for i in 1..2000u64 {
            let (h, b) = batch(i as u8, 1000);
            c.append(0, pos, (i, i + 1), &h, &b).unwrap();
            pos += 1008;
        }
        assert!(c.memory_bytes() <= 256 * 1024 + 64 * 1024);
        // Old offsets fell out; new ones are there.
        assert!(c.read(0, pos, 0, 1 << 20).is_none());
        assert!(c.read(0, pos, 1999, 1 << 20).is_some());
        // The dropped block a reader holds is intact.
        let mut via_file = vec![0u8; 1008];
        let mut f = held.block.file().try_clone().unwrap();
        f.read_exact(&mut via_file).unwrap();
        assert_eq!(&via_file[..8], &[1u8; 8]);
        assert_eq!(&via_file[8..], &[2u8; 1000][..]);
    }

    #[test]
    fn a_gap_or_a_new_segment_starts_over() {
        let mut c = TailCache::new(1 << 20);
        let (h, b) = batch(1, 100);
        c.append(0, 0, (0, 1), &h, &b).unwrap();
        c.append(0, 500, (9, 10), &h, &b).unwrap();
        assert!(c.read(0, 10_000, 0, 1 << 20).is_none());
        assert!(c.read(0, 10_000, 9, 1 << 20).is_some());
        c.append(10, 0, (10, 11), &h, &b).unwrap();
        assert!(c.read(0, 10_000, 9, 1 << 20).is_none());
        assert_eq!(c.read(10, 108, 10, 1 << 20).unwrap().next_offset, 11);
        // A batch bigger than a block gets a block of its own.
        let big = vec![3u8; 300 * 1024];
        c.append(10, 108, (11, 12), &h, &big).unwrap();
        assert_eq!(
            c.read(10, 108 + 8 + 300 * 1024, 11, 1).unwrap().len,
            8 + 300 * 1024
        );
        // Disabled: nothing kept.
        let mut off = TailCache::new(0);
        off.append(0, 0, (0, 1), &h, &b).unwrap();
        assert!(off.is_empty() && off.read(0, 108, 0, 1 << 20).is_none());
    }
}
