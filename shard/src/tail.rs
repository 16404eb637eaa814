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
//! `tail_cache_bytes` per partition: at the bound its oldest block is
//! started over for the new bytes (no memory file made, mapped and faulted
//! in per block), unless something may still read it: a reader holding a
//! slice keeps its block (an `Rc`) until the send is done, and a block whose
//! descriptor went to another core is never reused; such a block is
//! dropped instead, so bytes are never overwritten under an in-flight
//! sendfile.
//! Without tail readers for [`TAIL_INTEREST`] the cache empties and appends
//! cost nothing extra.

use crate::limits::TAIL_CACHE_SHARD_BYTES_DEFAULT;
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

/// The memory a shard's tail caches may hold together (their blocks,
/// counted at capacity, including dropped blocks a reader still holds).
/// One per shard, shared by `Rc` by every partition the shard owns; it
/// never crosses cores. A partition that needs a block while the budget is
/// spent reuses its oldest one if it can, else stops caching until blocks
/// are given back: its readers then read from the log file, as without the
/// cache.
pub struct TailBudget {
    bytes_max: Cell<usize>,
    bytes: Cell<usize>,
}

thread_local! {
    static SHARD_TAIL_BUDGET: Rc<TailBudget> = TailBudget::new(TAIL_CACHE_SHARD_BYTES_DEFAULT);
}

impl TailBudget {
    pub fn new(bytes_max: usize) -> Rc<TailBudget> {
        Rc::new(TailBudget {
            bytes_max: Cell::new(bytes_max),
            bytes: Cell::new(0),
        })
    }

    /// The budget of the calling shard (a thread-local: one per core).
    pub fn shard_default() -> Rc<TailBudget> {
        SHARD_TAIL_BUDGET.with(Rc::clone)
    }

    /// Changes the bound; blocks already made stay until dropped.
    pub fn set_bytes_max(&self, bytes_max: usize) {
        self.bytes_max.set(bytes_max);
    }

    /// Bytes the shard's blocks take now.
    pub fn bytes(&self) -> usize {
        self.bytes.get()
    }

    fn try_take(&self, n: usize) -> bool {
        if self.bytes.get() + n > self.bytes_max.get() {
            return false;
        }
        self.bytes.set(self.bytes.get() + n);
        true
    }

    fn give_back(&self, n: usize) {
        self.bytes.set(self.bytes.get() - n);
    }
}

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
    seg_pos: Cell<u64>,
    /// Its descriptor was duplicated for another core
    /// ([`TailBlock::share_file`]): bytes may be read through that
    /// descriptor at any time, so the block is never reused.
    exported: Cell<bool>,
    /// Bytes copied in so far.
    len: Cell<usize>,
    entries: RefCell<Vec<Entry>>,
    /// The shard budget its capacity was taken from (given back on drop).
    budget: Rc<TailBudget>,
}

impl Drop for TailBlock {
    fn drop(&mut self) {
        self.budget.give_back(self.map.len());
    }
}

impl TailBlock {
    /// A block of `cap` bytes (rounded up to pages), its memory taken from
    /// `budget` (`Ok(None)` if the budget has not that much left).
    fn create(
        seg_pos: u64,
        cap: usize,
        budget: &Rc<TailBudget>,
    ) -> std::io::Result<Option<TailBlock>> {
        let cap = cap.div_ceil(4096) * 4096;
        if !budget.try_take(cap) {
            return Ok(None);
        }
        match Self::make(seg_pos, cap, budget.clone()) {
            Ok(b) => Ok(Some(b)),
            Err(e) => {
                budget.give_back(cap);
                Err(e)
            }
        }
    }

    fn make(seg_pos: u64, cap: usize, budget: Rc<TailBudget>) -> std::io::Result<TailBlock> {
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
            seg_pos: Cell::new(seg_pos),
            exported: Cell::new(false),
            len: Cell::new(0),
            entries: RefCell::new(Vec::new()),
            budget,
        })
    }

    fn cap(&self) -> usize {
        self.map.len()
    }

    fn end_pos(&self) -> u64 {
        self.seg_pos.get() + self.len.get() as u64
    }

    /// Whether the block can take new bytes from its start: only the cache
    /// holds it (no reader's slice, no send in flight) and no other core
    /// has its descriptor.
    fn reusable(self: &Rc<Self>) -> bool {
        Rc::strong_count(self) == 1 && !self.exported.get()
    }

    /// Starts the block over at segment position `seg_pos`. Only for a
    /// [`TailBlock::reusable`] block: nothing can read the old bytes.
    fn reset(&self, seg_pos: u64) {
        self.seg_pos.set(seg_pos);
        self.len.set(0);
        self.entries.borrow_mut().clear();
    }

    /// A duplicate of the memory file's descriptor, for another core to
    /// send from; the block is never reused afterwards (its bytes stay as
    /// they are for as long as the duplicate lives).
    pub fn share_file(&self) -> std::io::Result<File> {
        self.exported.set(true);
        self.file.try_clone()
    }

    fn copy_in(&self, bytes: &[u8]) {
        let len = self.len.get();
        assert!(len + bytes.len() <= self.cap(), "tail block overflow");
        // SAFETY: the destination `[len, len + bytes.len())` lies inside the
        // mapping (checked above). Bytes at or past `len` are not in any
        // reader's hands: readers only get ranges of recorded entries, which
        // are below `len`, and a block is reset to `len` 0 only when no
        // reader holds it and no other core has its descriptor
        // (`reusable`). A block is only touched from its shard's thread, so
        // nothing reads this range while it is written.
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
        seg_pos - self.seg_pos.get()
    }

    /// The block's copy of segment bytes `[seg_pos, seg_pos + len)`, which
    /// must be recorded batches.
    pub fn bytes(&self, seg_pos: u64, len: u64) -> &[u8] {
        let at = (seg_pos - self.seg_pos.get()) as usize;
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
    /// Blocks reused so far (for tests).
    recycled: u64,
    budget: Rc<TailBudget>,
}

impl TailCache {
    /// A cache keeping about `cap` bytes (0: disabled), within the calling
    /// shard's [`TailBudget`].
    pub fn new(cap: usize) -> TailCache {
        Self::with_budget(cap, TailBudget::shard_default())
    }

    /// A cache keeping about `cap` bytes within `budget`.
    pub fn with_budget(cap: usize, budget: Rc<TailBudget>) -> TailCache {
        TailCache {
            budget,
            cap,
            block_bytes: (cap / 4).clamp(64 * 1024, 4 * 1024 * 1024),
            seg_base: 0,
            blocks: VecDeque::new(),
            bytes: 0,
            resting_until: None,
            recycled: 0,
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
            // At the bound, the oldest block is reused if nothing reads
            // it: no memory file to make, map and fault in again for every
            // block's worth of appends.
            let reusable_front = self
                .blocks
                .front()
                .is_some_and(|b| b.reusable() && b.cap() >= blen);
            let made = if self.bytes + cap > self.cap && self.blocks.len() > 1 && reusable_front {
                None
            } else {
                match TailBlock::create(seg_pos, cap, &self.budget) {
                    Ok(b) => b,
                    Err(e) => {
                        self.clear();
                        self.resting_until = Some(crate::rt::now() + TAIL_INTEREST);
                        return Err(e);
                    }
                }
            };
            match made {
                Some(block) => {
                    self.bytes += block.cap();
                    self.blocks.push_back(Rc::new(block));
                }
                None if reusable_front => {
                    // At this partition's bound, or the shard's budget is
                    // spent: the oldest block starts over.
                    if let Some(old) = self.blocks.pop_front() {
                        old.reset(seg_pos);
                        self.blocks.push_back(old);
                        self.recycled += 1;
                    }
                }
                None => {
                    // The shard's budget is spent and no block of ours is
                    // free: this batch is not cached (the next append
                    // starts the cache over); readers use the log file.
                    self.clear();
                    return Ok(());
                }
            }
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
        let start = block.seg_pos.get() + first.at as u64;
        let mut end = start;
        let mut next = first.base_offset;
        for e in &entries[i..] {
            let e_end = block.seg_pos.get() + (e.at + e.len) as u64;
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

    /// At the bound the oldest block is reused, unless a reader holds it
    /// or another core has its descriptor: their bytes stay as they were.
    #[test]
    fn reuses_only_blocks_nothing_can_read() {
        let mut c = TailCache::new(256 * 1024);
        let mut pos = 0u64;
        let mut append = |c: &mut TailCache, i: u64| {
            let (h, b) = batch(i as u8, 1000);
            c.append(0, pos, (i, i + 1), &h, &b).unwrap();
            pos += 1008;
            pos
        };
        // A batch of the first block exported, one of the second held by a
        // reader (65 batches fit a 64 KiB block).
        let mut end = 0;
        for i in 0..100u64 {
            end = append(&mut c, i);
        }
        let exported = c.read(0, end, 0, 1).unwrap();
        let held = c.read(0, end, 80, 1).unwrap();
        assert!(!Rc::ptr_eq(&exported.block, &held.block));
        let dup = exported.block.share_file().unwrap();
        let at = exported.block.offset_of(exported.position);
        drop(exported);
        for i in 100..2000u64 {
            end = append(&mut c, i);
        }
        assert!(c.recycled > 20, "{} blocks reused", c.recycled);
        assert!(c.memory_bytes() <= 256 * 1024 + 64 * 1024);
        assert!(c.read(0, end, 1999, 1 << 20).is_some());
        // The held block is intact; so is the exported one (never reused
        // although nothing on this core holds it any more).
        assert_eq!(held.block.bytes(held.position, 8), &[80u8; 8]);
        let mut b = [9u8; 8];
        dup.read_exact_at(&mut b, at).unwrap();
        assert_eq!(b, [0u8; 8]);
    }

    /// The shard's caches together stay within its budget: a cache that
    /// finds it spent reuses its own oldest block, or caches nothing until
    /// blocks are given back (dropped caches, readers letting go).
    #[test]
    fn caches_share_the_shard_budget() {
        let budget = TailBudget::new(4 * 64 * 1024);
        let mut a = TailCache::with_budget(256 * 1024, budget.clone());
        let mut b = TailCache::with_budget(256 * 1024, budget.clone());
        let fill = |c: &mut TailCache, n: u64| {
            let mut pos = 0;
            for i in 0..n {
                let (h, body) = batch(i as u8, 1000);
                c.append(0, pos, (i, i + 1), &h, &body).unwrap();
                pos += 1008;
            }
            pos
        };
        // `a` takes three blocks (65 batches each), `b` the last one.
        fill(&mut a, 150);
        assert_eq!(budget.bytes(), 3 * 64 * 1024);
        let end = fill(&mut b, 600);
        assert_eq!(budget.bytes(), 4 * 64 * 1024, "never past the budget");
        // `b` keeps its newest batches in its one block, reused.
        assert!(b.recycled > 5);
        assert!(b.read(0, end, 599, 1 << 20).is_some());
        // A held block cannot be reused: with the budget spent, `b` caches
        // nothing rather than go past it.
        let held = b.read(0, end, 599, 1).unwrap();
        let mut pos = end;
        for i in 600..700u64 {
            let (h, body) = batch(i as u8, 1000);
            b.append(0, pos, (i, i + 1), &h, &body).unwrap();
            pos += 1008;
        }
        assert!(b.is_empty());
        assert_eq!(budget.bytes(), 4 * 64 * 1024, "the held block still counts");
        drop(held);
        assert_eq!(budget.bytes(), 3 * 64 * 1024);
        drop(a);
        assert_eq!(budget.bytes(), 0);
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
