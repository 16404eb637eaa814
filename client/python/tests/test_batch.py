"""The record batch codec against wire/FORMAT.md, without a broker."""

import struct

import pytest

from shoal import CorruptBatchError, BatchTooLargeError, ErrorCode, _crc
from shoal.batch import (
    BATCH_HEADER_BYTES,
    CRC_START,
    RECORD_FIXED_BYTES,
    BatchBuilder,
    build_batch,
    count_records,
    decode_header,
    decode_records,
    encoded_len,
    validate_batch,
)


def test_crc32c_backends_agree_on_the_check_value():
    """CRC32C("123456789") is 0xE3069283 (the Castagnoli check value), for
    the package in use and for the pure-Python fallback."""
    assert _crc.crc32c(b"123456789") == 0xE3069283
    assert _crc.crc32c_python(b"123456789") == 0xE3069283
    data = bytes(range(256)) * 17
    assert _crc.crc32c(data) == _crc.crc32c_python(data)
    google = _crc._google()
    if google is not None:
        assert google(data) == _crc.crc32c(data)


def test_header_layout_is_the_documented_one():
    """Every header field at the offset FORMAT.md gives, little-endian."""
    b = BatchBuilder()
    b.append(b"k", b"hello", 1000, [(b"h1", b"v1")])
    b.append(None, b"", 1005)
    batch = bytes(b.finish(7, 3, 42))
    assert len(batch) == struct.unpack_from("<I", batch, 8)[0]
    assert struct.unpack_from("<Q", batch, 0)[0] == 0  # base_offset: broker's
    assert struct.unpack_from("<I", batch, 12)[0] == 0  # leader_epoch: broker's
    assert struct.unpack_from("<I", batch, 16)[0] == _crc.crc32c(batch[CRC_START:])
    assert batch[20] == 1  # magic
    assert batch[21] == 0
    assert struct.unpack_from("<H", batch, 22)[0] == 0  # attributes
    assert struct.unpack_from("<I", batch, 24)[0] == 2  # record_count
    assert struct.unpack_from("<i", batch, 28)[0] == 42  # base_sequence
    assert struct.unpack_from("<q", batch, 32)[0] == 1000  # first_timestamp_ms
    assert struct.unpack_from("<q", batch, 40)[0] == 1005  # max_timestamp_ms
    assert struct.unpack_from("<q", batch, 48)[0] == 7  # producer_id
    assert struct.unpack_from("<h", batch, 56)[0] == 3  # producer_epoch
    assert batch[58:64] == b"\0" * 6
    # First record: len, offset_delta, timestamp_delta, key, value, headers.
    rec = batch[BATCH_HEADER_BYTES:]
    body_len = struct.unpack_from("<I", rec, 0)[0]
    assert body_len == encoded_len(b"k", b"hello", [(b"h1", b"v1")]) - 4
    assert struct.unpack_from("<IiiB", rec, 4)[:3] == (0, 0, 1)
    assert rec[16:17] == b"k"
    assert struct.unpack_from("<i", rec, 17)[0] == 5
    assert rec[21:26] == b"hello"
    assert struct.unpack_from("<H", rec, 26)[0] == 1
    assert struct.unpack_from("<H", rec, 28)[0] == 2 and rec[30:32] == b"h1"
    assert struct.unpack_from("<I", rec, 32)[0] == 2 and rec[36:38] == b"v1"
    # Second record: null key is -1, empty value is length 0, delta 5 ms.
    rec2 = rec[4 + body_len :]
    assert struct.unpack_from("<IIii", rec2, 0) == (RECORD_FIXED_BYTES - 4, 1, 5, -1)
    assert struct.unpack_from("<iH", rec2, 16) == (0, 0)


def test_roundtrip_header_and_records():
    b = BatchBuilder()
    b.append(b"k", b"hello", 1000, [(b"h1", b"v1")])
    b.append(None, None, 1005)
    batch = bytearray(b.finish(7, 1, 42))
    # The broker rewrites base_offset and leader_epoch, outside the CRC.
    struct.pack_into("<Q", batch, 0, 99)
    struct.pack_into("<I", batch, 12, 3)
    h = validate_batch(batch)
    assert (h.base_offset, h.leader_epoch, h.record_count, h.last_offset) == (99, 3, 2, 100)
    assert (h.producer_id, h.base_sequence, h.first_timestamp_ms, h.max_timestamp_ms) == (7, 42, 1000, 1005)
    recs = decode_records(batch, "t", 4)
    assert [(r.offset, r.key, r.value, r.headers, r.timestamp) for r in recs] == [
        (99, b"k", b"hello", [(b"h1", b"v1")], 1000),
        (100, None, None, [], 1005),
    ]
    assert recs[0].topic == "t" and recs[0].partition == 4
    # A fetch may start inside a batch: records below the offset are skipped.
    assert [r.offset for r in decode_records(batch, "t", 4, from_offset=100)] == [100]
    assert decode_records(batch, "t", 4, from_offset=101) == []


def test_every_flipped_bit_is_caught_and_truncation_too():
    """As the Rust test flipped_bit_fails_crc_and_truncation_is_caught."""
    batch = bytes(build_batch([b"abc", b"defg"], 5))
    for i in range(CRC_START, len(batch)):
        bad = bytearray(batch)
        bad[i] ^= 0x10
        with pytest.raises(CorruptBatchError):
            validate_batch(bad)
        with pytest.raises(CorruptBatchError) as e:
            decode_records(bad, "t", 0)
        assert e.value.code == ErrorCode.CORRUPT_BATCH
        assert e.value.from_broker is False
    with pytest.raises(CorruptBatchError):
        validate_batch(batch[:-1])
    with pytest.raises(CorruptBatchError, match="truncated"):
        decode_records(batch + batch[:-3], "t", 0)
    with pytest.raises(BatchTooLargeError):
        validate_batch(batch, batch_bytes_max=10)


def test_crc_check_can_be_turned_off_but_framing_is_still_checked():
    batch = bytearray(build_batch([b"abc"], 5))
    batch[-3] ^= 0xFF  # inside the value: only the CRC notices
    assert decode_records(batch, "t", 0, check_crcs=False)[0].value != b"abc"
    with pytest.raises(CorruptBatchError, match="CRC mismatch"):
        decode_records(batch, "t", 0)
    batch = bytearray(build_batch([b"abc"], 5))
    struct.pack_into("<I", batch, BATCH_HEADER_BYTES, 1000)  # record length
    with pytest.raises(CorruptBatchError, match="runs past"):
        decode_records(batch, "t", 0, check_crcs=False)


def test_batches_back_to_back():
    a = build_batch([b"1"])
    b = bytearray(build_batch([b"2", b"3"]))
    struct.pack_into("<Q", b, 0, 1)
    assert count_records(bytes(a) + bytes(b)) == (3, 3)
    assert [r.value for r in decode_records(bytes(a) + bytes(b), "t", 0)] == [b"1", b"2", b"3"]


def test_builder_refuses_what_the_format_cannot_hold_and_stays_usable():
    b = BatchBuilder()
    b.append(None, b"x", 0)
    assert not b.fits_timestamp(2**31)
    with pytest.raises(ValueError):
        b.append(None, b"y", 2**31)
    with pytest.raises(ValueError):
        b.append(None, b"y", 0, [(b"n" * 70000, b"")])
    assert b.count == 1
    h = validate_batch(b.finish(-1, 0, -1))
    assert h.record_count == 1
    assert b.is_empty() and len(b) == BATCH_HEADER_BYTES


def test_header_decode_of_a_short_buffer_is_corrupt():
    with pytest.raises(CorruptBatchError):
        decode_header(b"\0" * 10)


def test_mangled_batches_fail_only_as_corrupt_batch():
    """Seeded random damage to batches (bytes changed, cut short, grown)
    with the CRC check off, so the framing checks alone must hold: every
    outcome is a CorruptBatchError or records that lie inside the input,
    never an IndexError or a struct.error."""
    import random

    rng = random.Random(20261123)
    b = BatchBuilder()
    b.append(b"key", b"v" * 40, 10, [(b"h", b"x" * 5), (b"", b"")])
    b.append(None, None, 11)
    b.append(b"", b"", 12, [(b"n" * 3, b"")])
    good = bytes(b.finish(1, 0, 0))
    outcomes = {"corrupt": 0, "ok": 0}
    for _ in range(3000):
        bad = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(BATCH_HEADER_BYTES, len(bad))
            bad[at] = rng.choice([0, 1, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        if rng.random() < 0.3:
            del bad[rng.randrange(BATCH_HEADER_BYTES, len(bad)) :]
            struct.pack_into("<I", bad, 8, len(bad))
        try:
            recs = decode_records(bytes(bad), "t", 0, check_crcs=False)
        except CorruptBatchError:
            outcomes["corrupt"] += 1
            continue
        outcomes["ok"] += 1
        assert len(recs) == 3
        for r in recs:
            assert r.value is None or len(r.value) <= len(bad)
    assert outcomes["corrupt"] > 1000, outcomes
