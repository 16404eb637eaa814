"""One TCP connection to one broker port (plaintext, or TLS through the
standard library's ``ssl``), requests multiplexed by correlation id
(asyncio).

Several requests may be outstanding; the broker answers produce and admin
requests in order and fetches possibly out of order, so answers are matched
by correlation id. A request whose caller stopped waiting (a timeout, a
cancelled poll) is still sent whole and its answer dropped, so a frame is
never cut short.

Receiving is a ``BufferedProtocol``: the socket reads into one receive
buffer where small frames are parsed in place, and a frame too large for
it (a fetch of megabytes) gets a buffer of its own, sized from its prefix,
that the socket reads straight into -- no copying a large payload from
buffer to buffer on its way in.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .. import protocol
from ..errors import ConnectionClosedError, ConnectError, ProtocolError, ShoalError, error_for

log = logging.getLogger("shoal")

_PREFIX = struct.Struct("<II")
#: The shared receive buffer; frames larger than half of it are received
#: into buffers of their own.
RECV_BUFFER_BYTES = 256 * 1024
_LARGE_FRAME_BYTES = RECV_BUFFER_BYTES // 2

Answer = Tuple[protocol.Response, object]


def _retrieve(f: asyncio.Future) -> None:
    if not f.cancelled():
        f.exception()


class _Receiver(asyncio.BufferedProtocol):
    def __init__(self, conn: "Connection"):
        self.conn = conn
        self.transport: Optional[asyncio.Transport] = None
        self.buf = bytearray(RECV_BUFFER_BYTES)
        self.view = memoryview(self.buf)
        self.start = 0
        self.end = 0
        # A large frame being received in place, and how much of it is in.
        self.big: Optional[bytearray] = None
        self.big_have = 0
        self.write_paused = False
        self.drain_waiters: List[asyncio.Future] = []

    # -- transport callbacks --

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.transport = transport

    def get_buffer(self, sizehint: int):  # type: ignore[override]
        if self.big is not None:
            return memoryview(self.big)[self.big_have :]
        if self.end == len(self.buf):
            self._compact()
        return self.view[self.end :]

    def buffer_updated(self, nbytes: int) -> None:  # type: ignore[override]
        if self.big is not None:
            self.big_have += nbytes
            if self.big_have == len(self.big):
                frame, self.big = self.big, None
                _, header_len = _PREFIX.unpack_from(frame, 0)
                payload = memoryview(frame)[8 + header_len :]
                self.conn._on_frame(bytes(frame[8 : 8 + header_len]), payload)
            return
        self.end += nbytes
        try:
            self._parse()
        except ProtocolError as e:
            self.conn.close(e)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.conn.close(exc)
        for f in self.drain_waiters:
            if not f.done():
                f.set_result(None)
        self.drain_waiters.clear()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiters, self.drain_waiters = self.drain_waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    # -- framing --

    def _compact(self) -> None:
        n = self.end - self.start
        if self.start:
            self.buf[:n] = self.buf[self.start : self.end]
        self.start, self.end = 0, n

    def _parse(self) -> None:
        buf = self.buf
        while self.end - self.start >= 8:
            frame_len, header_len = _PREFIX.unpack_from(buf, self.start)
            protocol.check_prefix(frame_len, header_len)
            total = 4 + frame_len
            have = self.end - self.start
            if have >= total:
                s = self.start + 8
                header = bytes(buf[s : s + header_len])
                payload = bytes(buf[s + header_len : self.start + total])
                self.start += total
                self.conn._on_frame(header, payload)
                continue
            if total > _LARGE_FRAME_BYTES:
                big = bytearray(total)
                big[:have] = buf[self.start : self.end]
                self.big, self.big_have = big, have
                self.start = self.end = 0
                return
            if self.start + total > len(buf):
                self._compact()
            return
        if self.start == self.end:
            self.start = self.end = 0


class Connection:
    """A connection to ``host:port``. Use :meth:`open`."""

    def __init__(self, host: str, port: int, client_id: str):
        self.host = host
        self.port = port
        self.client_id = client_id
        self._rx: Optional[_Receiver] = None
        self._transport: Optional[asyncio.Transport] = None
        self._pending: Dict[int, asyncio.Future] = {}
        self._next_corr = 1
        self._closed = False
        self._close_cause: Optional[BaseException] = None
        # A connection-level error the broker sent (correlation id 0),
        # usually just before it closes: the reason pending requests fail.
        self._broker_error: Optional[ShoalError] = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        client_id: str,
        connect_timeout: float,
        tls: Optional[ssl.SSLContext] = None,
        server_name: Optional[str] = None,
    ) -> "Connection":
        """Connects (and, with ``tls``, makes the TLS handshake, verifying
        the broker's certificate for ``server_name``, else ``host``: an IP
        address must be among the certificate's IP SANs)."""
        c = cls(host, port, client_id)
        loop = asyncio.get_running_loop()
        extra = {} if tls is None else {"ssl": tls, "server_hostname": server_name or host}
        try:
            transport, rx = await asyncio.wait_for(
                loop.create_connection(lambda: _Receiver(c), host, port, **extra), connect_timeout
            )
        except asyncio.TimeoutError as e:
            raise ConnectError(f"{host}:{port}", TimeoutError(f"no answer in {connect_timeout}s")) from e
        except OSError as e:
            raise ConnectError(f"{host}:{port}", e) from e
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        c._transport, c._rx = transport, rx
        return c

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, cause: Optional[BaseException] = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_cause = cause
        if self._transport is not None:
            self._transport.close()
        self._fail_pending()

    async def wait_closed(self) -> None:
        # The transport closes on the next loop iterations; give it one.
        await asyncio.sleep(0)

    def _closed_error(self) -> ShoalError:
        if self._broker_error is not None:
            return self._broker_error
        cause = self._close_cause
        if isinstance(cause, ShoalError) and not isinstance(cause, ConnectionClosedError):
            return cause
        return ConnectionClosedError(
            f"the connection to {self.addr} closed" + (f": {cause}" if cause else "")
        )

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(self._closed_error())

    def _on_frame(self, header: bytes, payload) -> None:
        try:
            resp = protocol.decode_response(header)
        except ProtocolError as e:
            log.warning("bad frame from %s: %s", self.addr, e)
            self.close(e)
            return
        corr = resp.correlation_id
        if corr != 0:
            fut = self._pending.pop(corr, None)
            if fut is not None and not fut.done():
                fut.set_result((resp, payload))
            return
        if resp.error_code != 0:
            # Connection-level (a frame the broker could not take,
            # TooManyConnections, a timed-out frame): the broker closes
            # after most of them.
            e = error_for(resp.error_code, resp.error_message, resp.leader_hint)
            log.warning("broker %s reported on the connection: %s", self.addr, e)
            self._broker_error = e
        # Pushes (correlation id 0, C5) are not used by this client: dropped.

    async def request(
        self,
        body: Tuple[int, Callable],
        payload: Sequence[bytes] = (),
        timeout: Optional[float] = None,
    ) -> Answer:
        """Sends a request and waits for its answer: the response and its
        payload (bytes-like). A broker error is raised as its
        :class:`~shoal.errors.BrokerError` class."""
        fut = self.send(body, payload)
        await self.drain()
        try:
            if timeout is None:
                resp, data = await fut
            else:
                resp, data = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            raise ConnectionClosedError(f"no answer from {self.addr} within {timeout}s") from None
        if resp.error_code != 0:
            raise error_for(resp.error_code, resp.error_message, resp.leader_hint)
        return resp, data

    def send(self, body: Tuple[int, Callable], payload: Sequence[bytes] = ()) -> asyncio.Future:
        """Writes a request now (whole, or buffered by the transport) and
        returns the future of its raw answer."""
        if self._closed:
            raise self._closed_error()
        corr = self._next_corr
        self._next_corr = corr + 1 if corr < 0xFFFFFFFF else 1
        body_type, build = body
        header = protocol.encode_request(corr, self.client_id, body_type, build)
        payload_len = sum(len(p) for p in payload)
        fut = asyncio.get_running_loop().create_future()
        # A caller that stopped waiting never reads the outcome.
        fut.add_done_callback(_retrieve)
        self._pending[corr] = fut
        t = self._transport
        assert t is not None
        if payload_len:
            t.writelines([protocol.prefix(len(header), payload_len), header, *[p for p in payload if p]])
        else:
            t.write(protocol.prefix(len(header), 0) + header)
        return fut

    async def drain(self) -> None:
        """Waits while the transport's send buffer is over its high mark."""
        rx = self._rx
        if rx is None or self._closed or not rx.write_paused:
            return
        f = asyncio.get_running_loop().create_future()
        rx.drain_waiters.append(f)
        await f
        if self._closed:
            raise self._closed_error()
