"""CRC32C (Castagnoli), the checksum of every record batch.

Backends, first found wins:

1. ``crc32c`` (PyPI, a dependency of this package; hardware-accelerated),
2. ``google-crc32c`` (PyPI; ``pip install google-crc32c``),
3. a table-driven pure-Python fallback, correct but about a thousand times
   slower (a few MB/s): fine for tests and tiny volumes, not for production.
   A warning says when it is in use.

``SHOAL_CRC32C=crc32c|google|python`` forces one (a missing one is an error).
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional, Tuple

Crc = Callable[[bytes], int]


def _table() -> Tuple[int, ...]:
    poly = 0x82F63B78  # Castagnoli, reflected
    out = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        out.append(c)
    return tuple(out)


_TABLE: Optional[Tuple[int, ...]] = None


def crc32c_python(data) -> int:
    """Pure-Python CRC32C (the fallback)."""
    global _TABLE
    if _TABLE is None:
        _TABLE = _table()
    t = _TABLE
    c = 0xFFFFFFFF
    for b in bytes(data):
        c = t[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _crc32c_pkg() -> Optional[Crc]:
    try:
        import crc32c as m  # type: ignore[import-not-found]
    except ImportError:
        return None
    return m.crc32c


def _google() -> Optional[Crc]:
    try:
        import google_crc32c as m  # type: ignore[import-not-found]
    except ImportError:
        return None
    if getattr(m, "implementation", "c") != "c":
        # Its own fallback is pure Python as well; ours is as good.
        return None
    return m.value


def _select() -> Tuple[str, Crc]:
    forced = os.environ.get("SHOAL_CRC32C", "").strip().lower()
    choices = {"crc32c": _crc32c_pkg, "google": _google}
    if forced:
        if forced == "python":
            return "python", crc32c_python
        if forced not in choices:
            raise ImportError(f"SHOAL_CRC32C={forced!r}: expected crc32c, google or python")
        f = choices[forced]()
        if f is None:
            raise ImportError(f"SHOAL_CRC32C={forced!r} but that package is not installed")
        return forced, f
    for name, load in choices.items():
        f = load()
        if f is not None:
            return name, f
    warnings.warn(
        "shoal: no CRC32C package found (pip install crc32c); using the slow "
        "pure-Python fallback",
        RuntimeWarning,
        stacklevel=2,
    )
    return "python", crc32c_python


BACKEND, crc32c = _select()
