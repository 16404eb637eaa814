"""One TCP connection to one broker port, requests multiplexed by
correlation id (asyncio).

Several requests may be outstanding; the broker answers produce and admin
requests in order and fetches possibly out of order, so answers are matched
by correlation id. A request whose caller stopped waiting (a timeout, a
cancelled poll) is still sent whole and its answer dropped, so a frame is
never cut short.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from typing import Callable, Dict, Optional, Sequence, Tuple

from .. import protocol
from ..errors import ConnectionClosedError, ConnectError, ProtocolError, ShoalError, error_for

log = logging.getLogger("shoal")

_PREFIX = struct.Struct("<II")

Answer = Tuple[protocol.Response, bytes]


def _retrieve(f: asyncio.Future) -> None:
    if not f.cancelled():
        f.exception()


class Connection:
    """A connection to ``host:port``. Use :meth:`open`."""

    def __init__(self, host: str, port: int, client_id: str):
        self.host = host
        self.port = port
        self.client_id = client_id
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._pending: Dict[int, asyncio.Future] = {}
        self._next_corr = 1
        self._closed = False
        self._close_cause: Optional[BaseException] = None
        self._read_task: Optional[asyncio.Task] = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    async def open(
        cls, host: str, port: int, client_id: str, connect_timeout: float
    ) -> "Connection":
        c = cls(host, port, client_id)
        try:
            r, w = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=1 << 20), connect_timeout
            )
        except asyncio.TimeoutError as e:
            raise ConnectError(f"{host}:{port}", TimeoutError(f"no answer in {connect_timeout}s")) from e
        except OSError as e:
            raise ConnectError(f"{host}:{port}", e) from e
        sock = w.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        c._reader, c._writer = r, w
        c._read_task = asyncio.get_running_loop().create_task(c._read_loop())
        return c

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, cause: Optional[BaseException] = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_cause = cause
        if self._writer is not None:
            self._writer.close()
        if self._read_task is not None and self._read_task is not asyncio.current_task():
            self._read_task.cancel()
        self._fail_pending()

    async def wait_closed(self) -> None:
        if self._writer is not None:
            try:
                await self._writer.wait_closed()
            except (OSError, asyncio.CancelledError):
                pass

    def _closed_error(self) -> ShoalError:
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

    async def request(
        self,
        body: Tuple[int, Callable],
        payload: Sequence[bytes] = (),
        timeout: Optional[float] = None,
    ) -> Answer:
        """Sends a request and waits for its answer. A broker error is
        raised as its :class:`~shoal.errors.BrokerError` class."""
        fut = self.send(body, payload)
        await self.drain()
        try:
            if timeout is None:
                resp, data = await fut
            else:
                resp, data = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            raise ConnectionClosedError(
                f"no answer from {self.addr} within {timeout}s"
            ) from None
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
        w = self._writer
        assert w is not None
        w.write(protocol.prefix(len(header), payload_len) + header)
        for p in payload:
            if p:
                w.write(p)
        return fut

    async def drain(self) -> None:
        """Waits while the socket's send buffer is over its high mark."""
        if self._writer is not None and not self._closed:
            try:
                await self._writer.drain()
            except (ConnectionError, OSError) as e:
                self.close(e)
                raise self._closed_error() from e

    async def _read_loop(self) -> None:
        r = self._reader
        assert r is not None
        cause: Optional[BaseException] = None
        try:
            while True:
                head = await r.readexactly(8)
                frame_len, header_len = _PREFIX.unpack(head)
                protocol.check_prefix(frame_len, header_len)
                rest = await r.readexactly(frame_len - 4)
                header = rest[:header_len]
                payload = rest[header_len:] if len(rest) > header_len else b""
                resp = protocol.decode_response(header)
                corr = resp.correlation_id
                if corr != 0:
                    fut = self._pending.pop(corr, None)
                    if fut is not None and not fut.done():
                        fut.set_result((resp, payload))
                    continue
                if resp.error_code != 0:
                    # Connection-level (a frame the broker could not take,
                    # TooManyConnections, a timed-out frame): the broker
                    # closes after most of them, and pending requests fail
                    # with this error rather than a bare "closed".
                    e = error_for(resp.error_code, resp.error_message, resp.leader_hint)
                    log.warning("broker %s reported on the connection: %s", self.addr, e)
                    cause = e
                # Pushes (corr 0) are not used by this client: dropped.
        except asyncio.IncompleteReadError:
            pass
        except asyncio.CancelledError:
            return
        except ProtocolError as e:
            log.warning("bad frame from %s: %s", self.addr, e)
            cause = e
        except (ConnectionError, OSError) as e:
            cause = cause or e
        self.close(cause)
