"""The record batch codec (``wire/FORMAT.md``): pure, no I/O.

A batch is a 64-byte header followed by its records. The bytes a producer
sends are the bytes the broker stores and the bytes a fetch returns; the
broker rewrites only ``base_offset`` and ``leader_epoch``, which sit outside
the CRC. This module mirrors ``wire/src/batch.rs`` field for field:
:class:`BatchBuilder` builds what ``BatchBuilder`` builds there, and
:func:`validate_batch` accepts exactly what the broker's ``validate_batch``
accepts.
"""

from __future__ import annotations

import struct
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

from ._crc import crc32c
from .errors import BatchTooLargeError, CorruptBatchError

#: Size of the fixed batch header.
BATCH_HEADER_BYTES = 64
#: Format version written in ``magic``.
MAGIC = 1
#: The CRC covers ``[CRC_START, batch_len)``: everything after the CRC field.
CRC_START = 20
#: Fixed bytes of one record before its variable parts.
RECORD_FIXED_BYTES = 4 + 4 + 4 + 4 + 4 + 2
#: No sequence / no producer id (a non-idempotent producer).
NO_SEQUENCE = -1
NO_PRODUCER_ID = -1

ATTR_COMPRESSION_MASK = 0b111
ATTR_CONTROL = 1 << 5
ATTR_KNOWN = ATTR_COMPRESSION_MASK | ATTR_CONTROL

OFF_CRC = 16

# base_offset, batch_len, leader_epoch, crc, magic, reserved, attributes,
# record_count, base_sequence, first_timestamp_ms, max_timestamp_ms,
# producer_id, producer_epoch, 6 reserved bytes.
_HEADER = struct.Struct("<QIIIBBHIiqqqh6x")
assert _HEADER.size == BATCH_HEADER_BYTES
# Record prefix: len, offset_delta, timestamp_delta_ms, key_len.
_REC = struct.Struct("<IIii")
# The same and value_len, for a record without a key.
_REC_NO_KEY = struct.Struct("<IIiii")
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_CRC = struct.Struct("<I")
_ZERO_HEADERS = b"\x00\x00"

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1

Bytes = Union[bytes, bytearray, memoryview]
Headers = Sequence[Tuple[Bytes, Bytes]]


class BatchHeader(NamedTuple):
    """The decoded fixed header of a batch."""

    base_offset: int
    batch_len: int
    leader_epoch: int
    crc: int
    magic: int
    attributes: int
    record_count: int
    base_sequence: int
    first_timestamp_ms: int
    max_timestamp_ms: int
    producer_id: int
    producer_epoch: int

    @property
    def last_offset(self) -> int:
        return self.base_offset + max(self.record_count, 1) - 1

    @property
    def next_offset(self) -> int:
        return self.base_offset + self.record_count


def decode_header(buf: Bytes, pos: int = 0) -> BatchHeader:
    """Decodes the header at ``pos`` without validating anything."""
    if len(buf) - pos < BATCH_HEADER_BYTES:
        raise CorruptBatchError(
            f"batch truncated: need {BATCH_HEADER_BYTES} bytes, have {len(buf) - pos}",
            from_broker=False,
        )
    (bo, bl, le, crc, magic, _r, attrs, count, seq, fts, mts, pid, pep) = _HEADER.unpack_from(
        buf, pos
    )
    return BatchHeader(bo, bl, le, crc, magic, attrs, count, seq, fts, mts, pid, pep)


def encoded_len(key: Optional[Bytes], value: Optional[Bytes], headers: Headers = ()) -> int:
    """Encoded size of one record inside a batch."""
    n = RECORD_FIXED_BYTES
    if key is not None:
        n += len(key)
    if value is not None:
        n += len(value)
    for name, v in headers:
        n += 2 + len(name) + 4 + len(v)
    return n


class BatchBuilder:
    """Builds one batch; :meth:`finish` writes the header and the CRC.

    The base offset is left at zero for the broker to assign.
    """

    __slots__ = ("_buf", "count", "first_timestamp_ms", "max_timestamp_ms")

    def __init__(self) -> None:
        self._buf = bytearray(BATCH_HEADER_BYTES)
        self.count = 0
        self.first_timestamp_ms = 0
        self.max_timestamp_ms = 0

    def __len__(self) -> int:
        """Bytes the batch would have if finished now."""
        return len(self._buf)

    def is_empty(self) -> bool:
        return self.count == 0

    def fits_timestamp(self, timestamp_ms: int) -> bool:
        """Whether a record stamped ``timestamp_ms`` can join this batch
        (its delta from the first record must fit an i32)."""
        if self.count == 0:
            return True
        return _I32_MIN <= timestamp_ms - self.first_timestamp_ms <= _I32_MAX

    def append(
        self,
        key: Optional[Bytes],
        value: Optional[Bytes],
        timestamp_ms: int,
        headers: Headers = (),
    ) -> None:
        """Appends a record. Raises :class:`RecordTooLargeError` (a
        ``ValueError``) for fields the format cannot hold; the batch is
        unchanged then."""
        if self.count == 0:
            self.first_timestamp_ms = timestamp_ms
            self.max_timestamp_ms = timestamp_ms
        delta = timestamp_ms - self.first_timestamp_ms
        if not _I32_MIN <= delta <= _I32_MAX:
            raise ValueError("timestamp delta out of range for this batch")
        if not headers and key is None:
            # The common record, in two writes: prefix with both lengths,
            # then the value and an empty header count.
            if value is None:
                vlen = -1
                body_len = RECORD_FIXED_BYTES - 4
            else:
                vlen = len(value)
                body_len = RECORD_FIXED_BYTES - 4 + vlen
                if vlen > _I32_MAX:
                    raise ValueError("field too large")
            b = self._buf
            b += _REC_NO_KEY.pack(body_len, self.count, delta, -1, vlen)
            if value is not None:
                b += value
            b += _ZERO_HEADERS
            self.count += 1
            if timestamp_ms > self.max_timestamp_ms:
                self.max_timestamp_ms = timestamp_ms
            return
        if len(headers) > 0xFFFF:
            raise ValueError("too many headers")
        body_len = encoded_len(key, value, headers) - 4
        if body_len > 0xFFFFFFFF:
            raise ValueError("record too large")
        klen = -1 if key is None else len(key)
        vlen = -1 if value is None else len(value)
        if klen > _I32_MAX or vlen > _I32_MAX:
            raise ValueError("field too large")
        for name, _ in headers:
            if len(name) > 0xFFFF:
                raise ValueError("header name too long")
        b = self._buf
        b += _REC.pack(body_len, self.count, delta, klen)
        if key is not None:
            b += key
        b += _I32.pack(vlen)
        if value is not None:
            b += value
        if headers:
            b += _U16.pack(len(headers))
            for name, v in headers:
                b += _U16.pack(len(name))
                b += name
                b += _U32.pack(len(v))
                b += v
        else:
            b += _ZERO_HEADERS
        self.count += 1
        if timestamp_ms > self.max_timestamp_ms:
            self.max_timestamp_ms = timestamp_ms

    def finish(self, producer_id: int, producer_epoch: int, base_sequence: int) -> bytearray:
        """Writes header and CRC and returns the batch; the builder starts
        over empty. The buffer is handed over, not copied."""
        out = self._buf
        _HEADER.pack_into(
            out,
            0,
            0,  # base_offset: the broker assigns it
            len(out),
            0,  # leader_epoch: the broker's
            0,  # crc, below
            MAGIC,
            0,
            0,  # attributes: no compression
            self.count,
            base_sequence,
            self.first_timestamp_ms,
            self.max_timestamp_ms,
            producer_id,
            producer_epoch,
        )
        _CRC.pack_into(out, OFF_CRC, crc32c(memoryview(out)[CRC_START:]))
        self._buf = bytearray(BATCH_HEADER_BYTES)
        self.count = 0
        return out


def build_batch(
    values: Sequence[Bytes],
    timestamp_ms: int = 0,
    producer_id: int = NO_PRODUCER_ID,
    producer_epoch: int = 0,
    base_sequence: int = NO_SEQUENCE,
) -> bytearray:
    """One batch from plain values (tests, tools), like ``build_batch`` in
    ``wire/src/batch.rs``."""
    b = BatchBuilder()
    for v in values:
        b.append(None, v, timestamp_ms)
    return b.finish(producer_id, producer_epoch, base_sequence)


def compute_crc(batch: Bytes) -> int:
    """CRC32C of a complete batch's covered region."""
    return crc32c(memoryview(batch)[CRC_START:])


def _corrupt(msg: str) -> CorruptBatchError:
    return CorruptBatchError(msg, from_broker=False)


def check_header(buf: Bytes, pos: int, end: int, batch_bytes_max: int) -> BatchHeader:
    """Checks the header of the batch at ``pos`` against the limits and the
    bytes available up to ``end``, without touching the body."""
    if end - pos < BATCH_HEADER_BYTES:
        raise _corrupt(f"batch truncated: need {BATCH_HEADER_BYTES} bytes, have {end - pos}")
    h = decode_header(buf, pos)
    if h.magic != MAGIC:
        raise _corrupt(f"unknown batch format magic {h.magic}")
    if h.batch_len < BATCH_HEADER_BYTES:
        raise _corrupt(f"invalid batch length {h.batch_len}")
    if h.batch_len > batch_bytes_max:
        raise BatchTooLargeError(
            f"batch of {h.batch_len} bytes exceeds the maximum of {batch_bytes_max}",
            from_broker=False,
        )
    if h.record_count == 0:
        raise _corrupt("batch has no records")
    if h.attributes & ~ATTR_KNOWN or h.attributes & ATTR_COMPRESSION_MASK:
        raise _corrupt(f"unsupported batch attributes {h.attributes:#x}")
    if end - pos < h.batch_len:
        raise _corrupt(f"batch truncated: need {h.batch_len} bytes, have {end - pos}")
    return h


class Record:
    """A record read from a partition.

    ``timestamp`` is in milliseconds since the Unix epoch; ``key`` and
    ``value`` are ``bytes`` or ``None``; ``headers`` a list of
    ``(name, value)`` byte pairs."""

    __slots__ = ("topic", "partition", "offset", "timestamp", "key", "value", "headers")

    def __init__(
        self,
        topic: str,
        partition: int,
        offset: int,
        timestamp: int,
        key: Optional[bytes],
        value: Optional[bytes],
        headers: List[Tuple[bytes, bytes]],
    ):
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.timestamp = timestamp
        self.key = key
        self.value = value
        self.headers = headers

    @property
    def timestamp_ms(self) -> int:
        return self.timestamp

    def __repr__(self) -> str:
        return (
            f"Record(topic={self.topic!r}, partition={self.partition}, offset={self.offset}, "
            f"timestamp={self.timestamp}, key={self.key!r}, value={_short(self.value)}, "
            f"headers={self.headers!r})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Record):
            return NotImplemented
        return all(getattr(self, s) == getattr(other, s) for s in self.__slots__)


def _short(v: Optional[bytes]) -> str:
    if v is None or len(v) <= 32:
        return repr(v)
    return repr(v[:32])[:-1] + f"...' ({len(v)} bytes)"


def _records(
    buf: bytes, h: BatchHeader, pos: int, topic: str, partition: int, from_offset: int, out: list
) -> None:
    """Parses the records of the batch at ``pos`` (its header checked) into
    ``out``, those at or after ``from_offset``; verifies the framing of all
    of them as the broker does. ``buf`` is ``bytes``: slices of it are the
    keys and values handed out."""
    end = pos + h.batch_len
    p = pos + BATCH_HEADER_BYTES
    count = 0
    base, ts0 = h.base_offset, h.first_timestamp_ms
    unpack5 = _REC_NO_KEY.unpack_from
    unpack_i32 = _I32.unpack_from
    # Every record is at least 4 + 18 bytes, so its first five fields (the
    # fifth is value_len when the key is null) can be read at once; each
    # read is then checked against the record's own end before it is used.
    while p < end:
        if end - p < 4 + RECORD_FIXED_BYTES - 4:
            raise _corrupt("malformed record: record field runs past the batch")
        rlen, delta, tsd, klen, vlen = unpack5(buf, p)
        rend = p + 4 + rlen
        if rend > end:
            raise _corrupt("malformed record: record field runs past the batch")
        if delta != count:
            raise _corrupt("malformed record: offset deltas are not 0, 1, 2, ...")
        if klen == -1:
            key = None
            q = p + 20
        elif klen >= 0:
            q = p + 16 + klen
            if q + 4 > rend:
                raise _corrupt("malformed record: record field runs past the batch")
            key = buf[p + 16 : q]
            (vlen,) = unpack_i32(buf, q)
            q += 4
        else:
            raise _corrupt("malformed record: negative length")
        if vlen >= 0:
            v_end = q + vlen
            if v_end + 2 > rend:
                raise _corrupt("malformed record: record field runs past the batch")
            value = buf[q:v_end]
            q = v_end
        elif vlen == -1:
            value = None
            if q + 2 > rend:
                raise _corrupt("malformed record: record field runs past the batch")
        else:
            raise _corrupt("malformed record: negative length")
        if buf[q] == 0 and buf[q + 1] == 0:
            headers: List[Tuple[bytes, bytes]] = []
            q += 2
        else:
            headers, q = _headers(buf, q + 2, _U16.unpack_from(buf, q)[0], rend)
        if q != rend:
            raise _corrupt("malformed record: trailing bytes after record headers")
        offset = base + delta
        if offset >= from_offset:
            out.append(Record(topic, partition, offset, ts0 + tsd, key, value, headers))
        count += 1
        p = rend
    if count != h.record_count:
        raise _corrupt("malformed record: record count does not match the header")


def _headers(buf: bytes, q: int, n: int, rend: int) -> Tuple[List[Tuple[bytes, bytes]], int]:
    out: List[Tuple[bytes, bytes]] = []
    for _ in range(n):
        if q + 2 > rend:
            raise _corrupt("malformed record: record field runs past the batch")
        (nl,) = _U16.unpack_from(buf, q)
        q += 2
        if q + nl + 4 > rend:
            raise _corrupt("malformed record: record field runs past the batch")
        name = buf[q : q + nl]
        q += nl
        (vl,) = _U32.unpack_from(buf, q)
        q += 4
        if q + vl > rend:
            raise _corrupt("malformed record: record field runs past the batch")
        out.append((name, buf[q : q + vl]))
        q += vl
    return out, q


def _check_crc(buf: Bytes, pos: int, h: BatchHeader) -> None:
    crc = crc32c(memoryview(buf)[pos + CRC_START : pos + h.batch_len])
    if crc != h.crc:
        raise _corrupt(
            f"batch at offset {h.base_offset}: CRC mismatch: stored {h.crc:#010x}, "
            f"computed {crc:#010x}"
        )


def validate_batch(batch: Bytes, batch_bytes_max: int = 1 << 20) -> BatchHeader:
    """Full validation of one batch spanning exactly ``batch``: header,
    length, CRC and record framing; what the broker's log accepts."""
    h = check_header(batch, 0, len(batch), batch_bytes_max)
    if h.batch_len != len(batch):
        raise _corrupt(f"invalid batch length {h.batch_len}")
    _check_crc(batch, 0, h)
    _records(bytes(batch), h, 0, "", 0, 1 << 64, [])
    return h


def iter_batches(payload: Bytes) -> Iterator[Tuple[BatchHeader, int]]:
    """The batches laid back to back in ``payload`` (a fetch response's):
    each header and its position. Raises :class:`CorruptBatchError` at the
    first malformed one; a trailing partial batch is one."""
    pos, end = 0, len(payload)
    while pos < end:
        h = check_header(payload, pos, end, 1 << 62)
        yield h, pos
        pos += h.batch_len


def decode_records(
    payload: Bytes,
    topic: str,
    partition: int,
    from_offset: int = 0,
    check_crcs: bool = True,
) -> List[Record]:
    """The records at or after ``from_offset`` in a run of batches (a fetch
    may return a first batch that starts before the offset asked for).
    With ``check_crcs`` every batch's CRC is verified, so corruption on the
    broker's disk or on the way arrives as :class:`CorruptBatchError`."""
    if type(payload) is not bytes:
        payload = bytes(payload)
    out: List[Record] = []
    for h, pos in iter_batches(payload):
        if h.next_offset <= from_offset:
            continue
        if check_crcs:
            _check_crc(payload, pos, h)
        _records(payload, h, pos, topic, partition, from_offset, out)
    return out


def count_records(payload: Bytes) -> Tuple[int, int]:
    """Records and the offset after the last batch, from the headers alone
    (benchmarks and tools)."""
    n, nxt = 0, 0
    for h, _ in iter_batches(payload):
        n += h.record_count
        nxt = h.next_offset
    return n, nxt
