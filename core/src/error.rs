//! The broker's errors: one enum, each variant mapping to the wire
//! [`ErrorCode`] a client receives, its `Display` the message sent with it.
//! Errors cross cores inside mesh replies, so the type is `Send`.

use shoal_wire::ErrorCode;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    #[error("topic {topic:?} has no partition {partition} (it has {count})")]
    UnknownPartition {
        topic: String,
        partition: u32,
        count: u32,
    },
    #[error("partition {topic}-{partition} is owned by another shard")]
    NotOwner { topic: String, partition: u32 },
    #[error("the owning shard is not answering (shutting down)")]
    ShardGone,
    #[error("{0}")]
    InvalidTopicName(String),
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    #[error("{0}")]
    InvalidConfig(String),
    #[error("{0}")]
    Malformed(String),
    #[error("invalid batch {index} of the request: {source}")]
    InvalidBatch {
        index: usize,
        source: shoal_wire::BatchError,
    },
    #[error("{0}")]
    Frame(#[from] shoal_wire::frame::FrameError),
    /// A framing error: the byte stream cannot be trusted any more.
    #[error("{0}; closing the connection")]
    BadFrame(shoal_wire::frame::FrameError),
    #[error("request frame not complete within {ms} ms; closing the connection")]
    RequestTimeout { ms: u64 },
    #[error("unknown request type {0}")]
    UnsupportedApi(u8),
    #[error("protocol version {0} is not supported (1 is)")]
    UnsupportedVersion(u16),
    #[error("{0}")]
    ResourceLimit(String),
    #[error("topic {topic:?} may need {needed_bytes} bytes of disk, only {free_bytes} are free")]
    NoSpace {
        topic: String,
        needed_bytes: u64,
        free_bytes: u64,
    },
    #[error("the broker is at its limit of {limit} connections per shard; try again later")]
    TooManyConnections { limit: usize },
    #[error("topic {topic:?} has id {current}, not {asked}: it was deleted (and maybe re-created); refresh metadata")]
    UnknownTopicId {
        topic: String,
        asked: u64,
        current: u64,
    },
    #[error("{0}")]
    Storage(#[from] shoal_shard::Error),
    #[error("partition {partition}: {source}")]
    Partition {
        partition: String,
        source: shoal_shard::Error,
    },
    #[error("cannot {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// A configuration that cannot run (start-up only).
    #[error("{0}")]
    Config(String),
    #[error("this broker does not lead {topic}-{partition}{}", match .leader { Some(l) => format!("; broker {l} does (leader epoch {leader_epoch})"), None => String::new() })]
    NotLeader {
        topic: String,
        partition: u32,
        leader: Option<u32>,
        leader_epoch: u32,
        hint: Option<LeaderHint>,
    },
    #[error("{topic}-{partition} has no live leader right now")]
    LeaderNotAvailable { topic: String, partition: u32 },
    /// ZooKeeper unreachable, no controller, or a controller deposed
    /// mid-change.
    #[error("{0}")]
    ClusterUnavailable(String),
    /// An error another broker answered (the controller, over a link).
    #[error("{message}")]
    Remote { code: ErrorCode, message: String },
    /// acks=all with fewer in-sync replicas than the topic asks for.
    #[error("{topic}-{partition} has {isr} in-sync replica(s), fewer than min_insync_replicas = {min}; not acknowledged")]
    NotEnoughReplicas {
        topic: String,
        partition: u32,
        isr: usize,
        min: usize,
    },
    /// A replication request from another leader epoch than this
    /// replica's.
    #[error("{topic}-{partition}: leader epoch {asked} is not the current {current}")]
    FencedLeaderEpoch {
        topic: String,
        partition: u32,
        asked: i64,
        current: u32,
    },
    #[error("group {group:?} has no member {member:?} (it left, its session expired, or the coordinator moved without it); join again")]
    UnknownMember { group: String, member: String },
    #[error("{0}; join again")]
    FencedMemberEpoch(String),
    #[error("the coordinator of group {0:?} is loading its state; retry")]
    CoordinatorLoading(String),
    #[error("group {0:?} has members; stop them first")]
    GroupNotEmpty(String),
    #[error("unknown group {0:?}")]
    UnknownGroup(String),
    #[error("{0}")]
    InvalidGroupId(String),
    #[error("this broker requires authentication (SCRAM-SHA-256) first; closing the connection")]
    AuthenticationRequired,
    #[error("authentication failed: {0}; closing the connection")]
    AuthenticationFailed(String),
    #[error("not authorised: {0}")]
    AuthorizationFailed(String),
    #[error("unknown user {0:?}")]
    UnknownUser(String),
    #[error("user {0:?} already exists")]
    UserExists(String),
    #[error(
        "this port speaks only TLS: connect with TLS (e.g. --tls-ca FILE); closing the connection"
    )]
    TlsRequired,
}

/// Where a partition's leader can be reached (sent with `NotLeader`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderHint {
    pub broker_id: u32,
    pub host: String,
    /// The leader's port of the shard that owns the partition.
    pub port: u16,
    pub leader_epoch: u32,
}

impl Error {
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::UnknownTopic(_) => ErrorCode::UnknownTopic,
            Error::UnknownPartition { .. } => ErrorCode::UnknownPartition,
            Error::NotOwner { .. } => ErrorCode::NotOwner,
            Error::ShardGone => ErrorCode::ShuttingDown,
            Error::InvalidTopicName(_) => ErrorCode::InvalidTopicName,
            Error::TopicExists(_) => ErrorCode::TopicExists,
            Error::InvalidConfig(_) | Error::Config(_) => ErrorCode::InvalidConfig,
            Error::Malformed(_) => ErrorCode::MalformedRequest,
            Error::InvalidBatch { source, .. } => source.code(),
            Error::Frame(e) | Error::BadFrame(e) => e.code(),
            Error::RequestTimeout { .. } => ErrorCode::Timeout,
            Error::UnsupportedApi(_) => ErrorCode::UnsupportedApi,
            Error::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            Error::ResourceLimit(_) | Error::NoSpace { .. } => ErrorCode::ResourceLimit,
            Error::TooManyConnections { .. } => ErrorCode::TooManyConnections,
            Error::UnknownTopicId { .. } => ErrorCode::UnknownTopicId,
            Error::Storage(e) | Error::Partition { source: e, .. } => e.code(),
            Error::Io { .. } => ErrorCode::StorageError,
            Error::NotLeader { .. } => ErrorCode::NotLeader,
            Error::LeaderNotAvailable { .. } => ErrorCode::LeaderNotAvailable,
            Error::ClusterUnavailable(_) => ErrorCode::ClusterUnavailable,
            Error::Remote { code, .. } => *code,
            Error::NotEnoughReplicas { .. } => ErrorCode::NotEnoughReplicas,
            Error::FencedLeaderEpoch { .. } => ErrorCode::FencedLeaderEpoch,
            Error::UnknownMember { .. } => ErrorCode::UnknownMemberId,
            Error::FencedMemberEpoch(_) => ErrorCode::FencedMemberEpoch,
            Error::CoordinatorLoading(_) => ErrorCode::CoordinatorLoading,
            Error::GroupNotEmpty(_) => ErrorCode::GroupNotEmpty,
            Error::UnknownGroup(_) => ErrorCode::UnknownGroup,
            Error::InvalidGroupId(_) => ErrorCode::InvalidGroupId,
            Error::AuthenticationRequired => ErrorCode::AuthenticationRequired,
            Error::AuthenticationFailed(_) => ErrorCode::AuthenticationFailed,
            Error::AuthorizationFailed(_) => ErrorCode::AuthorizationFailed,
            Error::UnknownUser(_) => ErrorCode::UnknownUser,
            Error::UserExists(_) => ErrorCode::UserExists,
            Error::TlsRequired => ErrorCode::TlsRequired,
        }
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages() {
        let e = Error::UnknownPartition {
            topic: "t".into(),
            partition: 9,
            count: 2,
        };
        assert_eq!(e.code(), ErrorCode::UnknownPartition);
        assert_eq!(e.to_string(), "topic \"t\" has no partition 9 (it has 2)");
        let e = Error::InvalidBatch {
            index: 1,
            source: shoal_wire::BatchError::BadCrc {
                stored: 1,
                computed: 2,
            },
        };
        assert_eq!(e.code(), ErrorCode::CorruptBatch);
        assert_eq!(Error::ShardGone.code(), ErrorCode::ShuttingDown);
        fn is_send<T: Send>() {}
        is_send::<Error>();
    }
}
