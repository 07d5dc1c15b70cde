"""Heap rmgr (10) redo and the heap page mask, after heap_xlog_* and heap_mask in
src/backend/access/heap/heapam.c.

Also the tuple-level helpers that Heap2 redo shares. VM bit clears implied by these records
are not block references; see `pageserver.redo.visibilitymap.vm_changes`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from pageserver.redo.masks import (
    mask_page_hint_bits,
    mask_page_lsn_and_checksum,
    mask_unused_space,
)
from pageserver.redo.page import (
    FIRST_OFFSET,
    ITEM_ID_SIZE,
    LP_NORMAL,
    PD_ALL_VISIBLE,
    SIZE_OF_PAGE_HEADER,
    PageError,
    UnsupportedRecord,
    get_flags,
    get_prune_xid,
    line_pointer_array,
    max_offset,
    new_page,
    page_add_item,
    set_flags,
    set_prune_xid,
)
from pg15.lsn import format_lsn
from pg15.records import BlockRef, DecodedRecord
from pg15.rmgr.heap import (
    XLOG_HEAP_CONFIRM,
    XLOG_HEAP_DELETE,
    XLOG_HEAP_HOT_UPDATE,
    XLOG_HEAP_INPLACE,
    XLOG_HEAP_INSERT,
    XLOG_HEAP_LOCK,
    XLOG_HEAP_OPMASK,
    XLOG_HEAP_UPDATE,
    HeapConfirm,
    HeapDelete,
    HeapInplace,
    HeapInsert,
    HeapLock,
    HeapUpdate,
    decode_heap,
)

# HeapTupleHeaderData field offsets.
T_XMIN = 0
T_XMAX = 4
T_CID = 8
T_CTID = 12
T_INFOMASK2 = 18
T_INFOMASK = 20
T_HOFF = 22
SIZEOF_HEAP_TUPLE_HEADER = 23

# t_infomask bits.
HEAP_COMBOCID = 0x0020
HEAP_XMAX_KEYSHR_LOCK = 0x0010
HEAP_XMAX_EXCL_LOCK = 0x0040
HEAP_XMAX_LOCK_ONLY = 0x0080
HEAP_XMIN_COMMITTED = 0x0100
HEAP_XMIN_INVALID = 0x0200
HEAP_XMIN_FROZEN = HEAP_XMIN_COMMITTED | HEAP_XMIN_INVALID
HEAP_XMAX_COMMITTED = 0x0400
HEAP_XMAX_INVALID = 0x0800
HEAP_XMAX_IS_MULTI = 0x1000
HEAP_MOVED = 0xC000
HEAP_XACT_MASK = 0xFFF0
HEAP_XMAX_BITS = 0x1CD0
HEAP_LOCK_MASK = 0x0050
# t_infomask2 bits.
HEAP_KEYS_UPDATED = 0x2000
HEAP_HOT_UPDATED = 0x4000

# xl_heap_lock / delete / update infobits_set (XLHL_*).
XLHL_XMAX_IS_MULTI = 0x01
XLHL_XMAX_LOCK_ONLY = 0x02
XLHL_XMAX_EXCL_LOCK = 0x04
XLHL_XMAX_KEYSHR_LOCK = 0x08
XLHL_KEYS_UPDATED = 0x10

XLH_INSERT_ALL_VISIBLE_CLEARED = 0x01
XLH_INSERT_ALL_FROZEN_SET = 0x20
XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED = 0x01
XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED = 0x02
XLH_UPDATE_PREFIX_FROM_OLD = 0x20
XLH_UPDATE_SUFFIX_FROM_OLD = 0x40
XLH_DELETE_ALL_VISIBLE_CLEARED = 0x01
XLH_DELETE_IS_SUPER = 0x08
XLH_DELETE_IS_PARTITION_MOVE = 0x10

SPEC_TOKEN_OFFSET = 0xFFFE
MOVED_PARTITIONS_BLOCK = 0xFFFFFFFF
MOVED_PARTITIONS_OFFSET = 0xFFFD

# xmin, xmax, cid, ctid {bi_hi, bi_lo, posid}, infomask2, infomask, hoff: the 23-byte header.
TUPLE_HEADER = struct.Struct("<IIIHHHHHB")
XL_HEAP_HEADER = struct.Struct("<HHB")  # t_infomask2, t_infomask, t_hoff
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_CTID = struct.Struct("<HHH")
_INFOMASKS = struct.Struct("<HH")  # t_infomask2, t_infomask
_ZERO4 = bytes(4)
_CTID_POSID_INFOMASKS = struct.Struct("<HHH")  # t_ctid.ip_posid, t_infomask2, t_infomask
_NOT_XMAX_HINTS = ~(HEAP_XMAX_INVALID | HEAP_XMAX_COMMITTED) & 0xFFFF
_ZEROS = bytes(8)

RedoFn = Callable[[DecodedRecord, int, "bytearray | None"], bytearray]


# ---------------------------------------------------------------------------------------------
# Shared helpers (also used by heap2)


def block_ref(record: DecodedRecord, block_id: int) -> BlockRef:
    ref = record.block(block_id)
    if ref is None:
        raise PageError(
            f"{record.rmgr_name} {record.type_name} at {format_lsn(record.lsn)} has no "
            f"block {block_id}"
        )
    return ref


def existing(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """The page a non-initializing record modifies; PageError if the caller has none."""
    if page is None:
        raise PageError(
            f"{record.rmgr_name} {record.type_name} at {format_lsn(record.lsn)} needs the "
            f"previous version of block {block_id}"
        )
    return page


def unsupported(record: DecodedRecord) -> UnsupportedRecord:
    return UnsupportedRecord(
        f"no redo for {record.rmgr_name} {record.type_name} (info {record.info:#04x}) at "
        f"{format_lsn(record.lsn)}"
    )


def normal_tuple(page: bytearray, offnum: int, what: str) -> int:
    """Byte offset of the tuple at `offnum`; PageError ("invalid lp") unless it is LP_NORMAL."""
    if offnum < FIRST_OFFSET or offnum > max_offset(page):
        raise PageError(f"{what}: invalid lp: offset {offnum} beyond {max_offset(page)}")
    raw = _U32.unpack_from(page, SIZE_OF_PAGE_HEADER + (offnum - 1) * ITEM_ID_SIZE)[0]
    if (raw >> 15) & 3 != LP_NORMAL:
        raise PageError(f"{what}: invalid lp: line pointer {offnum} is not a normal item")
    return raw & 0x7FFF


def build_tuple(
    xmin: int, xmax: int, blkno: int, offnum: int, header: bytes | memoryview, body: bytes
) -> bytes:
    """A heap tuple rebuilt from xl_heap_header (5 bytes) and the bytes after offset 23.

    t_cid is FirstCommandId (0) and COMBOCID is cleared (HeapTupleHeaderSetCmin).
    """
    infomask2, infomask, hoff = XL_HEAP_HEADER.unpack_from(header, 0)
    head = TUPLE_HEADER.pack(
        xmin,
        xmax,
        0,
        blkno >> 16,
        blkno & 0xFFFF,
        offnum,
        infomask2,
        infomask & ~HEAP_COMBOCID,
        hoff,
    )
    return head + body


def add_tuple(page: bytearray, tup: bytes, offnum: int, what: str) -> None:
    if max_offset(page) + 1 < offnum:
        raise PageError(f"{what}: invalid max offset number {offnum}")
    page_add_item(page, tup, offnum, overwrite=True, is_heap=True)


def set_ctid(page: bytearray, pos: int, blkno: int, offnum: int) -> None:
    _CTID.pack_into(page, pos + T_CTID, blkno >> 16, blkno & 0xFFFF, offnum)


def xmax_fixup(page: bytearray, pos: int, infobits: int, extra_clear2: int = 0) -> tuple[int, int]:
    """Clear xmax bits and KEYS_UPDATED, then apply fix_infomask_from_infobits.

    Returns the new (infomask2, infomask) after storing them.
    """
    infomask2, infomask = _INFOMASKS.unpack_from(page, pos + T_INFOMASK2)
    infomask &= ~(HEAP_XMAX_BITS | HEAP_MOVED)
    infomask2 &= ~(HEAP_KEYS_UPDATED | extra_clear2)
    if infobits & XLHL_XMAX_IS_MULTI:
        infomask |= HEAP_XMAX_IS_MULTI
    if infobits & XLHL_XMAX_LOCK_ONLY:
        infomask |= HEAP_XMAX_LOCK_ONLY
    if infobits & XLHL_XMAX_EXCL_LOCK:
        infomask |= HEAP_XMAX_EXCL_LOCK
    if infobits & XLHL_XMAX_KEYSHR_LOCK:
        infomask |= HEAP_XMAX_KEYSHR_LOCK
    if infobits & XLHL_KEYS_UPDATED:
        infomask2 |= HEAP_KEYS_UPDATED
    _INFOMASKS.pack_into(page, pos + T_INFOMASK2, infomask2, infomask)
    return infomask2, infomask


def set_cmax0(page: bytearray, pos: int) -> None:
    """HeapTupleHeaderSetCmax(FirstCommandId, not combo)."""
    _U32.pack_into(page, pos + T_CID, 0)
    infomask = _U16.unpack_from(page, pos + T_INFOMASK)[0]
    _U16.pack_into(page, pos + T_INFOMASK, infomask & ~HEAP_COMBOCID)


def transaction_id_precedes(id1: int, id2: int) -> bool:
    """TransactionIdPrecedes: modulo-2^32 comparison for normal xids."""
    if id1 < 3 or id2 < 3:
        return id1 < id2
    diff = (id1 - id2) & 0xFFFFFFFF
    return diff >= 0x80000000


def page_set_prunable(page: bytearray, xid: int) -> None:
    old = get_prune_xid(page)
    if old == 0 or transaction_id_precedes(xid, old):
        set_prune_xid(page, xid)


def clear_all_visible(page: bytearray) -> None:
    set_flags(page, get_flags(page) & ~PD_ALL_VISIBLE)


# ---------------------------------------------------------------------------------------------
# Record types


def _insert(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    xl = decode_heap(record.info, record.main_data)
    assert isinstance(xl, HeapInsert)
    ref = block_ref(record, block_id)
    page = new_page(0) if xl.init_page else existing(record, block_id, page)
    data = ref.data
    if len(data) <= XL_HEAP_HEADER.size:
        raise PageError(f"heap INSERT at {format_lsn(record.lsn)}: tuple data too short")
    tup = build_tuple(record.xid, 0, ref.blkno, xl.offnum, data, data[XL_HEAP_HEADER.size :])
    add_tuple(page, tup, xl.offnum, "heap INSERT")
    if xl.flags & XLH_INSERT_ALL_VISIBLE_CLEARED:
        clear_all_visible(page)
    return page


def _delete(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    xl = decode_heap(record.info, record.main_data)
    assert isinstance(xl, HeapDelete)
    ref = block_ref(record, block_id)
    page = existing(record, block_id, page)
    pos = normal_tuple(page, xl.offnum, "heap DELETE")
    xmax_fixup(page, pos, xl.infobits_set, HEAP_HOT_UPDATED)
    if xl.flags & XLH_DELETE_IS_SUPER:
        _U32.pack_into(page, pos + T_XMIN, 0)
    else:
        _U32.pack_into(page, pos + T_XMAX, xl.xmax)
    set_cmax0(page, pos)
    page_set_prunable(page, record.xid)
    if xl.flags & XLH_DELETE_ALL_VISIBLE_CLEARED:
        clear_all_visible(page)
    if xl.flags & XLH_DELETE_IS_PARTITION_MOVE:
        set_ctid(page, pos, MOVED_PARTITIONS_BLOCK, MOVED_PARTITIONS_OFFSET)
    else:
        set_ctid(page, pos, ref.blkno, xl.offnum)
    return page


def _update(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """UPDATE / HOT_UPDATE: block 0 is the new page, block 1 the old one if it differs."""
    xl = decode_heap(record.info, record.main_data)
    assert isinstance(xl, HeapUpdate)
    new_ref = block_ref(record, 0)
    same_page = record.block(1) is None
    what = "heap HOT_UPDATE" if xl.hot else "heap UPDATE"
    old_pos = -1
    if block_id == 1 or same_page:
        page = existing(record, block_id, page)
        old_pos = normal_tuple(page, xl.old_offnum, what)
        xmax_fixup(page, old_pos, xl.old_infobits_set, 0 if xl.hot else HEAP_HOT_UPDATED)
        if xl.hot:
            infomask2 = _U16.unpack_from(page, old_pos + T_INFOMASK2)[0]
            _U16.pack_into(page, old_pos + T_INFOMASK2, infomask2 | HEAP_HOT_UPDATED)
        _U32.pack_into(page, old_pos + T_XMAX, xl.old_xmax)
        set_cmax0(page, old_pos)
        set_ctid(page, old_pos, new_ref.blkno, xl.new_offnum)
        page_set_prunable(page, record.xid)
        if xl.flags & XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED:
            clear_all_visible(page)
        if block_id == 1:
            return page
    elif xl.init_page:
        page = new_page(0)
    else:
        page = existing(record, block_id, page)

    data = new_ref.data
    pos = 0
    prefixlen = suffixlen = 0
    if xl.flags & XLH_UPDATE_PREFIX_FROM_OLD:
        prefixlen = _U16.unpack_from(data, pos)[0]
        pos += 2
    if xl.flags & XLH_UPDATE_SUFFIX_FROM_OLD:
        suffixlen = _U16.unpack_from(data, pos)[0]
        pos += 2
    if len(data) < pos + XL_HEAP_HEADER.size:
        raise PageError(f"{what} at {format_lsn(record.lsn)}: new tuple data too short")
    header = data[pos : pos + XL_HEAP_HEADER.size]
    pos += XL_HEAP_HEADER.size
    logged = data[pos:]
    if prefixlen or suffixlen:
        if old_pos < 0:
            raise PageError(f"{what} at {format_lsn(record.lsn)}: prefix/suffix across pages")
        _, _, old_len = _item_id(page, xl.old_offnum)
        old_hoff = page[old_pos + T_HOFF]
        body = logged
        if prefixlen:
            bitmap_len = header[4] - SIZEOF_HEAP_TUPLE_HEADER
            start = old_pos + old_hoff
            body = logged[:bitmap_len] + page[start : start + prefixlen] + logged[bitmap_len:]
        if suffixlen:
            end = old_pos + old_len
            body = body + page[end - suffixlen : end]
    else:
        body = logged
    tup = build_tuple(record.xid, xl.new_xmax, new_ref.blkno, xl.new_offnum, header, bytes(body))
    add_tuple(page, tup, xl.new_offnum, what)
    if xl.flags & XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED:
        clear_all_visible(page)
    return page


def _item_id(page: bytearray, offnum: int) -> tuple[int, int, int]:
    raw = _U32.unpack_from(page, SIZE_OF_PAGE_HEADER + (offnum - 1) * ITEM_ID_SIZE)[0]
    return raw & 0x7FFF, (raw >> 15) & 3, raw >> 17


def _confirm(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    xl = decode_heap(record.info, record.main_data)
    assert isinstance(xl, HeapConfirm)
    page = existing(record, block_id, page)
    pos = normal_tuple(page, xl.offnum, "HEAP_CONFIRM")
    set_ctid(page, pos, block_ref(record, block_id).blkno, xl.offnum)
    return page


def is_locked_only(infomask: int) -> bool:
    """HEAP_XMAX_IS_LOCKED_ONLY."""
    return (
        bool(infomask & HEAP_XMAX_LOCK_ONLY)
        or (infomask & (HEAP_XMAX_IS_MULTI | HEAP_LOCK_MASK)) == HEAP_XMAX_EXCL_LOCK
    )


def _lock(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    xl = decode_heap(record.info, record.main_data)
    assert isinstance(xl, HeapLock)
    page = existing(record, block_id, page)
    pos = normal_tuple(page, xl.offnum, "heap LOCK")
    infomask2, infomask = xmax_fixup(page, pos, xl.infobits_set)
    if is_locked_only(infomask):
        _U16.pack_into(page, pos + T_INFOMASK2, infomask2 & ~HEAP_HOT_UPDATED)
        set_ctid(page, pos, block_ref(record, block_id).blkno, xl.offnum)
    _U32.pack_into(page, pos + T_XMAX, xl.locking_xid)
    set_cmax0(page, pos)
    return page


def _inplace(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    xl = decode_heap(record.info, record.main_data)
    assert isinstance(xl, HeapInplace)
    page = existing(record, block_id, page)
    pos = normal_tuple(page, xl.offnum, "heap INPLACE")
    newtup = block_ref(record, block_id).data
    _, _, length = _item_id(page, xl.offnum)
    hoff = page[pos + T_HOFF]
    if length - hoff != len(newtup):
        raise PageError(
            f"heap INPLACE at {format_lsn(record.lsn)}: wrong tuple length "
            f"{len(newtup)}, page has {length - hoff}"
        )
    page[pos + hoff : pos + length] = newtup
    return page


_REDO: dict[int, RedoFn] = {
    XLOG_HEAP_INSERT: _insert,
    XLOG_HEAP_DELETE: _delete,
    XLOG_HEAP_UPDATE: _update,
    XLOG_HEAP_HOT_UPDATE: _update,
    XLOG_HEAP_CONFIRM: _confirm,
    XLOG_HEAP_LOCK: _lock,
    XLOG_HEAP_INPLACE: _inplace,
}


def apply(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """Redo one block of a Heap record (TRUNCATE has no blocks and changes no page)."""
    fn = _REDO.get(record.info & XLOG_HEAP_OPMASK)
    if fn is None:
        raise unsupported(record)
    return fn(record, block_id, page)


# ---------------------------------------------------------------------------------------------
# Mask


def mask(page: bytearray, blkno: int = 0) -> None:
    """heap_mask: page hints, free space, tuple hint bits, t_cid and item padding.

    A speculative-insertion token in t_ctid becomes (blkno, offnum), which is what redo
    writes there; so this mask needs the block number (see RmgrRedo.block_mask).
    """
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    mask_unused_space(page)
    nline = max_offset(page)
    if not nline:
        return
    size = len(page)
    tail_at = _CTID_POSID_INFOMASKS.unpack_from
    u16_put = _U16.pack_into
    for off, raw in enumerate(line_pointer_array(nline).unpack_from(page, SIZE_OF_PAGE_HEADER), 1):
        length = raw >> 17
        if not length:
            continue
        lp_off = raw & 0x7FFF
        if (raw >> 15) & 3 == LP_NORMAL and lp_off + SIZEOF_HEAP_TUPLE_HEADER <= size:
            posid, _, infomask = tail_at(page, lp_off + T_CTID + 4)
            if infomask & HEAP_XMIN_FROZEN != HEAP_XMIN_FROZEN:
                u16_put(page, lp_off + T_INFOMASK, infomask & ~HEAP_XACT_MASK)
            else:
                u16_put(page, lp_off + T_INFOMASK, infomask & _NOT_XMAX_HINTS)
            page[lp_off + T_CID : lp_off + T_CID + 4] = _ZERO4
            if posid == SPEC_TOKEN_OFFSET:
                set_ctid(page, lp_off, blkno, off)
        pad = -length & 7
        end = lp_off + length
        if pad and end + pad <= size:
            page[end : end + pad] = _ZEROS[:pad]
