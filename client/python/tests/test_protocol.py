"""The protocol codec and the error codes against the contract, without a
broker: what PROTOCOL.md and wire/src/error.rs say is what this client
knows."""

import re

import flatbuffers
import pytest

import shoal
from shoal import errors, protocol
from shoal.aio.client import parse_bootstrap
from shoal.aio.producer import fnv1a
from shoal.fb import LeaderHint as FbHint
from shoal.fb import ProduceResponse as FbProduceResp
from shoal.fb import Request as FbRequest
from shoal.fb import Response as FbResponse
from shoal.fb.ResponseBody import ResponseBody

from conftest import REPO


def _doc_codes():
    text = (REPO / "wire" / "PROTOCOL.md").read_text()
    section = text[text.index("## Error codes") :]
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^\| (\d+) \| (\w+) \|", section, re.M)}


def _rust_codes():
    text = (REPO / "wire" / "src" / "error.rs").read_text()
    enum = text[text.index("pub enum ErrorCode") :]
    enum = enum[: enum.index("\n}")]
    return {int(v): n for n, v in re.findall(r"^\s+(\w+) = (\d+),", enum, re.M)}


def _snake(name):
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def test_error_codes_match_protocol_md_and_the_rust_enum():
    doc, rust = _doc_codes(), _rust_codes()
    assert len(doc) >= 28, doc
    assert doc == rust, "PROTOCOL.md and wire/src/error.rs disagree"
    mine = {int(c): c.name for c in errors.ErrorCode}
    assert set(mine) == set(doc)
    for code, name in doc.items():
        assert mine[code] == _snake(name), (code, name)


def test_every_code_but_none_has_its_exception_class():
    for code in errors.ErrorCode:
        if code == errors.ErrorCode.NONE:
            continue
        e = errors.error_for(int(code), "msg")
        assert type(e) is not errors.BrokerError, code
        assert e.code == code and isinstance(e.code, errors.ErrorCode)
        assert isinstance(e, shoal.BrokerError) and isinstance(e, shoal.ShoalError)
        assert f"[{int(code)} " in str(e)
    assert isinstance(errors.error_for(11, "x"), shoal.UnknownTopicError)
    assert isinstance(errors.error_for(20, "x"), shoal.CorruptBatchError)
    # A code this client does not know still carries its number.
    e = errors.error_for(999, "future")
    assert type(e) is shoal.BrokerError and e.code == 999 and not e.retriable


def test_retriable_codes_are_the_rust_clients():
    text = (REPO / "wire" / "src" / "error.rs").read_text()
    body = text[text.index("pub fn is_retriable") :]
    body = body[: body.index("\n    }")]
    rust = {_snake(n) for n in re.findall(r"ErrorCode::(\w+)", body)}
    assert {c.name for c in errors.RETRIABLE_CODES} == rust
    assert errors.error_for(36, "").retriable and not errors.error_for(11, "").retriable


def _response(corr, code=0, message=None, hint=None, produce=None):
    b = flatbuffers.Builder(128)
    msg = b.CreateString(message) if message else None
    h = None
    if hint:
        host = b.CreateString(hint[1])
        FbHint.Start(b)
        FbHint.AddBrokerId(b, hint[0])
        FbHint.AddHost(b, host)
        FbHint.AddPort(b, hint[2])
        FbHint.AddLeaderEpoch(b, hint[3])
        h = FbHint.End(b)
    body = None
    if produce:
        FbProduceResp.Start(b)
        FbProduceResp.AddBaseOffset(b, produce[0])
        FbProduceResp.AddLastOffset(b, produce[1])
        FbProduceResp.AddDuplicate(b, produce[2])
        body = FbProduceResp.End(b)
    FbResponse.Start(b)
    FbResponse.AddCorrelationId(b, corr)
    FbResponse.AddErrorCode(b, code)
    if msg is not None:
        FbResponse.AddErrorMessage(b, msg)
    if body is not None:
        FbResponse.AddBodyType(b, ResponseBody.ProduceResponse)
        FbResponse.AddBody(b, body)
    if h is not None:
        FbResponse.AddLeaderHint(b, h)
    b.Finish(FbResponse.End(b))
    return bytes(b.Output())


def test_responses_decode_with_the_leader_hint():
    r = protocol.decode_response(
        _response(9, 36, "not the leader", hint=(3, "10.0.0.3", 29401, 7))
    )
    assert (r.correlation_id, r.error_code, r.error_message) == (9, 36, "not the leader")
    e = errors.error_for(r.error_code, r.error_message, r.leader_hint)
    assert isinstance(e, shoal.NotLeaderError) and e.retriable
    assert e.leader_hint == errors.LeaderHint(3, "10.0.0.3", 29401, 7) and e.leader_hint.usable
    r = protocol.decode_response(_response(5, produce=(10, 12, True)))
    assert r.leader_hint is None
    assert protocol.decode_produce(r) == protocol.ProduceResult(10, 12, True)
    with pytest.raises(shoal.ProtocolError, match="expected response body"):
        protocol.decode_metadata(r)


def test_a_garbage_header_is_a_protocol_error_not_a_crash():
    for junk in (b"", b"\xff" * 3, b"\xff" * 40, b"\x04\x00\x00\x00" + b"\x00" * 4):
        with pytest.raises(shoal.ProtocolError):
            r = protocol.decode_response(junk)
            protocol.decode_produce(r)
    with pytest.raises(shoal.ProtocolError):
        protocol.check_prefix(2, 0)
    with pytest.raises(shoal.ProtocolError):
        protocol.check_prefix(100, 97)
    with pytest.raises(shoal.ProtocolError):
        protocol.check_prefix(protocol.RESPONSE_BYTES_MAX, 10)


def test_requests_encode_as_the_schema_reads_them():
    body = protocol.fetch_request("orders", 77, 3, 123, None, 4096, 1, 250)
    header = protocol.encode_request(42, "py", *body)
    r = FbRequest.Request.GetRootAs(header, 0)
    assert (r.Version(), r.CorrelationId(), r.ClientId(), r.BodyType()) == (1, 42, b"py", 7)
    from shoal.fb.FetchRequest import FetchRequest

    f = FetchRequest()
    t = r.Body()
    f.Init(t.Bytes, t.Pos)
    assert (f.Topic(), f.TopicId(), f.Partition(), f.Offset(), f.ByTimestamp()) == (b"orders", 77, 3, 123, False)
    assert (f.MaxBytes(), f.MinBytes(), f.MaxWaitMs()) == (4096, 1, 250)
    assert protocol.prefix(10, 5) == (19).to_bytes(4, "little") + (10).to_bytes(4, "little")


def test_bootstrap_lists():
    assert parse_bootstrap("a:1,b:2 , [::1]:3,c") == [("a", 1), ("b", 2), ("::1", 3), ("c", 9400)]
    assert parse_bootstrap(["h:5"]) == [("h", 5)]
    for bad in ("", "a:x", "a:0", ",", "a:70000"):
        with pytest.raises(ValueError):
            parse_bootstrap(bad)


def test_key_hash_is_the_rust_clients_fnv1a():
    # FNV-1a 32-bit reference values.
    assert fnv1a(b"") == 0x811C9DC5
    assert fnv1a(b"a") == 0xE40C292C
    assert fnv1a(b"foobar") == 0xBF9CF968


def test_acks_names():
    assert [protocol.acks_code(a) for a in ("none", "leader", "ALL", 1)] == [0, 1, 2, 1]
    with pytest.raises(ValueError):
        protocol.acks_code("some")
