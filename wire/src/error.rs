//! Errors of the codec and the wire error codes every subsystem maps to.

use thiserror::Error;

/// Why a batch was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BatchError {
    #[error("batch truncated: need {needed} bytes, have {have}")]
    Truncated { needed: usize, have: usize },
    #[error("unknown batch format magic {0}")]
    BadMagic(u8),
    #[error("invalid batch length {0}")]
    BadLength(u32),
    #[error("batch of {len} bytes exceeds the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("batch has no records")]
    Empty,
    #[error("unsupported batch attributes {0:#x}")]
    UnsupportedAttributes(u16),
    #[error("batch CRC mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { stored: u32, computed: u32 },
    #[error("malformed record: {0}")]
    BadRecord(&'static str),
}

/// Error codes carried in responses. Stable numbers: they are part of the
/// protocol contract (`wire/PROTOCOL.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    None = 0,
    Unknown = 1,
    MalformedRequest = 2,
    UnsupportedApi = 3,
    UnsupportedVersion = 4,
    FrameTooLarge = 5,
    InvalidTopicName = 10,
    UnknownTopic = 11,
    UnknownPartition = 12,
    TopicExists = 13,
    InvalidConfig = 14,
    UnknownTopicId = 15,
    CorruptBatch = 20,
    BatchTooLarge = 21,
    OffsetOutOfRange = 22,
    OutOfOrderSequence = 23,
    InvalidOffset = 24,
    StorageError = 30,
    ShuttingDown = 31,
    NotOwner = 32,
    Timeout = 33,
    ResourceLimit = 34,
    TooManyConnections = 35,
    /// This broker does not lead the partition; `Response.leader_hint`
    /// names the leader when known.
    NotLeader = 36,
    /// The partition has no live leader right now.
    LeaderNotAvailable = 37,
    /// Fewer in-sync replicas than the topic's `min_insync_replicas`.
    NotEnoughReplicas = 38,
    /// The cluster cannot answer now: ZooKeeper unreachable or no
    /// controller.
    ClusterUnavailable = 39,
    /// A request (or a replica) names a leader epoch older than the
    /// partition's current one.
    FencedLeaderEpoch = 40,
    /// The group does not know this member (never joined, left, or its
    /// session expired): the member gives up its partitions and joins again.
    UnknownMemberId = 41,
    /// The member's epoch is not its current one, or the partition is not
    /// assigned to it: the member gives up its partitions and joins again.
    FencedMemberEpoch = 42,
    /// The group coordinator is still replaying its metadata log.
    CoordinatorLoading = 43,
    /// The change needs a group without members (e.g. an offset reset).
    GroupNotEmpty = 44,
    /// No such group.
    UnknownGroup = 45,
    /// An empty or over-long group name.
    InvalidGroupId = 46,
    /// The broker requires authentication (SCRAM) before this request;
    /// the connection is closed.
    AuthenticationRequired = 47,
    /// The SCRAM exchange failed (unknown user, wrong password, replayed
    /// or malformed message); the connection is closed.
    AuthenticationFailed = 48,
    /// The authenticated principal may not do this (no ACL allows it).
    AuthorizationFailed = 49,
    /// No such user.
    UnknownUser = 50,
    /// The user exists already (create without `replace`).
    UserExists = 51,
    /// The port speaks only TLS and the connection began in plaintext;
    /// this one frame is sent in plaintext, then the connection is closed.
    TlsRequired = 52,
}

impl ErrorCode {
    pub fn from_u16(v: u16) -> ErrorCode {
        use ErrorCode::*;
        match v {
            0 => None,
            2 => MalformedRequest,
            3 => UnsupportedApi,
            4 => UnsupportedVersion,
            5 => FrameTooLarge,
            10 => InvalidTopicName,
            11 => UnknownTopic,
            12 => UnknownPartition,
            13 => TopicExists,
            14 => InvalidConfig,
            15 => UnknownTopicId,
            20 => CorruptBatch,
            21 => BatchTooLarge,
            22 => OffsetOutOfRange,
            23 => OutOfOrderSequence,
            24 => InvalidOffset,
            30 => StorageError,
            31 => ShuttingDown,
            32 => NotOwner,
            33 => Timeout,
            34 => ResourceLimit,
            35 => TooManyConnections,
            36 => NotLeader,
            37 => LeaderNotAvailable,
            38 => NotEnoughReplicas,
            39 => ClusterUnavailable,
            40 => FencedLeaderEpoch,
            41 => UnknownMemberId,
            42 => FencedMemberEpoch,
            43 => CoordinatorLoading,
            44 => GroupNotEmpty,
            45 => UnknownGroup,
            46 => InvalidGroupId,
            47 => AuthenticationRequired,
            48 => AuthenticationFailed,
            49 => AuthorizationFailed,
            50 => UnknownUser,
            51 => UserExists,
            52 => TlsRequired,
            _ => Unknown,
        }
    }

    /// Whether a client may retry the same request and expect success.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::ShuttingDown
                | ErrorCode::NotOwner
                | ErrorCode::NotLeader
                | ErrorCode::LeaderNotAvailable
                | ErrorCode::NotEnoughReplicas
                | ErrorCode::ClusterUnavailable
                | ErrorCode::FencedLeaderEpoch
                | ErrorCode::CoordinatorLoading
                | ErrorCode::Timeout
                | ErrorCode::StorageError
        )
    }
}

impl BatchError {
    pub fn code(&self) -> ErrorCode {
        match self {
            BatchError::TooLarge { .. } => ErrorCode::BatchTooLarge,
            _ => ErrorCode::CorruptBatch,
        }
    }
}
