"""The Tablespace rmgr decoder on the bytes CreateTableSpace / DropTableSpace log
(src/backend/commands/tablespace.c: the OID, then the location with its NUL)."""

from __future__ import annotations

import struct

import pytest

from pg15.rmgr.fields import MainDataError
from pg15.rmgr.tblspc import (
    XLOG_TBLSPC_CREATE,
    XLOG_TBLSPC_DROP,
    TblspcCreate,
    TblspcDrop,
    decode,
)


def test_create_with_an_absolute_location() -> None:
    parsed = decode(XLOG_TBLSPC_CREATE, struct.pack("<I", 16385) + b"/srv/pg ts/\xc3\xa9\0")
    assert parsed == TblspcCreate(16385, "/srv/pg ts/\u00e9")
    assert isinstance(parsed, TblspcCreate) and not parsed.in_place


def test_create_in_place_has_an_empty_location() -> None:
    parsed = decode(XLOG_TBLSPC_CREATE, struct.pack("<I", 16386) + b"\0")
    assert parsed == TblspcCreate(16386, "")
    assert isinstance(parsed, TblspcCreate) and parsed.in_place


def test_drop() -> None:
    assert decode(XLOG_TBLSPC_DROP, struct.pack("<I", 16385)) == TblspcDrop(16385)
    # The low info bits belong to the record machinery (XLR_INFO_MASK), not the op.
    assert decode(XLOG_TBLSPC_DROP | 0x01, struct.pack("<I", 7)) == TblspcDrop(7)


@pytest.mark.parametrize(
    ("info", "data", "message"),
    [
        (XLOG_TBLSPC_CREATE, b"\x01\x40", "need 4"),
        (XLOG_TBLSPC_CREATE, struct.pack("<I", 1) + b"/srv", "not NUL-terminated"),
        (XLOG_TBLSPC_CREATE, struct.pack("<I", 1) + b"\xff\0", "not UTF-8"),
        (XLOG_TBLSPC_DROP, b"\x01", "need 4"),
        (0x20, struct.pack("<I", 1), "unknown Tablespace record"),
    ],
)
def test_malformed_records_are_refused_by_name(info: int, data: bytes, message: str) -> None:
    with pytest.raises(MainDataError, match=message):
        decode(info, data)
