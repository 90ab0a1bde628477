"""Block checksums, torch-free (a fresh process can verify shards while torch still imports).

`crc32(data, value=0)` is the standard CRC-32 (the zlib / gzip polynomial: the same values as
`zlib.crc32`, so artifacts packed with any implementation load with any other), computed by
the fastest implementation installed:

    zlib_ng   zlib-ng's crc32 (PCLMULQDQ / VPCLMULQDQ folding)
    isal      Intel ISA-L's crc32 (PCLMULQDQ folding)
    zlib      the interpreter's zlib (table-driven)

All three release the GIL on large buffers, so blocks verify in parallel on threads. On the
2-core development VM zlib's crc32 runs at about 3 GB/s per core, zlib-ng's and ISA-L's at
10-12 GB/s: with zlib the verified load is bound by the checksum, not by the page cache.
`EMBER_CRC32=zlib` (or `zlib_ng`, `isal`) forces one (benchmarks compare them).
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Callable
from typing import Any

__all__ = ["BLOCK_DIGESTS", "CRC32_IMPL", "block_digest", "crc32", "crc32_impls"]

BLOCK_DIGESTS = ("crc32", "sha256")


def crc32_impls() -> dict[str, Callable[..., int]]:
    """Every installed CRC-32 implementation, fastest first."""
    impls: dict[str, Callable[..., int]] = {}
    try:
        from zlib_ng import zlib_ng

        impls["zlib_ng"] = zlib_ng.crc32
    except ImportError:
        pass
    try:
        from isal import isal_zlib

        impls["isal"] = isal_zlib.crc32
    except ImportError:
        pass
    impls["zlib"] = zlib.crc32
    return impls


def _choose() -> tuple[str, Callable[..., int]]:
    impls = crc32_impls()
    forced = os.environ.get("EMBER_CRC32", "").strip()
    if forced:
        if forced not in impls:
            raise RuntimeError(
                f"EMBER_CRC32={forced!r} is not installed; installed: {', '.join(impls)}"
            )
        return forced, impls[forced]
    return next(iter(impls.items()))


CRC32_IMPL, _crc32 = _choose()


def crc32(data: Any, value: int = 0) -> int:
    """CRC-32 of a buffer (continuing from `value`), equal to `zlib.crc32(data, value)`."""
    return _crc32(data, value)


def block_digest(algorithm: str, data: Any) -> str:
    """Hex checksum of one block (any buffer). Both algorithms release the GIL on big buffers,
    so blocks verify in parallel on threads."""
    if algorithm == "crc32":
        return f"{_crc32(data):08x}"
    if algorithm == "sha256":
        return hashlib.sha256(data).hexdigest()
    raise ValueError(f"unknown block digest {algorithm!r}; choose from {BLOCK_DIGESTS}")
