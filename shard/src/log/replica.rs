//! What replication needs of a log: leader epochs, the high watermark and
//! an exact, crash-safe truncation.
//!
//! - **Leader epochs.** Every batch carries the epoch of the leader that
//!   appended it. `leader-epoch.ckpt` lists, per epoch, the offset it
//!   starts at (Kafka's leader-epoch checkpoint). An entry is written
//!   (write-then-rename) *before* the first batch of its epoch is accepted,
//!   so the file never misses an epoch the log has; an entry past the log's
//!   end after a crash is dropped on open. A replica asks its leader where
//!   its last epoch ends ([`PartitionLog::epoch_end`]) and truncates there.
//! - **High watermark.** What consumers may read: reads, long-polls and the
//!   reported high watermark stop at it. Unset (a single node, or a
//!   partition never replicated) it is the log's end, as before
//!   replication; `u64::MAX` makes it follow the end. Checkpointed in
//!   `high-watermark.ckpt` when asked to.
//! - **Truncation.** [`PartitionLog::truncate_to`] records its intent
//!   durably (`truncate.intent`), closes the log cleanly, cuts the files
//!   (later segments deleted, the segment holding the offset cut at the
//!   batch boundary, the recovery checkpoint rewritten so the cut segment
//!   is scanned again, the idempotent-producer state cut to the offset),
//!   removes the intent and opens the log's state again in place. An open
//!   that finds the intent finishes the cut first: a crash at any point
//!   leaves the log either as it was or cut, never between.

use super::{writer, PartitionLog};
use crate::checkpoint::{self, Checkpoint};
use crate::durable;
use crate::error::{Error, Result};
use crate::producers::ProducerTable;
use crate::rt;
use crate::segment;
use shoal_wire::batch::BatchHeader;
use shoal_wire::BATCH_HEADER_BYTES;
use std::path::Path;

pub const EPOCHS_FILE: &str = "leader-epoch.ckpt";
pub const HW_FILE: &str = "high-watermark.ckpt";
pub const TRUNCATE_INTENT_FILE: &str = "truncate.intent";

/// Replication state of a log, beside its write state (kept across a
/// truncation's reopen).
#[derive(Debug, Default)]
pub(super) struct ReplicaState {
    /// (epoch, start offset), ascending in both.
    pub epochs: Vec<(u32, u64)>,
    /// The epoch `append` stamps on batches.
    pub stamp: u32,
    /// `None`: the log's end.
    pub hw: Option<u64>,
    /// The high watermark last written to its file.
    pub hw_saved: Option<u64>,
}

fn encode_epochs(epochs: &[(u32, u64)]) -> Vec<u8> {
    let mut s = String::from("1\n");
    for (e, o) in epochs {
        s.push_str(&format!("{e} {o}\n"));
    }
    s.into_bytes()
}

fn decode_epochs(bytes: &[u8]) -> Option<Vec<(u32, u64)>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut lines = text.lines();
    if lines.next()? != "1" {
        return None;
    }
    let mut out: Vec<(u32, u64)> = Vec::new();
    for l in lines {
        let (e, o) = l.split_once(' ')?;
        let (e, o) = (e.parse().ok()?, o.parse().ok()?);
        if out.last().is_some_and(|&(le, lo)| e <= le || o < lo) {
            return None;
        }
        out.push((e, o));
    }
    Some(out)
}

/// The replication state of the log in `dir` as its files say, fitted to
/// a log of offsets `[start, next)`. A log with batches but no epoch file
/// predates epochs: its batches were all appended as epoch 0 (nothing
/// stamped another), and reading its first batch here would open a
/// closed segment at every start.
pub(super) fn load(dir: &Path, start: u64, next: u64) -> ReplicaState {
    let mut epochs = match std::fs::read(dir.join(EPOCHS_FILE)) {
        Ok(b) => decode_epochs(&b).unwrap_or_else(|| {
            tracing::warn!(dir = %dir.display(), "unreadable leader-epoch checkpoint; rebuilt from the first batch");
            Vec::new()
        }),
        Err(_) => Vec::new(),
    };
    epochs.retain(|&(_, o)| o <= next);
    if epochs.is_empty() && next > start {
        epochs.push((0, start));
    }
    let hw = read_hw(dir).map(|h| h.min(next));
    ReplicaState {
        stamp: epochs.last().map_or(0, |e| e.0),
        epochs,
        hw,
        hw_saved: hw,
    }
}

/// The high watermark file's value, if it is there and readable.
fn read_hw(dir: &Path) -> Option<u64> {
    std::fs::read_to_string(dir.join(HW_FILE))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// The largest epoch `<= epoch` in `epochs` and where it ends (the next
/// entry's start, or `next`).
pub fn epoch_end_in(epochs: &[(u32, u64)], epoch: u32, next: u64) -> Option<(u32, u64)> {
    let i = epochs.iter().rposition(|&(e, _)| e <= epoch)?;
    let end = epochs.get(i + 1).map_or(next, |&(_, o)| o);
    Some((epochs[i].0, end))
}

impl PartitionLog {
    /// This replica leads from now on at `epoch`: the epoch is recorded
    /// (durably, starting at the log's end) and stamped on every batch
    /// `append` accepts. An epoch older than the log's last is refused.
    pub async fn set_leader_epoch(&self, epoch: u32) -> Result<()> {
        let last = self.last_epoch();
        if last.is_some_and(|l| epoch < l) {
            return Err(Error::Config(format!(
                "leader epoch {epoch} is older than the log's last epoch {}",
                last.unwrap_or(0)
            )));
        }
        if last.is_none() && epoch == 0 {
            // A log without epochs that starts at epoch 0 needs no file:
            // opening a log with batches and no epoch file seeds exactly
            // this entry. A new topic's leader so takes its role without
            // waiting for the disk, and takes writes at once.
            let start = self.next_offset();
            self.inner.replica.borrow_mut().epochs.push((0, start));
        } else if last != Some(epoch) {
            self.record_epoch(epoch, self.next_offset()).await?;
        }
        self.inner.replica.borrow_mut().stamp = epoch;
        Ok(())
    }

    /// Adds `(epoch, start)` to the epoch file, durably.
    pub(super) async fn record_epoch(&self, epoch: u32, start: u64) -> Result<()> {
        let bytes = {
            let mut r = self.inner.replica.borrow_mut();
            r.epochs.retain(|&(_, o)| o < start);
            r.epochs.push((epoch, start));
            encode_epochs(&r.epochs)
        };
        durable::write_durably(&self.inner.dir, EPOCHS_FILE, bytes).await?;
        Ok(())
    }

    /// The epoch of the last entry of the epoch file (`None`: no batch has
    /// an epoch yet, or the log predates epochs and is empty).
    pub fn last_epoch(&self) -> Option<u32> {
        self.inner.replica.borrow().epochs.last().map(|e| e.0)
    }

    /// The epoch `append` stamps.
    pub fn leader_epoch(&self) -> u32 {
        self.inner.replica.borrow().stamp
    }

    /// The largest epoch `<= epoch` this log has, and the offset where it
    /// ends here; `None` if every epoch here is newer.
    pub fn epoch_end(&self, epoch: u32) -> Option<(u32, u64)> {
        epoch_end_in(
            &self.inner.replica.borrow().epochs,
            epoch,
            self.next_offset(),
        )
    }

    /// Sets what consumers may read up to (`u64::MAX`: the log's end).
    /// Wakes long-polling readers when it moves.
    pub fn set_high_watermark(&self, hw: u64) {
        let before = self.high_watermark();
        self.inner.replica.borrow_mut().hw = Some(hw);
        if self.high_watermark() != before {
            self.inner.progress.notify_all();
        }
    }

    /// What consumers may read up to: the high watermark where one is set,
    /// never past the written end.
    pub fn high_watermark(&self) -> u64 {
        let written = self.inner.st.borrow().written_next;
        self.inner
            .replica
            .borrow()
            .hw
            .map_or(written, |h| h.min(written))
    }

    /// Writes the high watermark to its file if it moved since the last
    /// write (a log whose high watermark was never set writes nothing).
    pub async fn checkpoint_high_watermark(&self) -> Result<()> {
        let hw = {
            let r = self.inner.replica.borrow();
            if r.hw.is_none() {
                return Ok(());
            }
            drop(r);
            self.high_watermark()
        };
        if self.inner.replica.borrow().hw_saved == Some(hw) {
            return Ok(());
        }
        durable::write_durably(&self.inner.dir, HW_FILE, format!("{hw}\n").into_bytes()).await?;
        self.inner.replica.borrow_mut().hw_saved = Some(hw);
        Ok(())
    }

    /// Removes everything at or past `offset` (a batch boundary): exact and
    /// crash-safe (see the module docs). Below the log's start the log
    /// becomes empty and continues at `offset`. Epoch entries starting at
    /// or past `offset` go too (also when nothing else does). The caller
    /// appends nothing meanwhile; appends that race it fail.
    pub async fn truncate_to(&self, offset: u64) -> Result<()> {
        let next = self.next_offset();
        if offset >= next {
            // Nothing to cut but an epoch begun at the end with no batch
            // (a leader that wrote nothing in it).
            let stale = offset == next
                && self
                    .inner
                    .replica
                    .borrow()
                    .epochs
                    .iter()
                    .any(|&(_, o)| o >= offset);
            if stale {
                self.cut_epochs(offset).await?;
            }
            return Ok(());
        }
        if offset > self.start_offset() {
            let s = self.read_replica(offset, 1)?;
            if s.first_offset != offset {
                return Err(Error::Config(format!(
                    "cannot truncate at {offset}: the batch there starts at {}",
                    s.first_offset
                )));
            }
        }
        self.cut(offset, false).await
    }

    /// Empties the log, which then continues at `offset` (a follower whose
    /// leader no longer holds what it lacks: retention deleted it). Crash-
    /// safe like [`Self::truncate_to`].
    pub async fn start_over_at(&self, offset: u64) -> Result<()> {
        self.cut(offset, true).await
    }

    async fn cut(&self, offset: u64, start_over: bool) -> Result<()> {
        let inner = self.inner.clone();
        let dir = inner.dir.clone();
        let intent = if start_over {
            format!("start {offset}\n")
        } else {
            format!("{offset}\n")
        };
        durable::write_durably(&dir, TRUNCATE_INTENT_FILE, intent.into_bytes()).await?;
        self.shutdown().await?;
        let bmax = inner.config.batch_bytes_max;
        let applied = {
            let dir = dir.clone();
            rt::spawn_blocking(move || apply_truncation(&dir, offset, bmax, start_over)).await
        };
        // Reopened whatever happened: a cut that failed halfway is finished
        // by the open (the intent is still there) or fails it again.
        let (state, replica) =
            super::recover::open_state(&dir, &inner.config, inner.budget.clone()).await?;
        *inner.st.borrow_mut() = state;
        *inner.replica.borrow_mut() = replica;
        *inner.read_ahead.borrow_mut() =
            crate::readahead::ReadAhead::new(crate::readahead::ReadAheadBudget::shard_default());
        inner.generation.set(inner.generation.get() + 1);
        writer::start(&inner);
        inner.progress.notify_all();
        inner.space.notify_all();
        applied?;
        tracing::info!(dir = %dir.display(), offset, start_over, "log truncated");
        Ok(())
    }

    async fn cut_epochs(&self, offset: u64) -> Result<()> {
        let bytes = {
            let mut r = self.inner.replica.borrow_mut();
            r.epochs.retain(|&(_, o)| o < offset);
            r.stamp = r.epochs.last().map_or(0, |e| e.0);
            encode_epochs(&r.epochs)
        };
        durable::write_durably(&self.inner.dir, EPOCHS_FILE, bytes).await?;
        Ok(())
    }
}

/// Cuts the files of the closed log in `dir` at `offset` (see
/// [`PartitionLog::truncate_to`]); idempotent, so an open that finds the
/// intent can run it again after a crash at any point.
pub(super) fn apply_truncation(
    dir: &Path,
    offset: u64,
    bmax: usize,
    start_over: bool,
) -> Result<()> {
    let bases = super::recover::list_segments(dir)?;
    let remove_segment =
        |base: u64| durable::remove_files_blocking(&segment::segment_paths(dir, base));
    let ckpt = Checkpoint::load(dir);
    let mut producers = ckpt.map(|c| c.producers).unwrap_or_default();
    let keep = if start_over {
        None
    } else {
        bases.iter().rposition(|&b| b <= offset)
    };
    let target = match keep {
        None => {
            // Below the log's start (or starting over): empty, continuing
            // at `offset`.
            for &b in &bases {
                remove_segment(b)?;
            }
            std::fs::File::create(segment::log_path(dir, offset))?;
            producers = ProducerTable::default();
            offset
        }
        Some(i) => {
            for &b in &bases[i + 1..] {
                remove_segment(b)?;
            }
            bases[i]
        }
    };
    // Cut the target segment at the batch starting at `offset`.
    let path = segment::log_path(dir, target);
    let bytes = std::fs::read(&path)?;
    let mut pos = 0usize;
    let mut at = target;
    while at < offset {
        if pos + BATCH_HEADER_BYTES > bytes.len() {
            break;
        }
        let h = BatchHeader::decode(&bytes[pos..])?;
        if h.batch_len == 0 || h.base_offset != at || h.batch_len as usize > bmax {
            break;
        }
        pos += h.batch_len as usize;
        at = h.next_offset();
    }
    if at != offset && at < offset && pos < bytes.len() {
        return Err(Error::Corrupt(format!(
            "cannot truncate {} at {offset}: the batches there end at {at}",
            path.display()
        )));
    }
    if at > offset {
        return Err(Error::Corrupt(format!(
            "cannot truncate {} at {offset}: not a batch boundary",
            path.display()
        )));
    }
    let f = std::fs::OpenOptions::new().write(true).open(&path)?;
    f.set_len(pos as u64)?;
    f.sync_all()?;
    drop(f);
    // The cut segment is the active one now: its index is rebuilt by the
    // open's scan, and so is the producer state of its batches.
    for p in [
        segment::offset_index_path(dir, target),
        segment::time_index_path(dir, target),
    ] {
        let _ = std::fs::remove_file(p);
    }
    producers.truncate_to(target);
    let ck = Checkpoint {
        clean: false,
        active_base: target,
        recovery_pos: 0,
        next_offset: target,
        max_timestamp: None,
        offset_index: Vec::new(),
        time_index: Vec::new(),
        producers,
    };
    durable::write_durably_blocking(dir, checkpoint::FILE_NAME, &ck.encode())?;
    if let Ok(b) = std::fs::read(dir.join(EPOCHS_FILE)) {
        if let Some(mut epochs) = decode_epochs(&b) {
            epochs.retain(|&(_, o)| o < offset && !start_over);
            durable::write_durably_blocking(dir, EPOCHS_FILE, &encode_epochs(&epochs))?;
        }
    }
    if let Some(hw) = read_hw(dir) {
        if hw > offset || start_over {
            durable::write_durably_blocking(dir, HW_FILE, format!("{offset}\n").as_bytes())?;
        }
    }
    std::fs::remove_file(dir.join(TRUNCATE_INTENT_FILE))?;
    durable::sync_dir_blocking(dir)?;
    Ok(())
}

/// Finishes a truncation a crash interrupted, before the log opens.
pub(super) fn finish_interrupted(dir: &Path, bmax: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(dir.join(TRUNCATE_INTENT_FILE)) else {
        return Ok(());
    };
    let (start_over, number) = match text.trim().strip_prefix("start ") {
        Some(n) => (true, n),
        None => (false, text.trim()),
    };
    match number.parse::<u64>() {
        Ok(offset) => {
            tracing::warn!(dir = %dir.display(), offset, start_over, "finishing a truncation a crash interrupted");
            apply_truncation(dir, offset, bmax, start_over)
        }
        Err(_) => {
            // Written whole or not at all (write-then-rename): unreadable
            // means a foreign file; the log was not touched yet.
            tracing::warn!(dir = %dir.display(), "ignoring an unreadable truncation intent");
            std::fs::remove_file(dir.join(TRUNCATE_INTENT_FILE))?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_ends() {
        let e = [(0, 0), (3, 10), (5, 25)];
        assert_eq!(epoch_end_in(&e, 0, 40), Some((0, 10)));
        assert_eq!(epoch_end_in(&e, 2, 40), Some((0, 10)));
        assert_eq!(epoch_end_in(&e, 3, 40), Some((3, 25)));
        assert_eq!(epoch_end_in(&e, 4, 40), Some((3, 25)));
        assert_eq!(epoch_end_in(&e, 9, 40), Some((5, 40)));
        assert_eq!(epoch_end_in(&[(2, 5)], 1, 40), None);
    }

    #[test]
    fn epoch_file_round_trip_and_refusals() {
        let e = vec![(0, 0), (3, 10)];
        assert_eq!(decode_epochs(&encode_epochs(&e)), Some(e));
        assert_eq!(decode_epochs(b"1\n3 10\n2 20\n"), None, "epochs go up");
        assert_eq!(decode_epochs(b"2\n"), None, "unknown version");
    }
}
