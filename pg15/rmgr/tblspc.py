"""Tablespace rmgr (5): CREATE TABLESPACE and DROP TABLESPACE.

Layouts from src/include/commands/tablespace.h: ``xl_tblspc_create_rec { Oid ts_id; char
ts_path[FLEXIBLE_ARRAY_MEMBER]; }`` (CreateTableSpace in src/backend/commands/tablespace.c
registers the path with its NUL) and ``xl_tblspc_drop_rec { Oid ts_id; }``. The path is the
LOCATION as given: absolute, or empty for an in-place tablespace (allow_in_place_tablespaces),
whose pg_tblspc/OID is a plain directory (create_tablespace_directories). These records are
the only place outside the file system where a tablespace's location is written down
(pg_tablespace has no location column), so the page history keeps it from them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pg15.rmgr.fields import MainDataError, unpack

XLOG_TBLSPC_CREATE = 0x00
XLOG_TBLSPC_DROP = 0x10

_OID = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class TblspcCreate:
    """tblspc_redo creates pg_tblspc/OID (a symlink to `location`, or a directory if empty)."""

    ts_id: int
    location: str

    @property
    def in_place(self) -> bool:
        return self.location == ""


@dataclass(frozen=True, slots=True)
class TblspcDrop:
    """tblspc_redo removes pg_tblspc/OID and the version directory it holds."""

    ts_id: int


def decode(info: int, data: bytes) -> TblspcCreate | TblspcDrop:
    op = info & 0xF0
    if op == XLOG_TBLSPC_CREATE:
        (ts_id,) = unpack(_OID, data, 0, "TBLSPC CREATE")
        end = data.find(b"\0", _OID.size)
        if end < 0:
            raise MainDataError("TBLSPC CREATE: the location is not NUL-terminated")
        try:
            location = data[_OID.size : end].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MainDataError(f"TBLSPC CREATE: the location is not UTF-8: {exc}") from None
        return TblspcCreate(ts_id, location)
    if op == XLOG_TBLSPC_DROP:
        (ts_id,) = unpack(_OID, data, 0, "TBLSPC DROP")
        return TblspcDrop(ts_id)
    raise MainDataError(f"unknown Tablespace record info {info:#04x}")
