"""A cluster of three real brokers around a real ZooKeeper: the client
bootstraps from a list, routes each partition to its leader's shard port,
follows NotLeader hints, and waits out a leader that is down."""

import dataclasses
import os
import time

import pytest

import shoal

from conftest import Broker, ZooKeeper, free_ports, zookeeper_available

if not zookeeper_available():
    if os.environ.get("CI"):
        raise RuntimeError("ZooKeeper (Debian's zookeeper package) and java are needed in CI")
    pytest.skip("ZooKeeper or java not installed (apt-get install zookeeper default-jre-headless)", allow_module_level=True)

SESSION_MS = 1500


def member(zk, broker_id, attempts=3):
    """A cluster member. A broker gives up on ZooKeeper after its session
    timeout; a ZooKeeper just started (JVM warming up on a busy machine)
    can take longer than that for a first session, so try again."""
    for attempt in range(attempts):
        try:
            return Broker(
                cores="1" if broker_id % 2 == 0 else "0",
                extra=["--zookeeper", zk.connect, "--broker-id", str(broker_id)],
                toml=f"zk_session_timeout_ms = {SESSION_MS}\n",
            )
        except RuntimeError as e:
            if "ZooKeeper" not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(0.5)


@pytest.fixture
def cluster():
    zk = ZooKeeper()
    brokers = []
    try:
        for broker_id in (1, 2, 3):
            brokers.append(member(zk, broker_id))
        yield zk, brokers
    finally:
        for b in brokers:
            b.cleanup()
        zk.cleanup()


def eventually(what, cond, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_bootstrap_list_routing_and_not_leader_hints(cluster, topic_name):
    _, brokers = cluster
    dead = f"127.0.0.1:{free_ports(0)}"
    with shoal.Client(f"{dead},{brokers[1].addr}", connect_timeout=1.0) as c:
        eventually("three live brokers", lambda: len(c.refresh_metadata().brokers) == 3)
        assert [b.id for b in c.brokers] == [1, 2, 3]
        m = c.metadata
        assert m.controller_id in (1, 2, 3) and m.cluster
        c.create_topic(topic_name, partitions=6)
        t = c.refresh_metadata([topic_name]).topic(topic_name)
        leaders = {p.leader for p in t.partitions}
        assert leaders == {1, 2, 3}, "six partitions spread over three brokers"
        for p in t.partitions:
            assert p.replicas and p.replicas[0] == p.leader and not p.offline

        # Each partition's records go to its leader's shard port.
        with shoal.Producer(c) as prod:
            futs = [prod.send(topic_name, b"%d" % i, partition=i % 6) for i in range(60)]
        for i, f in enumerate(futs):
            m = f.result()
            assert (m.partition, m.offset) == (i % 6, i // 6)
        opened = {addr for addr, conn in c.aio._conns.items() if not conn.closed}
        for p in t.partitions:
            leader = next(b for b in c.brokers if b.id == p.leader)
            assert (leader.host, leader.shard_ports[p.shard]) in opened, (p, opened)

        # A stale view: partition 0 believed to live on another broker. The
        # broker asked answers NotLeader naming the leader's shard port...
        p0 = t.partitions[0]
        wrong = next(i for i in (1, 2, 3) if i != p0.leader)
        stale = dataclasses.replace(t, partitions=(dataclasses.replace(p0, leader=wrong),) + t.partitions[1:])
        c.aio._topics[topic_name] = stale
        with pytest.raises(shoal.NotLeaderError) as e:
            c.fetch(topic_name, 0, 0)
        leader = next(b for b in c.brokers if b.id == p0.leader)
        hint = e.value.leader_hint
        assert e.value.code == 36 and e.value.retriable
        assert (hint.broker_id, hint.port) == (p0.leader, leader.shard_ports[p0.shard])
        # ...and the producer and the consumer go there and succeed.
        c.aio._topics[topic_name] = stale
        with shoal.Producer(c, retries=3) as prod:
            assert prod.send(topic_name, b"after-hint", partition=0).result(20).offset == 10
        c.aio._topics[topic_name] = stale
        cons = shoal.Consumer(c)
        cons.assign(topic_name, 0, start=10)
        got = cons.poll(timeout=5.0)
        assert [(r.offset, r.value) for r in got] == [(10, b"after-hint")]
        cons.assign_all(topic_name)
        seen = []
        deadline = time.monotonic() + 20
        while len(seen) < 61:
            assert time.monotonic() < deadline
            seen += cons.poll(timeout=1.0)
        assert sorted(r.value for r in seen) == sorted([b"%d" % i for i in range(60)] + [b"after-hint"])


def test_a_leader_that_goes_down_and_comes_back_is_waited_for(cluster, topic_name):
    """kill -9 of a partition's leader: sends to it are retried (connection
    refused, then LeaderNotAvailable while it is offline) and succeed once
    it is back; the other partitions are served meanwhile."""
    _, brokers = cluster
    with shoal.Client(",".join(b.addr for b in brokers), connect_timeout=1.0) as c:
        eventually("three live brokers", lambda: len(c.refresh_metadata().brokers) == 3)
        c.create_topic(topic_name, partitions=3)
        t = c.refresh_metadata([topic_name]).topic(topic_name)
        victim_part = next(p for p in t.partitions if p.leader == 3)
        other_part = next(p for p in t.partitions if p.leader != 3)
        prod = shoal.Producer(c, retries=60, retry_backoff_ms=100)
        assert prod.send(topic_name, b"before", partition=victim_part.partition).result(20).offset == 0
        brokers[2].kill9()
        eventually(
            "broker 3 to leave",
            lambda: [b.id for b in c.refresh_metadata().brokers] == [1, 2],
            timeout=SESSION_MS * 6 / 1000,
        )
        assert c.refresh_metadata([topic_name]).topic(topic_name).partitions[victim_part.partition].offline
        with pytest.raises(shoal.LeaderNotAvailableError):
            c.fetch(topic_name, victim_part.partition, 0)
        waiting = prod.send(topic_name, b"during", partition=victim_part.partition)
        assert prod.send(topic_name, b"elsewhere", partition=other_part.partition).result(20).offset == 0
        time.sleep(1.0)
        assert not waiting.done(), "the offline partition cannot have taken it"
        brokers[2].restart()
        assert waiting.result(timeout=60).offset == 1
        cons = shoal.Consumer(c)
        cons.assign(topic_name, victim_part.partition)
        got = []
        deadline = time.monotonic() + 20
        while len(got) < 2:
            assert time.monotonic() < deadline
            got += cons.poll(timeout=1.0)
        assert [r.value for r in got] == [b"before", b"during"]
        prod.close()
