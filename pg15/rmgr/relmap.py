"""RelMap rmgr (7): a new pg_filenode.map for a database (or the shared one, dbid 0)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pg15.rmgr.fields import MainDataError, array, unpack

XLOG_RELMAP_UPDATE = 0x00
RELMAPPER_FILEMAGIC = 0x592717
RELMAP_FILE_SIZE = 512
MAX_MAPPINGS = 62

_HEADER = struct.Struct("<IIi")
_FILE_HEAD = struct.Struct("<Ii")


@dataclass(frozen=True, slots=True)
class RelmapUpdate:
    """`data` is the whole 512-byte RelMapFile, written as-is by redo."""

    db_id: int
    ts_id: int
    data: bytes

    @property
    def mappings(self) -> tuple[tuple[int, int], ...]:
        """(catalog OID, relfilenode) pairs of the map."""
        magic, n = unpack(_FILE_HEAD, self.data, 0, "RelMapFile")
        if magic != RELMAPPER_FILEMAGIC or not 0 <= n <= MAX_MAPPINGS:
            raise MainDataError(f"RelMapFile has magic {magic:#x} and {n} mappings")
        flat = array("I", self.data, 8, 2 * n, "RelMapFile")
        return tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))


def decode(info: int, data: bytes) -> RelmapUpdate:
    if info & 0xF0 != XLOG_RELMAP_UPDATE:
        raise MainDataError(f"unknown RelMap record info {info:#04x}")
    db_id, ts_id, nbytes = unpack(_HEADER, data, 0, "RelMap UPDATE")
    if nbytes < 0 or len(data) < 12 + nbytes:
        raise MainDataError(f"RelMap UPDATE: {nbytes} map bytes do not fit")
    return RelmapUpdate(db_id, ts_id, data[12 : 12 + nbytes])
