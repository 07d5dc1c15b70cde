"""Heap (10) and Heap2 (9) rmgrs: the main-data structs of every record type.

Block data (tuples, offset arrays, freeze plans) is left to redo, which reads it from the
block references; see src/include/access/heapam_xlog.h and heap_xlog_* in
src/backend/access/heap/heapam.c.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pg15.records import RelFileNode
from pg15.rmgr.fields import MainDataError, array, relfilenode, unpack

# Heap opcodes (info & XLOG_HEAP_OPMASK) and the INIT_PAGE flag.
XLOG_HEAP_INSERT = 0x00
XLOG_HEAP_DELETE = 0x10
XLOG_HEAP_UPDATE = 0x20
XLOG_HEAP_TRUNCATE = 0x30
XLOG_HEAP_HOT_UPDATE = 0x40
XLOG_HEAP_CONFIRM = 0x50
XLOG_HEAP_LOCK = 0x60
XLOG_HEAP_INPLACE = 0x70
XLOG_HEAP_OPMASK = 0x70
XLOG_HEAP_INIT_PAGE = 0x80
# Heap2 opcodes.
XLOG_HEAP2_REWRITE = 0x00
XLOG_HEAP2_PRUNE = 0x10
XLOG_HEAP2_VACUUM = 0x20
XLOG_HEAP2_FREEZE_PAGE = 0x30
XLOG_HEAP2_VISIBLE = 0x40
XLOG_HEAP2_MULTI_INSERT = 0x50
XLOG_HEAP2_LOCK_UPDATED = 0x60
XLOG_HEAP2_NEW_CID = 0x70

_OFFNUM = struct.Struct("<H")
_INSERT = struct.Struct("<HB")
_DELETE = struct.Struct("<IHBB")
_UPDATE = struct.Struct("<IHBBIH")
_TRUNCATE = struct.Struct("<IIB")
_LOCK = struct.Struct("<IHBB")
_PRUNE = struct.Struct("<IHH")
_FREEZE_PAGE = struct.Struct("<IH")
_VISIBLE = struct.Struct("<IB")
_MULTI_INSERT = struct.Struct("<BxH")
_NEW_CID = struct.Struct("<IIII")
_ITEM_POINTER = struct.Struct("<HHH")
_REWRITE = struct.Struct("<III4xqI4xQ")


@dataclass(frozen=True, slots=True)
class HeapInsert:
    offnum: int
    flags: int
    init_page: bool


@dataclass(frozen=True, slots=True)
class HeapDelete:
    xmax: int
    offnum: int
    infobits_set: int
    flags: int


@dataclass(frozen=True, slots=True)
class HeapUpdate:
    """UPDATE or HOT_UPDATE (`hot`); block 0 is the new page, block 1 the old if different."""

    old_xmax: int
    old_offnum: int
    old_infobits_set: int
    flags: int
    new_xmax: int
    new_offnum: int
    hot: bool
    init_page: bool


@dataclass(frozen=True, slots=True)
class HeapTruncate:
    """TRUNCATE of whole relations, for logical decoding only (no page changes)."""

    db_id: int
    flags: int
    relids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class HeapConfirm:
    offnum: int


@dataclass(frozen=True, slots=True)
class HeapLock:
    locking_xid: int
    offnum: int
    infobits_set: int
    flags: int


@dataclass(frozen=True, slots=True)
class HeapInplace:
    offnum: int


@dataclass(frozen=True, slots=True)
class HeapPrune:
    latest_removed_xid: int
    nredirected: int
    ndead: int


@dataclass(frozen=True, slots=True)
class HeapVacuum:
    nunused: int


@dataclass(frozen=True, slots=True)
class HeapFreezePage:
    cutoff_xid: int
    ntuples: int


@dataclass(frozen=True, slots=True)
class HeapVisible:
    """Block 0 is the visibility-map page, block 1 the heap page."""

    cutoff_xid: int
    flags: int


@dataclass(frozen=True, slots=True)
class HeapMultiInsert:
    """`offsets` is empty with INIT_PAGE: the tuples then go to offsets 1..ntuples."""

    flags: int
    ntuples: int
    offsets: tuple[int, ...]
    init_page: bool


@dataclass(frozen=True, slots=True)
class HeapLockUpdated:
    xmax: int
    offnum: int
    infobits_set: int
    flags: int


@dataclass(frozen=True, slots=True)
class HeapNewCid:
    top_xid: int
    cmin: int
    cmax: int
    combocid: int
    target_node: RelFileNode
    target_block: int
    target_offnum: int


@dataclass(frozen=True, slots=True)
class HeapRewriteMapping:
    mapped_xid: int
    mapped_db: int
    mapped_rel: int
    offset: int
    num_mappings: int
    start_lsn: int
    mappings: bytes


HeapMain = (
    HeapInsert | HeapDelete | HeapUpdate | HeapTruncate | HeapConfirm | HeapLock | HeapInplace
)
Heap2Main = (
    HeapPrune
    | HeapVacuum
    | HeapFreezePage
    | HeapVisible
    | HeapMultiInsert
    | HeapLockUpdated
    | HeapNewCid
    | HeapRewriteMapping
)


def decode_heap(info: int, data: bytes) -> HeapMain:
    op = info & XLOG_HEAP_OPMASK
    init = bool(info & XLOG_HEAP_INIT_PAGE)
    if op == XLOG_HEAP_INSERT:
        offnum, flags = unpack(_INSERT, data, 0, "heap INSERT")
        return HeapInsert(offnum, flags, init)
    if op == XLOG_HEAP_DELETE:
        return HeapDelete(*unpack(_DELETE, data, 0, "heap DELETE"))
    if op in (XLOG_HEAP_UPDATE, XLOG_HEAP_HOT_UPDATE):
        old_xmax, old_off, old_infobits, flags, new_xmax, new_off = unpack(
            _UPDATE, data, 0, "heap UPDATE"
        )
        hot = op == XLOG_HEAP_HOT_UPDATE
        return HeapUpdate(old_xmax, old_off, old_infobits, flags, new_xmax, new_off, hot, init)
    if op == XLOG_HEAP_TRUNCATE:
        db_id, nrelids, flags = unpack(_TRUNCATE, data, 0, "heap TRUNCATE")
        return HeapTruncate(db_id, flags, array("I", data, 12, nrelids, "heap TRUNCATE"))
    if op == XLOG_HEAP_CONFIRM:
        return HeapConfirm(unpack(_OFFNUM, data, 0, "HEAP_CONFIRM")[0])
    if op == XLOG_HEAP_LOCK:
        return HeapLock(*unpack(_LOCK, data, 0, "heap LOCK"))
    return HeapInplace(unpack(_OFFNUM, data, 0, "heap INPLACE")[0])


def decode_heap2(info: int, data: bytes) -> Heap2Main:
    op = info & XLOG_HEAP_OPMASK
    if op == XLOG_HEAP2_PRUNE:
        return HeapPrune(*unpack(_PRUNE, data, 0, "PRUNE"))
    if op == XLOG_HEAP2_VACUUM:
        return HeapVacuum(unpack(_OFFNUM, data, 0, "heap2 VACUUM")[0])
    if op == XLOG_HEAP2_FREEZE_PAGE:
        return HeapFreezePage(*unpack(_FREEZE_PAGE, data, 0, "FREEZE_PAGE"))
    if op == XLOG_HEAP2_VISIBLE:
        return HeapVisible(*unpack(_VISIBLE, data, 0, "VISIBLE"))
    if op == XLOG_HEAP2_MULTI_INSERT:
        init = bool(info & XLOG_HEAP_INIT_PAGE)
        flags, ntuples = unpack(_MULTI_INSERT, data, 0, "MULTI_INSERT")
        offsets = () if init else array("H", data, 4, ntuples, "MULTI_INSERT")
        return HeapMultiInsert(flags, ntuples, offsets, init)
    if op == XLOG_HEAP2_LOCK_UPDATED:
        return HeapLockUpdated(*unpack(_LOCK, data, 0, "LOCK_UPDATED"))
    if op == XLOG_HEAP2_NEW_CID:
        top_xid, cmin, cmax, combocid = unpack(_NEW_CID, data, 0, "NEW_CID")
        node = relfilenode(data, 16, "NEW_CID")
        hi, lo, posid = unpack(_ITEM_POINTER, data, 28, "NEW_CID")
        return HeapNewCid(top_xid, cmin, cmax, combocid, node, (hi << 16) | lo, posid)
    if op == XLOG_HEAP2_REWRITE:
        xid, db, rel, offset, num, start_lsn = unpack(_REWRITE, data, 0, "REWRITE")
        return HeapRewriteMapping(xid, db, rel, offset, num, start_lsn, data[_REWRITE.size :])
    raise MainDataError(f"unknown Heap2 record info {info:#04x}")
