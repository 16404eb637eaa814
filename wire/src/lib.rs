//! `shoal-wire`: the bytes Shoal speaks, as a pure codec.
//!
//! No sockets, no executor, no disk: everything here decodes from `&[u8]`
//! and encodes into buffers the caller owns, so the broker, the client, the
//! storage engine and the perf harness share one definition of every byte.
//!
//! # Layout
//! - [`batch`]: the record batch (S1). The bytes a producer sends are the
//!   bytes on disk and the bytes a fetch returns. See `FORMAT.md`.
//! - [`error`]: codec errors and the protocol's stable [`ErrorCode`]s.

pub mod batch;
pub mod error;

pub use batch::{BatchBuilder, BatchHeader, NewRecord, BATCH_HEADER_BYTES};
pub use error::{BatchError, ErrorCode};
