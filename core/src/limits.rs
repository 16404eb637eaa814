//! Every bound the broker works within, in one place (the storage engine's
//! own are in `shoal_shard::limits`). Relations between bounds are checked
//! at compile time below, or at start-up in [`check_config`] for the ones a
//! configuration can move.

use crate::config::Config;
use crate::error::{Error, Result};
use std::time::Duration;

// ---- connections -----------------------------------------------------------

/// Largest fetch/push payload in one frame.
pub const FETCH_BYTES_MAX: u32 = 4 * 1024 * 1024;
/// Longest long-poll a client may ask for.
pub const MAX_WAIT_MAX: Duration = Duration::from_secs(60);
/// Fetches a connection may have waiting at once; past this they are
/// served one after another.
pub const FETCHES_IN_FLIGHT_MAX: usize = 64;
/// Produce acknowledgements a connection may have pending at once; past
/// this the next produce is answered before the loop reads on.
pub const PRODUCES_IN_FLIGHT_MAX: usize = 64;
/// Subscriptions per connection.
pub const SUBSCRIPTIONS_MAX: usize = 1024;
/// Longest a push subscription at the end of its log waits before it looks
/// again. It wakes at once for data, credit or cancellation; this only
/// bounds a wait nothing ended. Below the tail cache's interest window
/// (10 s), so an idle follower keeps the newest batches in memory.
pub const PUSH_IDLE_WAIT: Duration = Duration::from_secs(5);
/// A connection's receive buffer when it opens: an idle connection costs
/// this much. The buffer grows towards a frame's announced size only as the
/// frame's bytes arrive (at most doubling what has arrived), so an
/// announced size commits no memory.
pub const RECV_BUFFER_INITIAL_BYTES: usize = 4096;
/// Up to this size a receive buffer grows freely (when reads keep filling
/// it, so pipelined small requests are read in few system calls); beyond
/// it, growth is drawn from the shard's partial-frame budget.
pub const RECV_BUFFER_BASE_BYTES: usize = 64 * 1024;
/// A receive buffer grown past this is given back once its frame is
/// served.
pub const RECV_BUFFER_KEEP_BYTES: usize = 1024 * 1024;
/// Default budget, per shard, for the bytes of receive buffers beyond
/// their base size (partial and large frames). A connection that needs
/// more waits until others free some or its frame times out.
pub const PARTIAL_FRAMES_BYTES_MAX_DEFAULT: usize = 256 * 1024 * 1024;
/// Default time a frame may take from its first byte to its last before
/// the connection is closed (`request_timeout_ms`).
pub const REQUEST_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Default time a connection's outbound data may make no progress before
/// the connection is closed (`slow_consumer_timeout_ms`).
pub const SLOW_CONSUMER_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Default open connections, split evenly over shards.
pub const CONNECTIONS_MAX_DEFAULT: usize = 10_000;
/// Smallest `frame_bytes_max` a configuration may set.
pub const FRAME_BYTES_MAX_MIN: usize = 64 * 1024;
/// On a TLS connection, log bytes are read into memory this much at a
/// time to be encrypted (no kTLS: see `conn::writer`); the buffer is one
/// per connection that reads, allocated at its first read and kept, so
/// it is sized for many connections (10,000 readers: 640 MiB) rather than
/// for the fewest system calls: one `pread` of 64 KiB from the page cache
/// costs a few µs next to the tens of µs of encrypting it, and rustls cuts
/// every write into 16 KiB records anyway.
pub const TLS_COPY_PIECE_BYTES: usize = 64 * 1024;

// ---- between cores ---------------------------------------------------------

/// Messages queued between two shards before a sender waits.
pub const MESH_CHANNEL_CAPACITY: usize = 1024;
/// Ordered messages (produces) a shard holds in its per-partition lanes
/// before it stops taking more off the mesh: the bound on a receiving
/// shard's queued cross-core produce memory is this times the frame size.
pub const MESH_LANE_QUEUED_MAX: usize = 256;

// ---- partitions and topics -------------------------------------------------

/// Longest a fetch waits (yielding) for its log bytes to reach the page
/// cache before sending them anyway.
pub const RESIDENT_WAIT_MAX: Duration = Duration::from_millis(100);
/// Partitions a shard opens (or closes) at once when it starts (or stops).
pub const PARTITION_OPENS_IN_FLIGHT_MAX: usize = 64;
/// Longest topic name, in bytes.
pub const TOPIC_NAME_BYTES_MAX: usize = 200;
/// Most partitions a topic may have.
pub const PARTITIONS_MAX: u32 = 1024;

// ---- metrics ---------------------------------------------------------------

/// Appends remembered per partition to time batches from append to send
/// (the e2e histogram): a consumer more than this many batches behind is
/// not timed.
pub const APPEND_CLOCK_SLOTS: usize = 64;
/// Longest HTTP request head `GET /metrics` reads.
pub const METRICS_REQUEST_BYTES_MAX: usize = 8 * 1024;
/// Longest a scrape may take to send its request, or to read its answer;
/// scrapes are served one at a time, so a stuck one holds up the next this
/// long at most.
pub const METRICS_IO_TIMEOUT: Duration = Duration::from_secs(5);

const _: () = assert!(RECV_BUFFER_INITIAL_BYTES >= shoal_wire::frame::FRAME_PREFIX_BYTES);
const _: () = assert!(RECV_BUFFER_INITIAL_BYTES <= RECV_BUFFER_BASE_BYTES);
const _: () = assert!(RECV_BUFFER_BASE_BYTES <= RECV_BUFFER_KEEP_BYTES);
const _: () = assert!(FRAME_BYTES_MAX_MIN >= RECV_BUFFER_BASE_BYTES);
const _: () = assert!(FRAME_BYTES_MAX_MIN >= shoal_wire::frame::HEADER_BYTES_MAX);
const _: () = assert!(shoal_wire::frame::FRAME_BYTES_MAX_DEFAULT >= FRAME_BYTES_MAX_MIN);
const _: () = assert!(
    shoal_wire::frame::FRAME_BYTES_MAX_DEFAULT
        >= shoal_shard::limits::BATCH_BYTES_MAX_DEFAULT
            + shoal_wire::frame::HEADER_BYTES_MAX
            + shoal_wire::frame::FRAME_PREFIX_BYTES
);
const _: () =
    assert!(PARTIAL_FRAMES_BYTES_MAX_DEFAULT >= shoal_wire::frame::FRAME_BYTES_MAX_DEFAULT);
const _: () = assert!(FETCH_BYTES_MAX as usize >= shoal_shard::limits::BATCH_BYTES_MAX_DEFAULT);
const _: () = assert!(MESH_LANE_QUEUED_MAX <= MESH_CHANNEL_CAPACITY);

/// The relations a configuration could break, checked before a broker
/// starts.
pub fn check_config(c: &Config) -> Result<()> {
    let bad = |m: String| Err(Error::Config(m));
    if c.frame_bytes_max < FRAME_BYTES_MAX_MIN {
        return bad(format!(
            "frame_bytes_max must be at least {FRAME_BYTES_MAX_MIN}"
        ));
    }
    // A produce frame must be able to carry the largest batch the logs
    // accept, with its request header.
    let batch_frame = shoal_shard::limits::BATCH_BYTES_MAX_DEFAULT
        + shoal_wire::frame::HEADER_BYTES_MAX
        + shoal_wire::frame::FRAME_PREFIX_BYTES;
    if c.frame_bytes_max < batch_frame {
        return bad(format!(
            "frame_bytes_max {} cannot carry a batch of the largest size ({} bytes with its header)",
            c.frame_bytes_max, batch_frame
        ));
    }
    // Otherwise one largest frame could never be received.
    if c.partial_frames_bytes_max < c.frame_bytes_max {
        return bad(format!(
            "partial_frames_bytes_max {} must be at least frame_bytes_max {}",
            c.partial_frames_bytes_max, c.frame_bytes_max
        ));
    }
    if c.request_timeout.is_zero() {
        return bad("request_timeout_ms must be above 0".into());
    }
    if c.slow_consumer_timeout.is_zero() {
        return bad("slow_consumer_timeout_ms must be above 0".into());
    }
    if c.connections_max < c.cores.len() {
        return bad(format!(
            "connections_max {} is below one per shard ({})",
            c.connections_max,
            c.cores.len()
        ));
    }
    Ok(())
}

/// Bounds on how long an acks=all produce waits for its replicas (the
/// request's `timeout_ms`, clamped): never forever, never so short that a
/// follower's round trip cannot make it.
pub const ACKS_ALL_TIMEOUT_MIN: Duration = Duration::from_millis(100);
pub const ACKS_ALL_TIMEOUT_MAX: Duration = Duration::from_secs(300);
