"""CRC-32C (Castagnoli: PostgreSQL's pg_comp_crc32c, src/include/port/pg_crc32c.h) for the
modules every `neon` command imports (pg_control, a replication slot's file, the WAL reader).

The `crc32c` package computes the same, but importing it reads its own distribution's
metadata (`importlib.metadata.version`): 13-21 ms of the start of `snapshot create` and `pg
checkout`, which need a CRC of a few hundred bytes. The C module those commands load anyway
(pg15/_walscan.c: SSE 4.2's crc32 where the CPU has it, else slicing-by-8) computes it here;
without it (NEON_PURE_PYTHON=1, or not built) the package does.
"""

from __future__ import annotations

from typing import Protocol

from pg15.native import walscan


class Crc32c(Protocol):
    def __call__(self, data: bytes | bytearray | memoryview, value: int = 0, /) -> int:
        """The CRC of data, continuing from `value` (the CRC of the bytes before it)."""
        ...


crc32c: Crc32c
if walscan is not None:
    crc32c = walscan.crc32c
else:
    import crc32c as _package

    crc32c = _package.crc32c
