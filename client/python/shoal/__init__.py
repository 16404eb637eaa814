"""Shoal's Python client, written from the protocol contract
(``wire/schema/shoal.fbs``, ``wire/PROTOCOL.md``, ``wire/FORMAT.md``).

Blocking::

    import shoal
    with shoal.Client("127.0.0.1:9400") as c:
        c.create_topic("t", partitions=3)
        with shoal.Producer(c) as p:
            fut = p.send("t", b"value", key=None)
            p.flush()
            print(fut.result().offset)
        cons = shoal.Consumer(c)
        cons.assign_all("t", start="beginning")
        for r in cons.poll(timeout=1.0):
            print(r.topic, r.partition, r.offset, r.key, r.value, r.timestamp)

asyncio: the same names under :mod:`shoal.aio`.

Layout:

- :mod:`shoal.fb` -- flatbuffers code generated from the schema
  (``client/python/generate.sh``; never edited by hand).
- :mod:`shoal.protocol` -- frames, request builders, response decoding (no I/O).
- :mod:`shoal.batch` -- the record batch codec and CRC32C (no I/O).
- :mod:`shoal.errors` -- one exception class per wire error code.
- :mod:`shoal.aio` -- connections, metadata and routing, producer, consumer.
- :mod:`shoal.sync` -- the blocking facade over :mod:`shoal.aio`.
"""

from . import aio, batch, errors, protocol
from ._crc import BACKEND as CRC32C_BACKEND
from .aio.consumer import Timestamp
from .aio.producer import Delivery, RecordMetadata
from .batch import Record
from .errors import (
    BatchTooLargeError,
    BrokerError,
    BufferFullError,
    ClosedError,
    ClusterUnavailableError,
    ConnectError,
    ConnectionClosedError,
    CorruptBatchError,
    ErrorCode,
    FencedLeaderEpochError,
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
    UnknownMemberIdError,
    FrameTooLargeError,
    InvalidConfigError,
    InvalidOffsetError,
    InvalidTopicNameError,
    LeaderHint,
    LeaderNotAvailableError,
    MalformedRequestError,
    NotEnoughReplicasError,
    NotLeaderError,
    NotOwnerError,
    OffsetOutOfRangeError,
    OutOfOrderSequenceError,
    ProtocolError,
    RecordTooLargeError,
    RequestTimeoutError,
    ResourceLimitError,
    ShoalError,
    ShuttingDownError,
    StorageError,
    TooManyConnectionsError,
    TopicExistsError,
    UnknownError,
    UnknownPartitionError,
    UnknownTopicError,
    UnknownTopicIdError,
    UnsupportedApiError,
    UnsupportedVersionError,
)
from .protocol import BrokerInfo, ClusterMetadata, PartitionInfo, TopicInfo
from .sync import Client, Consumer, Producer

__version__ = "0.1.0"

__all__ = [
    "aio",
    "batch",
    "errors",
    "protocol",
    "Client",
    "Producer",
    "Consumer",
    "Delivery",
    "RecordMetadata",
    "Record",
    "Timestamp",
    "BrokerInfo",
    "ClusterMetadata",
    "PartitionInfo",
    "TopicInfo",
    "LeaderHint",
    "ErrorCode",
    "CRC32C_BACKEND",
    "ShoalError",
    "BrokerError",
    "ProtocolError",
    "ConnectError",
    "ConnectionClosedError",
    "ClosedError",
    "BufferFullError",
    "RecordTooLargeError",
    "UnknownError",
    "MalformedRequestError",
    "UnsupportedApiError",
    "UnsupportedVersionError",
    "FrameTooLargeError",
    "InvalidTopicNameError",
    "UnknownTopicError",
    "UnknownPartitionError",
    "TopicExistsError",
    "InvalidConfigError",
    "UnknownTopicIdError",
    "CorruptBatchError",
    "BatchTooLargeError",
    "OffsetOutOfRangeError",
    "OutOfOrderSequenceError",
    "InvalidOffsetError",
    "StorageError",
    "ShuttingDownError",
    "NotOwnerError",
    "RequestTimeoutError",
    "ResourceLimitError",
    "TooManyConnectionsError",
    "NotLeaderError",
    "LeaderNotAvailableError",
    "NotEnoughReplicasError",
    "ClusterUnavailableError",
    "FencedLeaderEpochError",
    "UnknownMemberIdError",
    "FencedMemberEpochError",
    "CoordinatorLoadingError",
    "GroupNotEmptyError",
    "UnknownGroupError",
    "InvalidGroupIdError",
    "AuthenticationRequiredError",
    "AuthenticationFailedError",
    "AuthorizationFailedError",
    "UnknownUserError",
    "UserExistsError",
    "TlsRequiredError",
]
