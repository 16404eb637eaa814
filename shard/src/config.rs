//! Per-partition log configuration and the sync modes (S3).

use crate::limits::*;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// When appended data reaches stable storage.
///
/// What a returned [`crate::PartitionLog::append_acked`] guarantees:
/// - `Always`: the batch is on stable storage (fdatasync done). Survives a
///   power cut. Concurrent appends share one fdatasync (group commit).
/// - `Interval(d)`: the batch is in the file (survives a crash of the
///   process, visible to readers); a background fdatasync runs every `d`,
///   so a power cut loses at most about `d` of acknowledged data.
/// - `None`: the batch is in the file; the kernel decides when it reaches
///   the disk (a power cut can lose anything not yet written back).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncMode {
    Always,
    Interval(Duration),
    None,
}

impl fmt::Display for SyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyncMode::Always => write!(f, "always"),
            SyncMode::Interval(d) => write!(f, "interval:{}", d.as_millis()),
            SyncMode::None => write!(f, "none"),
        }
    }
}

impl FromStr for SyncMode {
    type Err = String;
    fn from_str(s: &str) -> Result<SyncMode, String> {
        match s {
            "always" => Ok(SyncMode::Always),
            "none" => Ok(SyncMode::None),
            _ => {
                let ms = s.strip_prefix("interval:").ok_or_else(|| {
                    format!("invalid sync mode {s:?}: expected always, none or interval:<ms>")
                })?;
                let ms: u64 = ms
                    .parse()
                    .map_err(|_| format!("invalid sync interval {ms:?}: expected milliseconds"))?;
                if ms == 0 || ms > 3_600_000 {
                    return Err(format!("sync interval {ms} ms out of range 1..=3600000"));
                }
                Ok(SyncMode::Interval(Duration::from_millis(ms)))
            }
        }
    }
}

/// Configuration of one partition log.
#[derive(Debug, Clone)]
pub struct LogConfig {
    pub sync: SyncMode,
    /// Roll the active segment when it would grow beyond this.
    pub segment_bytes: u64,
    /// Roll the active segment when it is older than this (and not empty).
    pub segment_age: Duration,
    /// Delete closed segments whose newest record is older than this.
    pub retention_age: Option<Duration>,
    /// Delete the oldest closed segments while the log is larger than this.
    pub retention_bytes: Option<u64>,
    /// Largest batch accepted.
    pub batch_bytes_max: usize,
    /// Buffered bytes before appenders wait for the writer.
    pub write_buffer_bytes: usize,
    /// Memory for the newest bytes, served to readers at the end of the
    /// log without a disk read (`crate::tail`); 0 turns the cache off.
    pub tail_cache_bytes: usize,
    /// Lifts [`SEGMENT_BYTES_MIN`] for tests that need many rolls of
    /// little data. Never set outside tests.
    #[doc(hidden)]
    pub test_segments: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            sync: SyncMode::Interval(Duration::from_millis(100)),
            segment_bytes: SEGMENT_BYTES_DEFAULT,
            segment_age: Duration::from_secs(7 * 24 * 3600),
            retention_age: Some(Duration::from_millis(RETENTION_AGE_DEFAULT_MS)),
            retention_bytes: None,
            batch_bytes_max: BATCH_BYTES_MAX_DEFAULT,
            write_buffer_bytes: WRITE_BUFFER_BYTES_DEFAULT,
            tail_cache_bytes: TAIL_CACHE_BYTES_DEFAULT,
            test_segments: false,
        }
    }
}

impl LogConfig {
    /// Largest a segment file of this configuration gets: a segment rolls
    /// before a batch would take it past `segment_bytes`, unless it is
    /// empty; direct I/O rounds it up to a block.
    pub fn segment_file_bytes_max(&self) -> u64 {
        (self.segment_bytes + self.batch_bytes_max as u64).div_ceil(DIRECT_IO_ALIGN)
            * DIRECT_IO_ALIGN
    }

    /// Most disk a partition of this configuration takes beyond its batches
    /// and the index files of its closed segments, once it is written to:
    /// the preallocated lead of its active segment
    /// ([`PREALLOCATE_STEP_BYTES`]), the recovery checkpoint and the
    /// temporary that replaces it, and the probe file. The worst case of a
    /// partition that takes appends; one never written takes only
    /// [`Self::created_bytes_max`], since an active segment reserves its
    /// lead with its first accepted batch, not when it is created or
    /// rolled.
    pub fn reserved_bytes_max(&self) -> u64 {
        let file_max = self.segment_file_bytes_max();
        let lead = (PREALLOCATE_STEP_BYTES + DIRECT_IO_ALIGN).min(file_max);
        let checkpoints = 2 * crate::checkpoint::encoded_bytes_max(file_max);
        lead + checkpoints + DIRECT_IO_ALIGN
    }

    /// Most disk a new partition takes before its first append: its
    /// directory, an empty segment file (no block: nothing is preallocated
    /// yet), the checkpoint of an empty log and the temporary that replaces
    /// it, and the probe file, a block each. What a topic's creation needs
    /// per partition: the broker can refuse a topic whose partitions could
    /// not even be created in the free space
    /// ([`crate::durable::free_bytes`]); each partition's writes then need
    /// their own bytes plus up to [`Self::reserved_bytes_max`].
    pub fn created_bytes_max(&self) -> u64 {
        let empty = crate::checkpoint::Checkpoint::default().encode().len() as u64;
        let checkpoint = empty.div_ceil(DIRECT_IO_ALIGN);
        // Directory, probe file, checkpoint and its temporary.
        (2 + 2 * checkpoint) * DIRECT_IO_ALIGN
    }

    /// Checks the relations between the bounds.
    pub fn validate(&self) -> Result<(), String> {
        if self.batch_bytes_max < wire_header() {
            return Err("batch_bytes_max is smaller than a batch header".into());
        }
        let segment_min = if self.test_segments {
            DIRECT_IO_ALIGN
        } else {
            SEGMENT_BYTES_MIN
        };
        if self.segment_bytes < segment_min {
            return Err(format!(
                "segment_bytes {} is below the minimum of {segment_min} ({} KiB): every \
                 segment costs three files and, while open, a file descriptor",
                self.segment_bytes,
                segment_min / 1024
            ));
        }
        if self.segment_bytes + self.batch_bytes_max as u64 > SEGMENT_BYTES_LIMIT {
            return Err(format!(
                "segment_bytes + batch_bytes_max must not exceed {SEGMENT_BYTES_LIMIT}"
            ));
        }
        if self.write_buffer_bytes < 2 * self.batch_bytes_max + CHUNK_BYTES {
            return Err("write_buffer_bytes must hold two maximal batches and a chunk".into());
        }
        Ok(())
    }
}

fn wire_header() -> usize {
    shoal_wire::BATCH_HEADER_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn sync_mode_parses_and_prints() {
        for s in ["always", "none", "interval:250"] {
            assert_eq!(s.parse::<SyncMode>().unwrap().to_string(), s);
        }
        assert!("interval:".parse::<SyncMode>().is_err());
        assert!("interval:0".parse::<SyncMode>().is_err());
        assert!("sometimes".parse::<SyncMode>().is_err());
    }
    #[test]
    fn default_config_is_valid() {
        LogConfig::default().validate().unwrap();
        let c = LogConfig {
            segment_bytes: u64::from(u32::MAX),
            ..LogConfig::default()
        };
        assert!(c.validate().is_err());
    }
    /// Tiny segments are refused with a message that says why (issue 9 #7:
    /// 4 KiB segments were accepted and ran the broker out of descriptors).
    #[test]
    fn tiny_segments_are_refused() {
        let tiny = LogConfig {
            segment_bytes: 4096,
            ..LogConfig::default()
        };
        let e = tiny.validate().unwrap_err();
        assert!(e.contains("below the minimum of 1048576"), "{e}");
        let floor = LogConfig {
            segment_bytes: SEGMENT_BYTES_MIN,
            ..LogConfig::default()
        };
        floor.validate().unwrap();
    }
}
