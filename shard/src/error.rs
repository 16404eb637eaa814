//! Storage errors, each mapping to a wire error code.

use shoal_wire::{BatchError, ErrorCode};
use std::io;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("invalid batch: {0}")]
    Batch(#[from] BatchError),
    #[error("offset {offset} is out of range: the log holds [{start}, {end})")]
    OffsetOutOfRange { offset: u64, start: u64, end: u64 },
    #[error("batch base offset {got} does not follow the log end {expected}")]
    OffsetMismatch { expected: u64, got: u64 },
    #[error("producer {producer_id}: sequence {got} out of order (expected {expected})")]
    OutOfOrderSequence {
        producer_id: i64,
        expected: i32,
        got: i32,
    },
    #[error("producer {producer_id}: epoch {got} is older than {current}")]
    FencedProducer {
        producer_id: i64,
        current: i16,
        got: i16,
    },
    #[error("the log is closed")]
    Closed,
    #[error("storage I/O failed: {0}")]
    Io(#[from] io::Error),
    /// A write, fdatasync or roll failed (a full disk, say). Retriable:
    /// the log retries on its own and takes appends again once that works.
    #[error("storage write failed, appends are refused until a retry succeeds: {0}")]
    Poisoned(String),
    #[error("corrupt storage: {0}")]
    Corrupt(String),
    #[error("invalid log configuration: {0}")]
    Config(String),
}

impl From<glommio::GlommioError<()>> for Error {
    fn from(e: glommio::GlommioError<()>) -> Self {
        Error::Io(e.into())
    }
}

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::Batch(b) => b.code(),
            Error::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
            Error::OffsetMismatch { .. } => ErrorCode::InvalidOffset,
            Error::OutOfOrderSequence { .. } | Error::FencedProducer { .. } => {
                ErrorCode::OutOfOrderSequence
            }
            Error::Closed => ErrorCode::ShuttingDown,
            Error::Config(_) => ErrorCode::InvalidConfig,
            Error::Io(_) | Error::Poisoned(_) | Error::Corrupt(_) => ErrorCode::StorageError,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
