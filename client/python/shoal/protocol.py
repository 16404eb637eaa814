"""Frames and flatbuffers envelopes (``wire/PROTOCOL.md``): pure, no I/O.

A frame is ``u32 frame_len | u32 header_len | header | payload``, little
endian, ``frame_len`` counting everything after itself. The header is a
flatbuffer ``Request`` or ``Response`` (code generated from
``wire/schema/shoal.fbs`` into :mod:`shoal.fb`); the payload is raw record
batches that never pass through flatbuffers.

The Python flatbuffers runtime has no verifier (the Rust client verifies
every response header). Decoding here therefore treats any failure while
reading a header -- a bad offset, a short buffer, bad UTF-8 -- as a
:class:`~shoal.errors.ProtocolError`, and the connection closes on it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import flatbuffers

from .errors import LeaderHint, ProtocolError
from .fb import Acks as _Acks
from .fb import BrokerInfo as _BrokerInfo  # noqa: F401  (read through MetadataResponse)
from .fb import CreateTopicRequest as _Create
from .fb import DeleteTopicRequest as _Delete
from .fb import DescribeTopicRequest as _Describe
from .fb import DescribeTopicResponse as _DescribeResp
from .fb import FetchRequest as _Fetch
from .fb import FetchResponse as _FetchResp
from .fb import ListTopicsRequest as _List
from .fb import ListTopicsResponse as _ListResp
from .fb import MetadataRequest as _Meta
from .fb import MetadataResponse as _MetaResp
from .fb import MetricsRequest as _Metrics
from .fb import MetricsResponse as _MetricsResp
from .fb import ProduceRequest as _Produce
from .fb import ProduceResponse as _ProduceResp
from .fb import Request as _Request
from .fb import SaslAuthenticateRequest as _Sasl
from .fb import SaslAuthenticateResponse as _SaslResp
from .fb import Response as _Response
from .fb.RequestBody import RequestBody
from .fb.ResponseBody import ResponseBody

PROTOCOL_VERSION = 1
#: ``frame_len`` and ``header_len``.
FRAME_PREFIX_BYTES = 8
_PREFIX = struct.Struct("<II")
#: Largest response frame this client accepts (as the Rust client): a
#: bound against a broken peer, not a limit on metadata.
RESPONSE_BYTES_MAX = 256 * 1024 * 1024

ACKS = {"none": _Acks.Acks.None_, "leader": _Acks.Acks.Leader, "all": _Acks.Acks.All}


def acks_code(acks) -> int:
    """``"none"``/``"leader"``/``"all"`` (or 0/1/2) to the wire enum."""
    if isinstance(acks, str):
        try:
            return ACKS[acks.lower()]
        except KeyError:
            raise ValueError(f"acks must be none, leader or all, not {acks!r}") from None
    if acks in (0, 1, 2):
        return int(acks)
    raise ValueError(f"acks must be none, leader or all, not {acks!r}")


def prefix(header_len: int, payload_len: int) -> bytes:
    """The 8-byte prefix for a frame with these part sizes."""
    return _PREFIX.pack(4 + header_len + payload_len, header_len)


def check_prefix(frame_len: int, header_len: int) -> None:
    """Raises :class:`ProtocolError` for a response prefix that cannot be
    trusted (the byte stream is then lost)."""
    if 4 + frame_len > RESPONSE_BYTES_MAX:
        raise ProtocolError(f"frame of {4 + frame_len} bytes exceeds {RESPONSE_BYTES_MAX}")
    if frame_len < 4 or header_len > frame_len - 4:
        raise ProtocolError(f"header length {header_len} does not fit a frame of {frame_len}")


# ---- requests ---------------------------------------------------------------


def _s(b: flatbuffers.Builder, s: Optional[str]) -> Optional[int]:
    return None if s is None else b.CreateString(s)


def encode_request(
    correlation_id: int,
    client_id: str,
    body_type: int,
    build_body: Callable[[flatbuffers.Builder], int],
) -> bytes:
    """A finished ``Request`` flatbuffer: the frame header."""
    b = flatbuffers.Builder(256)
    body = build_body(b)
    cid = b.CreateString(client_id)
    _Request.Start(b)
    _Request.AddVersion(b, PROTOCOL_VERSION)
    _Request.AddCorrelationId(b, correlation_id)
    _Request.AddClientId(b, cid)
    _Request.AddBodyType(b, body_type)
    _Request.AddBody(b, body)
    b.Finish(_Request.End(b))
    return bytes(b.Output())


def metadata_request(topics: Optional[Sequence[str]]):
    def build(b: flatbuffers.Builder) -> int:
        vec = None
        if topics:
            names = [b.CreateString(t) for t in topics]
            _Meta.StartTopicsVector(b, len(names))
            for n in reversed(names):
                b.PrependUOffsetTRelative(n)
            vec = b.EndVector()
        _Meta.Start(b)
        if vec is not None:
            _Meta.AddTopics(b, vec)
        return _Meta.End(b)

    return RequestBody.MetadataRequest, build


def create_topic_request(
    name: str,
    partitions: int,
    replication_factor: int,
    sync: Optional[str],
    retention_ms: Optional[int],
    retention_bytes: Optional[int],
    segment_bytes: Optional[int],
):
    def build(b: flatbuffers.Builder) -> int:
        n = b.CreateString(name)
        s = _s(b, sync)
        _Create.Start(b)
        _Create.AddName(b, n)
        _Create.AddPartitions(b, partitions)
        _Create.AddReplicationFactor(b, replication_factor)
        if s is not None:
            _Create.AddSync(b, s)
        _Create.AddRetentionMs(b, -1 if retention_ms is None else retention_ms)
        _Create.AddRetentionBytes(b, -1 if retention_bytes is None else retention_bytes)
        _Create.AddSegmentBytes(b, -1 if segment_bytes is None else segment_bytes)
        return _Create.End(b)

    return RequestBody.CreateTopicRequest, build


def _named(mod, body_type: int, name: str):
    def build(b: flatbuffers.Builder) -> int:
        n = b.CreateString(name)
        mod.Start(b)
        mod.AddName(b, n)
        return mod.End(b)

    return body_type, build


def delete_topic_request(name: str):
    return _named(_Delete, RequestBody.DeleteTopicRequest, name)


def describe_topic_request(name: str):
    return _named(_Describe, RequestBody.DescribeTopicRequest, name)


def _empty(mod, body_type: int):
    def build(b: flatbuffers.Builder) -> int:
        mod.Start(b)
        return mod.End(b)

    return body_type, build


def sasl_authenticate_request(mechanism: Optional[str], auth_bytes: bytes):
    """One step of the SCRAM exchange (``wire/PROTOCOL.md``)."""

    def build(b: flatbuffers.Builder) -> int:
        m = _s(b, mechanism)
        data = b.CreateByteVector(auth_bytes)
        _Sasl.Start(b)
        if m is not None:
            _Sasl.AddMechanism(b, m)
        _Sasl.AddAuthBytes(b, data)
        return _Sasl.End(b)

    return RequestBody.SaslAuthenticateRequest, build


def list_topics_request():
    return _empty(_List, RequestBody.ListTopicsRequest)


def metrics_request():
    return _empty(_Metrics, RequestBody.MetricsRequest)


def produce_request(topic: str, topic_id: int, partition: int, acks: int, timeout_ms: int):
    def build(b: flatbuffers.Builder) -> int:
        t = b.CreateString(topic)
        _Produce.Start(b)
        _Produce.AddTopic(b, t)
        _Produce.AddPartition(b, partition)
        _Produce.AddAcks(b, acks)
        _Produce.AddTimeoutMs(b, timeout_ms)
        _Produce.AddTopicId(b, topic_id)
        return _Produce.End(b)

    return RequestBody.ProduceRequest, build


def fetch_request(
    topic: str,
    topic_id: int,
    partition: int,
    offset: int,
    timestamp_ms: Optional[int],
    max_bytes: int,
    min_bytes: int,
    max_wait_ms: int,
):
    def build(b: flatbuffers.Builder) -> int:
        t = b.CreateString(topic)
        _Fetch.Start(b)
        _Fetch.AddTopic(b, t)
        _Fetch.AddPartition(b, partition)
        _Fetch.AddOffset(b, offset)
        _Fetch.AddByTimestamp(b, timestamp_ms is not None)
        _Fetch.AddTimestampMs(b, 0 if timestamp_ms is None else timestamp_ms)
        _Fetch.AddMaxBytes(b, max_bytes)
        _Fetch.AddMinBytes(b, min_bytes)
        _Fetch.AddMaxWaitMs(b, max_wait_ms)
        _Fetch.AddTopicId(b, topic_id)
        return _Fetch.End(b)

    return RequestBody.FetchRequest, build


# ---- responses --------------------------------------------------------------


@dataclass(frozen=True)
class BrokerInfo:
    """A live broker as metadata describes it."""

    id: int
    host: str
    port: int
    #: Port of shard ``i`` at index ``i``.
    shard_ports: Tuple[int, ...]
    version: str = ""
    rack: str = ""


@dataclass(frozen=True)
class PartitionInfo:
    """One partition as metadata describes it."""

    partition: int
    #: Id of the broker leading it.
    leader: int
    #: The owning shard on the leader.
    shard: int
    leader_epoch: int = 0
    log_start_offset: int = 0
    high_watermark: int = 0
    #: Cluster only (empty on a single node): brokers with a replica,
    #: preferred leader first, and those in sync with the leader.
    replicas: Tuple[int, ...] = ()
    isr: Tuple[int, ...] = ()
    #: No live leader: produce and fetch fail with LeaderNotAvailable.
    offline: bool = False


@dataclass(frozen=True)
class TopicInfo:
    name: str
    partitions: Tuple[PartitionInfo, ...]
    replication_factor: int = 1
    sync: str = ""
    #: ``None``: unlimited / broker default.
    retention_ms: Optional[int] = None
    retention_bytes: Optional[int] = None
    segment_bytes: int = 0
    #: This incarnation of the topic (0 from brokers that predate ids).
    topic_id: int = 0


@dataclass(frozen=True)
class ClusterMetadata:
    brokers: Tuple[BrokerInfo, ...]
    topics: Tuple[TopicInfo, ...]
    #: The cluster's name; empty on a single node.
    cluster: str = ""
    #: -1: no controller right now.
    controller_id: int = -1
    controller_epoch: int = 0

    def topic(self, name: str) -> Optional[TopicInfo]:
        for t in self.topics:
            if t.name == name:
                return t
        return None


@dataclass(frozen=True)
class ProduceResult:
    #: Offset of the first record of the first batch.
    base_offset: int
    #: Offset of the last record of the last batch.
    last_offset: int
    #: Every batch was an idempotent retry of one already stored.
    duplicate: bool


@dataclass(frozen=True)
class FetchResult:
    high_watermark: int
    log_start_offset: int
    #: Where the next fetch should start.
    next_offset: int
    #: Whole record batches, as the broker stores them (bytes-like: a
    #: memoryview of the received frame for large answers).
    payload: object = field(repr=False, default=b"")


@dataclass
class Response:
    """A decoded response envelope: the body is read by the functions below
    according to ``body_type``."""

    correlation_id: int
    error_code: int
    error_message: str
    body_type: int
    body: object  # flatbuffers Table, or None
    leader_hint: Optional[LeaderHint]


def _str(b: Optional[bytes]) -> str:
    return "" if b is None else b.decode("utf-8")


def decode_response(header: bytes) -> Response:
    """Decodes a response header; :class:`ProtocolError` if it is not one."""
    try:
        r = _Response.Response.GetRootAs(header, 0)
        hint = None
        h = r.LeaderHint()
        if h is not None:
            hint = LeaderHint(h.BrokerId(), _str(h.Host()), h.Port(), h.LeaderEpoch())
        return Response(
            r.CorrelationId(),
            r.ErrorCode(),
            _str(r.ErrorMessage()),
            r.BodyType(),
            r.Body(),
            hint,
        )
    except ProtocolError:
        raise
    except Exception as e:  # no verifier: any failure means a bad header
        raise ProtocolError(f"invalid response header: {e!r}") from e


def _body(resp: Response, expected: int, cls):
    if resp.body_type != expected or resp.body is None:
        raise ProtocolError(
            f"expected response body type {expected}, got {resp.body_type} "
            f"(correlation id {resp.correlation_id})"
        )
    t = cls()
    t.Init(resp.body.Bytes, resp.body.Pos)
    return t


def _guard(f):
    def wrapped(*a, **k):
        try:
            return f(*a, **k)
        except ProtocolError:
            raise
        except Exception as e:
            raise ProtocolError(f"invalid response body: {e!r}") from e

    wrapped.__name__ = f.__name__
    wrapped.__doc__ = f.__doc__
    return wrapped


def _opt(v: int) -> Optional[int]:
    return v if v >= 0 else None


def _topic_info(t) -> TopicInfo:
    parts = []
    for i in range(t.PartitionsLength()):
        p = t.Partitions(i)
        parts.append(
            PartitionInfo(
                partition=p.Partition(),
                leader=p.LeaderBroker(),
                shard=p.Shard(),
                leader_epoch=p.LeaderEpoch(),
                log_start_offset=p.LogStartOffset(),
                high_watermark=p.HighWatermark(),
                replicas=tuple(p.Replicas(j) for j in range(p.ReplicasLength())),
                isr=tuple(p.Isr(j) for j in range(p.IsrLength())),
                offline=bool(p.Offline()),
            )
        )
    parts.sort(key=lambda p: p.partition)
    return TopicInfo(
        name=_str(t.Name()),
        partitions=tuple(parts),
        replication_factor=t.ReplicationFactor(),
        sync=_str(t.Sync()),
        retention_ms=_opt(t.RetentionMs()),
        retention_bytes=_opt(t.RetentionBytes()),
        segment_bytes=max(t.SegmentBytes(), 0),
        topic_id=t.TopicId(),
    )


@_guard
def decode_metadata(resp: Response) -> ClusterMetadata:
    m = _body(resp, ResponseBody.MetadataResponse, _MetaResp.MetadataResponse)
    brokers = []
    for i in range(m.BrokersLength()):
        b = m.Brokers(i)
        brokers.append(
            BrokerInfo(
                id=b.Id(),
                host=_str(b.Host()),
                port=b.Port(),
                shard_ports=tuple(b.ShardPorts(j) for j in range(b.ShardPortsLength())),
                version=_str(b.Version()),
                rack=_str(b.Rack()),
            )
        )
    topics = tuple(_topic_info(m.Topics(i)) for i in range(m.TopicsLength()))
    return ClusterMetadata(
        brokers=tuple(brokers),
        topics=topics,
        cluster=_str(m.Cluster()),
        controller_id=m.ControllerId(),
        controller_epoch=m.ControllerEpoch(),
    )


@_guard
def decode_list_topics(resp: Response) -> List[TopicInfo]:
    m = _body(resp, ResponseBody.ListTopicsResponse, _ListResp.ListTopicsResponse)
    return [_topic_info(m.Topics(i)) for i in range(m.TopicsLength())]


@_guard
def decode_describe_topic(resp: Response) -> TopicInfo:
    m = _body(resp, ResponseBody.DescribeTopicResponse, _DescribeResp.DescribeTopicResponse)
    t = m.Topic()
    if t is None:
        raise ProtocolError("describe response without a topic")
    return _topic_info(t)


@_guard
def decode_produce(resp: Response) -> ProduceResult:
    m = _body(resp, ResponseBody.ProduceResponse, _ProduceResp.ProduceResponse)
    return ProduceResult(m.BaseOffset(), m.LastOffset(), bool(m.Duplicate()))


@_guard
def decode_fetch(resp: Response, payload: bytes) -> FetchResult:
    m = _body(resp, ResponseBody.FetchResponse, _FetchResp.FetchResponse)
    return FetchResult(m.HighWatermark(), m.LogStartOffset(), m.NextOffset(), payload)


@_guard
@_guard
def decode_sasl_authenticate(resp: Response) -> bytes:
    """The server's SCRAM message."""
    a = _body(resp, ResponseBody.SaslAuthenticateResponse, _SaslResp.SaslAuthenticateResponse)
    if a.AuthBytesIsNone():
        return b""
    return bytes(a.AuthBytes(i) for i in range(a.AuthBytesLength()))


def decode_metrics(resp: Response) -> Dict[str, int]:
    m = _body(resp, ResponseBody.MetricsResponse, _MetricsResp.MetricsResponse)
    out = {}
    for i in range(m.MetricsLength()):
        x = m.Metrics(i)
        out[_str(x.Name())] = x.Value()
    return out


def expect_body(resp: Response, expected: int) -> None:
    """Checks the body type of a response whose body carries nothing."""
    if resp.body_type != expected:
        raise ProtocolError(f"expected response body type {expected}, got {resp.body_type}")
