"""The value formats ingest and import write and reads decode, defined in one place.

==============================  ===========================================================
key                              value
==============================  ===========================================================
relation / SLRU page             Image: the 8192-byte page; or WalDelta whose record is
                                 ``u64 LE start LSN`` + the XLogRecord bytes (the key's LSN
                                 is the record's end LSN, so the record re-decodes exactly)
relation size, SLRU segment      Image: ``u32 LE`` number of blocks (Tombstone: dropped)
database directory               Image: msgpack list of ``[spc, db]`` (``[1664, 0]`` = the
                                 shared catalogs in ``global/``)
relation directory of a db       Image: msgpack list of ``[relfilenode, fork]``
SLRU directory                   Image: msgpack list of segment numbers
two-phase directory              Image: msgpack list of xids
two-phase state file             Image: the pg_twophase/%08X file bytes (state + CRC32C)
relmap file                      Image: the 512-byte pg_filenode.map
checkpoint                       Image: the 88-byte CheckPoint struct (pg15.rmgr.xlog)
pg_control                       Image: the 8192-byte file as imported
node metadata                    Image: msgpack dict (system_identifier, pg_version, ...)
tablespace map                   Image: msgpack list of ``[oid, location]`` (location ``""``:
                                 in-place, pg_tblspc/OID is a directory; else absolute)
==============================  ===========================================================
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgpack

from pageserver.storage.values import WalDelta
from pg15.constants import BLCKSZ, SLRU_PAGES_PER_SEGMENT
from pg15.lsn import format_lsn
from pg15.records import DecodedRecord, decode_record_bytes
from proto.errors import CorruptData

ZERO_PAGE = bytes(BLCKSZ)
"""A page never written: what PostgreSQL reads from a hole below the relation's size."""

_U32 = struct.Struct("<I")
DELTA_HEAD = struct.Struct("<Q")


def encode_delta(start_lsn: int, record_bytes: bytes) -> bytes:
    """The WalDelta payload: the record's start LSN, then its XLogRecord bytes."""
    return DELTA_HEAD.pack(start_lsn) + record_bytes


def decode_delta(end_lsn: int, delta: WalDelta) -> DecodedRecord:
    """Re-decode a delta stored at `end_lsn` (the LSN of its put)."""
    if len(delta.record) < DELTA_HEAD.size:
        raise CorruptData(f"WAL delta at {format_lsn(end_lsn)} is truncated")
    (start,) = DELTA_HEAD.unpack_from(delta.record, 0)
    return decode_record_bytes(delta.record[DELTA_HEAD.size :], start, end_lsn)


def encode_u32(n: int) -> bytes:
    return _U32.pack(n)


def decode_u32(data: bytes, what: str | Callable[[], str]) -> int:
    """A block count; `what` names the value in the error (a callable: only then made, as
    for a basebackup's ~300 sizes a database it cost more than the decoding)."""
    if len(data) != 4:
        name = what if isinstance(what, str) else what()
        raise CorruptData(f"{name}: expected a 4-byte block count, got {len(data)} bytes")
    return int(_U32.unpack(data)[0])


def encode_pairs(pairs: Iterable[tuple[int, int]]) -> bytes:
    return bytes(msgpack.packb(sorted([a, b] for a, b in pairs)))


def decode_pairs(data: bytes, what: str) -> set[tuple[int, int]]:
    try:
        items = msgpack.unpackb(data)
        return {(int(a), int(b)) for a, b in items}
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CorruptData(f"{what} is corrupt: {exc}") from None


def encode_ints(values: Iterable[int]) -> bytes:
    return bytes(msgpack.packb(sorted(values)))


def decode_ints(data: bytes, what: str) -> set[int]:
    try:
        return {int(v) for v in msgpack.unpackb(data)}
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CorruptData(f"{what} is corrupt: {exc}") from None


def encode_metadata(meta: dict[str, Any]) -> bytes:
    return bytes(msgpack.packb(meta))


def decode_metadata(data: bytes) -> dict[str, Any]:
    try:
        meta = msgpack.unpackb(data)
    except (ValueError, msgpack.UnpackException) as exc:
        raise CorruptData(f"node metadata is corrupt: {exc}") from None
    if not isinstance(meta, dict):
        raise CorruptData("node metadata is not a map")
    return meta


def encode_tablespaces(locations: Mapping[int, str]) -> bytes:
    return bytes(msgpack.packb(sorted([oid, loc] for oid, loc in locations.items())))


def decode_tablespaces(data: bytes) -> dict[int, str]:
    try:
        out = {int(oid): loc for oid, loc in msgpack.unpackb(data)}
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise CorruptData(f"tablespace map is corrupt: {exc}") from None
    if not all(isinstance(loc, str) for loc in out.values()):
        raise CorruptData("tablespace map is corrupt: a location is not a string")
    return out


def slru_location(pageno: int) -> tuple[int, int]:
    """(segment number, block within the segment) of an SLRU page number."""
    return pageno // SLRU_PAGES_PER_SEGMENT, pageno % SLRU_PAGES_PER_SEGMENT
