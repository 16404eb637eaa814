//! `shoal-shard`: what one core owns on disk.
//!
//! Each partition is a [`PartitionLog`]: a directory of segments
//! (`<base offset>.log`, `.index`, `.timeindex`) plus a recovery checkpoint.
//! Everything here runs on the owning shard's glommio executor and is
//! single-threaded on purpose (`Rc`, `RefCell`): cores never share a log.
//!
//! # Tour
//! - [`log`]: the partition log, one room per job: `log/mod.rs` append
//!   (direct I/O into pending chunks) and roll, `log/writer.rs` the writer
//!   pipeline (rounds, group commit, preallocation a step ahead, retry of
//!   failed writes), `log/read.rs` reads (whole batches as a file range for
//!   sendfile or an mmap view), `log/recover.rs` open and crash recovery,
//!   `log/retention.rs` retention.
//! - [`segment`]: one segment's read side: file, mapping, indexes; closed
//!   segments open them on demand within the shard's [`FdBudget`].
//! - [`index`]: sparse offset and time indexes (in memory for the active
//!   segment, memory-mapped files for closed ones).
//! - [`tail`]: the tail cache: the newest bytes in memory files, so readers
//!   at the end of the log are served by sendfile without touching the disk.
//! - [`readahead`]: read-ahead for forward readers (fetch and push), so a
//!   consumer catching up reads at the disk's speed without the shard
//!   ever waiting for the disk; bounded per partition and per shard
//!   ([`ReadAheadBudget`]).
//! - [`checkpoint`]: the recovery point that bounds a restart's work.
//! - [`durable`]: write-then-rename, directory removal and free space,
//!   done on the blocking thread so `std::fs` never stalls the core.
//! - [`producers`]: idempotent-producer state (no duplicate on retry).
//! - [`rt`]: the seam for spawning, timers, the clock and blocking work, so
//!   shard logic can later run under a deterministic simulator.
//! - [`config`]: [`LogConfig`] and the [`SyncMode`]s with their guarantees.
//! - [`limits`]: every bound, with compile-time checks of their relations.
//!
//! The batch format itself lives in `shoal-wire` (`wire/FORMAT.md`): the
//! bytes on disk are the bytes on the wire.

pub mod checkpoint;
pub mod config;
pub mod durable;
pub mod error;
pub mod index;
pub mod limits;
pub mod log;
pub mod notify;
pub mod producers;
pub mod readahead;
pub mod rt;
pub mod segment;
pub mod tail;

pub use config::{LogConfig, SyncMode};
pub use error::{Error, Result};
pub use log::{Appended, PartitionLog, ReadSlice};
pub use notify::Notify;
pub use readahead::ReadAheadBudget;
pub use segment::FdBudget;
pub use tail::TailBudget;
