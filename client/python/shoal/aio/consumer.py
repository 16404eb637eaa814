"""The consumer: assigned partitions read by long-poll fetch (asyncio).

Positions live in this object only. Consumer groups (partitions shared out
among members, offsets committed to the broker, C6) are not built in the
broker yet; when they are, this consumer gains ``subscribe(group=...)`` and
``commit()``. Until then, a consumer reads what it is assigned and a
restarted process chooses where to start again (an offset it kept, a
timestamp, the beginning or the end).
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import logging
import time
from typing import AsyncIterator, Dict, List, NamedTuple, Optional, Tuple, Union

from ..batch import Record, decode_records
from ..errors import (
    NotLeaderError,
    OffsetOutOfRangeError,
    ShoalError,
    UnknownPartitionError,
)
from .client import Client, jitter

log = logging.getLogger("shoal")

_TS_MAX = 2**63 - 1


class Timestamp(NamedTuple):
    """A start position: the first record at or after ``ms`` (milliseconds
    since the Unix epoch)."""

    ms: int


#: A start position: ``"beginning"``, ``"end"``, an offset (``int``), a
#: :class:`Timestamp` or a ``datetime`` (aware, or naive meaning local time).
Start = Union[str, int, Timestamp, _dt.datetime]


def _start_kind(start: Start):
    if isinstance(start, bool):
        raise TypeError("start must be 'beginning', 'end', an offset, a Timestamp or a datetime")
    if isinstance(start, Timestamp):
        return "ts", int(start.ms)
    if isinstance(start, _dt.datetime):
        return "ts", int(start.timestamp() * 1000)
    if isinstance(start, int):
        if start < 0:
            raise ValueError("an offset cannot be negative")
        return "offset", start
    if isinstance(start, str) and start in ("beginning", "earliest"):
        return "beginning", 0
    if isinstance(start, str) and start in ("end", "latest"):
        return "end", 0
    raise ValueError(f"start must be 'beginning', 'end', an offset, a Timestamp or a datetime, not {start!r}")


class _Assignment:
    __slots__ = ("topic", "partition", "next", "failing_since")

    def __init__(self, topic: str, partition: int, next_offset: int):
        self.topic = topic
        self.partition = partition
        self.next = next_offset
        self.failing_since: Optional[float] = None


class Consumer:
    """Reads assigned partitions (asyncio).

    ``max_bytes`` bounds one fetch per partition; a poll long-polls with
    ``min_bytes``. With ``check_crcs`` (the default) every fetched batch's
    CRC32C is verified. ``auto_offset_reset`` (``"beginning"``/``"end"``)
    moves a position that fell out of the log (retention) instead of raising
    :class:`~shoal.errors.OffsetOutOfRangeError`. Retriable failures (a
    broker restarting, a leader moving) are retried behind the scenes; a
    partition failing for longer than ``retry_timeout`` seconds raises.
    """

    def __init__(
        self,
        client: Client,
        *,
        max_bytes: int = 1 << 20,
        min_bytes: int = 1,
        max_wait_ms: int = 500,
        check_crcs: bool = True,
        auto_offset_reset: Optional[str] = None,
        retry_timeout: float = 30.0,
        retry_backoff_ms: float = 100.0,
    ):
        if auto_offset_reset not in (None, "beginning", "earliest", "end", "latest"):
            raise ValueError("auto_offset_reset must be None, 'beginning' or 'end'")
        self.client = client
        self.max_bytes = max_bytes
        self.min_bytes = min_bytes
        self.max_wait_ms = max_wait_ms
        self.check_crcs = check_crcs
        self.auto_offset_reset = auto_offset_reset
        self.retry_timeout = retry_timeout
        self.retry_backoff_s = retry_backoff_ms / 1000.0
        self._assigned: Dict[Tuple[str, int], _Assignment] = {}
        self._closed = False

    # ---- assignment -----------------------------------------------------------

    async def assign(self, topic: str, partition: int, start: Start = "beginning") -> int:
        """Reads ``partition`` of ``topic`` from ``start``; returns the
        offset it starts at."""
        n = await self.client.partition_count(topic)
        if not 0 <= partition < n:
            raise UnknownPartitionError(
                f"topic {topic!r} has no partition {partition}", from_broker=False
            )
        offset = await self.offset_for(topic, partition, start)
        self._assigned[(topic, partition)] = _Assignment(topic, partition, offset)
        return offset

    async def assign_all(self, topic: str, start: Start = "beginning") -> None:
        """Assigns every partition of ``topic``."""
        n = await self.client.partition_count(topic)
        offsets = await asyncio.gather(*(self.offset_for(topic, p, start) for p in range(n)))
        for p, off in enumerate(offsets):
            self._assigned[(topic, p)] = _Assignment(topic, p, off)

    async def seek(self, topic: str, partition: int, start: Start) -> int:
        """Moves an assigned partition's position."""
        a = self._assignment(topic, partition)
        a.next = await self.offset_for(topic, partition, start)
        return a.next

    def unassign(self, topic: Optional[str] = None, partition: Optional[int] = None) -> None:
        """Stops reading a partition, a whole topic, or everything."""
        for key in list(self._assigned):
            if (topic is None or key[0] == topic) and (partition is None or key[1] == partition):
                del self._assigned[key]

    def assignment(self) -> List[Tuple[str, int]]:
        return sorted(self._assigned)

    def position(self, topic: str, partition: int) -> int:
        """The offset of the next record :meth:`poll` returns for it."""
        return self._assignment(topic, partition).next

    def positions(self) -> Dict[Tuple[str, int], int]:
        return {k: a.next for k, a in sorted(self._assigned.items())}

    def _assignment(self, topic: str, partition: int) -> _Assignment:
        a = self._assigned.get((topic, partition))
        if a is None:
            raise ValueError(f"{topic}/{partition} is not assigned")
        return a

    async def offset_for(self, topic: str, partition: int, start: Start) -> int:
        """The offset ``start`` means for the partition now."""
        kind, value = _start_kind(start)
        if kind == "offset":
            return value
        if kind in ("beginning", "end"):
            # A timestamp past every record reads at the log's end: an empty
            # answer carrying the log start and the high watermark.
            fr = await self._retrying(
                topic, partition, lambda: self.client.fetch(
                    topic, partition, 0, timestamp_ms=_TS_MAX, max_bytes=1, min_bytes=0
                )
            )
            return fr.log_start_offset if kind == "beginning" else fr.high_watermark
        fr = await self._retrying(
            topic, partition, lambda: self.client.fetch(
                topic, partition, 0, timestamp_ms=value, max_bytes=self.max_bytes, min_bytes=0
            )
        )
        # The first batch at or after the time may hold earlier records.
        for r in decode_records(fr.payload, topic, partition, 0, self.check_crcs):
            if r.timestamp >= value:
                return r.offset
        return fr.next_offset

    async def _retrying(self, topic: str, partition: int, call):
        deadline = time.monotonic() + self.retry_timeout
        attempt = 0
        while True:
            try:
                return await call()
            except ShoalError as e:
                if not e.retriable or time.monotonic() >= deadline:
                    raise
                attempt += 1
                self._after_failure(topic, partition, e)
                await asyncio.sleep(jitter(min(self.retry_backoff_s * attempt, 1.0)))

    def _after_failure(self, topic: str, partition: int, e: ShoalError) -> None:
        hint = getattr(e, "leader_hint", None)
        if isinstance(e, NotLeaderError) and hint is not None and hint.usable:
            self.client.note_leader_hint(topic, partition, hint)
            self.client.refresh_in_background(topic)
        else:
            self.client.invalidate(topic)

    # ---- polling --------------------------------------------------------------

    async def poll(self, timeout: Optional[float] = None, max_records: Optional[int] = None) -> List[Record]:
        """The next records from the assigned partitions: at once if any are
        there, else as soon as one partition has some, else ``[]`` after
        ``timeout`` seconds (default ``max_wait_ms``). Records of one
        partition come in offset order."""
        if self._closed:
            raise ShoalError("the consumer was closed")
        timeout = self.max_wait_ms / 1000.0 if timeout is None else max(timeout, 0.0)
        deadline = time.monotonic() + timeout
        if not self._assigned:
            await asyncio.sleep(timeout)
            return []
        records, failed = await self._round(0)
        while not records:
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            if failed:
                await asyncio.sleep(min(jitter(self.retry_backoff_s), left))
                records, failed = await self._round(0)
            else:
                records, failed = await self._round(left)
                if not records and not failed:
                    return []
        return self._take(records, max_records)

    def _take(self, got: List[Tuple[_Assignment, List[Record], int]], max_records: Optional[int]) -> List[Record]:
        out: List[Record] = []
        for a, recs, next_offset in got:
            if max_records is not None and len(out) + len(recs) > max_records:
                keep = max(max_records - len(out), 0)
                recs = recs[:keep]
                out.extend(recs)
                a.next = recs[-1].offset + 1 if recs else a.next
                continue
            out.extend(recs)
            a.next = max(a.next, next_offset)
        return out

    async def _round(self, wait_s: float) -> Tuple[List[Tuple[_Assignment, List[Record], int]], bool]:
        """One fetch per assigned partition: with no wait, all answers;
        with a wait, until the first that brings records (the others are
        dropped, their positions unchanged)."""
        wait_ms = int(wait_s * 1000)
        min_bytes = self.min_bytes if wait_ms > 0 else 0
        assigned = list(self._assigned.values())
        tasks = {
            asyncio.ensure_future(self._fetch(a, wait_ms, min_bytes)): a for a in assigned
        }
        got: List[Tuple[_Assignment, List[Record], int]] = []
        failed = False
        first_error: Optional[BaseException] = None
        resets: List[_Assignment] = []
        try:
            pending = set(tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    a = tasks[t]
                    try:
                        recs, next_offset = t.result()
                    except ShoalError as e:
                        if isinstance(e, OffsetOutOfRangeError) and self.auto_offset_reset:
                            resets.append(a)
                            failed = True
                        elif self._recover(a, e):
                            failed = True
                        elif first_error is None:
                            first_error = e
                        continue
                    a.failing_since = None
                    if recs:
                        got.append((a, recs, next_offset))
                    elif next_offset > a.next:
                        a.next = next_offset
                if first_error is not None:
                    raise first_error
                if got and wait_ms > 0:
                    break
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
        start = "beginning" if self.auto_offset_reset in ("beginning", "earliest") else "end"
        for a in resets:
            old = a.next
            a.next = await self.offset_for(a.topic, a.partition, start)
            log.warning(
                "%s/%s: offset %d is out of the log; reset to %d (%s)",
                a.topic, a.partition, old, a.next, start,
            )
        # Partitions in assignment order, so output is stable.
        order = {id(a): i for i, a in enumerate(assigned)}
        got.sort(key=lambda g: order[id(g[0])])
        return got, failed

    def _recover(self, a: _Assignment, e: ShoalError) -> bool:
        """Whether a fetch failure is retried (True) or raised."""
        if not e.retriable:
            return False
        now = time.monotonic()
        if a.failing_since is None:
            a.failing_since = now
        elif now - a.failing_since > self.retry_timeout:
            return False
        log.debug("%s/%s: fetch failed (%s); retrying", a.topic, a.partition, e)
        self._after_failure(a.topic, a.partition, e)
        return True

    async def _fetch(self, a: _Assignment, wait_ms: int, min_bytes: int) -> Tuple[List[Record], int]:
        offset = a.next
        fr = await self.client.fetch(
            a.topic,
            a.partition,
            offset,
            max_bytes=self.max_bytes,
            min_bytes=min_bytes,
            max_wait_ms=wait_ms,
        )
        recs = decode_records(fr.payload, a.topic, a.partition, offset, self.check_crcs)
        return recs, fr.next_offset

    # ---- the rest ---------------------------------------------------------------

    def __aiter__(self) -> AsyncIterator[Record]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Record]:
        while not self._closed:
            for r in await self.poll():
                yield r

    async def close(self) -> None:
        self._closed = True
        self._assigned.clear()

    async def __aenter__(self) -> "Consumer":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

