"""Python and the Rust client (the ``shoal`` CLI) read each other's
records byte for byte."""

import os

import pytest

import shoal
from shoal.aio.producer import fnv1a

from conftest import run_cli


def _lines(n):
    # Every byte value but newline (the CLI's separator), UTF-8 and not.
    alphabet = bytes(b for b in range(256) if b != 0x0A)
    out = []
    for i in range(n):
        raw = os.urandom(1 + i % 300)
        out.append(bytes(alphabet[b % len(alphabet)] for b in raw) + b"#%d" % i)
    out.append(b"")  # an empty message
    out.append("héllo wörld ✓".encode())
    return out


def test_python_produces_and_shoal_consume_reads_the_same_bytes(broker, topic_name):
    values = _lines(500)
    with shoal.Client(broker.addr) as c:
        c.create_topic(topic_name, partitions=1)
        with shoal.Producer(c) as p:
            futs = [p.send(topic_name, v) for v in values]
            p.flush()
            assert [f.result().offset for f in futs] == list(range(len(values)))
    out = run_cli(broker.addr, "consume", topic_name, "--from-beginning").stdout
    assert out == b"".join(v + b"\n" for v in values)


def _text_lines(n):
    # `shoal produce` reads stdin as UTF-8 text lines (a line that is not
    # UTF-8 ends its input; a trailing CR is dropped with the newline).
    chars = "abcXYZ019 \t!~{}é✓漢🐟\\\""
    out = []
    for i in range(n):
        raw = os.urandom(1 + i % 200)
        out.append(("".join(chars[b % len(chars)] for b in raw) + "#%d" % i).encode())
    out.append(b"")
    return out


def test_shoal_produce_output_is_read_by_python_byte_for_byte(broker, topic_name):
    values = _text_lines(500)
    with shoal.Client(broker.addr) as c:
        c.create_topic(topic_name, partitions=1)
        r = run_cli(broker.addr, "produce", topic_name, stdin=b"".join(v + b"\n" for v in values))
        assert b"%d messages acknowledged" % len(values) in r.stderr
        cons = shoal.Consumer(c)
        cons.assign(topic_name, 0, "beginning")
        got = []
        while len(got) < len(values):
            batch = cons.poll(timeout=5.0)
            assert batch, f"only {len(got)} of {len(values)} arrived"
            got += batch
    assert [r.value for r in got] == values
    assert [r.offset for r in got] == list(range(len(values)))
    assert all(r.key is None and r.headers == [] for r in got)


@pytest.mark.parametrize("key", ["user-1", "k", "another key"])
def test_both_clients_put_a_key_in_the_same_partition(broker, topic_name, key):
    """The Rust client's key hash (FNV-1a) and Python's agree: a key's
    records from either land in one partition."""
    parts = 5
    with shoal.Client(broker.addr) as c:
        c.create_topic(topic_name, partitions=parts)
        run_cli(broker.addr, "produce", topic_name, "--key", key, stdin=b"from-rust\n")
        with shoal.Producer(c) as p:
            m = p.send(topic_name, b"from-python", key=key).result(timeout=15)
        want = fnv1a(key.encode()) % parts
        assert m.partition == want
        out = run_cli(
            broker.addr, "consume", topic_name, "--from-beginning", "--partition", str(want)
        ).stdout
        assert out == b"from-rust\nfrom-python\n"
        cons = shoal.Consumer(c)
        cons.assign(topic_name, want)
        got = cons.poll(timeout=5.0)
        assert [(r.key, r.value) for r in got] == [(key.encode(), b"from-rust"), (key.encode(), b"from-python")]


def test_topics_made_by_either_client_are_seen_by_the_other(broker, topic_name):
    run_cli(broker.addr, "topic", "create", topic_name, "--partitions", "4", "--sync", "always")
    with shoal.Client(broker.addr) as c:
        t = c.topic(topic_name)
        assert (len(t.partitions), t.sync) == (4, "always")
        c.create_topic(topic_name + "-py", partitions=2)
    out = run_cli(broker.addr, "topic", "describe", topic_name + "-py").stdout.decode()
    assert f"topic {topic_name}-py  partitions=2" in out
