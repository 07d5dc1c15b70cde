"""Database rmgr (4): CREATE DATABASE (file_copy and wal_log strategies) and DROP DATABASE."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from pg15.rmgr.fields import MainDataError, array, unpack

XLOG_DBASE_CREATE_FILE_COPY = 0x00
XLOG_DBASE_CREATE_WAL_LOG = 0x10
XLOG_DBASE_DROP = 0x20

_FILE_COPY = struct.Struct("<IIII")
_WAL_LOG = struct.Struct("<II")
_DROP = struct.Struct("<Ii")


@dataclass(frozen=True, slots=True)
class DbaseCreateFileCopy:
    """Redo copies the source database directory wholesale (no per-page WAL follows)."""

    strategy: ClassVar[str] = "file_copy"
    db_id: int
    tablespace_id: int
    src_db_id: int
    src_tablespace_id: int


@dataclass(frozen=True, slots=True)
class DbaseCreateWalLog:
    """Redo creates the directory; the contents follow as smgr, FPI and relmap records."""

    strategy: ClassVar[str] = "wal_log"
    db_id: int
    tablespace_id: int


@dataclass(frozen=True, slots=True)
class DbaseDrop:
    db_id: int
    tablespace_ids: tuple[int, ...]


def decode(info: int, data: bytes) -> DbaseCreateFileCopy | DbaseCreateWalLog | DbaseDrop:
    op = info & 0xF0
    if op == XLOG_DBASE_CREATE_FILE_COPY:
        return DbaseCreateFileCopy(*unpack(_FILE_COPY, data, 0, "CREATE_FILE_COPY"))
    if op == XLOG_DBASE_CREATE_WAL_LOG:
        return DbaseCreateWalLog(*unpack(_WAL_LOG, data, 0, "CREATE_WAL_LOG"))
    if op == XLOG_DBASE_DROP:
        db_id, n = unpack(_DROP, data, 0, "DROP")
        return DbaseDrop(db_id, array("I", data, 8, n, "DROP"))
    raise MainDataError(f"unknown Database record info {info:#04x}")
