"""A broker restart in the middle of a stream is survived by retries."""

import threading
import time

import shoal


def test_producer_and_consumer_survive_a_kill9_restart_mid_stream(own_broker, topic_name):
    """kill -9 of the broker while a producer sends and a consumer reads,
    then a restart on the same ports and data: every send is acknowledged
    (retries; idempotence keeps a retried batch from being stored twice),
    and the consumer, still polling, gets every record exactly once and in
    order per partition. The topic syncs `always`, so nothing acknowledged
    is lost in the kill."""
    b = own_broker(cores="0")
    n = 3000
    with shoal.Client(b.addr, connect_timeout=1.0) as c:
        c.create_topic(topic_name, partitions=2, sync="always")
        p = shoal.Producer(c, retries=40, retry_backoff_ms=50, linger_ms=2)
        cons = shoal.Consumer(c, retry_timeout=60.0)
        cons.assign_all(topic_name, start="beginning")
        deliveries = []
        acked = [0]
        lock = threading.Lock()

        def on_ack(d):
            if d.exception(0) is None:
                with lock:
                    acked[0] += 1

        def produce():
            for i in range(n):
                d = p.send(topic_name, b"%d" % i, partition=i % 2)
                d.add_done_callback(on_ack)
                deliveries.append(d)
                if i % 4 == 0:
                    time.sleep(0.001)

        got = []
        consume_error = []

        def consume():
            deadline = time.monotonic() + 120
            try:
                while len(got) < n and time.monotonic() < deadline:
                    got.extend(cons.poll(timeout=0.5))
            except Exception as e:  # reported below
                consume_error.append(e)

        producer = threading.Thread(target=produce)
        consumer = threading.Thread(target=consume)
        producer.start()
        consumer.start()
        deadline = time.monotonic() + 60
        while acked[0] < 500:
            assert time.monotonic() < deadline, "nothing acknowledged before the restart"
            time.sleep(0.005)
        b.kill9()
        sent_at_kill, acked_at_kill = len(deliveries), acked[0]
        time.sleep(0.5)
        b.restart()
        producer.join(120)
        p.flush(timeout=120)
        offsets = [d.result(timeout=60) for d in deliveries]
        consumer.join(130)
        assert not consume_error, consume_error
        assert sent_at_kill < n and acked_at_kill < n, "the restart was not mid-stream"
        assert len(offsets) == n
        for part in (0, 1):
            values = [int(r.value) for r in got if r.partition == part]
            assert values == list(range(part, n, 2)), f"partition {part}: lost, duplicated or reordered"
            assert [r.offset for r in got if r.partition == part] == list(range(n // 2))
        assert sorted((m.partition, m.offset) for m in offsets) == sorted(
            (r.partition, r.offset) for r in got
        )
        p.close()
