"""Errors: one exception class per wire error code, plus the client's own.

Every error the broker reports arrives as a :class:`BrokerError` subclass
chosen by its wire code (``wire/PROTOCOL.md``, "Error codes"); ``err.code``
is the :class:`ErrorCode` and ``err.retriable`` says whether the same
request may succeed later. Catch a family with the base class
(``except shoal.BrokerError``) or one condition with its own class
(``except shoal.UnknownTopicError``).

A client-side check that matches a wire condition raises the same class:
a fetched batch whose CRC does not match is a :class:`CorruptBatchError`
(code 20) whether the broker or this client found it
(``err.from_broker`` tells which).
"""

from __future__ import annotations

import enum
from typing import Dict, Optional, Type


class ErrorCode(enum.IntEnum):
    """Wire error codes (``Response.error_code``); stable numbers."""

    NONE = 0
    UNKNOWN = 1
    MALFORMED_REQUEST = 2
    UNSUPPORTED_API = 3
    UNSUPPORTED_VERSION = 4
    FRAME_TOO_LARGE = 5
    INVALID_TOPIC_NAME = 10
    UNKNOWN_TOPIC = 11
    UNKNOWN_PARTITION = 12
    TOPIC_EXISTS = 13
    INVALID_CONFIG = 14
    UNKNOWN_TOPIC_ID = 15
    CORRUPT_BATCH = 20
    BATCH_TOO_LARGE = 21
    OFFSET_OUT_OF_RANGE = 22
    OUT_OF_ORDER_SEQUENCE = 23
    INVALID_OFFSET = 24
    STORAGE_ERROR = 30
    SHUTTING_DOWN = 31
    NOT_OWNER = 32
    TIMEOUT = 33
    RESOURCE_LIMIT = 34
    TOO_MANY_CONNECTIONS = 35
    NOT_LEADER = 36
    LEADER_NOT_AVAILABLE = 37
    NOT_ENOUGH_REPLICAS = 38
    CLUSTER_UNAVAILABLE = 39
    FENCED_LEADER_EPOCH = 40
    UNKNOWN_MEMBER_ID = 41
    FENCED_MEMBER_EPOCH = 42
    COORDINATOR_LOADING = 43
    GROUP_NOT_EMPTY = 44
    UNKNOWN_GROUP = 45
    INVALID_GROUP_ID = 46
    AUTHENTICATION_REQUIRED = 47
    AUTHENTICATION_FAILED = 48
    AUTHORIZATION_FAILED = 49
    UNKNOWN_USER = 50
    USER_EXISTS = 51
    TLS_REQUIRED = 52


# The same set as `ErrorCode::is_retriable` in wire/src/error.rs.
RETRIABLE_CODES = frozenset(
    {
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.NOT_OWNER,
        ErrorCode.NOT_LEADER,
        ErrorCode.LEADER_NOT_AVAILABLE,
        ErrorCode.NOT_ENOUGH_REPLICAS,
        ErrorCode.CLUSTER_UNAVAILABLE,
        ErrorCode.FENCED_LEADER_EPOCH,
        ErrorCode.COORDINATOR_LOADING,
        ErrorCode.TIMEOUT,
        ErrorCode.STORAGE_ERROR,
    }
)

# After these the cached placement is wrong or stale: refresh metadata
# before trying again.
REFRESH_CODES = frozenset(
    {
        ErrorCode.NOT_OWNER,
        ErrorCode.NOT_LEADER,
        ErrorCode.LEADER_NOT_AVAILABLE,
        ErrorCode.FENCED_LEADER_EPOCH,
        ErrorCode.UNKNOWN_TOPIC_ID,
    }
)


class ShoalError(Exception):
    """Base of every error this package raises."""

    retriable = False


class ProtocolError(ShoalError):
    """The broker sent something this client cannot decode (a bad frame,
    an invalid flatbuffer, a response of the wrong type). The connection
    it came on is closed."""


class ConnectError(ShoalError):
    """No connection could be made to a broker address."""

    retriable = True

    def __init__(self, addr: str, cause: BaseException):
        super().__init__(f"cannot connect to {addr}: {cause}")
        self.addr = addr
        self.cause = cause


class ConnectionClosedError(ShoalError):
    """The connection closed before the answer arrived. Whether the broker
    acted on the request is unknown (an idempotent producer retries
    safely)."""

    retriable = True


class BufferFullError(ShoalError):
    """The producer's buffer stayed full for the whole ``max_block``:
    records are accepted faster than the broker acknowledges them."""

    retriable = True


class RecordTooLargeError(ShoalError, ValueError):
    """One record larger than the producer's whole buffer or the format's
    bounds: it could never be sent."""


class ClosedError(ShoalError):
    """The client, producer or consumer was closed."""


class LeaderHint:
    """Where the leader of a partition is now, as a NotLeader answer names it.

    ``broker_id`` is -1 when unknown; ``host``/``port`` address the owning
    shard on the leader; ``leader_epoch`` is the leader's epoch."""

    __slots__ = ("broker_id", "host", "port", "leader_epoch")

    def __init__(self, broker_id: int, host: str, port: int, leader_epoch: int):
        self.broker_id = broker_id
        self.host = host
        self.port = port
        self.leader_epoch = leader_epoch

    @property
    def usable(self) -> bool:
        return bool(self.host) and self.port > 0

    def __repr__(self) -> str:
        return (
            f"LeaderHint(broker_id={self.broker_id}, host={self.host!r}, "
            f"port={self.port}, leader_epoch={self.leader_epoch})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LeaderHint) and (
            (self.broker_id, self.host, self.port, self.leader_epoch)
            == (other.broker_id, other.host, other.port, other.leader_epoch)
        )


class BrokerError(ShoalError):
    """The broker answered with an error code.

    ``code`` is an :class:`ErrorCode` (a plain ``int`` for a code this
    client does not know), ``message`` the broker's explanation."""

    code: int = ErrorCode.UNKNOWN

    def __init__(
        self,
        message: str = "",
        code: Optional[int] = None,
        leader_hint: Optional[LeaderHint] = None,
        from_broker: bool = True,
    ):
        if code is not None:
            self.code = code
        self.message = message
        self.leader_hint = leader_hint
        self.from_broker = from_broker
        name = self.code.name if isinstance(self.code, ErrorCode) else str(self.code)
        super().__init__(f"[{int(self.code)} {name}] {message}")

    @property
    def retriable(self) -> bool:  # type: ignore[override]
        return self.code in RETRIABLE_CODES

    @property
    def needs_refresh(self) -> bool:
        return self.code in REFRESH_CODES


def _code_class(name: str, code: ErrorCode, doc: str) -> Type[BrokerError]:
    cls = type(name, (BrokerError,), {"code": code, "__doc__": doc, "__module__": __name__})
    return cls  # type: ignore[return-value]


UnknownError = _code_class("UnknownError", ErrorCode.UNKNOWN, "Unexpected failure in the broker.")
MalformedRequestError = _code_class(
    "MalformedRequestError", ErrorCode.MALFORMED_REQUEST, "The broker could not parse a request."
)
UnsupportedApiError = _code_class(
    "UnsupportedApiError", ErrorCode.UNSUPPORTED_API, "Unknown request type."
)
UnsupportedVersionError = _code_class(
    "UnsupportedVersionError", ErrorCode.UNSUPPORTED_VERSION, "Protocol version other than 1."
)
FrameTooLargeError = _code_class(
    "FrameTooLargeError", ErrorCode.FRAME_TOO_LARGE, "A request frame above frame_bytes_max."
)
InvalidTopicNameError = _code_class(
    "InvalidTopicNameError", ErrorCode.INVALID_TOPIC_NAME, "1-200 of A-Z a-z 0-9 . _ -."
)
UnknownTopicError = _code_class("UnknownTopicError", ErrorCode.UNKNOWN_TOPIC, "No such topic.")
UnknownPartitionError = _code_class(
    "UnknownPartitionError", ErrorCode.UNKNOWN_PARTITION, "No such partition."
)
TopicExistsError = _code_class("TopicExistsError", ErrorCode.TOPIC_EXISTS, "The topic exists.")
InvalidConfigError = _code_class(
    "InvalidConfigError", ErrorCode.INVALID_CONFIG, "Bad partitions, sync mode, sizes or acks."
)
UnknownTopicIdError = _code_class(
    "UnknownTopicIdError",
    ErrorCode.UNKNOWN_TOPIC_ID,
    "The request named another incarnation of the topic (deleted, maybe re-created).",
)
CorruptBatchError = _code_class(
    "CorruptBatchError", ErrorCode.CORRUPT_BATCH, "Bad CRC, framing or fields in a record batch."
)
BatchTooLargeError = _code_class(
    "BatchTooLargeError", ErrorCode.BATCH_TOO_LARGE, "A batch above the partition's limit."
)
OffsetOutOfRangeError = _code_class(
    "OffsetOutOfRangeError",
    ErrorCode.OFFSET_OUT_OF_RANGE,
    "A fetch below the log start or past the end.",
)
OutOfOrderSequenceError = _code_class(
    "OutOfOrderSequenceError",
    ErrorCode.OUT_OF_ORDER_SEQUENCE,
    "An idempotent producer's sequence has a gap or a stale epoch.",
)
InvalidOffsetError = _code_class(
    "InvalidOffsetError", ErrorCode.INVALID_OFFSET, "A replica batch not following the log end."
)
StorageError = _code_class("StorageError", ErrorCode.STORAGE_ERROR, "The disk failed; retriable.")
ShuttingDownError = _code_class(
    "ShuttingDownError", ErrorCode.SHUTTING_DOWN, "The broker or shard is stopping; retriable."
)
NotOwnerError = _code_class(
    "NotOwnerError", ErrorCode.NOT_OWNER, "The partition lives elsewhere; retriable."
)
RequestTimeoutError = _code_class(
    "RequestTimeoutError",
    ErrorCode.TIMEOUT,
    "A request frame did not arrive whole within the broker's request_timeout_ms.",
)
ResourceLimitError = _code_class(
    "ResourceLimitError", ErrorCode.RESOURCE_LIMIT, "A per-connection bound was reached."
)
TooManyConnectionsError = _code_class(
    "TooManyConnectionsError",
    ErrorCode.TOO_MANY_CONNECTIONS,
    "The broker is at connections_max.",
)
NotLeaderError = _code_class(
    "NotLeaderError",
    ErrorCode.NOT_LEADER,
    "This broker does not lead the partition; ``leader_hint`` names the leader when known.",
)
LeaderNotAvailableError = _code_class(
    "LeaderNotAvailableError",
    ErrorCode.LEADER_NOT_AVAILABLE,
    "The partition has no live leader right now; retriable.",
)
NotEnoughReplicasError = _code_class(
    "NotEnoughReplicasError",
    ErrorCode.NOT_ENOUGH_REPLICAS,
    "Fewer in-sync replicas than min_insync_replicas; nothing was appended; retriable.",
)
ClusterUnavailableError = _code_class(
    "ClusterUnavailableError",
    ErrorCode.CLUSTER_UNAVAILABLE,
    "The cluster cannot answer now (no ZooKeeper, no controller); retriable.",
)
FencedLeaderEpochError = _code_class(
    "FencedLeaderEpochError",
    ErrorCode.FENCED_LEADER_EPOCH,
    "The request named an older leader epoch than the partition's.",
)
UnknownMemberIdError = _code_class(
    "UnknownMemberIdError",
    ErrorCode.UNKNOWN_MEMBER_ID,
    "The group has no such member: give up its partitions and join again.",
)
FencedMemberEpochError = _code_class(
    "FencedMemberEpochError",
    ErrorCode.FENCED_MEMBER_EPOCH,
    "A stale member epoch, or a partition not assigned to the member: join again.",
)
CoordinatorLoadingError = _code_class(
    "CoordinatorLoadingError",
    ErrorCode.COORDINATOR_LOADING,
    "The group coordinator is loading its state; retriable.",
)
GroupNotEmptyError = _code_class(
    "GroupNotEmptyError",
    ErrorCode.GROUP_NOT_EMPTY,
    "The change needs a group without members.",
)
UnknownGroupError = _code_class(
    "UnknownGroupError",
    ErrorCode.UNKNOWN_GROUP,
    "No such group.",
)
InvalidGroupIdError = _code_class(
    "InvalidGroupIdError",
    ErrorCode.INVALID_GROUP_ID,
    "An empty or over-long group name.",
)
AuthenticationRequiredError = _code_class(
    "AuthenticationRequiredError",
    ErrorCode.AUTHENTICATION_REQUIRED,
    "The broker requires authentication (SCRAM-SHA-256) first; the connection is closed.",
)
AuthenticationFailedError = _code_class(
    "AuthenticationFailedError",
    ErrorCode.AUTHENTICATION_FAILED,
    "Authentication failed (user, password or exchange); the connection is closed.",
)
AuthorizationFailedError = _code_class(
    "AuthorizationFailedError",
    ErrorCode.AUTHORIZATION_FAILED,
    "No ACL allows this request to the authenticated user.",
)
UnknownUserError = _code_class(
    "UnknownUserError",
    ErrorCode.UNKNOWN_USER,
    "No such user.",
)
UserExistsError = _code_class(
    "UserExistsError",
    ErrorCode.USER_EXISTS,
    "The user exists already.",
)
TlsRequiredError = _code_class(
    "TlsRequiredError",
    ErrorCode.TLS_REQUIRED,
    "The port speaks only TLS; connect with TLS (a CA file); the connection is closed.",
)

ERROR_CLASSES: Dict[int, Type[BrokerError]] = {
    cls.code: cls  # type: ignore[misc]
    for cls in (
        UnknownError,
        MalformedRequestError,
        UnsupportedApiError,
        UnsupportedVersionError,
        FrameTooLargeError,
        InvalidTopicNameError,
        UnknownTopicError,
        UnknownPartitionError,
        TopicExistsError,
        InvalidConfigError,
        UnknownTopicIdError,
        CorruptBatchError,
        BatchTooLargeError,
        OffsetOutOfRangeError,
        OutOfOrderSequenceError,
        InvalidOffsetError,
        StorageError,
        ShuttingDownError,
        NotOwnerError,
        RequestTimeoutError,
        ResourceLimitError,
        TooManyConnectionsError,
        NotLeaderError,
        LeaderNotAvailableError,
        NotEnoughReplicasError,
        ClusterUnavailableError,
        FencedLeaderEpochError,
        UnknownMemberIdError,
        FencedMemberEpochError,
        CoordinatorLoadingError,
        GroupNotEmptyError,
        UnknownGroupError,
        InvalidGroupIdError,
        AuthenticationRequiredError,
        AuthenticationFailedError,
        AuthorizationFailedError,
        UnknownUserError,
        UserExistsError,
        TlsRequiredError,
    )
}


def error_for(
    code: int,
    message: str = "",
    leader_hint: Optional[LeaderHint] = None,
    from_broker: bool = True,
) -> BrokerError:
    """The exception for a wire error code (a plain :class:`BrokerError`
    carrying the number for codes this client does not know)."""
    cls = ERROR_CLASSES.get(code)
    if cls is None:
        return BrokerError(message, code=code, leader_hint=leader_hint, from_broker=from_broker)
    known = ErrorCode(code)
    return cls(message, code=known, leader_hint=leader_hint, from_broker=from_broker)


def is_retriable(e: BaseException) -> bool:
    return isinstance(e, ShoalError) and bool(e.retriable)
