"""The blocking interface.

Each :class:`Client` runs one asyncio event loop on a daemon thread of its
own (``shoal-io``), where the connections, timers and sender tasks of the
:mod:`shoal.aio` objects live; blocking calls hand it coroutines and wait.
:meth:`Producer.send` does not cross threads per record: it appends to the
partition's batch under a lock and wakes the loop only when a batch is
sealed, so it stays cheap.

Do not call blocking methods from a delivery callback (callbacks run on the
``shoal-io`` thread): that would wait for the thread that is waiting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from typing import Dict, Iterator, List, Optional, Sequence, Union

from . import aio
from .batch import Record
from .errors import BufferFullError, ClosedError
from .protocol import BrokerInfo, ClusterMetadata, FetchResult, ProduceResult, TopicInfo


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.call_soon(started.set)
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, name="shoal-io", daemon=True)
        self.thread.start()
        started.wait()

    def run(self, coro, timeout: Optional[float] = None):
        if threading.current_thread() is self.thread:
            coro.close()
            raise RuntimeError("a blocking shoal call on the shoal-io thread would deadlock")
        if self.loop.is_closed():
            coro.close()
            raise ClosedError("the client was closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"no result within {timeout}s") from None
        except BaseException:
            # KeyboardInterrupt and the like: stop the work we were waiting for.
            fut.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


class Client:
    """A handle to a Shoal cluster or broker (blocking).

    ``bootstrap`` is ``"host:port[,host:port...]"``; any live broker among
    them is enough. Loads metadata at once (raises if no broker answers).
    Close it, or use it as a context manager.
    """

    def __init__(
        self,
        bootstrap: Union[str, Sequence[str]],
        *,
        client_id: Optional[str] = None,
        connect_timeout: float = 5.0,
        request_timeout: float = 40.0,
        reconnect_backoff_max: float = 30.0,
        user: Optional[str] = None,
        password: Optional[str] = None,
        tls_ca: Optional[str] = None,
        tls_cert: Optional[str] = None,
        tls_key: Optional[str] = None,
        tls_server_name: Optional[str] = None,
    ):
        self._aio = aio.Client(
            bootstrap,
            client_id=client_id,
            connect_timeout=connect_timeout,
            request_timeout=request_timeout,
            reconnect_backoff_max=reconnect_backoff_max,
            user=user,
            password=password,
            tls_ca=tls_ca,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_server_name=tls_server_name,
        )
        self._thread = _LoopThread()
        try:
            self._run(self._aio.connect())
        except BaseException:
            self._thread.stop()
            raise

    def _run(self, coro, timeout: Optional[float] = None):
        return self._thread.run(coro, timeout)

    @property
    def aio(self) -> aio.Client:
        """The asyncio client underneath (its loop is the ``shoal-io``
        thread's)."""
        return self._aio

    # ---- metadata ---------------------------------------------------------------

    def refresh_metadata(self, topics: Optional[Sequence[str]] = None) -> ClusterMetadata:
        return self._run(self._aio.refresh_metadata(topics))

    @property
    def metadata(self) -> Optional[ClusterMetadata]:
        return self._aio.metadata

    @property
    def brokers(self) -> List[BrokerInfo]:
        return self._aio.brokers

    @property
    def broker_version(self) -> Optional[str]:
        return self._aio.broker_version

    def topic(self, name: str) -> TopicInfo:
        """Cached metadata of a topic, loaded if not known."""
        t = self._aio.cached_topic(name)
        return t if t is not None else self._run(self._aio.topic(name))

    def partition_count(self, topic: str) -> int:
        return len(self.topic(topic).partitions)

    # ---- admin ----------------------------------------------------------------

    def create_topic(
        self,
        name: str,
        partitions: int = 1,
        *,
        replication_factor: int = 1,
        sync: Optional[str] = None,
        retention_ms: Optional[int] = None,
        retention_bytes: Optional[int] = None,
        segment_bytes: Optional[int] = None,
    ) -> TopicInfo:
        """Creates a topic; ``sync`` is ``always``, ``interval:<ms>`` or
        ``none`` (``None``: the broker's default)."""
        return self._run(
            self._aio.create_topic(
                name,
                partitions,
                replication_factor=replication_factor,
                sync=sync,
                retention_ms=retention_ms,
                retention_bytes=retention_bytes,
                segment_bytes=segment_bytes,
            )
        )

    def delete_topic(self, name: str) -> None:
        self._run(self._aio.delete_topic(name))

    def list_topics(self) -> List[TopicInfo]:
        return self._run(self._aio.list_topics())

    def describe_topic(self, name: str) -> TopicInfo:
        return self._run(self._aio.describe_topic(name))

    def metrics(self) -> Dict[str, int]:
        return self._run(self._aio.metrics())

    # ---- low level --------------------------------------------------------------

    def produce_raw(self, topic: str, partition: int, batches, **kw) -> ProduceResult:
        """Sends caller-built record batches once (see
        :meth:`shoal.aio.Client.produce_raw`)."""
        return self._run(self._aio.produce_raw(topic, partition, batches, **kw))

    def fetch(self, topic: str, partition: int, offset: int = 0, **kw) -> FetchResult:
        """One raw fetch (see :meth:`shoal.aio.Client.fetch`)."""
        return self._run(self._aio.fetch(topic, partition, offset, **kw))

    # ---- lifecycle ----------------------------------------------------------------

    def close(self) -> None:
        if self._thread.loop.is_closed():
            return
        try:
            self._run(self._aio.close(), timeout=10)
        finally:
            self._thread.stop()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Producer:
    """Sends records (blocking). ``send`` returns a :class:`Delivery`
    future; ``flush`` waits for everything sent so far. Settings as
    :class:`shoal.aio.Producer`. Thread-safe."""

    def __init__(self, client: Client, **config):
        self._client = client

        async def make() -> aio.Producer:
            p = aio.Producer(client.aio, **config)
            p._bind()
            return p

        self._aio: aio.Producer = client._run(make())

    @property
    def aio(self) -> aio.Producer:
        return self._aio

    @property
    def buffered_bytes(self) -> int:
        return self._aio.buffered_bytes

    def send(
        self,
        topic: str,
        value,
        key=None,
        *,
        partition: Optional[int] = None,
        headers=None,
        timestamp_ms: Optional[int] = None,
    ) -> aio.Delivery:
        """Queues a record; the returned :class:`Delivery`'s ``result()``
        is its :class:`RecordMetadata` once acknowledged. Records to one
        partition are stored in call order. Blocks while the buffer is full
        (up to ``max_block`` seconds, then :class:`BufferFullError`)."""
        p = self._aio
        key, value, hs, nbytes = p._prepare(key, value, headers)
        if partition is None:
            t = p.client._topics.get(topic)
            n = len(t.partitions) if t is not None else self._client._run(p.partition_count(topic))
            partition = p.choose_partition(key, n)
        if not p._buffer.try_reserve(nbytes):
            p._seal_all()
            deadline = time.monotonic() + p.max_block
            if p.max_block <= 0 or not p._buffer.wait_blocking(nbytes, deadline):
                raise BufferFullError(
                    f"the producer's buffer of {p._buffer.bytes_max} bytes stayed full "
                    f"for {p.max_block}s"
                )
        return p._append(topic, partition, key, value, hs, timestamp_ms, nbytes)

    def flush(self, timeout: Optional[float] = None) -> None:
        """Sends everything accepted and waits until it is answered; raises
        the first failure since the previous flush."""
        self._client._run(self._aio.flush(), timeout)

    def close(self, timeout: Optional[float] = None) -> None:
        """Flushes (up to ``timeout``) and stops."""
        if self._client._thread.loop.is_closed():
            return
        self._client._run(self._aio.close(timeout))

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Consumer:
    """Reads assigned partitions (blocking). Settings as
    :class:`shoal.aio.Consumer`. Not thread-safe: one thread polls."""

    def __init__(self, client: Client, **config):
        self._client = client
        self._aio = aio.Consumer(client.aio, **config)

    @property
    def aio(self) -> aio.Consumer:
        return self._aio

    def assign(self, topic: str, partition: int, start: aio.Start = "beginning") -> int:
        return self._client._run(self._aio.assign(topic, partition, start))

    def assign_all(self, topic: str, start: aio.Start = "beginning") -> None:
        self._client._run(self._aio.assign_all(topic, start))

    def seek(self, topic: str, partition: int, start: aio.Start) -> int:
        return self._client._run(self._aio.seek(topic, partition, start))

    def unassign(self, topic: Optional[str] = None, partition: Optional[int] = None) -> None:
        self._aio.unassign(topic, partition)

    def assignment(self):
        return self._aio.assignment()

    def position(self, topic: str, partition: int) -> int:
        return self._aio.position(topic, partition)

    def positions(self):
        return self._aio.positions()

    def poll(self, timeout: Optional[float] = None, max_records: Optional[int] = None) -> List[Record]:
        """Records from the assigned partitions, ``[]`` after ``timeout``
        seconds (default ``max_wait_ms``) if none arrive."""
        return self._client._run(self._aio.poll(timeout, max_records))

    def __iter__(self) -> Iterator[Record]:
        """Every record, forever (stop with ``break`` or :meth:`close`)."""
        while not self._aio._closed:
            yield from self.poll()

    def close(self) -> None:
        self._aio._closed = True
        self._aio._assigned.clear()

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
