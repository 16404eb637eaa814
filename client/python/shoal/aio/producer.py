"""The producer: batching by size and linger, key partitioning, acks,
idempotence and retries (mirrors ``client/src/producer.rs``).

Records for one partition accumulate in a :class:`~shoal.batch.BatchBuilder`;
a batch is sealed when it reaches ``batch_bytes``, ``linger_ms`` after its
first record, on :meth:`Producer.flush`, or -- with a linger of zero -- as
soon as the partition's sender is free, so records that arrive while a
request is in flight share the next batch. Each partition has one sender
task that sends its batches in order, one request at a time, so with
idempotence on (the default) a retry carries the same producer id and
sequence and the broker never stores a batch twice.

Memory is bounded by ``buffer_bytes_max``: a record takes its encoded size
from the buffer when accepted and gives it back when its batch is answered.
A full buffer makes ``send`` wait up to ``max_block`` seconds (then
:class:`~shoal.errors.BufferFullError`) and sends what is pending at once.

The partition table is guarded by a ``threading.Lock`` so that the blocking
:class:`shoal.Producer` can append records from its callers' threads
directly; everything that touches the event loop (timers, sender tasks,
futures) runs on the loop's thread.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import threading
import time
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

from .. import protocol
from ..batch import NO_PRODUCER_ID, NO_SEQUENCE, RECORD_FIXED_BYTES, BatchBuilder, encoded_len
from ..errors import (
    BufferFullError,
    ClosedError,
    NotLeaderError,
    RecordTooLargeError,
    ShoalError,
    UnknownTopicError,
)
from .client import Client, jitter

log = logging.getLogger("shoal")

#: Bytes of batches one produce request may carry.
REQUEST_BYTES_MAX = 4 * 1024 * 1024
#: Batches one produce request may carry. The broker recognises a retry
#: only among a producer's last 5 batches per partition
#: (PRODUCER_BATCHES_KEPT, wire/PROTOCOL.md "Idempotent producers"): a
#: request of more whose answer was lost could not be retried safely. (The
#: Rust client coalesces up to 4 MiB regardless.)
REQUEST_BATCHES_MAX = 5
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1

BytesLike = Union[bytes, bytearray, memoryview]
HeadersArg = Union[None, Dict[Union[str, bytes], BytesLike], Sequence[Tuple[Union[str, bytes], BytesLike]]]


def fnv1a(key: bytes) -> int:
    """FNV-1a (32 bit), the Rust client's key hash: the same key goes to
    the same partition from either client."""
    h = 0x811C9DC5
    for b in key:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def _as_bytes(v, what: str) -> Optional[BytesLike]:
    if v is None or isinstance(v, (bytes, bytearray, memoryview)):
        return v
    if isinstance(v, str):
        return v.encode("utf-8")
    raise TypeError(f"{what} must be bytes, str or None, not {type(v).__name__}")


def _headers(h: HeadersArg) -> List[Tuple[bytes, BytesLike]]:
    if not h:
        return []
    items = h.items() if isinstance(h, dict) else h
    out = []
    for name, value in items:
        n = _as_bytes(name, "a header name")
        v = _as_bytes(value, "a header value")
        if n is None or v is None:
            raise TypeError("header names and values cannot be None")
        out.append((bytes(n), v))
    return out


class RecordMetadata:
    """Where a record was stored."""

    __slots__ = ("topic", "partition", "offset")

    def __init__(self, topic: str, partition: int, offset: int):
        self.topic = topic
        self.partition = partition
        self.offset = offset

    def __repr__(self) -> str:
        return f"RecordMetadata(topic={self.topic!r}, partition={self.partition}, offset={self.offset})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RecordMetadata) and (
            (self.topic, self.partition, self.offset)
            == (other.topic, other.partition, other.offset)
        )


_callback_lock = threading.Lock()


class _Slot:
    """The outcome of one batch, shared by the deliveries of its records
    (one object per batch, not per record). Completed on the loop thread;
    waited for from any thread."""

    __slots__ = ("done", "base", "error", "_event", "_callbacks", "_futures")

    def __init__(self) -> None:
        self.done = False
        self.base = 0
        self.error: Optional[BaseException] = None
        self._event: Optional[threading.Event] = None
        self._callbacks: List[Callable[[], None]] = []
        self._futures: List[asyncio.Future] = []

    def complete(self, base: int, error: Optional[BaseException]) -> None:
        with _callback_lock:
            if self.done:
                return
            self.base, self.error, self.done = base, error, True
            callbacks, self._callbacks = self._callbacks, []
            futures, self._futures = self._futures, []
            event = self._event
        if event is not None:
            event.set()
        for f in futures:
            if not f.done():
                f.set_result(None)
        for cb in callbacks:
            try:
                cb()
            except Exception:  # a user's callback must not stop the sender
                log.exception("delivery callback failed")

    def wait(self, timeout: Optional[float]) -> bool:
        with _callback_lock:
            if self.done:
                return True
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        return event.wait(timeout)

    def on_done(self, cb: Callable[[], None]) -> None:
        with _callback_lock:
            if not self.done:
                self._callbacks.append(cb)
                return
        cb()

    def future(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future:
        f = loop.create_future()
        with _callback_lock:
            if not self.done:
                self._futures.append(f)
                return f
        f.set_result(None)
        return f


class Delivery:
    """A record's acknowledgement.

    Blocking code calls :meth:`result`; asyncio code awaits it (``await
    delivery``). Both give a :class:`RecordMetadata` or raise the error that
    failed the record's batch."""

    __slots__ = ("_slot", "topic", "partition", "_index", "_loop")

    def __init__(self, slot: _Slot, topic: str, partition: int, index: int, loop):
        self._slot = slot
        self.topic = topic
        self.partition = partition
        self._index = index
        self._loop = loop

    def done(self) -> bool:
        return self._slot.done

    def _outcome(self) -> RecordMetadata:
        s = self._slot
        if s.error is not None:
            raise s.error
        return RecordMetadata(self.topic, self.partition, s.base + self._index)

    def result(self, timeout: Optional[float] = None) -> RecordMetadata:
        """Waits (up to ``timeout`` seconds) for the acknowledgement."""
        if not self._slot.done:
            if _on_loop_thread(self._loop):
                raise RuntimeError(
                    "Delivery.result() would block the event loop: await the delivery instead"
                )
            if not self._slot.wait(timeout):
                raise TimeoutError(f"record not acknowledged within {timeout}s")
        return self._outcome()

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        try:
            self.result(timeout)
        except TimeoutError:
            raise
        except BaseException as e:
            return e
        return None

    def add_done_callback(self, fn: Callable[["Delivery"], None]) -> None:
        """Calls ``fn(delivery)`` once acknowledged or failed: at once if
        it is, else on the event loop's thread (keep it short)."""
        self._slot.on_done(lambda: fn(self))

    def __await__(self):
        if not self._slot.done:
            yield from self._slot.future(asyncio.get_running_loop()).__await__()
        return self._outcome()

    def __repr__(self) -> str:
        state = "done" if self._slot.done else "pending"
        return f"<Delivery {self.topic}/{self.partition} {state}>"


def _on_loop_thread(loop: Optional[asyncio.AbstractEventLoop]) -> bool:
    if loop is None:
        return False
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class _Outgoing:
    __slots__ = ("batch", "count", "slot", "buffer_bytes", "flush")

    def __init__(self, batch, count: int, slot: _Slot, buffer_bytes: int, flush: bool = False):
        self.batch = batch
        self.count = count
        self.slot = slot
        self.buffer_bytes = buffer_bytes
        self.flush = flush


class _Partition:
    __slots__ = (
        "topic",
        "partition",
        "builder",
        "slot",
        "buffer_bytes",
        "generation",
        "linger_armed",
        "next_sequence",
        "queue",
        "sender_busy",
        "waiter",
        "task",
    )

    def __init__(self, topic: str, partition: int):
        self.topic = topic
        self.partition = partition
        self.builder = BatchBuilder()
        self.slot = _Slot()
        self.buffer_bytes = 0
        # Counts sealed batches: a linger timer seals the batch it was
        # armed for, never a later one.
        self.generation = 0
        self.linger_armed = False
        self.next_sequence = 0
        self.queue: Deque[_Outgoing] = collections.deque()
        # The sender has something to send or is sending; cleared (under
        # the table lock) only when its queue is empty, so a record that
        # sees it set is sealed by the sender once it is free.
        self.sender_busy = False
        self.waiter: Optional[asyncio.Future] = None
        self.task: Optional[asyncio.Task] = None


class _Buffer:
    """Bytes of records accepted and not yet answered, bounded."""

    def __init__(self, bytes_max: int):
        self.bytes_max = bytes_max
        self.used = 0
        # The lock itself on the hot path (a Condition's own __enter__ is
        # Python code); the condition only for blocking waiters.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._async_waiters: List[asyncio.Future] = []

    def try_reserve(self, n: int) -> bool:
        with self._lock:
            if self.used + n <= self.bytes_max:
                self.used += n
                return True
            return False

    def release(self, n: int) -> None:
        """Called on the loop thread."""
        if n <= 0:
            return
        with self._cond:
            self.used -= n
            assert self.used >= 0, "buffer released more than it reserved"
            self._cond.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    def wait_blocking(self, n: int, deadline: float) -> bool:
        with self._cond:
            while self.used + n > self.bytes_max:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self.used += n
            return True

    async def wait_async(self, n: int, deadline: float) -> bool:
        loop = asyncio.get_running_loop()
        while True:
            with self._cond:
                if self.used + n <= self.bytes_max:
                    self.used += n
                    return True
                f = loop.create_future()
                self._async_waiters.append(f)
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(f, left)
            except asyncio.TimeoutError:
                pass


class Producer:
    """Sends records to topics (asyncio).

    ``acks``: ``"leader"`` (stored as the topic's sync mode promises),
    ``"none"`` (accepted, nothing waited for) or ``"all"`` (in-sync
    replicas too; refused by a single node). ``linger_ms`` is how long a
    batch waits for more records after its first; ``batch_bytes`` seals it
    earlier. ``retries`` and ``retry_backoff_ms`` (times the attempt number)
    bound retries of retriable errors; with ``idempotent`` (the default) a
    retry never stores a batch twice.
    """

    def __init__(
        self,
        client: Client,
        *,
        acks: Union[str, int] = "leader",
        batch_bytes: int = 64 * 1024,
        linger_ms: float = 1.0,
        idempotent: bool = True,
        retries: int = 10,
        retry_backoff_ms: float = 100.0,
        partitioner: str = "key",
        buffer_bytes_max: int = 32 * 1024 * 1024,
        max_block: float = 60.0,
        request_timeout_ms: int = 30000,
    ):
        if partitioner not in ("key", "round_robin"):
            raise ValueError("partitioner must be 'key' (key hash, else round-robin) or 'round_robin'")
        self.client = client
        self.acks = protocol.acks_code(acks)
        self.batch_bytes = batch_bytes
        self.linger_s = max(linger_ms, 0.0) / 1000.0
        self.idempotent = idempotent
        self.retries = retries
        self.retry_backoff_s = retry_backoff_ms / 1000.0
        self.partitioner = partitioner
        self.max_block = max_block
        self.request_timeout_ms = request_timeout_ms
        # A random 63-bit id: collisions between producers are negligible
        # and no broker round trip is needed (as the Rust client).
        self.producer_id = random.getrandbits(63) if idempotent else NO_PRODUCER_ID
        self._buffer = _Buffer(buffer_bytes_max)
        self._lock = threading.Lock()
        self._parts: Dict[Tuple[str, int], _Partition] = {}
        self._round_robin = random.getrandbits(32)
        self._topic_ids: Dict[str, int] = {}
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._closed = False
        client._producers.add(self)

    # ---- loop plumbing --------------------------------------------------------

    def _bind(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _on_loop(self) -> bool:
        return _on_loop_thread(self._loop)

    def _soon(self, fn, *args) -> None:
        """Runs ``fn`` on the loop: now if this is the loop's thread."""
        if self._on_loop():
            fn(*args)
        else:
            assert self._loop is not None
            self._loop.call_soon_threadsafe(fn, *args)

    # ---- sending --------------------------------------------------------------

    @property
    def buffered_bytes(self) -> int:
        """Bytes of records accepted and not yet acknowledged or failed."""
        return self._buffer.used

    def choose_partition(self, key: Optional[BytesLike], partitions: int) -> int:
        if partitions <= 0:
            raise ValueError("the topic has no partitions")
        if key is not None and self.partitioner == "key":
            return fnv1a(bytes(key)) % partitions
        self._round_robin = (self._round_robin + 1) & 0xFFFFFFFF
        return self._round_robin % partitions

    def _prepare(self, key, value, headers):
        if key is None and not headers and type(value) is bytes:
            # The common record: no conversions.
            nbytes = RECORD_FIXED_BYTES + len(value)
            if nbytes > self._buffer.bytes_max:
                raise RecordTooLargeError(
                    f"a record of {nbytes} bytes cannot fit the producer's buffer of "
                    f"{self._buffer.bytes_max} bytes"
                )
            return None, value, (), nbytes
        key = _as_bytes(key, "key")
        value = _as_bytes(value, "value")
        hs = _headers(headers)
        nbytes = encoded_len(key, value, hs)
        if nbytes > self._buffer.bytes_max:
            raise RecordTooLargeError(
                f"a record of {nbytes} bytes cannot fit the producer's buffer of "
                f"{self._buffer.bytes_max} bytes"
            )
        return key, value, hs, nbytes

    async def send(
        self,
        topic: str,
        value: Optional[BytesLike],
        key: Optional[BytesLike] = None,
        *,
        partition: Optional[int] = None,
        headers: HeadersArg = None,
        timestamp_ms: Optional[int] = None,
    ) -> Delivery:
        """Queues a record and returns its :class:`Delivery` (await it for
        the :class:`RecordMetadata`). Records to one partition are stored in
        call order. Waits while the buffer is full (up to ``max_block``)."""
        self._bind()
        if self._closed:
            raise ClosedError("the producer was closed")
        key, value, hs, nbytes = self._prepare(key, value, headers)
        if partition is None:
            t = self.client._topics.get(topic)
            n = len(t.partitions) if t is not None else await self.partition_count(topic)
            partition = self.choose_partition(key, n)
        if not self._buffer.try_reserve(nbytes):
            self._seal_all()
            ok = self.max_block > 0 and await self._buffer.wait_async(
                nbytes, time.monotonic() + self.max_block
            )
            if not ok:
                raise BufferFullError(
                    f"the producer's buffer of {self._buffer.bytes_max} bytes stayed full "
                    f"for {self.max_block}s"
                )
        return self._append(topic, partition, key, value, hs, timestamp_ms, nbytes)

    async def partition_count(self, topic: str) -> int:
        """The topic's partition count, from cache, else from a broker:
        retried while no broker answers, up to ``max_block`` seconds."""
        t = self.client.cached_topic(topic)
        if t is not None:
            return len(t.partitions)
        deadline = time.monotonic() + self.max_block
        attempt = 0
        while True:
            try:
                return await self.client.partition_count(topic)
            except ShoalError as e:
                if not e.retriable or time.monotonic() >= deadline:
                    raise
                attempt += 1
                await asyncio.sleep(jitter(min(self.retry_backoff_s * attempt, 1.0)))

    async def send_and_wait(self, topic: str, value, key=None, **kw) -> RecordMetadata:
        """Sends a record and waits for its acknowledgement."""
        return await (await self.send(topic, value, key, **kw))

    def _append(self, topic, partition, key, value, hs, timestamp_ms, nbytes) -> Delivery:
        """Adds a record whose ``nbytes`` are reserved to its partition's
        pending batch; gives the bytes back if that fails. Any thread."""
        ts = int(time.time() * 1000) if timestamp_ms is None else int(timestamp_ms)
        try:
            with self._lock:
                if self._closed:
                    raise ClosedError("the producer was closed")
                st = self._parts.get((topic, partition))
                if st is None:
                    st = self._parts[(topic, partition)] = _Partition(topic, partition)
                b = st.builder
                if b.count and (
                    len(b._buf) + nbytes > self.batch_bytes
                    or not _I32_MIN <= ts - b.first_timestamp_ms <= _I32_MAX
                ):
                    self._seal(st)
                index = b.count
                b.append(key, value, ts, hs)
                st.buffer_bytes += nbytes
                delivery = Delivery(st.slot, topic, partition, index, self._loop)
                if len(b._buf) >= self.batch_bytes or (self.linger_s == 0 and not st.sender_busy):
                    self._seal(st)
                elif self.linger_s > 0 and not st.linger_armed:
                    st.linger_armed = True
                    self._soon(self._arm_linger, st, st.generation)
                return delivery
        except BaseException:
            self._soon(self._buffer.release, nbytes)
            raise

    def _arm_linger(self, st: _Partition, generation: int) -> None:
        assert self._loop is not None
        self._loop.call_later(self.linger_s, self._linger_fired, st, generation)

    def _linger_fired(self, st: _Partition, generation: int) -> None:
        with self._lock:
            if st.generation == generation:
                self._seal(st)

    def _seal(self, st: _Partition) -> None:
        """Turns the pending records into a batch and queues it for the
        partition's sender. Holds the table lock."""
        st.linger_armed = False
        b = st.builder
        if b.is_empty():
            return
        st.generation += 1
        count = b.count
        if self.producer_id >= 0:
            seq = st.next_sequence
            st.next_sequence = (st.next_sequence + count) & _I32_MAX
        else:
            seq = NO_SEQUENCE
        batch = b.finish(self.producer_id, 0, seq)
        slot, st.slot = st.slot, _Slot()
        nbytes, st.buffer_bytes = st.buffer_bytes, 0
        st.queue.append(_Outgoing(batch, count, slot, nbytes))
        st.sender_busy = True
        self._soon(self._wake, st)

    def _seal_all(self) -> None:
        with self._lock:
            for st in self._parts.values():
                self._seal(st)

    def _wake(self, st: _Partition) -> None:
        """On the loop: starts the partition's sender or wakes it."""
        if st.task is None:
            st.task = asyncio.ensure_future(self._sender(st))
        w = st.waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def flush(self) -> None:
        """Sends everything accepted so far and waits until it is answered.
        Raises the first failure of any partition since the previous flush
        (each failure is reported once), after waiting for all of it."""
        loop = self._bind()
        markers = []
        with self._lock:
            for st in self._parts.values():
                self._seal(st)
                slot = _Slot()
                st.queue.append(_Outgoing(None, 0, slot, 0, flush=True))
                st.sender_busy = True
                markers.append(slot)
                self._soon(self._wake, st)
        first: Optional[BaseException] = None
        for slot in markers:
            await slot.future(loop)
            if slot.error is not None and first is None:
                first = slot.error
        if first is not None:
            raise first

    async def close(self, timeout: Optional[float] = None) -> None:
        """Flushes (up to ``timeout`` seconds) and stops the senders. Records
        still unsent after the timeout fail with :class:`ClosedError`."""
        if self._closed:
            return
        try:
            if timeout is None:
                await self.flush()
            else:
                await asyncio.wait_for(self.flush(), timeout)
        except (ShoalError, asyncio.TimeoutError):
            pass
        finally:
            with self._lock:
                self._closed = True
                parts = list(self._parts.values())
            for st in parts:
                if st.task is not None:
                    st.task.cancel()
            for st in parts:
                if st.task is not None:
                    try:
                        await st.task
                    except (asyncio.CancelledError, Exception):
                        pass
                err = ClosedError("the producer was closed before the record was sent")
                with self._lock:
                    left = list(st.queue)
                    st.queue.clear()
                    if not st.builder.is_empty():
                        left.append(_Outgoing(None, 0, st.slot, st.buffer_bytes))
                        st.builder = BatchBuilder()
                        st.buffer_bytes = 0
                for o in left:
                    self._buffer.release(o.buffer_bytes)
                    o.slot.complete(0, err)

    async def __aenter__(self) -> "Producer":
        self._bind()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # ---- the sender -----------------------------------------------------------

    async def _sender(self, st: _Partition) -> None:
        """One partition's batches, in order, one request at a time;
        batches queued meanwhile travel together in the next request."""
        loop = asyncio.get_running_loop()
        unreported: Optional[BaseException] = None
        while True:
            batches: List = []
            groups: List[Tuple[int, _Slot]] = []
            nbytes = 0
            payload_bytes = 0
            marker: Optional[_Slot] = None
            with self._lock:
                q = st.queue
                if not q:
                    st.sender_busy = False
                    if self.linger_s == 0:
                        self._seal(st)
                while q:
                    o = q[0]
                    if o.flush:
                        if not batches:
                            q.popleft()
                            marker = o.slot
                        break
                    if batches and (
                        payload_bytes + len(o.batch) > REQUEST_BYTES_MAX
                        or len(batches) >= REQUEST_BATCHES_MAX
                    ):
                        break
                    q.popleft()
                    batches.append(o.batch)
                    groups.append((o.count, o.slot))
                    nbytes += o.buffer_bytes
                    payload_bytes += len(o.batch)
                if not batches and marker is None and not q:
                    st.waiter = loop.create_future()
            if marker is not None:
                marker.complete(0, unreported)
                unreported = None
                continue
            if not batches:
                if st.waiter is not None:
                    await st.waiter
                    st.waiter = None
                continue
            error: Optional[BaseException] = None
            base = 0
            try:
                base = await self._send_with_retries(st.topic, st.partition, batches)
            except ShoalError as e:
                error = e
            except asyncio.CancelledError:
                # Closing: fail what was taken out of the queue.
                self._buffer.release(nbytes)
                err = ClosedError("the producer was closed before the record was sent")
                for _, slot in groups:
                    slot.complete(0, err)
                raise
            except Exception as e:  # a bug; fail the records, not the task
                log.exception("producer sender failed")
                error = e
            # Room first, then the answers: whoever sees a delivery complete
            # also sees its bytes out of the buffer.
            self._buffer.release(nbytes)
            if error is None:
                # The broker stores the batches of a request back to back.
                offset = base
                for count, slot in groups:
                    slot.complete(offset, None)
                    offset += count
            else:
                if getattr(error, "needs_refresh", False):
                    # UnknownTopicId, FencedLeaderEpoch: what this client
                    # knows of the topic is out of date.
                    self.client.invalidate(st.topic)
                for _, slot in groups:
                    slot.complete(0, error)
                if unreported is None:
                    unreported = error

    def _topic_id(self, topic: str) -> int:
        """The incarnation of ``topic`` this producer first wrote to: it
        never writes into a topic deleted and re-created under the same
        name (the broker refuses with UnknownTopicId)."""
        tid = self._topic_ids.get(topic)
        if tid is not None:
            return tid
        tid = self.client.cached_topic_id(topic)
        if tid:
            self._topic_ids[topic] = tid
        return tid

    async def _send_with_retries(self, topic: str, partition: int, batches: List) -> int:
        attempt = 0
        while True:
            try:
                conn = await self.client.leader_connection(topic, partition)
                body = protocol.produce_request(
                    topic, self._topic_id(topic), partition, self.acks, self.request_timeout_ms
                )
                resp, _ = await conn.request(
                    body, batches, timeout=self.request_timeout_ms / 1000.0 + 10.0
                )
                return protocol.decode_produce(resp).base_offset
            except ShoalError as e:
                if not e.retriable or attempt >= self.retries:
                    raise
                attempt += 1
                hint = getattr(e, "leader_hint", None)
                if isinstance(e, NotLeaderError) and hint is not None and hint.usable:
                    # Straight to the leader it named; metadata is reloaded
                    # behind it (a reload drops the hint).
                    log.debug(
                        "%s/%s: not leader, retrying at %s:%s", topic, partition, hint.host, hint.port
                    )
                    self.client.note_leader_hint(topic, partition, hint)
                    self.client.refresh_in_background(topic)
                    if attempt > 1:
                        await asyncio.sleep(jitter(self.retry_backoff_s))
                    continue
                log.debug("%s/%s: produce failed (%s); retry %d", topic, partition, e, attempt)
                self.client.invalidate(topic)
                await asyncio.sleep(jitter(self.retry_backoff_s * attempt))
                try:
                    await self.client.topic(topic)
                except UnknownTopicError:
                    raise
                except ShoalError:
                    pass
