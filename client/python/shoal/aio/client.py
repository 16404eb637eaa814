"""The asyncio entry point: bootstrap list, cached metadata, routing each
partition to its leader's shard (L2), leader hints, and topic admin."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import time
import weakref
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .. import protocol
from ..errors import (
    ClosedError,
    ConnectError,
    ConnectionClosedError,
    LeaderHint,
    LeaderNotAvailableError,
    ShoalError,
    UnknownPartitionError,
    UnknownTopicError,
)
from ..protocol import BrokerInfo, ClusterMetadata, FetchResult, ProduceResult, TopicInfo
from .connection import Connection

log = logging.getLogger("shoal")

DEFAULT_PORT = 9400
#: First wait before an unreachable shard port is tried again (doubles per
#: failure up to ``reconnect_backoff_max``); meanwhile the broker's public
#: port serves its partitions.
RECONNECT_BACKOFF_MIN_S = 0.1

Addr = Tuple[str, int]


def tls_context(
    ca: Optional[str], cert: Optional[str] = None, key: Optional[str] = None
) -> Optional[ssl.SSLContext]:
    """An ``ssl.SSLContext`` that trusts the CAs in ``ca`` (PEM) and, with
    ``cert`` and ``key``, presents that client certificate; ``None``
    without ``ca`` (plaintext)."""
    if ca is None:
        if cert is not None or key is not None:
            raise ValueError("a TLS client certificate needs tls_ca too")
        return None
    if (cert is None) != (key is None):
        raise ValueError("give both tls_cert and tls_key, or neither")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


def parse_bootstrap(bootstrap: Union[str, Sequence[str]]) -> List[Addr]:
    """``"host:port,host:port"`` (or a list of ``host:port``) to addresses.
    IPv6 hosts go in brackets (``[::1]:9400``); a missing port is 9400."""
    items = bootstrap.split(",") if isinstance(bootstrap, str) else list(bootstrap)
    out: List[Addr] = []
    for raw in items:
        s = raw.strip()
        if not s:
            continue
        if s.startswith("["):
            host, _, rest = s[1:].partition("]")
            port_s = rest[1:] if rest.startswith(":") else ""
        elif s.count(":") == 1:
            host, port_s = s.split(":")
        else:
            host, port_s = s, ""
        try:
            port = int(port_s) if port_s else DEFAULT_PORT
        except ValueError:
            raise ValueError(f"bad broker address {s!r}: port is not a number") from None
        if not host or not 0 < port < 65536:
            raise ValueError(f"bad broker address {s!r}")
        out.append((host, port))
    if not out:
        raise ValueError(f"no broker address in {bootstrap!r}")
    return out


async def _authenticate(c: Connection, user: str, password: str) -> None:
    """The SCRAM-SHA-256 exchange, first on a new connection."""
    from .. import protocol, scram

    client = scram.ScramClient(user, password)
    try:
        resp, _ = await c.request(protocol.sasl_authenticate_request(scram.MECHANISM, client.first()))
        final = client.final(protocol.decode_sasl_authenticate(resp))
        resp, _ = await c.request(protocol.sasl_authenticate_request(None, final))
        client.verify(protocol.decode_sasl_authenticate(resp))
    except scram.ScramError as e:
        raise ProtocolError(f"authentication with {c.addr}: {e}") from e


class Client:
    """A handle to a Shoal cluster (or single broker), for one event loop.

    ``bootstrap`` is ``"host:port[,host:port...]"``: any live broker among
    them is enough; the client then learns every broker from metadata.
    Use ``async with Client(...) as c`` or ``await Client(...).connect()``.
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
        self.bootstrap = parse_bootstrap(bootstrap)
        # TLS on every connection when a CA file is given (a broker with
        # tls_cert): the brokers' certificates are verified against it, for
        # the address connected to or ``tls_server_name``; a client
        # certificate, if given, is presented when the broker asks (its CN
        # is then the principal).
        self._tls = tls_context(tls_ca, tls_cert, tls_key)
        if self._tls is None and tls_server_name is not None:
            raise ValueError("tls_server_name needs tls_ca")
        self._tls_server_name = tls_server_name
        # SCRAM-SHA-256 on every connection when set (a broker with --auth).
        if (user is None) != (password is None):
            raise ValueError("give both user and password, or neither")
        self._credentials = (user, password) if user is not None else None
        self.client_id = client_id or f"shoal-python-{os.getpid()}"
        self.connect_timeout = connect_timeout
        #: Longest wait for any answer (a produce's own broker timeout is
        #: 30 s; a long poll's is its max_wait).
        self.request_timeout = request_timeout
        self.reconnect_backoff_max = reconnect_backoff_max
        self._conns: Dict[Addr, Connection] = {}
        self._connecting: Dict[Addr, asyncio.Lock] = {}
        # addr -> (failures, retry_at)
        self._unreachable: Dict[Addr, Tuple[int, float]] = {}
        self._brokers: Dict[int, BrokerInfo] = {}
        self._topics: Dict[str, TopicInfo] = {}
        # Cached topics whose placement may be wrong (a request to them
        # failed): still good for a partition count, not for routing.
        self._stale: set = set()
        self._hints: Dict[Tuple[str, int], Addr] = {}
        self._metadata: Optional[ClusterMetadata] = None
        self._refreshing: Dict[Optional[Tuple[str, ...]], asyncio.Future] = {}
        self._closed = False
        # Producers on this client: closing the client sends what they hold.
        self._producers: "weakref.WeakSet" = weakref.WeakSet()

    # ---- lifecycle ----------------------------------------------------------

    async def connect(self) -> "Client":
        """Loads metadata from the first bootstrap broker that answers."""
        await self.refresh_metadata()
        return self

    async def __aenter__(self) -> "Client":
        return await self.connect()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self, producer_timeout: float = 5.0) -> None:
        """Closes the producers made on this client (each first sends what
        it accepted, for up to ``producer_timeout`` seconds), then every
        connection."""
        for p in list(self._producers):
            await p.close(producer_timeout)
        self._closed = True
        conns, self._conns = list(self._conns.values()), {}
        for c in conns:
            c.close(ClosedError("the client was closed"))
        for c in conns:
            await c.wait_closed()

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- connections --------------------------------------------------------

    async def connection(self, addr: Addr) -> Connection:
        """A live connection to ``addr``, reusing an open one; concurrent
        callers share one connect."""
        if self._closed:
            raise ClosedError("the client was closed")
        c = self._conns.get(addr)
        if c is not None and not c.closed:
            return c
        lock = self._connecting.setdefault(addr, asyncio.Lock())
        async with lock:
            c = self._conns.get(addr)
            if c is not None and not c.closed:
                return c
            try:
                c = await Connection.open(
                    addr[0],
                    addr[1],
                    self.client_id,
                    self.connect_timeout,
                    self._tls,
                    self._tls_server_name,
                )
                if self._credentials is not None:
                    try:
                        await asyncio.wait_for(
                            _authenticate(c, *self._credentials), self.connect_timeout
                        )
                    except BaseException:
                        c.close(ClosedError("authentication failed"))
                        raise
            except ConnectError:
                failures = self._unreachable.get(addr, (0, 0.0))[0] + 1
                backoff = min(
                    RECONNECT_BACKOFF_MIN_S * (1 << min(failures - 1, 16)),
                    self.reconnect_backoff_max,
                )
                self._unreachable[addr] = (failures, time.monotonic() + backoff)
                raise
            self._unreachable.pop(addr, None)
            self._conns[addr] = c
            return c

    def _avoid(self, addr: Addr) -> bool:
        u = self._unreachable.get(addr)
        return u is not None and time.monotonic() < u[1]

    def _candidates(self) -> List[Addr]:
        """Where to ask for metadata or admin: open connections first, then
        known brokers' public ports, then the bootstrap list; addresses that
        failed recently last."""
        seen: Dict[Addr, None] = {}
        for addr, c in self._conns.items():
            if not c.closed:
                seen[addr] = None
        for b in self._brokers.values():
            seen[(b.host or self.bootstrap[0][0], b.port)] = None
        for addr in self.bootstrap:
            seen[addr] = None
        addrs = list(seen)
        return [a for a in addrs if not self._avoid(a)] + [a for a in addrs if self._avoid(a)]

    async def any_connection(self) -> Connection:
        """A connection to any broker that answers."""
        failed: List[ConnectError] = []
        for addr in self._candidates():
            try:
                return await self.connection(addr)
            except ConnectError as e:
                failed.append(e)
        raise _none_reachable(failed)

    async def _any_request(self, body, payload=()):
        """Sends a request to any broker, trying the next on a connection
        failure (never after the broker answered)."""
        failed: List[ConnectError] = []
        closed: Optional[ConnectionClosedError] = None
        for addr in self._candidates():
            try:
                conn = await self.connection(addr)
            except ConnectError as e:
                failed.append(e)
                continue
            try:
                return await conn.request(body, payload, timeout=self.request_timeout)
            except ConnectionClosedError as e:
                # The connection failed under the request: another broker
                # may answer (a broker error is an answer and is raised).
                closed = e
        if closed is not None:
            raise closed
        raise _none_reachable(failed)

    # ---- metadata -----------------------------------------------------------

    @property
    def metadata(self) -> Optional[ClusterMetadata]:
        """The last metadata loaded (``None`` before :meth:`connect`)."""
        return self._metadata

    @property
    def brokers(self) -> List[BrokerInfo]:
        return sorted(self._brokers.values(), key=lambda b: b.id)

    @property
    def broker_version(self) -> Optional[str]:
        """The release of a broker, as its metadata reports it."""
        for b in self.brokers:
            if b.version:
                return b.version
        return None

    async def refresh_metadata(self, topics: Optional[Sequence[str]] = None) -> ClusterMetadata:
        """Reloads brokers and the named topics (all if ``None``).
        Concurrent refreshes of the same topics share one request."""
        key = None if topics is None else tuple(sorted(set(topics)))
        fut = self._refreshing.get(key)
        if fut is None:
            fut = asyncio.ensure_future(self._refresh(key))
            self._refreshing[key] = fut
            fut.add_done_callback(lambda _f, k=key: self._refreshing.pop(k, None))
        return await asyncio.shield(fut)

    async def _refresh(self, topics: Optional[Tuple[str, ...]]) -> ClusterMetadata:
        try:
            resp, _ = await self._any_request(protocol.metadata_request(topics))
        except UnknownTopicError:
            for t in topics or ():
                self._forget(t)
            raise
        m = protocol.decode_metadata(resp)
        self._brokers = {b.id: b for b in m.brokers}
        if topics is None:
            self._topics = {t.name: t for t in m.topics}
            self._hints.clear()
            self._stale.clear()
        else:
            for t in m.topics:
                self._topics[t.name] = t
                self._stale.discard(t.name)
                for key in [k for k in self._hints if k[0] == t.name]:
                    del self._hints[key]
        self._metadata = m
        return m

    def _forget(self, topic: str) -> None:
        self._topics.pop(topic, None)
        self._stale.discard(topic)
        for key in [k for k in self._hints if k[0] == topic]:
            del self._hints[key]

    def refresh_in_background(self, topic: Optional[str] = None) -> None:
        """Starts a metadata reload without waiting for it; failures are
        only logged (the next request that needs it tries again)."""

        async def run() -> None:
            try:
                await self.refresh_metadata(None if topic is None else [topic])
            except ShoalError as e:
                log.debug("background metadata refresh failed: %s", e)

        asyncio.ensure_future(run())

    def invalidate(self, topic: Optional[str] = None) -> None:
        """Marks cached placement (of one topic, or all) stale: the next
        request routed there reloads it first. Partition counts stay known,
        so records can still be accepted while no broker answers."""
        if topic is None:
            self._stale.update(self._topics)
            self._hints.clear()
        else:
            if topic in self._topics:
                self._stale.add(topic)
            for key in [k for k in self._hints if k[0] == topic]:
                del self._hints[key]

    def cached_topic(self, name: str) -> Optional[TopicInfo]:
        return self._topics.get(name)

    async def topic(self, name: str) -> TopicInfo:
        """Cached topic metadata, loaded if not known (or stale);
        :class:`UnknownTopicError` if there is no such topic."""
        t = self._topics.get(name)
        if t is not None and name not in self._stale:
            return t
        await self.refresh_metadata([name])
        t = self._topics.get(name)
        if t is None:
            raise UnknownTopicError(f"unknown topic {name!r}", from_broker=False)
        return t

    async def partition_count(self, topic: str) -> int:
        t = self._topics.get(topic)
        if t is None:
            t = await self.topic(topic)
        return len(t.partitions)

    def cached_topic_id(self, topic: str) -> int:
        t = self._topics.get(topic)
        return 0 if t is None else t.topic_id

    # ---- routing ------------------------------------------------------------

    def note_leader_hint(self, topic: str, partition: int, hint: LeaderHint) -> None:
        """Routes the partition to the leader a NotLeader answer named,
        until metadata is loaded again."""
        if hint.usable:
            self._hints[(topic, partition)] = (hint.host, hint.port)

    def _leader_addrs(self, topic: str, partition: int) -> Optional[List[Addr]]:
        """Where to send the partition's requests, best first (the owning
        shard's port, then the leader's public port); ``None`` if the topic
        is not cached."""
        hinted = self._hints.get((topic, partition))
        if hinted is not None:
            return [hinted]
        t = self._topics.get(topic)
        if t is None or topic in self._stale:
            return None
        if not 0 <= partition < len(t.partitions):
            raise UnknownPartitionError(
                f"topic {topic!r} has no partition {partition}", from_broker=False
            )
        p = t.partitions[partition]
        if p.offline:
            raise LeaderNotAvailableError(
                f"{topic}/{partition} has no live leader", from_broker=False
            )
        b = self._brokers.get(p.leader)
        if b is None:
            if len(self._brokers) == 0:
                return [self.bootstrap[0]]
            raise LeaderNotAvailableError(
                f"{topic}/{partition}: leader broker {p.leader} is not live", from_broker=False
            )
        host = b.host or self.bootstrap[0][0]
        public = (host, b.port)
        if p.shard < len(b.shard_ports) and b.shard_ports[p.shard]:
            return [(host, b.shard_ports[p.shard]), public]
        return [public]

    async def leader_addr(self, topic: str, partition: int) -> Addr:
        addrs = self._leader_addrs(topic, partition)
        if addrs is None:
            await self.topic(topic)
            addrs = self._leader_addrs(topic, partition)
            assert addrs is not None
        return addrs[0]

    async def leader_connection(self, topic: str, partition: int) -> Connection:
        """The connection to the shard that owns the partition on its
        leader; the leader's public port (which serves every shard, one hop
        slower) while the shard port cannot be reached."""
        addrs = self._leader_addrs(topic, partition)
        if addrs is None:
            await self.topic(topic)
            addrs = self._leader_addrs(topic, partition)
            assert addrs is not None
        last: Optional[BaseException] = None
        usable = [a for a in addrs if not self._avoid(a)] or addrs[-1:]
        for addr in usable:
            try:
                return await self.connection(addr)
            except ConnectError as e:
                last = e
                log.debug("cannot reach %s:%s for %s/%s: %s", *addr, topic, partition, e)
        assert last is not None
        raise last

    # ---- admin --------------------------------------------------------------

    async def create_topic(
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
        """Creates a topic and returns its metadata. ``sync`` is ``always``,
        ``interval:<ms>`` or ``none`` (``None``: the broker's default)."""
        await self._any_request(
            protocol.create_topic_request(
                name,
                partitions,
                replication_factor,
                sync,
                retention_ms,
                retention_bytes,
                segment_bytes,
            )
        )
        await self.refresh_metadata([name])
        return self._topics[name]

    async def delete_topic(self, name: str) -> None:
        await self._any_request(protocol.delete_topic_request(name))
        self._forget(name)

    async def list_topics(self) -> List[TopicInfo]:
        resp, _ = await self._any_request(protocol.list_topics_request())
        return protocol.decode_list_topics(resp)

    async def describe_topic(self, name: str) -> TopicInfo:
        """The topic with each partition's log start and high watermark."""
        resp, _ = await self._any_request(protocol.describe_topic_request(name))
        return protocol.decode_describe_topic(resp)

    async def metrics(self) -> Dict[str, int]:
        """One broker's counters, summed over its shards."""
        resp, _ = await self._any_request(protocol.metrics_request())
        return protocol.decode_metrics(resp)

    # ---- low level ----------------------------------------------------------

    async def produce_raw(
        self,
        topic: str,
        partition: int,
        batches: Union[bytes, bytearray, Sequence[Union[bytes, bytearray]]],
        *,
        acks: Union[str, int] = "leader",
        timeout_ms: int = 30000,
        topic_id: int = 0,
    ) -> ProduceResult:
        """Sends record batches built by the caller (see
        :mod:`shoal.batch`) to the partition's leader, once, no retries."""
        parts = [batches] if isinstance(batches, (bytes, bytearray, memoryview)) else list(batches)
        conn = await self.leader_connection(topic, partition)
        resp, _ = await conn.request(
            protocol.produce_request(
                topic, topic_id, partition, protocol.acks_code(acks), timeout_ms
            ),
            parts,
            timeout=self.request_timeout,
        )
        return protocol.decode_produce(resp)

    async def fetch(
        self,
        topic: str,
        partition: int,
        offset: int = 0,
        *,
        timestamp_ms: Optional[int] = None,
        max_bytes: int = 1 << 20,
        min_bytes: int = 1,
        max_wait_ms: int = 0,
        topic_id: int = 0,
    ) -> FetchResult:
        """One fetch from the partition's leader, once, no retries: the raw
        batches (``result.payload``; decode with
        :func:`shoal.batch.decode_records`)."""
        conn = await self.leader_connection(topic, partition)
        resp, payload = await conn.request(
            protocol.fetch_request(
                topic, topic_id, partition, offset, timestamp_ms, max_bytes, min_bytes, max_wait_ms
            ),
            timeout=self.request_timeout + max_wait_ms / 1000.0,
        )
        return protocol.decode_fetch(resp, payload)


def _none_reachable(failed: List[ConnectError]) -> ConnectError:
    """One error naming every address tried."""
    assert failed, "no address to try"
    if len(failed) == 1:
        return failed[0]
    addrs = ", ".join(e.addr for e in failed)
    return ConnectError(addrs, failed[-1].cause)


def jitter(seconds: float) -> float:
    """``seconds`` ± 20 %, so clients that failed together do not retry in
    lockstep."""
    return seconds * random.uniform(0.8, 1.2)
