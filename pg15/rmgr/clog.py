"""CLOG rmgr (3): zeroing and truncating pg_xact pages."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pg15.rmgr.fields import MainDataError, unpack

CLOG_ZEROPAGE = 0x00
CLOG_TRUNCATE = 0x10

_I32 = struct.Struct("<i")
_TRUNCATE = struct.Struct("<iII")


@dataclass(frozen=True, slots=True)
class ClogZeroPage:
    pageno: int


@dataclass(frozen=True, slots=True)
class ClogTruncate:
    pageno: int
    oldest_xact: int
    oldest_xact_db: int


def decode(info: int, data: bytes) -> ClogZeroPage | ClogTruncate:
    op = info & 0xF0
    if op == CLOG_ZEROPAGE:
        return ClogZeroPage(unpack(_I32, data, 0, "CLOG ZEROPAGE")[0])
    if op == CLOG_TRUNCATE:
        return ClogTruncate(*unpack(_TRUNCATE, data, 0, "CLOG TRUNCATE"))
    raise MainDataError(f"unknown CLOG record info {info:#04x}")
