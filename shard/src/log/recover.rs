//! Opening a partition log and recovering it after a crash (S4).
//!
//! Closed segments keep their index files (rebuilt from the batch headers
//! when missing or damaged); the active segment resumes from the recovery
//! checkpoint and only the bytes past its recovery point are scanned, by
//! CRC, so restart time does not grow with the size of the log. Zeros
//! after the last valid batch are the normal end of a crashed log (the
//! preallocated part) and are trimmed quietly; anything else there is a
//! torn or corrupt write, truncated with a warning ([`TailEnd`]).

use super::{
    align_down, capacity_bytes, replica::ReplicaState, writer::Prealloc, Inner, PartitionLog,
    Pending, State,
};
use crate::checkpoint::{self, Checkpoint};
use crate::config::LogConfig;
use crate::durable;
use crate::error::{Error, Result};
use crate::index::{IndexBytes, SegmentIndex};
use crate::limits::DIRECT_IO_ALIGN;
use crate::notify::Notify;
use crate::producers::ProducerTable;
use crate::readahead::{ReadAhead, ReadAheadBudget};
use crate::rt;
use crate::segment::{self, FdBudget, Segment, SegmentFiles};
use crate::tail::TailCache;
use glommio::io::{DmaFile, OpenOptions};
use shoal_wire::batch::{self, check_header};
use shoal_wire::BatchError;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

const DMA_PROBE_FILE: &str = ".dma-probe";

/// Makes sure the probe file of [`dma_probe`] exists and is not empty.
fn prepare_dma_probe(dir: &Path) -> std::io::Result<()> {
    let p = dir.join(DMA_PROBE_FILE);
    if std::fs::metadata(&p)
        .map(|m| m.len() < DIRECT_IO_ALIGN)
        .unwrap_or(true)
    {
        std::fs::write(&p, vec![0x5a; DIRECT_IO_ALIGN as usize])?;
    }
    Ok(())
}

/// Opens a non-empty file with direct I/O before any segment: glommio's
/// iopoll probe reads the first block of the first DMA file it sees on a
/// device and misjudges an empty one. [`prepare_dma_probe`] made the file.
async fn dma_probe(dir: &Path) -> std::io::Result<()> {
    let f = DmaFile::open(dir.join(DMA_PROBE_FILE)).await?;
    let _ = f.read_at_aligned(0, DIRECT_IO_ALIGN as usize).await?;
    f.close().await?;
    Ok(())
}

pub(super) fn list_segments(dir: &Path) -> std::io::Result<Vec<u64>> {
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

/// What an open found past the active segment's last valid batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailEnd {
    /// Closed cleanly: the checkpoint vouched for the end; nothing scanned.
    Clean,
    /// Only zeros (or nothing) follow the valid batches: the preallocated
    /// part of the file that a crash leaves behind. The normal end after a
    /// crash; trimmed without a warning.
    Zeros,
    /// Something other than zeros follows the valid batches: a batch torn
    /// by a crash mid-write, or corruption. Truncated, with a warning.
    Damaged {
        valid_bytes: u64,
        file_bytes: u64,
        why: TailDamage,
    },
}

/// Why the bytes after the last valid batch are not a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailDamage {
    /// No valid header there, or a batch cut short by the end of the file.
    Header(BatchError),
    /// A whole batch whose CRC does not match.
    Crc,
    /// A valid batch that does not continue the offsets.
    OffsetGap { expected: u64, found: u64 },
}

impl std::fmt::Display for TailDamage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TailDamage::Header(e) => write!(f, "{e}"),
            TailDamage::Crc => write!(f, "batch CRC mismatch"),
            TailDamage::OffsetGap { expected, found } => {
                write!(f, "batch at offset {found} where {expected} was due")
            }
        }
    }
}

/// Result of scanning a segment's tail.
struct Scan {
    end: u64,
    next_offset: u64,
    max_ts: Option<i64>,
    /// Set when the bytes after `end` are not all zeros.
    damage: Option<TailDamage>,
}

/// Whether every byte is zero. Folds without an early exit so the compiler
/// can vectorise it: a crash can leave a whole preallocation step to check.
fn all_zero(bytes: &[u8]) -> bool {
    bytes
        .chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
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
        ..
    } = from;
    let stop = loop {
        let rest = &bytes[pos as usize..];
        let h = match check_header(rest, batch_bytes_max) {
            Ok(h) => h,
            Err(e) => break TailDamage::Header(e),
        };
        let blen = h.batch_len as usize;
        if batch::compute_crc(&rest[..blen]) != h.crc {
            break TailDamage::Crc;
        }
        if h.base_offset != next_offset {
            break TailDamage::OffsetGap {
                expected: next_offset,
                found: h.base_offset,
            };
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
    };
    let damage = (!all_zero(&bytes[pos as usize..])).then_some(stop);
    Scan {
        end: pos,
        next_offset,
        max_ts,
        damage,
    }
}

/// A closed segment as the blocking half of an open found it.
struct ClosedFound {
    base: u64,
    path: std::path::PathBuf,
    len: u64,
    next_offset: u64,
    max_ts: Option<i64>,
}

/// What the blocking half of an open found and repaired on disk.
struct Found {
    closed: Vec<ClosedFound>,
    /// The active segment's files, its index set.
    active: SegmentFiles,
    active_path: std::path::PathBuf,
    base: u64,
    end: u64,
    next_offset: u64,
    max_ts: Option<i64>,
    producers: ProducerTable,
    trusted: bool,
    tail_end: TailEnd,
    /// The checkpoint that clears the clean flag, encoded.
    checkpoint: Vec<u8>,
}

/// Everything an open does with `std::fs` and the mappings, in one piece
/// for the blocking thread: create the directory, list and open the
/// segments, load or rebuild their indexes, load the checkpoint and scan
/// (and truncate) the active segment's tail.
fn recover_files(dir: &Path, bmax: usize, capacity: u64) -> Result<Found> {
    std::fs::create_dir_all(dir)?;
    prepare_dma_probe(dir)?;
    let mut bases = list_segments(dir)?;
    if bases.is_empty() {
        std::fs::File::create(segment::log_path(dir, 0))?;
        bases.push(0);
    }
    let ckpt = Checkpoint::load(dir);

    let mut closed = Vec::with_capacity(bases.len());
    for (i, &base) in bases[..bases.len() - 1].iter().enumerate() {
        let path = segment::log_path(dir, base);
        let files = SegmentFiles::open(&path, 0)?;
        let len = files.file().metadata()?.len();
        let oi = segment::offset_index_path(dir, base);
        let ti = segment::time_index_path(dir, base);
        let loaded = match (IndexBytes::map(&oi), IndexBytes::map(&ti)) {
            (Ok(o), Ok(t)) => {
                let idx = SegmentIndex::from_parts(o, t);
                idx.validate(len).map(|_| idx)
            }
            (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
        };
        match loaded {
            Ok(idx) => *files.index.borrow_mut() = idx,
            Err(why) => {
                tracing::warn!(segment = %path.display(), %why, "rebuilding segment index");
                let idx = segment::rebuild_index(&files, base, len, bmax);
                let (oname, tname) = (
                    segment::offset_index_name(base),
                    segment::time_index_name(base),
                );
                let saved = durable::write_durably_blocking(dir, &oname, idx.offsets.as_bytes())
                    .and_then(|()| {
                        durable::write_durably_blocking(dir, &tname, idx.times.as_bytes())
                    })
                    .and_then(|()| Ok((IndexBytes::map(&oi)?, IndexBytes::map(&ti)?)));
                match saved {
                    Ok((o, t)) => *files.index.borrow_mut() = SegmentIndex::from_parts(o, t),
                    // A full disk must not keep the partition from
                    // opening: serve the index from memory, rebuild it
                    // again next time.
                    Err(e) => {
                        tracing::warn!(segment = %path.display(), error = %e, "cannot save the rebuilt index; it is rebuilt when read");
                        *files.index.borrow_mut() = idx;
                    }
                }
            }
        }
        // Closed segments open their files again when read, within the
        // shard's budget: a restart holds no descriptor per segment.
        let max_ts = files.index().max_timestamp();
        closed.push(ClosedFound {
            base,
            path,
            len,
            next_offset: bases[i + 1],
            max_ts,
        });
    }

    // The active segment.
    let base = *bases.last().unwrap_or(&0);
    let path = segment::log_path(dir, base);
    let file_len = std::fs::metadata(&path)?.len();
    let (mut idx, mut start_pos, mut next_offset, mut max_ts, mut producers, trusted) = match &ckpt
    {
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
    let mut tail_end = TailEnd::Clean;
    if !trusted {
        tail_end = TailEnd::Zeros;
        let file = std::fs::File::open(&path)?;
        if file_len > start_pos {
            // SAFETY: read-only mapping of a file nothing else writes
            // during open; dropped before the appender starts.
            let map = unsafe { memmap2::Mmap::map(&file)? };
            let from = Scan {
                end: start_pos,
                next_offset,
                max_ts,
                damage: None,
            };
            let scan = scan_tail(&map, from, base, &mut idx, &mut producers, bmax);
            end = scan.end;
            next_offset = scan.next_offset;
            max_ts = scan.max_ts;
            if let Some(why) = scan.damage {
                tail_end = TailEnd::Damaged {
                    valid_bytes: end,
                    file_bytes: file_len,
                    why,
                };
            }
        }
        if end < file_len {
            match &tail_end {
                TailEnd::Damaged { why, .. } => {
                    tracing::warn!(segment = %path.display(), valid = end, file = file_len, %why, "truncating torn or corrupt tail")
                }
                _ => {
                    tracing::debug!(segment = %path.display(), valid = end, file = file_len, "trimming the preallocated zeros past the log end")
                }
            }
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
    let checkpoint = Checkpoint {
        clean: false,
        active_base: base,
        recovery_pos: end,
        next_offset,
        max_timestamp: max_ts,
        offset_index: idx.offsets.as_bytes().to_vec(),
        time_index: idx.times.as_bytes().to_vec(),
        producers: producers.clone(),
    }
    .encode();

    let active = SegmentFiles::open(&path, capacity)?;
    *active.index.borrow_mut() = idx;
    Ok(Found {
        closed,
        active,
        active_path: path,
        base,
        end,
        next_offset,
        max_ts,
        producers,
        trusted,
        tail_end,
        checkpoint,
    })
}

impl PartitionLog {
    /// Opens (or creates) the log in `dir`, recovering after a crash.
    ///
    /// After a clean close nothing is scanned: the checkpoint holds the
    /// active segment's index and end. After a crash only the bytes past the
    /// last recovery point are scanned; a torn or corrupt tail is truncated.
    /// The file-system work runs on the blocking thread ([`rt::spawn_blocking`]),
    /// so opening many partitions never stalls the shard's other tasks.
    pub async fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<PartitionLog> {
        Self::open_with_budget(dir, config, FdBudget::shard_default()).await
    }

    /// [`Self::open`], with the closed segments' open files counted in
    /// `budget` (one per shard, shared by its partitions) instead of the
    /// shard's default budget.
    pub async fn open_with_budget(
        dir: impl AsRef<Path>,
        config: LogConfig,
        budget: Rc<FdBudget>,
    ) -> Result<PartitionLog> {
        config.validate().map_err(Error::Config)?;
        // Absolute: glommio opens directories by absolute path only.
        let dir = std::path::absolute(dir.as_ref())?;
        let (state, replica, tail_end) = open_parts(&dir, &config, budget.clone()).await?;
        let inner = Rc::new(Inner {
            dir,
            budget,
            tail_end,
            st: RefCell::new(state),
            config,
            progress: Notify::default(),
            wake_writer: Notify::default(),
            space: Notify::default(),
            injected_failures: Cell::new(0),
            read_ahead: RefCell::new(ReadAhead::new(ReadAheadBudget::shard_default())),
            replica: RefCell::new(replica),
            generation: Cell::new(0),
        });
        super::writer::start(&inner);
        Ok(PartitionLog { inner })
    }
}

/// The write state and replication state of the log in `dir`, recovered
/// (a truncation reopens with this, in place).
pub(super) async fn open_state(
    dir: &Path,
    config: &LogConfig,
    budget: Rc<FdBudget>,
) -> Result<(State, ReplicaState)> {
    let (st, r, _) = open_parts(dir, config, budget).await?;
    Ok((st, r))
}

async fn open_parts(
    dir: &Path,
    config: &LogConfig,
    budget: Rc<FdBudget>,
) -> Result<(State, ReplicaState, TailEnd)> {
    let dir = dir.to_path_buf();
    {
        let bmax = config.batch_bytes_max;
        let capacity = capacity_bytes(config);
        let found = {
            let dir = dir.clone();
            rt::spawn_blocking(move || {
                std::fs::create_dir_all(&dir)?;
                super::replica::finish_interrupted(&dir, bmax)?;
                recover_files(&dir, bmax, capacity)
            })
            .await?
        };
        dma_probe(&dir).await?;
        let Found {
            closed,
            active,
            active_path,
            base,
            end,
            next_offset,
            max_ts,
            producers,
            trusted,
            tail_end,
            checkpoint: ck,
        } = found;
        if let Err(e) = durable::write_durably(&dir, checkpoint::FILE_NAME, ck).await {
            // A full disk must not keep the partition from opening. The old
            // checkpoint stays; one that says "clean" is trusted only while
            // the file keeps exactly its length, and any write changes that.
            tracing::warn!(dir = %dir.display(), error = %e, "cannot write the recovery checkpoint on open; a crash recovery will scan more");
        }

        let closed: Vec<Rc<Segment>> = closed
            .into_iter()
            .map(|c| {
                let seg = Rc::new(Segment::new(c.path, c.base, 0, None));
                seg.set_visible(c.len, c.next_offset);
                seg.set_max_timestamp(c.max_ts);
                seg.join_budget(&budget);
                seg
            })
            .collect();
        let active = Rc::new(Segment::new(active_path, base, capacity, Some(active)));
        active.set_visible(end, next_offset);
        let dma = Rc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .dma_open(&active.path)
                .await?,
        );
        // Nothing is reserved until the first append (`Prealloc::due`): a
        // partition that is never written takes no preallocated disk.
        let prealloc = Prealloc::new(end);
        let mut pending = Pending {
            chunks: Vec::new(),
            file_pos: align_down(end),
            len: 0,
            prefix: 0,
            next_offset,
        };
        let prefix = (end - pending.file_pos) as usize;
        if prefix > 0 {
            let files = active.open_files();
            let tail = active
                .bytes(&files, pending.file_pos, prefix as u64)
                .to_vec();
            pending.push(&dma, &tail);
            pending.prefix = prefix;
        }
        let first_offset = closed.first().map_or(active.base_offset, |s| s.base_offset);
        tracing::debug!(dir = %dir.display(), segments = closed.len() + 1, first_offset, next_offset, trusted, "opened partition log");
        let replica = {
            let dir = dir.clone();
            rt::spawn_blocking(move || super::replica::load(&dir, first_offset, next_offset)).await
        };
        let state = State {
            closed,
            active,
            dma,
            active_bytes: end,
            active_created: rt::now(),
            active_max_ts: max_ts,
            next_offset,
            written_next: next_offset,
            durable_next: next_offset,
            pending,
            sync_requested: false,
            rolling: false,
            closing: false,
            writer_done: false,
            write_failure: None,
            roll_failure: None,
            failures: 0,
            retry: BTreeMap::new(),
            roll_needed: false,
            producers,
            ckpt_pos: end,
            ckpt_running: false,
            round_seq: 0,
            rounds_written: 0,
            rounds_in_flight: 0,
            prealloc,
            tail: TailCache::new(config.tail_cache_bytes),
            tail_interest: None,
        };
        Ok((state, replica, tail_end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shoal_wire::batch::{BatchBuilder, NewRecord, NO_PRODUCER_ID, NO_SEQUENCE};

    fn batch(base: u64, n: u32) -> Vec<u8> {
        let mut b = BatchBuilder::default();
        for _ in 0..n {
            b.push(&NewRecord {
                value: Some(b"recovery"),
                ..Default::default()
            })
            .unwrap();
        }
        let mut bytes = b.finish(NO_PRODUCER_ID, 0, NO_SEQUENCE);
        let mut head = [0u8; shoal_wire::BATCH_HEADER_BYTES];
        head.copy_from_slice(&bytes[..shoal_wire::BATCH_HEADER_BYTES]);
        batch::set_base_offset(&mut head, base);
        bytes[..head.len()].copy_from_slice(&head);
        bytes
    }

    /// Three valid batches (offsets 0..6), then `tail`.
    fn scan(tail: impl FnOnce(&mut Vec<u8>)) -> (Scan, usize) {
        let mut log = Vec::new();
        for i in 0..3 {
            log.extend(batch(i * 2, 2));
        }
        let valid = log.len();
        tail(&mut log);
        let from = Scan {
            end: 0,
            next_offset: 0,
            max_ts: None,
            damage: None,
        };
        let mut idx = SegmentIndex::default();
        let mut producers = ProducerTable::default();
        let s = scan_tail(&log, from, 0, &mut idx, &mut producers, 1 << 20);
        (s, valid)
    }

    /// Zeros after the last batch are the normal end of a crashed log, not
    /// damage (issue 9 #10: every recovery used to warn).
    #[test]
    fn zeros_after_the_last_batch_are_no_damage() {
        for zeros in [0, 100, 4096, 3 << 20] {
            let (s, valid) = scan(|l| l.resize(l.len() + zeros, 0));
            assert_eq!(s.end, valid as u64);
            assert_eq!(s.next_offset, 6);
            assert_eq!(s.damage, None, "{zeros} zeros");
        }
    }

    /// A torn batch, a flipped bit, an offset gap and data after a zeroed
    /// block are damage, each with its reason.
    #[test]
    fn torn_corrupt_or_stray_bytes_are_damage() {
        let (s, valid) = scan(|l| {
            let b = batch(6, 3);
            l.extend(&b[..b.len() - 5]);
            l.resize(l.len() + 8192, 0);
        });
        assert_eq!(s.end, valid as u64);
        assert!(matches!(
            s.damage,
            Some(TailDamage::Crc | TailDamage::Header(BatchError::Truncated { .. }))
        ));

        let (s, _) = scan(|l| {
            let b = batch(6, 3);
            l.extend(&b[..b.len() - 5]);
        });
        assert!(matches!(
            s.damage,
            Some(TailDamage::Header(BatchError::Truncated { .. }))
        ));

        let (s, valid) = scan(|l| {
            let mut b = batch(6, 1);
            let last = b.len() - 1;
            b[last] ^= 4;
            l.extend(b);
        });
        assert_eq!((s.end, s.damage), (valid as u64, Some(TailDamage::Crc)));

        let (s, _) = scan(|l| l.extend(batch(9, 1)));
        assert_eq!(
            s.damage,
            Some(TailDamage::OffsetGap {
                expected: 6,
                found: 9
            })
        );

        let (s, valid) = scan(|l| {
            l.resize(l.len() + 4096, 0);
            l.extend(batch(6, 1));
        });
        assert_eq!(s.end, valid as u64);
        assert!(matches!(s.damage, Some(TailDamage::Header(_))));
    }
}
