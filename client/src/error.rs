//! Client errors.

use shoal_wire::ErrorCode;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("connection to {addr} failed: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("broker error {code:?}: {message}")]
    Broker { code: ErrorCode, message: String },
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("the connection is closed")]
    Closed,
    #[error("{0}")]
    Invalid(String),
    /// The producer's buffer stayed full for all of `buffer_wait_max`:
    /// records are accepted faster than the broker acknowledges them.
    #[error("the producer's buffer of {bytes_max} bytes stayed full for the whole wait")]
    BufferFull { bytes_max: usize },
    /// One record larger than the producer's whole buffer: it could never
    /// be accepted, however long it waited.
    #[error("a record of {bytes} bytes cannot fit the producer's buffer of {bytes_max} bytes")]
    RecordTooLarge { bytes: usize, bytes_max: usize },
}

impl Error {
    /// The broker's error code, if the broker answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Broker { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether retrying the same request may succeed.
    pub fn is_retriable(&self) -> bool {
        match self {
            Error::Broker { code, .. } => code.is_retriable(),
            Error::Io(_) | Error::Closed | Error::Connect { .. } | Error::BufferFull { .. } => true,
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
