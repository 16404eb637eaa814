"""SCRAM-SHA-256 (RFC 5802 with RFC 7677's hash), the client's side: pure,
no I/O. The broker's rules (``wire/PROTOCOL.md``, "Authentication"): the
GS2 header is ``n,,``; user names are 1-64 characters of
``A-Z a-z 0-9 . _ - @``; passwords are hashed as their UTF-8 bytes."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from typing import Tuple

MECHANISM = "SCRAM-SHA-256"
ITERATIONS_MIN = 4096
ITERATIONS_MAX = 1_000_000
_USER = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")


class ScramError(Exception):
    """A SCRAM message that cannot be right (or a broker that cannot prove
    it knows the credential)."""


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


class ScramClient:
    """One exchange: :meth:`first`, then :meth:`final` with the
    server-first message, then :meth:`verify` with the server-final one."""

    def __init__(self, user: str, password: str, nonce: str = ""):
        if not _USER.match(user):
            raise ScramError(f"invalid user name {user!r}: 1 to 64 of A-Z a-z 0-9 . _ - @")
        self._password = password.encode()
        self._nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self._bare = f"n={user},r={self._nonce}"
        self._server_signature = b""

    def first(self) -> bytes:
        return ("n,," + self._bare).encode()

    def final(self, server_first: bytes) -> bytes:
        msg = server_first.decode("utf-8", errors="strict")
        if msg.startswith("e="):
            raise ScramError(f"the broker refused: {msg[2:]}")
        parts = msg.split(",")
        if len(parts) < 3 or not (
            parts[0].startswith("r=") and parts[1].startswith("s=") and parts[2].startswith("i=")
        ):
            raise ScramError("malformed server-first message")
        nonce, salt, iterations = parts[0][2:], base64.b64decode(parts[1][2:]), int(parts[2][2:])
        if not nonce.startswith(self._nonce) or nonce == self._nonce:
            raise ScramError("the server nonce does not continue ours")
        if not ITERATIONS_MIN <= iterations <= ITERATIONS_MAX:
            raise ScramError(f"iteration count {iterations} out of range")
        salted = hashlib.pbkdf2_hmac("sha256", self._password, salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={nonce}"
        auth = f"{self._bare},{msg},{without_proof}".encode()
        signature = _hmac(stored_key, auth)
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        self._server_signature = _hmac(_hmac(salted, b"Server Key"), auth)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: bytes) -> None:
        msg = server_final.decode("utf-8", errors="strict")
        if msg.startswith("e="):
            raise ScramError(f"the broker refused: {msg[2:]}")
        if not msg.startswith("v="):
            raise ScramError("malformed server-final message")
        sig = base64.b64decode(msg[2:].split(",")[0])
        if not self._server_signature or not hmac.compare_digest(sig, self._server_signature):
            raise ScramError("the broker's signature is wrong: it does not know the password")


def exchange_steps(user: str, password: str) -> Tuple[ScramClient, bytes]:
    """A new exchange and its client-first message."""
    c = ScramClient(user, password)
    return c, c.first()
