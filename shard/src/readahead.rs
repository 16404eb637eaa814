//! Read-ahead for readers going forward through a partition (fetch and
//! push), so a consumer catching up reads at the disk's speed.
//!
//! Appends use direct I/O, so what was written is not in the page cache:
//! a consumer behind the tail cache reads every byte from the disk. Left
//! to itself, each read asks for its slice when it arrives, the disk idles
//! while the slice goes out and the consumer asks again, and the kernel's
//! own read-ahead is bounded by `read_ahead_kb` and only follows `read`s
//! of the same open file (sendfile of small slices barely moves it).
//!
//! So each partition keeps a few [`Stream`]s, one per forward reader (or
//! per group of readers close together: they share what it reads, one
//! read-ahead for many sends). After every read the stream keeps
//! [`READ_AHEAD_WINDOW_BYTES`] past the reader's position on its way into
//! the page cache: `posix_fadvise(WILLNEED)` of the next range, in pieces
//! of [`READ_AHEAD_ADVICE_BYTES`] (the kernel reads at most
//! `max(read_ahead_kb, max_sectors_kb)` per call), issued on the executor's
//! read-ahead thread because the call allocates the pages and submits the
//! reads itself (~1 ms for 4 MiB, measured), which would stall every task
//! of the core. That thread advises the next piece as soon as the one
//! before it has arrived, so the disk reads without pause while the socket
//! drains what already arrived, but never has more than
//! [`READ_AHEAD_INFLIGHT_BYTES`] of read-ahead queued: the disk serves
//! queued reads first, and an append's write must not wait behind a
//! window of reads for somebody else's catch-up.
//!
//! Bounded twice more: a partition holds at most [`READ_AHEAD_STREAMS_MAX`]
//! streams, and a shard's streams together keep at most its
//! [`ReadAheadBudget`] advised ahead of their readers (a stream idle for
//! [`READ_AHEAD_IDLE`] gives its share back). Advised pages are ordinary
//! clean page cache: the kernel reclaims them under memory pressure.
//!
//! Everything here belongs to one shard (core): `Rc` and `Cell`, never
//! shared.

use crate::limits::{
    READ_AHEAD_ADVICE_BYTES, READ_AHEAD_IDLE, READ_AHEAD_INFLIGHT_BYTES,
    READ_AHEAD_SHARD_BYTES_DEFAULT, READ_AHEAD_STEP_BYTES, READ_AHEAD_STREAMS_MAX,
    READ_AHEAD_WINDOW_BYTES,
};
use crate::rt;
use crate::segment::{Segment, SegmentFiles};
use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::time::Instant;

/// The bytes a shard's streams may keep advised ahead of their readers.
///
/// One per shard, shared by `Rc` by every partition the shard owns; it
/// never crosses cores. [`ReadAheadBudget::shard_default`] is the one
/// [`crate::PartitionLog::open`] uses.
pub struct ReadAheadBudget {
    bytes_max: Cell<u64>,
    bytes: Cell<u64>,
    /// Every live stream's share, to take back the shares of idle ones.
    shares: RefCell<Vec<Weak<Share>>>,
}

thread_local! {
    static SHARD_BUDGET: Rc<ReadAheadBudget> = ReadAheadBudget::new(READ_AHEAD_SHARD_BYTES_DEFAULT);
}

impl ReadAheadBudget {
    pub fn new(bytes_max: u64) -> Rc<ReadAheadBudget> {
        Rc::new(ReadAheadBudget {
            bytes_max: Cell::new(bytes_max),
            bytes: Cell::new(0),
            shares: RefCell::new(Vec::new()),
        })
    }

    /// The budget of the calling shard (a thread-local: one per core).
    pub fn shard_default() -> Rc<ReadAheadBudget> {
        SHARD_BUDGET.with(Rc::clone)
    }

    /// Changes the bound (0 turns read-ahead off); shares already taken
    /// shrink as their readers move on.
    pub fn set_bytes_max(&self, bytes_max: u64) {
        self.bytes_max.set(bytes_max);
    }

    pub fn bytes_max(&self) -> u64 {
        self.bytes_max.get()
    }

    /// Bytes advised ahead of readers now, over the shard.
    pub fn bytes(&self) -> u64 {
        self.bytes.get()
    }

    fn share(self: &Rc<Self>) -> Rc<Share> {
        let share = Rc::new(Share {
            budget: self.clone(),
            bytes: Cell::new(0),
            used: Cell::new(rt::now()),
        });
        let mut shares = self.shares.borrow_mut();
        shares.retain(|s| s.strong_count() > 0);
        shares.push(Rc::downgrade(&share));
        share
    }

    /// Takes back the shares of streams idle for [`READ_AHEAD_IDLE`]: their
    /// readers stopped, and what they advised is read or reclaimable.
    fn reclaim_idle(&self) {
        let shares: Vec<Rc<Share>> = self
            .shares
            .borrow()
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for s in shares {
            if rt::since(s.used.get()) >= READ_AHEAD_IDLE {
                s.set(0);
            }
        }
    }

    /// How much more a share of `held` bytes may hold, up to `wanted`.
    fn grant(&self, held: u64, wanted: u64) -> u64 {
        let free = |b: &Self| b.bytes_max.get().saturating_sub(b.bytes.get() - held);
        if free(self) < wanted {
            self.reclaim_idle();
        }
        free(self).min(wanted)
    }
}

/// One stream's bytes in its shard's budget; given back when dropped.
struct Share {
    budget: Rc<ReadAheadBudget>,
    bytes: Cell<u64>,
    used: Cell<Instant>,
}

impl Share {
    fn set(&self, bytes: u64) {
        let b = &self.budget.bytes;
        b.set(b.get() - self.bytes.get() + bytes);
        self.bytes.set(bytes);
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.set(0);
    }
}

/// One forward reader (or a group close together) of one segment.
struct Stream {
    segment_base: u64,
    /// Furthest position its readers have asked for.
    read_end: u64,
    /// Position up to which its pages were advised.
    advised_end: u64,
    /// Its bytes advised ahead of `read_end`, in the shard's budget.
    share: Rc<Share>,
}

/// A partition's read-ahead streams.
pub(crate) struct ReadAhead {
    budget: Rc<ReadAheadBudget>,
    window_bytes: u64,
    streams: Vec<Stream>,
}

/// A range to advise, and the file to advise it on.
pub(crate) struct Advice {
    files: Rc<SegmentFiles>,
    start: u64,
    end: u64,
}

impl ReadAhead {
    pub(crate) fn new(budget: Rc<ReadAheadBudget>) -> ReadAhead {
        ReadAhead {
            budget,
            window_bytes: READ_AHEAD_WINDOW_BYTES,
            streams: Vec::with_capacity(READ_AHEAD_STREAMS_MAX),
        }
    }

    /// A reader is about to read `[start, end)` of `seg` (whose files are
    /// `files`): joins or starts the stream it belongs to and returns what
    /// to advise now, the range itself included where no stream covered it.
    pub(crate) fn on_read(
        &mut self,
        seg: &Segment,
        files: &Rc<SegmentFiles>,
        start: u64,
        end: u64,
    ) -> Option<Advice> {
        let window = self.window_bytes;
        let visible = seg.len();
        let found = self.streams.iter().position(|s| {
            s.segment_base == seg.base_offset
                && start <= s.advised_end
                && start + window >= s.read_end
        });
        let i = match found {
            Some(i) => i,
            None => {
                if self.streams.len() >= READ_AHEAD_STREAMS_MAX {
                    // The stream its readers left longest ago goes.
                    let coldest = (0..self.streams.len())
                        .min_by_key(|&i| self.streams[i].share.used.get())
                        .unwrap_or(0);
                    self.streams.swap_remove(coldest);
                }
                self.streams.push(Stream {
                    segment_base: seg.base_offset,
                    read_end: start,
                    advised_end: start,
                    share: self.budget.share(),
                });
                self.streams.len() - 1
            }
        };
        let s = &mut self.streams[i];
        s.share.used.set(rt::now());
        s.read_end = s.read_end.max(end);
        // The reader's own range is advised whatever the budget says: it
        // is read now either way, and advice gets it read in large pieces.
        let from = s.advised_end.max(start);
        let own_end = end.min(visible);
        let target = (s.read_end + window).min(visible);
        // Top up once a step of the window is used. Advice is read by the
        // disk at once, queued ahead of whatever comes after it (a
        // produce's write): small steps keep that queue short while the
        // window stays as far ahead.
        let step = READ_AHEAD_STEP_BYTES.min(window / 2).max(1);
        let due = own_end > from || target >= s.advised_end + step;
        if !due || target <= from {
            s.share.set(s.advised_end.saturating_sub(s.read_end));
            return None;
        }
        let held = s.share.bytes.get();
        let ahead = target - s.read_end.min(target);
        let granted = self.budget.grant(held, ahead);
        let advise_end = (s.read_end + granted).max(own_end).min(visible);
        if advise_end <= from {
            s.share.set(s.advised_end.saturating_sub(s.read_end));
            return None;
        }
        s.advised_end = advise_end;
        s.share.set(advise_end.saturating_sub(s.read_end));
        Some(Advice {
            files: files.clone(),
            start: from,
            end: advise_end,
        })
    }

    /// How far ahead of a reader its stream keeps the log advised.
    pub(crate) fn window_bytes(&self) -> u64 {
        self.window_bytes
    }

    /// Bytes this partition's streams hold advised ahead of their readers.
    pub(crate) fn ahead_bytes(&self) -> u64 {
        self.streams.iter().map(|s| s.share.bytes.get()).sum()
    }

    /// Forgets the streams of segments that are gone (retention).
    pub(crate) fn forget_before(&mut self, segment_base: u64) {
        self.streams.retain(|s| s.segment_base >= segment_base);
    }

    #[cfg(test)]
    fn set_window_bytes(&mut self, w: u64) {
        self.window_bytes = w;
    }
}

impl Advice {
    /// Advice for `[start, end)` of `files`, outside any stream.
    pub(crate) fn new(files: Rc<SegmentFiles>, start: u64, end: u64) -> Advice {
        Advice { files, start, end }
    }

    pub(crate) fn start(&self) -> u64 {
        self.start
    }

    /// Asks the kernel, from the shard's read-ahead thread ([`advise`]),
    /// to read the range into the page cache, without waiting for the
    /// reads. The reader polls residency on its own
    /// (`SegmentFiles::resident_from`), so a lost advice only costs speed.
    pub(crate) fn issue(self) {
        let file = match self.files.file().try_clone() {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!(error = %e, "no descriptor for read-ahead");
                return;
            }
        };
        advise(file, self.start, self.end);
    }
}

/// One range to advise, on the read-ahead thread.
struct Job {
    file: std::fs::File,
    start: u64,
    end: u64,
}

thread_local! {
    /// The calling shard's read-ahead thread, started at its first advice.
    static ADVISOR: RefCell<Option<std::sync::mpsc::Sender<Job>>> = const { RefCell::new(None) };
}

/// Advises `[start, end)` of `file` on the shard's read-ahead thread.
///
/// `posix_fadvise(WILLNEED)` allocates the pages and submits the reads in
/// the calling thread (~1 ms of kernel time per 4 MiB, and it blocks while
/// the disk's queue is full), and a reader catching up at disk speed asks
/// for hundreds of MiB/s of it. The executor's blocking pool is one thread
/// per shard, which also runs the produce path's blocking work (segment
/// rolls, durable writes): queued behind a window of advice, a roll would
/// wait for the disk to read megabytes for somebody else. So each shard
/// has a thread of its own for advice (it inherits the shard's core).
/// Falls back to the blocking pool if that thread cannot be started.
fn advise(file: std::fs::File, start: u64, end: u64) {
    let job = Job { file, start, end };
    let job = ADVISOR.with(|a| {
        let mut a = a.borrow_mut();
        if a.is_none() {
            *a = start_advisor();
        }
        match a.as_ref() {
            Some(tx) => tx.send(job).err().map(|e| e.0),
            None => Some(job),
        }
    });
    if let Some(Job { file, start, end }) = job {
        rt::spawn_detached(rt::spawn_blocking(move || {
            // The blocking pool also runs the produce path's file work:
            // advice there never waits for the disk (unpaced).
            advise_blocking(&file, start, end, false)
        }));
    }
}

fn start_advisor() -> Option<std::sync::mpsc::Sender<Job>> {
    let (tx, rx) = std::sync::mpsc::channel::<Job>();
    let name = format!("{}-ra", std::thread::current().name().unwrap_or("shard"));
    let started = std::thread::Builder::new().name(name).spawn(move || {
        // Ends when the shard's thread (the sender's owner) ends.
        while let Ok(j) = rx.recv() {
            advise_blocking(&j.file, j.start, j.end, true);
        }
    });
    match started {
        Ok(_) => Some(tx),
        Err(e) => {
            tracing::warn!(error = %e, "no read-ahead thread; advice runs on the blocking pool");
            None
        }
    }
}

/// `posix_fadvise(WILLNEED)` of `[start, end)` in pieces the kernel reads
/// whole, at most [`READ_AHEAD_INFLIGHT_BYTES`] of them still being read:
/// before advising more, the thread waits for the oldest piece's last page.
///
/// The bound is for the writes. Advice only queues reads, and the disk's
/// scheduler serves what is queued (mq-deadline even prefers reads over
/// writes), so a whole window advised at once puts the next append's write
/// behind tens of megabytes of reads for somebody else's catch-up.
///
/// `paced = false` advises the whole range at once and returns (the
/// fallback on the blocking pool, which must not wait for the disk).
fn advise_blocking(file: &std::fs::File, start: u64, end: u64, paced: bool) {
    let fd = std::os::fd::AsRawFd::as_raw_fd(file);
    // The pieces advised and maybe still being read, oldest first.
    let mut inflight = std::collections::VecDeque::new();
    // Waiting reads one byte of a piece's last page through a description
    // of the file of its own, marked random access: a page the advice did
    // not bring in (memory was short) is then read alone, instead of
    // starting the kernel's own read-ahead.
    let waiter = if paced {
        match std::fs::File::open(format!("/proc/self/fd/{fd}")) {
            Ok(w) => Some(w),
            Err(e) => {
                // Unpaced then: the reads queue up as they did before the
                // bound, which costs the writes latency, not correctness.
                static SAID: std::sync::Once = std::sync::Once::new();
                SAID.call_once(|| {
                    tracing::warn!(error = %e, "read-ahead cannot reopen a segment to pace its reads; advising unpaced")
                });
                None
            }
        }
    } else {
        None
    };
    if let Some(w) = &waiter {
        // SAFETY: advice on a descriptor this function owns; no memory
        // is passed.
        unsafe {
            libc::posix_fadvise(
                std::os::fd::AsRawFd::as_raw_fd(w),
                0,
                0,
                libc::POSIX_FADV_RANDOM,
            )
        };
    }
    let wait_for = |piece_end: u64| {
        if let Some(w) = &waiter {
            let mut b = [0u8; 1];
            let _ = std::os::unix::fs::FileExt::read_at(w, &mut b, piece_end - 1);
        }
    };
    let mut at = start;
    while at < end {
        let n = (end - at).min(READ_AHEAD_ADVICE_BYTES);
        while inflight.len() as u64 * READ_AHEAD_ADVICE_BYTES >= READ_AHEAD_INFLIGHT_BYTES {
            let Some(e) = inflight.pop_front() else { break };
            wait_for(e);
        }
        // SAFETY: advice on a descriptor this closure owns (a duplicate);
        // no memory is passed.
        unsafe {
            libc::posix_fadvise(
                fd,
                at as libc::off_t,
                n as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
        at += n;
        inflight.push_back(at);
    }
    // Nothing left in flight for the next range to queue behind.
    for e in inflight {
        wait_for(e);
    }
    // The kernel's read-ahead stops before a partial page at the end of
    // the file (a closed segment ends wherever its last batch does), so
    // advice never brings it in and a reader would wait for it in vain:
    // read one byte of it here, off the shard.
    let page = crate::limits::DIRECT_IO_ALIGN;
    if !end.is_multiple_of(page) && file.metadata().is_ok_and(|m| m.len() == end) {
        let mut b = [0u8; 1];
        let _ = std::os::unix::fs::FileExt::read_at(file, &mut b, end - 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(len: u64) -> (tempfile::TempDir, Rc<Segment>, Rc<SegmentFiles>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000000000000000000.log");
        std::fs::write(&path, vec![0u8; len as usize]).unwrap();
        let seg = Rc::new(Segment::open(path, 0, len).unwrap());
        seg.set_visible(len, 1);
        let files = seg.files().unwrap();
        (dir, seg, files)
    }

    /// The advice thread's work ends with its range in the page cache,
    /// however many pieces it took (more than the bound in flight), so a
    /// range queued after it never waits behind its reads.
    #[test]
    fn advice_returns_with_its_whole_range_read_in() {
        // On the disk (not a tmpfs /tmp, where everything is resident).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("00000000000000000000.log");
        let len = 5 * READ_AHEAD_ADVICE_BYTES + 4096;
        std::fs::write(&path, vec![7u8; len as usize]).unwrap();
        let seg = Rc::new(Segment::open(path, 0, len).unwrap());
        seg.set_visible(len, 1);
        let files = seg.files().unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(files.file());
        files.file().sync_all().unwrap();
        // SAFETY: advice on a descriptor the segment owns; no memory.
        unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert!(!files.resident(0, len), "the written pages were dropped");
        advise_blocking(files.file(), 0, len, true);
        assert!(files.resident(0, len));
    }

    fn range(a: Option<Advice>) -> Option<(u64, u64)> {
        a.map(|a| (a.start, a.end))
    }

    /// A forward reader keeps a window advised ahead, topped up in halves;
    /// a second reader close behind shares the stream; one far behind gets
    /// its own; the shard budget bounds what all of them hold.
    #[test]
    fn streams_stay_a_window_ahead_within_the_budget() {
        let (_d, seg, files) = segment(64 << 20);
        let budget = ReadAheadBudget::new(12 << 20);
        let mut ra = ReadAhead::new(budget.clone());
        ra.set_window_bytes(8 << 20);
        const M: u64 = 1 << 20;
        // First read: its own range and the window past it.
        assert_eq!(range(ra.on_read(&seg, &files, 0, M)), Some((0, 9 * M)));
        assert_eq!(budget.bytes(), 8 * M);
        // Within the first half of the window: nothing new.
        assert_eq!(range(ra.on_read(&seg, &files, M, 4 * M)), None);
        // Past half: topped up to a window ahead.
        assert_eq!(
            range(ra.on_read(&seg, &files, 4 * M, 5 * M)),
            Some((9 * M, 13 * M))
        );
        assert_eq!(budget.bytes(), 8 * M);
        // A reader a little behind shares the stream.
        assert_eq!(range(ra.on_read(&seg, &files, 2 * M, 3 * M)), None);
        assert_eq!(ra.streams.len(), 1);
        // One far ahead starts its own stream, within what the budget has
        // left (4 MiB) plus its own range.
        assert_eq!(
            range(ra.on_read(&seg, &files, 40 * M, 41 * M)),
            Some((40 * M, 45 * M))
        );
        assert_eq!(ra.streams.len(), 2);
        assert_eq!(budget.bytes(), 12 * M);
        assert_eq!(ra.ahead_bytes(), 12 * M);
        // With the budget spent, a new reader gets its own range only.
        assert_eq!(
            range(ra.on_read(&seg, &files, 60 * M, 63 * M)),
            Some((60 * M, 63 * M))
        );
        // Dropping the partition's streams gives their shares back.
        drop(ra);
        assert_eq!(budget.bytes(), 0);
        // The segment's readable end bounds the window.
        let mut ra = ReadAhead::new(budget.clone());
        ra.set_window_bytes(8 << 20);
        assert_eq!(
            range(ra.on_read(&seg, &files, 60 * M, 62 * M)),
            Some((60 * M, 64 * M))
        );
        assert_eq!(budget.bytes(), 2 * M);
    }

    /// With a window larger than two steps, a forward reader's window is
    /// topped up a step at a time: bursts of advice stay small (the disk
    /// reads them ahead of the writes that follow) while the window stays
    /// as far ahead.
    #[test]
    fn large_windows_are_topped_up_in_steps() {
        let (_d, seg, files) = segment(64 << 20);
        let mut ra = ReadAhead::new(ReadAheadBudget::new(u64::MAX));
        ra.set_window_bytes(32 << 20);
        const M: u64 = 1 << 20;
        let step = READ_AHEAD_STEP_BYTES;
        assert_eq!(range(ra.on_read(&seg, &files, 0, M)), Some((0, 33 * M)));
        assert_eq!(range(ra.on_read(&seg, &files, M, M + step - 1)), None);
        assert_eq!(
            range(ra.on_read(&seg, &files, M, M + step)),
            Some((33 * M, 33 * M + step))
        );
        assert_eq!(ra.ahead_bytes(), 32 * M);
    }

    /// At most `READ_AHEAD_STREAMS_MAX` streams per partition, the least
    /// recently read one replaced; idle shares are taken back when the
    /// budget runs short.
    #[test]
    fn streams_are_bounded_and_idle_ones_give_back() {
        let (_d, seg, files) = segment(64 << 20);
        let budget = ReadAheadBudget::new(u64::MAX);
        let mut ra = ReadAhead::new(budget.clone());
        ra.set_window_bytes(1 << 20);
        for k in 0..(READ_AHEAD_STREAMS_MAX as u64 + 3) {
            let at = k * (4 << 20);
            assert!(ra.on_read(&seg, &files, at, at + 4096).is_some());
        }
        assert_eq!(ra.streams.len(), READ_AHEAD_STREAMS_MAX);
        // Shares older than the idle time are reclaimed on demand.
        for s in &ra.streams {
            let idle_since = rt::now().checked_sub(READ_AHEAD_IDLE);
            s.share.used.set(idle_since.unwrap_or_else(rt::now));
        }
        budget.set_bytes_max(1 << 20);
        assert_eq!(budget.grant(0, 1 << 20), 1 << 20);
        assert_eq!(budget.bytes(), 0);
    }
}
