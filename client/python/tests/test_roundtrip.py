"""Round trips through a real broker with the blocking API."""

import threading
import time

import pytest

import shoal
from shoal.aio.producer import fnv1a
from shoal.batch import build_batch


@pytest.fixture
def client(broker):
    with shoal.Client(broker.addr) as c:
        yield c


def drain(cons, expect, timeout=20.0):
    """Polls until ``expect`` records arrived (or fails after ``timeout``)."""
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < expect:
        assert time.monotonic() < deadline, f"only {len(got)} of {expect} records arrived"
        got += cons.poll(timeout=1.0)
    return got


def test_the_issue_api_shape_round_trips_keys_values_headers_and_timestamps(client, topic_name):
    """The README's blocking example: create, send with and without keys,
    flush, assign_all from the beginning, poll."""
    info = client.create_topic(topic_name, partitions=3)
    assert [p.partition for p in info.partitions] == [0, 1, 2]
    assert info.topic_id != 0
    p = shoal.Producer(client)
    sent = {}
    t0 = int(time.time() * 1000)
    for i in range(300):
        key = None if i % 3 == 0 else b"key-%d" % (i % 7)
        fut = p.send(topic_name, b"value-%d" % i, key=key, headers=[("n", str(i).encode())])
        sent[b"value-%d" % i] = (key, fut)
    p.flush()
    for value, (key, fut) in sent.items():
        m = fut.result(timeout=0)
        assert fut.done() and m.topic == topic_name
        if key is not None:
            assert m.partition == fnv1a(key) % 3
    cons = shoal.Consumer(client)
    cons.assign_all(topic_name, start="beginning")
    got = drain(cons, 300)
    assert len(got) == 300 and cons.poll(timeout=0.2) == []
    by_value = {r.value: r for r in got}
    assert set(by_value) == set(sent)
    for value, (key, fut) in sent.items():
        r = by_value[value]
        m = fut.result()
        assert (r.topic, r.partition, r.offset, r.key) == (topic_name, m.partition, m.offset, key)
        assert r.headers == [(b"n", value.split(b"-")[1])]
        assert t0 - 1000 <= r.timestamp <= int(time.time() * 1000) + 1000
    # Per partition: offsets 0, 1, 2, ... in order, in send order.
    for part in range(3):
        recs = [r for r in got if r.partition == part]
        assert [r.offset for r in recs] == list(range(len(recs)))
        assert [int(r.value.split(b"-")[1]) for r in recs] == sorted(
            int(r.value.split(b"-")[1]) for r in recs
        )
    assert cons.positions() == {(topic_name, q): len([r for r in got if r.partition == q]) for q in range(3)}
    p.close()


def test_start_positions_offset_end_and_timestamp(client, topic_name):
    client.create_topic(topic_name, partitions=1)
    p = shoal.Producer(client, linger_ms=0)
    for i in range(5):
        p.send(topic_name, b"early-%d" % i, timestamp_ms=1_000_000 + i).result(10)
    for i in range(5):
        p.send(topic_name, b"late-%d" % i, timestamp_ms=2_000_000 + i).result(10)
    cons = shoal.Consumer(client)
    assert cons.assign(topic_name, 0, start=3) == 3
    assert [r.offset for r in drain(cons, 7)] == list(range(3, 10))
    assert cons.seek(topic_name, 0, "end") == 10
    assert cons.poll(timeout=0.2) == []
    assert cons.seek(topic_name, 0, shoal.Timestamp(2_000_002)) == 7
    assert [r.value for r in drain(cons, 3)] == [b"late-2", b"late-3", b"late-4"]
    # Inside the first batch: the first record at or after the time.
    assert cons.seek(topic_name, 0, shoal.Timestamp(1_000_003)) == 3
    assert cons.seek(topic_name, 0, shoal.Timestamp(3_000_000)) == 10
    assert cons.seek(topic_name, 0, "beginning") == 0
    assert [r.timestamp for r in drain(cons, 10)][:2] == [1_000_000, 1_000_001]
    with pytest.raises(ValueError):
        cons.seek(topic_name, 0, "middle")
    p.close()


def test_long_poll_returns_when_data_arrives_and_empty_after_the_timeout(client, topic_name):
    client.create_topic(topic_name, partitions=2)
    cons = shoal.Consumer(client)
    cons.assign_all(topic_name, start="end")
    t0 = time.monotonic()
    assert cons.poll(timeout=0.6) == []
    waited = time.monotonic() - t0
    assert 0.5 <= waited < 3.0, waited
    p = shoal.Producer(client)
    timer = threading.Timer(0.5, lambda: p.send(topic_name, b"late", partition=1))
    timer.start()
    t0 = time.monotonic()
    got = cons.poll(timeout=10.0)
    waited = time.monotonic() - t0
    timer.join()
    assert [(r.partition, r.value) for r in got] == [(1, b"late")]
    assert 0.3 < waited < 5.0, waited
    p.close()


def test_max_records_hands_out_the_rest_next_time(client, topic_name):
    client.create_topic(topic_name, partitions=1)
    with shoal.Producer(client) as p:
        for i in range(50):
            p.send(topic_name, b"%d" % i)
    cons = shoal.Consumer(client)
    cons.assign(topic_name, 0)
    seen = []
    while len(seen) < 50:
        batch = cons.poll(timeout=2.0, max_records=7)
        assert 0 < len(batch) <= 7
        seen += [int(r.value) for r in batch]
    assert seen == list(range(50))


def test_idempotent_retry_of_a_stored_batch_is_a_duplicate(client, topic_name):
    """A batch resent with the same producer id and sequence is answered
    with its first offsets and stored once (what makes retries safe)."""
    client.create_topic(topic_name, partitions=1)
    batch = build_batch([b"a", b"b"], timestamp_ms=1, producer_id=4242, base_sequence=0)
    first = client.produce_raw(topic_name, 0, batch)
    again = client.produce_raw(topic_name, 0, batch)
    assert (first.base_offset, first.last_offset, first.duplicate) == (0, 1, False)
    assert (again.base_offset, again.last_offset, again.duplicate) == (0, 1, True)
    assert client.describe_topic(topic_name).partitions[0].high_watermark == 2


def test_the_broker_recognises_a_retry_among_the_last_five_batches_only(client, topic_name):
    """The contract behind the producer's five batches per request
    (PROTOCOL.md, "Idempotent producers"): a retried request of five
    batches is a duplicate; of six, its first batch is no longer known."""
    client.create_topic(topic_name, partitions=2)

    def batches(pid, n):
        return [bytes(build_batch([b"r%d" % i], 1, producer_id=pid, base_sequence=i)) for i in range(n)]

    five = batches(7001, 5)
    assert client.produce_raw(topic_name, 0, five).duplicate is False
    again = client.produce_raw(topic_name, 0, five)
    assert (again.base_offset, again.last_offset, again.duplicate) == (0, 4, True)
    six = batches(7002, 6)
    assert client.produce_raw(topic_name, 1, six).last_offset == 5
    with pytest.raises(shoal.OutOfOrderSequenceError):
        client.produce_raw(topic_name, 1, six)
    assert client.describe_topic(topic_name).partitions[1].high_watermark == 6
    assert shoal.aio.producer.REQUEST_BATCHES_MAX == 5


def test_acks_none_and_round_robin(client, topic_name):
    client.create_topic(topic_name, partitions=3)
    with shoal.Producer(client, acks="none", partitioner="round_robin", linger_ms=0) as p:
        futs = [p.send(topic_name, b"x", key=b"same") for _ in range(30)]
        p.flush()
        parts = {f.result().partition for f in futs}
    assert parts == {0, 1, 2}
    # acks=none answers before the write is done: the end moves a moment later.
    deadline = time.monotonic() + 10
    while sum(pi.high_watermark for pi in client.describe_topic(topic_name).partitions) < 30:
        assert time.monotonic() < deadline, "records sent with acks=none never arrived"
        time.sleep(0.05)
    assert sum(pi.high_watermark for pi in client.describe_topic(topic_name).partitions) == 30


def test_batching_by_size_and_linger(client, topic_name):
    """Records sent together share batches up to batch_bytes; one record
    waits for its linger, not for ever."""
    client.create_topic(topic_name, partitions=1)
    p = shoal.Producer(client, batch_bytes=4096, linger_ms=200)
    futs = [p.send(topic_name, b"v" * 1000) for _ in range(12)]
    p.flush()
    assert [f.result().offset for f in futs] == list(range(12))
    fr = client.fetch(topic_name, 0, 0, max_bytes=1 << 20)
    sizes = [h.record_count for h, _ in shoal.batch.iter_batches(fr.payload)]
    assert sum(sizes) == 12 and max(sizes) <= 4 and len(sizes) >= 3, sizes
    t0 = time.monotonic()
    f = p.send(topic_name, b"lonely")
    assert f.result(timeout=5).offset == 12
    assert 0.15 <= time.monotonic() - t0 < 3.0
    p.close()


def test_a_full_buffer_blocks_for_max_block_then_fails(client, topic_name):
    client.create_topic(topic_name, partitions=1)
    p = shoal.Producer(client, buffer_bytes_max=4000, max_block=0, linger_ms=10_000)
    p.send(topic_name, b"x" * 1500)
    p.send(topic_name, b"x" * 1500)
    with pytest.raises(shoal.BufferFullError):
        p.send(topic_name, b"x" * 1500)
    with pytest.raises(shoal.RecordTooLargeError):
        p.send(topic_name, b"x" * 5000)
    p.flush()
    assert p.buffered_bytes == 0
    p.send(topic_name, b"x" * 1500).result(timeout=15)
    p.close()


def test_delivery_callbacks_and_many_threads(client, topic_name):
    client.create_topic(topic_name, partitions=2)
    p = shoal.Producer(client)
    done = []
    lock = threading.Lock()

    def cb(d):
        with lock:
            done.append(d.result().offset)

    def worker(n):
        for i in range(200):
            p.send(topic_name, b"%d-%d" % (n, i), key=b"%d" % n).add_done_callback(cb)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    p.flush()
    assert len(done) == 800
    cons = shoal.Consumer(client)
    cons.assign_all(topic_name)
    got = drain(cons, 800)
    for n in range(4):
        mine = [int(r.value.split(b"-")[1]) for r in got if r.value.startswith(b"%d-" % n)]
        assert mine == list(range(200)), "one thread's records keep their order"
    p.close()


def test_metadata_admin_and_metrics(client, topic_name):
    client.create_topic(topic_name, partitions=2, sync="always", retention_ms=60_000)
    t = client.describe_topic(topic_name)
    assert (t.name, len(t.partitions), t.sync, t.retention_ms) == (topic_name, 2, "always", 60_000)
    assert topic_name in [x.name for x in client.list_topics()]
    m = client.refresh_metadata()
    assert m.topic(topic_name) is not None
    assert len(m.brokers) == 1 and len(m.brokers[0].shard_ports) == 2
    assert client.broker_version
    metrics = client.metrics()
    assert isinstance(metrics, dict) and metrics and all(isinstance(v, int) for v in metrics.values())
    client.delete_topic(topic_name)
    assert topic_name not in [x.name for x in client.list_topics()]
