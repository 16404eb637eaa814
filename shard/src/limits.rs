//! Every bound the storage engine works within, in one place.

use std::time::Duration;

/// O_DIRECT alignment of file positions, lengths and buffers.
pub const DIRECT_IO_ALIGN: u64 = 4096;
/// Size of one DMA write buffer; a flush writes a run of them concurrently.
pub const CHUNK_BYTES: usize = 256 * 1024;
/// Write rounds a partition keeps in flight (pipelining the disk).
pub const ROUNDS_IN_FLIGHT_MAX: usize = 4;
/// Default bytes an append may leave buffered before appenders wait for
/// the writer (the bound on a partition's write memory).
pub const WRITE_BUFFER_BYTES_DEFAULT: usize = 16 * 1024 * 1024;
/// Default largest batch accepted.
pub const BATCH_BYTES_MAX_DEFAULT: usize = 1024 * 1024;
/// Default segment size before a roll.
pub const SEGMENT_BYTES_DEFAULT: u64 = 1024 * 1024 * 1024;
/// How far ahead of the accepted bytes an active segment's file is
/// preallocated (`log/writer.rs`), and so the most disk a partition holds
/// that carries no data (none until its active segment's first append). Large enough that the extensions (each a
/// fallocate that waits for the writes in flight) are rare, about 30 a
/// second at 1 GiB/s, and that an extension started with half a step left
/// finishes long before the writer gets there (it takes well under a
/// millisecond; half a step is ~16 ms of writing at 1 GiB/s). Small enough
/// that 1,000 partitions being written reserve 32 GiB, not the 1 TiB that
/// preallocating whole 1 GiB segments took.
pub const PREALLOCATE_STEP_BYTES: u64 = 32 * 1024 * 1024;
/// Smallest segment accepted. Every segment costs three files, and while
/// open a descriptor and three mappings (issue 9 #7: 4 KiB segments
/// exhausted the descriptor limit); 1 MiB is also Redpanda's floor.
pub const SEGMENT_BYTES_MIN: u64 = 1024 * 1024;
/// Default number of closed segments per shard that keep their files open
/// (`segment::FdBudget`); colder ones are reopened when read. Leaves most
/// of a typical 65,536-descriptor limit to sockets and active segments.
pub const SEGMENT_FDS_DEFAULT: usize = 1024;
/// Index positions are `u32`: a segment (plus one batch) must fit.
pub const SEGMENT_BYTES_LIMIT: u64 = u32::MAX as u64;
/// A sparse index entry every this many bytes of log.
pub const INDEX_INTERVAL_BYTES: u64 = 4096;
/// A recovery point is checkpointed after this many new bytes, bounding
/// the bytes a crash recovery has to scan.
pub const RECOVERY_CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;
/// First pause before a failed write (a full disk, say) is retried; the
/// pause doubles with each failure up to [`WRITE_RETRY_PAUSE_MAX`]. Appends
/// are refused meanwhile, so a producer learns of the failure at once.
pub const WRITE_RETRY_PAUSE_MIN: Duration = Duration::from_millis(100);
/// Longest pause between retries of a failed write: appends resume at
/// most this long after the disk has room again.
pub const WRITE_RETRY_PAUSE_MAX: Duration = Duration::from_secs(2);
/// Producer ids remembered per partition for idempotence.
pub const PRODUCERS_MAX: usize = 4096;
/// Recent batches remembered per producer to answer retries.
pub const PRODUCER_BATCHES_KEPT: usize = 5;
/// Default memory per partition for the tail cache (`crate::tail`), used
/// only while readers wait at the end of the log.
pub const TAIL_CACHE_BYTES_DEFAULT: usize = 8 * 1024 * 1024;
/// Default memory a shard's tail caches may hold together: 32 partitions
/// with readers at their end at the default `tail_cache_bytes`.
pub const TAIL_CACHE_SHARD_BYTES_DEFAULT: usize = 256 * 1024 * 1024;
/// How far past a forward reader's position its partition keeps the log
/// on its way into the page cache (`crate::readahead`), topped up in
/// halves, so the disk works at queue depth while the socket drains what
/// arrived. Measured (issue 16: one consumer catching up on one partition
/// over loopback, 1 KiB messages, 4 MiB fetches, medians of 5 alternating
/// runs on a 2-core virtio machine): no read-ahead 189 MiB/s, 8 MiB 516,
/// 16 MiB 543, 32 MiB 737, 64 MiB 750. 32 MiB is the knee; 64 doubles the
/// page cache a reader holds for 2 %.
pub const READ_AHEAD_WINDOW_BYTES: u64 = 32 * 1024 * 1024;
/// How much of a reader's window is used before its read-ahead tops it up
/// again (one burst of advice at most this large, after the first).
pub const READ_AHEAD_STEP_BYTES: u64 = 4 * 1024 * 1024;
/// Bytes per read-ahead advice call: the kernel reads at most
/// `max(read_ahead_kb, max_sectors_kb)` per `posix_fadvise`, 1.25 MiB with
/// common defaults, so larger advice would be cut short.
pub const READ_AHEAD_ADVICE_BYTES: u64 = 1024 * 1024;
/// Read-ahead of a shard still being read from the disk, at most (one
/// advice piece: the next is advised when it has arrived). The disk serves
/// queued reads before a write that arrives after them (mq-deadline even
/// prefers reads), so this bounds how long an append's write can wait
/// behind another consumer's catch-up: with the whole window advised at
/// once, the tail consumer's p99.9 during a catch-up was 62-66 ms against
/// 26 ms without one; with this bound 19-23 ms (issue 16's closing note).
pub const READ_AHEAD_INFLIGHT_BYTES: u64 = READ_AHEAD_ADVICE_BYTES;
/// Read-ahead streams per partition: forward readers far enough apart
/// not to share one (readers close together share one stream).
pub const READ_AHEAD_STREAMS_MAX: usize = 4;
/// Default bytes a shard's streams together keep advised ahead of their
/// readers: clean page cache the kernel may reclaim, but also disk time.
pub const READ_AHEAD_SHARD_BYTES_DEFAULT: u64 = 256 * 1024 * 1024;
/// A stream unread for this long gives its share of the shard's
/// read-ahead budget back (when another stream needs it).
pub const READ_AHEAD_IDLE: Duration = Duration::from_secs(10);
/// Default retention by age: 30 days (seed 001).
pub const RETENTION_AGE_DEFAULT_MS: u64 = 30 * 24 * 3600 * 1000;

const _: () = assert!((CHUNK_BYTES as u64).is_multiple_of(DIRECT_IO_ALIGN));
const _: () = assert!(WRITE_BUFFER_BYTES_DEFAULT >= 2 * BATCH_BYTES_MAX_DEFAULT);
const _: () =
    assert!(SEGMENT_BYTES_DEFAULT + BATCH_BYTES_MAX_DEFAULT as u64 <= SEGMENT_BYTES_LIMIT);
const _: () = assert!(INDEX_INTERVAL_BYTES >= DIRECT_IO_ALIGN);
const _: () = assert!(SEGMENT_BYTES_MIN.is_multiple_of(DIRECT_IO_ALIGN));
const _: () = assert!(SEGMENT_BYTES_MIN <= SEGMENT_BYTES_DEFAULT);
const _: () = assert!(SEGMENT_BYTES_MIN >= BATCH_BYTES_MAX_DEFAULT as u64);
const _: () = assert!(SEGMENT_FDS_DEFAULT >= 1);
const _: () = assert!(PREALLOCATE_STEP_BYTES.is_multiple_of(DIRECT_IO_ALIGN));
const _: () = assert!(WRITE_RETRY_PAUSE_MIN.as_millis() <= WRITE_RETRY_PAUSE_MAX.as_millis());
// An extension is due with half a step left: one maximal batch must fit.
const _: () = assert!(PREALLOCATE_STEP_BYTES / 2 >= BATCH_BYTES_MAX_DEFAULT as u64);
const _: () = assert!(READ_AHEAD_ADVICE_BYTES.is_multiple_of(DIRECT_IO_ALIGN));
const _: () = assert!(READ_AHEAD_WINDOW_BYTES >= 2 * READ_AHEAD_ADVICE_BYTES);
const _: () = assert!(READ_AHEAD_SHARD_BYTES_DEFAULT >= READ_AHEAD_WINDOW_BYTES);
const _: () = assert!(READ_AHEAD_STREAMS_MAX >= 1);
const _: () = assert!(READ_AHEAD_INFLIGHT_BYTES >= READ_AHEAD_ADVICE_BYTES);
