"""Heap2 rmgr (9) redo, after heap_xlog_* in src/backend/access/heap/heapam.c; the mask is heap's.

REWRITE and NEW_CID carry no block references (logical decoding only), so they never reach
`apply`. VISIBLE's block 0 is the VM page and its block 1 the heap page; neither gets the
dispatcher's LSN stamp (`keeps_lsn`): the heap page LSN only moves with checksums or
wal_log_hints (assumed off), the VM page LSN only when its bits change.
"""

from __future__ import annotations

import struct

from pageserver.redo.heap import (
    T_CID,
    T_INFOMASK2,
    T_XMAX,
    XL_HEAP_HEADER,
    XLH_INSERT_ALL_FROZEN_SET,
    XLH_INSERT_ALL_VISIBLE_CLEARED,
    RedoFn,
    add_tuple,
    block_ref,
    build_tuple,
    clear_all_visible,
    existing,
    mask,
    normal_tuple,
    unsupported,
    xmax_fixup,
)
from pageserver.redo.page import (
    ITEM_ID_SIZE,
    LP_DEAD,
    LP_REDIRECT,
    LP_UNUSED,
    PD_ALL_VISIBLE,
    SIZE_OF_PAGE_HEADER,
    PageError,
    get_flags,
    item_offset,
    max_offset,
    new_page,
    page_repair_fragmentation,
    page_truncate_line_pointer_array,
    set_flags,
)
from pageserver.redo.visibilitymap import vm_redo_visible
from pg15.lsn import format_lsn
from pg15.records import DecodedRecord
from pg15.rmgr.heap import (
    XLOG_HEAP2_FREEZE_PAGE,
    XLOG_HEAP2_LOCK_UPDATED,
    XLOG_HEAP2_MULTI_INSERT,
    XLOG_HEAP2_PRUNE,
    XLOG_HEAP2_VACUUM,
    XLOG_HEAP2_VISIBLE,
    XLOG_HEAP_OPMASK,
    HeapFreezePage,
    HeapLockUpdated,
    HeapMultiInsert,
    HeapPrune,
    HeapVacuum,
    HeapVisible,
    decode_heap2,
)

__all__ = ["apply", "keeps_lsn", "mask"]

XLH_FREEZE_XVAC = 0x02
XLH_INVALID_XVAC = 0x04
FROZEN_TRANSACTION_ID = 2

_U32 = struct.Struct("<I")
_FREEZE_TUPLE = struct.Struct("<IHHHBx")  # xmax, offset, t_infomask2, t_infomask, frzflags
_MULTI_INSERT_TUPLE = struct.Struct("<HHHB")  # datalen, t_infomask2, t_infomask, t_hoff


def _offsets(data: bytes, count: int, start: int, what: str) -> tuple[int, ...]:
    end = start + 2 * count
    if count < 0 or end > len(data):
        raise PageError(f"{what}: block data holds {len(data)} bytes, need {end}")
    return struct.unpack_from(f"<{count}H", data, start)


def _set_lp(page: bytearray, offnum: int, off: int, flags: int, length: int, what: str) -> None:
    if not 1 <= offnum <= max_offset(page):
        raise PageError(f"{what}: line pointer {offnum} beyond {max_offset(page)}")
    _U32.pack_into(
        page,
        SIZE_OF_PAGE_HEADER + (offnum - 1) * ITEM_ID_SIZE,
        off | (flags << 15) | (length << 17),
    )


def _prune(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """heap_page_prune_execute: redirects, dead and unused line pointers, then defragment."""
    xl = decode_heap2(record.info, record.main_data)
    assert isinstance(xl, HeapPrune)
    page = existing(record, block_id, page)
    data = block_ref(record, block_id).data
    if len(data) % 2:
        raise PageError(f"PRUNE at {format_lsn(record.lsn)}: odd block data length")
    offs = _offsets(data, len(data) // 2, 0, "PRUNE")
    nred = 2 * xl.nredirected
    if nred + xl.ndead > len(offs):
        raise PageError(f"PRUNE at {format_lsn(record.lsn)}: counts exceed the block data")
    for i in range(0, nred, 2):
        _set_lp(page, offs[i], offs[i + 1], LP_REDIRECT, 0, "PRUNE")
    for off in offs[nred : nred + xl.ndead]:
        _set_lp(page, off, 0, LP_DEAD, 0, "PRUNE")
    for off in offs[nred + xl.ndead :]:
        _set_lp(page, off, 0, LP_UNUSED, 0, "PRUNE")
    page_repair_fragmentation(page)
    return page


def _vacuum(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    xl = decode_heap2(record.info, record.main_data)
    assert isinstance(xl, HeapVacuum)
    page = existing(record, block_id, page)
    for off in _offsets(block_ref(record, block_id).data, xl.nunused, 0, "heap2 VACUUM"):
        _set_lp(page, off, 0, LP_UNUSED, 0, "heap2 VACUUM")
    page_truncate_line_pointer_array(page)
    return page


def _freeze_page(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    xl = decode_heap2(record.info, record.main_data)
    assert isinstance(xl, HeapFreezePage)
    page = existing(record, block_id, page)
    data = block_ref(record, block_id).data
    if len(data) < xl.ntuples * _FREEZE_TUPLE.size:
        raise PageError(f"FREEZE_PAGE at {format_lsn(record.lsn)}: block data too short")
    for xmax, offnum, infomask2, infomask, frzflags in _FREEZE_TUPLE.iter_unpack(
        data[: xl.ntuples * _FREEZE_TUPLE.size]
    ):
        if not 1 <= offnum <= max_offset(page):
            raise PageError(f"FREEZE_PAGE: line pointer {offnum} beyond {max_offset(page)}")
        pos = item_offset(page, offnum)
        _U32.pack_into(page, pos + T_XMAX, xmax)
        if frzflags & XLH_FREEZE_XVAC:
            _U32.pack_into(page, pos + T_CID, FROZEN_TRANSACTION_ID)
        if frzflags & XLH_INVALID_XVAC:
            _U32.pack_into(page, pos + T_CID, 0)
        struct.pack_into("<HH", page, pos + T_INFOMASK2, infomask2, infomask)
    return page


def _visible(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    xl = decode_heap2(record.info, record.main_data)
    assert isinstance(xl, HeapVisible)
    if block_id == 1:
        page = existing(record, block_id, page)
        set_flags(page, get_flags(page) | PD_ALL_VISIBLE)
        return page
    heap_blkno = block_ref(record, 1).blkno
    return vm_redo_visible(page, heap_blkno, xl.flags, record.end_lsn)


def _multi_insert(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    xl = decode_heap2(record.info, record.main_data)
    assert isinstance(xl, HeapMultiInsert)
    ref = block_ref(record, block_id)
    page = new_page(0) if xl.init_page else existing(record, block_id, page)
    data = ref.data
    pos = 0
    for i in range(xl.ntuples):
        offnum = i + 1 if xl.init_page else xl.offsets[i]
        pos += pos & 1  # SHORTALIGN within the (MAXALIGNed) block data
        if pos + _MULTI_INSERT_TUPLE.size > len(data):
            raise PageError(f"MULTI_INSERT at {format_lsn(record.lsn)}: tuple {i} truncated")
        datalen = _MULTI_INSERT_TUPLE.unpack_from(data, pos)[0]
        header = data[pos + 2 : pos + _MULTI_INSERT_TUPLE.size]
        pos += _MULTI_INSERT_TUPLE.size
        body = data[pos : pos + datalen]
        pos += datalen
        if len(body) != datalen:
            raise PageError(f"MULTI_INSERT at {format_lsn(record.lsn)}: tuple {i} truncated")
        add_tuple(
            page,
            build_tuple(record.xid, 0, ref.blkno, offnum, header, body),
            offnum,
            "MULTI_INSERT",
        )
    if pos != len(data):
        raise PageError(f"MULTI_INSERT at {format_lsn(record.lsn)}: total tuple length mismatch")
    if xl.flags & XLH_INSERT_ALL_VISIBLE_CLEARED:
        clear_all_visible(page)
    if xl.flags & XLH_INSERT_ALL_FROZEN_SET:
        set_flags(page, get_flags(page) | PD_ALL_VISIBLE)
    return page


def _lock_updated(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    xl = decode_heap2(record.info, record.main_data)
    assert isinstance(xl, HeapLockUpdated)
    page = existing(record, block_id, page)
    pos = normal_tuple(page, xl.offnum, "LOCK_UPDATED")
    xmax_fixup(page, pos, xl.infobits_set)
    _U32.pack_into(page, pos + T_XMAX, xl.xmax)
    return page


_REDO: dict[int, RedoFn] = {
    XLOG_HEAP2_PRUNE: _prune,
    XLOG_HEAP2_VACUUM: _vacuum,
    XLOG_HEAP2_FREEZE_PAGE: _freeze_page,
    XLOG_HEAP2_VISIBLE: _visible,
    XLOG_HEAP2_MULTI_INSERT: _multi_insert,
    XLOG_HEAP2_LOCK_UPDATED: _lock_updated,
}

assert XL_HEAP_HEADER.size == _MULTI_INSERT_TUPLE.size - 2


def apply(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """Redo one block of a Heap2 record."""
    fn = _REDO.get(record.info & XLOG_HEAP_OPMASK)
    if fn is None:
        raise unsupported(record)
    return fn(record, block_id, page)


def keeps_lsn(record: DecodedRecord, block_id: int) -> bool:
    """VISIBLE manages its pages' LSNs itself (see the module docstring)."""
    return record.info & XLOG_HEAP_OPMASK == XLOG_HEAP2_VISIBLE


_ = mask  # re-exported: Heap2 pages are masked like Heap's
