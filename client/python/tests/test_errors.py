"""Errors arrive as the exception class of their wire code."""

import os
import time

import pytest

import shoal
from shoal import ErrorCode
from shoal.batch import BATCH_HEADER_BYTES, build_batch


@pytest.fixture
def client(broker):
    with shoal.Client(broker.addr) as c:
        yield c


def test_unknown_topic_everywhere(client, topic_name):
    """Producer, consumer and admin calls on a topic that does not exist
    raise UnknownTopicError carrying code 11, not a generic error."""
    p = shoal.Producer(client)
    with pytest.raises(shoal.UnknownTopicError) as e:
        p.send(topic_name, b"v")
    assert e.value.code == ErrorCode.UNKNOWN_TOPIC == 11
    assert not e.value.retriable
    # A partition given: the failure arrives through the delivery and flush.
    d = p.send(topic_name, b"v", partition=0)
    with pytest.raises(shoal.UnknownTopicError):
        p.flush()
    with pytest.raises(shoal.UnknownTopicError):
        d.result(timeout=10)
    assert isinstance(d.exception(), shoal.UnknownTopicError)
    p.flush()  # each failure is reported once
    cons = shoal.Consumer(client)
    with pytest.raises(shoal.UnknownTopicError):
        cons.assign_all(topic_name)
    with pytest.raises(shoal.UnknownTopicError) as e:
        client.describe_topic(topic_name)
    assert e.value.from_broker and topic_name in e.value.message
    with pytest.raises(shoal.UnknownTopicError):
        client.delete_topic(topic_name)
    with pytest.raises(shoal.UnknownTopicError):
        client.fetch(topic_name, 0)
    p.close()


def test_admin_errors(client, topic_name):
    client.create_topic(topic_name, partitions=1)
    with pytest.raises(shoal.TopicExistsError) as e:
        client.create_topic(topic_name, partitions=1)
    assert e.value.code == 13
    with pytest.raises(shoal.InvalidTopicNameError) as e:
        client.create_topic("bad/name", partitions=1)
    assert e.value.code == 10
    with pytest.raises(shoal.InvalidConfigError):
        client.create_topic(topic_name + "-x", partitions=1, sync="sometimes")
    with pytest.raises(shoal.UnknownPartitionError):
        shoal.Consumer(client).assign(topic_name, 5)
    # acks=all on a single node (nothing replicated) is acks=leader.
    r = client.produce_raw(topic_name, 0, build_batch([b"x"]), acks="all")
    assert r.base_offset == 0


def test_a_bad_crc_is_refused_by_the_broker_as_corrupt_batch(client, topic_name):
    """A batch whose CRC does not match is refused with CorruptBatch (20)
    and nothing of the request is stored, good batches beside it included."""
    client.create_topic(topic_name, partitions=1)
    good = bytes(build_batch([b"good"], timestamp_ms=5))
    bad = bytearray(build_batch([b"evil"], timestamp_ms=5))
    bad[-4] ^= 0x01  # a bit of the value, covered by the CRC
    with pytest.raises(shoal.CorruptBatchError) as e:
        client.produce_raw(topic_name, 0, [good, bytes(bad)])
    assert e.value.code == ErrorCode.CORRUPT_BATCH == 20
    assert e.value.from_broker and not e.value.retriable
    assert "crc" in e.value.message.lower()
    assert client.describe_topic(topic_name).partitions[0].high_watermark == 0
    # The connection stays usable, and the good batch alone is stored.
    assert client.produce_raw(topic_name, 0, good).base_offset == 0


def test_corruption_on_the_brokers_disk_is_caught_by_the_consumers_crc_check(own_broker, topic_name):
    """The broker sends log bytes unverified (sendfile); a flipped bit in a
    segment reaches the consumer, whose CRC check raises CorruptBatchError."""
    b = own_broker(cores="0", toml="tail_cache_bytes = 0\n")
    with shoal.Client(b.addr) as c:
        c.create_topic(topic_name, partitions=1, sync="always")
        with shoal.Producer(c) as p:
            for i in range(3):
                p.send(topic_name, b"value-%d" % i)
        log = b.data / "topics" / f"{topic_name}-0" / ("0" * 20 + ".log")
        fd = os.open(log, os.O_RDWR)
        try:
            # len, offset delta, timestamp delta, key len (-1), value len: then "value-0".
            at = BATCH_HEADER_BYTES + 4 + 4 + 4 + 4 + 4 + 1
            byte = os.pread(fd, 1, at)
            assert byte == b"a", "the layout of the segment is not what this test expects"
            os.pwrite(fd, b"A", at)
        finally:
            os.close(fd)
        cons = shoal.Consumer(c)
        cons.assign(topic_name, 0)
        with pytest.raises(shoal.CorruptBatchError) as e:
            cons.poll(timeout=2.0)
        assert e.value.code == 20 and not e.value.from_broker
        assert "CRC mismatch" in str(e.value)
        trusting = shoal.Consumer(c, check_crcs=False)
        trusting.assign(topic_name, 0)
        assert [r.value for r in trusting.poll(timeout=2.0)] == [b"vAlue-0", b"value-1", b"value-2"]


def test_offset_out_of_range_raises_or_resets(client, topic_name):
    client.create_topic(topic_name, partitions=1)
    with shoal.Producer(client) as p:
        p.send(topic_name, b"only")
    cons = shoal.Consumer(client)
    cons.assign(topic_name, 0, start=50)
    with pytest.raises(shoal.OffsetOutOfRangeError) as e:
        cons.poll(timeout=0.5)
    assert e.value.code == 22
    resetting = shoal.Consumer(client, auto_offset_reset="beginning")
    resetting.assign(topic_name, 0, start=50)
    got = []
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        got = resetting.poll(timeout=0.5)
    assert [(r.offset, r.value) for r in got] == [(0, b"only")]


def test_no_broker_at_the_bootstrap_addresses(topic_name):
    from conftest import free_ports

    port = free_ports(0)
    t0 = time.monotonic()
    with pytest.raises(shoal.ConnectError) as e:
        shoal.Client(f"127.0.0.1:{port},127.0.0.1:{port + 1}", connect_timeout=1.0)
    assert e.value.retriable
    assert f"127.0.0.1:{port}" in str(e.value) and f"127.0.0.1:{port + 1}" in str(e.value)
    assert time.monotonic() - t0 < 10


def test_a_deleted_and_recreated_topic_is_not_written_by_an_old_producer(client, topic_name):
    """The producer pins the topic id it first wrote to; after the topic is
    deleted and created again, its sends fail with UnknownTopicId (15)
    instead of landing in the new topic."""
    client.create_topic(topic_name, partitions=1)
    p = shoal.Producer(client, retries=0)
    p.send(topic_name, b"old").result(timeout=10)
    client.delete_topic(topic_name)
    client.create_topic(topic_name, partitions=1)
    d = p.send(topic_name, b"stray")
    with pytest.raises(shoal.UnknownTopicIdError) as e:
        d.result(timeout=10)
    assert e.value.code == 15
    assert client.describe_topic(topic_name).partitions[0].high_watermark == 0
    p.close()
