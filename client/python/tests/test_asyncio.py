"""The asyncio interface (each test runs its own event loop with
``asyncio.run``; no plugin needed)."""

import asyncio
import time

import pytest

import shoal
from shoal import aio


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_async_round_trip_with_context_managers(broker, topic_name):
    async def main():
        async with aio.Client(broker.addr) as c:
            await c.create_topic(topic_name, partitions=2)
            async with aio.Producer(c) as p:
                deliveries = [
                    await p.send(topic_name, f"v{i}", key=f"k{i % 4}", headers={"i": str(i)})
                    for i in range(200)
                ]
                metas = await asyncio.gather(*deliveries)
                one = await p.send_and_wait(topic_name, b"last", partition=1)
            assert all(isinstance(m, aio.RecordMetadata) for m in metas)
            assert one.partition == 1 and one.offset == sum(m.partition == 1 for m in metas)
            async with aio.Consumer(c) as cons:
                await cons.assign_all(topic_name, start="beginning")
                got = []
                while len(got) < 201:
                    batch = await cons.poll(timeout=2.0)
                    assert batch, f"only {len(got)} arrived"
                    got += batch
            assert sorted(r.value for r in got) == sorted([f"v{i}".encode() for i in range(200)] + [b"last"])
            by_value = {r.value: r for r in got}
            for i, m in enumerate(metas):
                r = by_value[f"v{i}".encode()]
                assert (r.partition, r.offset, r.key) == (m.partition, m.offset, f"k{i % 4}".encode())
                assert r.headers == [(b"i", str(i).encode())]
        assert c.closed

    run(main())


def test_concurrent_senders_keep_per_task_order(broker, topic_name):
    async def main():
        async with aio.Client(broker.addr) as c:
            await c.create_topic(topic_name, partitions=1)
            p = aio.Producer(c, linger_ms=0)

            async def sender(n):
                return [await p.send(topic_name, b"%d:%d" % (n, i)) for i in range(100)]

            lists = await asyncio.gather(*(sender(n) for n in range(5)))
            await p.flush()
            for ds in lists:
                offsets = [(await d).offset for d in ds]
                assert offsets == sorted(offsets)
            await p.close()
            cons = aio.Consumer(c)
            await cons.assign(topic_name, 0)
            got = []
            async for r in cons:
                got.append(r)
                if len(got) == 500:
                    break
            for n in range(5):
                mine = [int(r.value.split(b":")[1]) for r in got if r.value.startswith(b"%d:" % n)]
                assert mine == list(range(100))

    run(main())


def test_async_errors_are_typed(broker, topic_name):
    async def main():
        async with aio.Client(broker.addr) as c:
            with pytest.raises(shoal.UnknownTopicError) as e:
                await c.describe_topic(topic_name)
            assert e.value.code == 11
            p = aio.Producer(c)
            with pytest.raises(shoal.UnknownTopicError):
                await p.send(topic_name, b"x")
            d = await p.send(topic_name, b"x", partition=0)
            with pytest.raises(shoal.UnknownTopicError):
                await d
            with pytest.raises(shoal.UnknownTopicError):
                await p.flush()
            await c.create_topic(topic_name, partitions=1)
            with pytest.raises(shoal.TopicExistsError):
                await c.create_topic(topic_name, partitions=1)
            bad = bytearray(shoal.batch.build_batch([b"x"]))
            bad[-1] ^= 1
            with pytest.raises(shoal.CorruptBatchError):
                await c.produce_raw(topic_name, 0, bytes(bad))
            await p.close()

    run(main())


def test_async_long_poll_wakes_on_data(broker, topic_name):
    async def main():
        async with aio.Client(broker.addr) as c:
            await c.create_topic(topic_name, partitions=3)
            cons = aio.Consumer(c)
            await cons.assign_all(topic_name, start="end")
            p = aio.Producer(c)

            async def later():
                await asyncio.sleep(0.4)
                await p.send(topic_name, b"wake", partition=2)

            t0 = time.monotonic()
            task = asyncio.ensure_future(later())
            got = await cons.poll(timeout=10)
            waited = time.monotonic() - t0
            await task
            assert [(r.partition, r.value) for r in got] == [(2, b"wake")]
            assert 0.3 < waited < 5
            assert cons.positions()[(topic_name, 2)] == 1
            await p.close()

    run(main())


def test_async_delivery_is_also_a_blocking_future_off_the_loop(broker, topic_name):
    """A Delivery made on the loop refuses to block it, and resolves for
    a thread waiting on it."""

    async def main():
        async with aio.Client(broker.addr) as c:
            await c.create_topic(topic_name, partitions=1)
            p = aio.Producer(c, linger_ms=50)
            d = await p.send(topic_name, b"x")
            with pytest.raises(RuntimeError, match="block the event loop"):
                d.result()
            meta = await asyncio.get_running_loop().run_in_executor(None, d.result, 10)
            assert meta.offset == 0 and d.done()
            await p.close()

    run(main())


def test_graceful_broker_restart_under_the_async_producer(own_broker, topic_name):
    """SIGTERM (a rolling restart) while an async producer sends: every
    record is acknowledged once the broker is back, none twice."""
    b = own_broker(cores="0")

    async def main():
        async with aio.Client(b.addr, connect_timeout=1.0) as c:
            await c.create_topic(topic_name, partitions=1)
            p = aio.Producer(c, retries=40, retry_backoff_ms=50)
            ds = []
            loop = asyncio.get_running_loop()

            def restart():
                code = b.terminate()
                b.restart()
                return code

            restarting = None
            i, stop_at = 0, None
            # Sends go on while the broker stops and starts, and for 200
            # records after it is back.
            while stop_at is None or i < stop_at:
                ds.append(await p.send(topic_name, b"%d" % i))
                if i == 300:
                    restarting = loop.run_in_executor(None, restart)
                if restarting is not None and restarting.done() and stop_at is None:
                    stop_at = i + 200
                i += 1
                if i % 5 == 0:
                    await asyncio.sleep(0.001)
            n = len(ds)
            metas = await asyncio.gather(*ds)
            assert await restarting == 0, b.log_text()[-2000:]
            assert [m.offset for m in metas] == list(range(n))
            cons = aio.Consumer(c)
            await cons.assign(topic_name, 0)
            got = []
            while len(got) < n:
                batch = await cons.poll(timeout=2)
                assert batch
                got += batch
            assert [int(r.value) for r in got] == list(range(n))
            await p.close()

    run(main(), timeout=120)
