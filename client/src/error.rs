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
    /// The broker does not lead the partition (`ErrorCode::NotLeader`);
    /// `hint` says where the leader is when the broker knows.
    #[error("broker error NotLeader: {message}")]
    NotLeader {
        message: String,
        hint: Option<LeaderHint>,
    },
    /// No broker could be found or reached: ZooKeeper, every bootstrap
    /// address and the discovery cache failed (each is named).
    #[error("{0}")]
    Discovery(String),
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
    /// A record was not acknowledged, for a reason the broker did not give
    /// (the connection, no broker reachable, ...) and retries did not
    /// cure: the message says what the last attempt met.
    #[error("not acknowledged: {0}")]
    Undelivered(String),
    /// A batch read from the broker failed its CRC or its record framing:
    /// the bytes are not what the producer wrote. Nothing of it was
    /// delivered, and the position stays before it.
    #[error("corrupt batch in {topic}-{partition} at offset {offset}: {source}")]
    Corrupt {
        topic: String,
        partition: u32,
        /// The batch's base offset.
        offset: u64,
        source: shoal_wire::BatchError,
    },
}

/// Where a partition's leader is, as a broker that is not its leader
/// says (`Response.leader_hint`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderHint {
    /// `None` if the broker did not know.
    pub broker_id: Option<u32>,
    pub host: String,
    /// The leader's port of the shard that owns the partition.
    pub port: u16,
    pub leader_epoch: u32,
}

impl Error {
    /// The broker's error code, if the broker answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Broker { code, .. } => Some(*code),
            Error::NotLeader { .. } => Some(ErrorCode::NotLeader),
            _ => None,
        }
    }

    /// Whether retrying the same request may succeed (after a metadata
    /// refresh where [`Self::is_routing`] says so).
    pub fn is_retriable(&self) -> bool {
        match self {
            // A stale leader epoch: the leader moved; the request is fine.
            Error::Broker {
                code: ErrorCode::FencedLeaderEpoch,
                ..
            } => true,
            Error::Broker { code, .. } => code.is_retriable(),
            Error::NotLeader { .. } | Error::Discovery(_) => true,
            Error::Io(_) | Error::Closed | Error::Connect { .. } | Error::BufferFull { .. } => true,
            _ => false,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether the failure says the cached route to a partition is wrong
    /// or dead: another leader, none right now, or a broker gone.
    pub fn is_routing(&self) -> bool {
        match self {
            Error::NotLeader { .. } | Error::Connect { .. } | Error::Closed | Error::Io(_) => true,
            Error::Broker { code, .. } => matches!(
                code,
                ErrorCode::NotOwner
                    | ErrorCode::NotLeader
                    | ErrorCode::LeaderNotAvailable
                    | ErrorCode::ClusterUnavailable
                    | ErrorCode::FencedLeaderEpoch
                    | ErrorCode::ShuttingDown
                    | ErrorCode::UnknownTopic
                    | ErrorCode::UnknownPartition
            ),
            _ => false,
        }
    }

    /// The broker does not know the topic or partition: worth one retry
    /// after a metadata refresh (the request may have gone to a broker
    /// that no longer holds it), not more.
    pub(crate) fn is_unknown_placement(&self) -> bool {
        matches!(
            self.code(),
            Some(ErrorCode::UnknownTopic | ErrorCode::UnknownPartition)
        )
    }
}
