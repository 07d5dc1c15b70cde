"""Btree rmgr (11) redo and mask, after src/backend/access/nbtree/nbtxlog.c and nbtdedup.c.

Every block of every record type is redone independently from the block's previous version
and the record: the per-block dispatch below follows the order and effects of
btree_xlog_* exactly (which block is initialized, which gets which sibling link).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from pageserver.redo.heap import block_ref, existing, unsupported
from pageserver.redo.masks import (
    mask_lp_flags,
    mask_page_hint_bits,
    mask_page_lsn_and_checksum,
    mask_unused_space,
)
from pageserver.redo.page import (
    FIRST_OFFSET,
    ITEM_ID_SIZE,
    SIZE_OF_PAGE_HEADER,
    PageError,
    get_item,
    get_special,
    item_offset,
    max_offset,
    maxalign,
    new_page,
    page_add_item,
    page_index_multi_delete,
    page_index_tuple_delete,
    page_index_tuple_overwrite,
    set_lower,
    set_upper,
)
from pg15.constants import BLCKSZ
from pg15.lsn import format_lsn
from pg15.records import DecodedRecord
from pg15.rmgr.btree import (
    XLOG_BTREE_DEDUP,
    XLOG_BTREE_DELETE,
    XLOG_BTREE_INSERT_LEAF,
    XLOG_BTREE_INSERT_META,
    XLOG_BTREE_INSERT_POST,
    XLOG_BTREE_INSERT_UPPER,
    XLOG_BTREE_MARK_PAGE_HALFDEAD,
    XLOG_BTREE_META_CLEANUP,
    XLOG_BTREE_NEWROOT,
    XLOG_BTREE_SPLIT_L,
    XLOG_BTREE_SPLIT_R,
    XLOG_BTREE_UNLINK_PAGE,
    XLOG_BTREE_UNLINK_PAGE_META,
    XLOG_BTREE_VACUUM,
    BtreeDedup,
    BtreeDelete,
    BtreeMarkPageHalfdead,
    BtreeNewroot,
    BtreeSplit,
    BtreeUnlinkPage,
    BtreeVacuum,
    decode,
    parse_metadata,
)

BT_OPAQUE_SIZE = 16
P_NONE = 0
P_HIKEY = 1

BTP_LEAF = 0x001
BTP_ROOT = 0x002
BTP_DELETED = 0x004
BTP_META = 0x008
BTP_HALF_DEAD = 0x010
BTP_SPLIT_END = 0x020
BTP_HAS_GARBAGE = 0x040
BTP_INCOMPLETE_SPLIT = 0x080
BTP_HAS_FULLXID = 0x100

BTREE_MAGIC = 0x053162
BTREE_METAPAGE_END = 72  # pd_lower of the metapage: header + BTMetaPageData

INDEX_SIZE_MASK = 0x1FFF
INDEX_ALT_TID_MASK = 0x2000
BT_IS_POSTING = 0x2000
BT_OFFSET_MASK = 0x0FFF
TID_SIZE = 6
INDEX_TUPLE_HEADER = 8

_OPAQUE = struct.Struct("<IIIHH")  # btpo_prev, btpo_next, btpo_level, btpo_flags, btpo_cycleid
_FLAGS_AT = 12  # btpo_flags within the special area
_TID = struct.Struct("<HHH")  # bi_hi, bi_lo, posid
_INDEX_TUPLE = struct.Struct("<HHHH")  # t_tid (3 x u16), t_info
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_META = struct.Struct("<IIIIIII4xd?")  # magic .. last_cleanup_num_delpages, pad, tuples, alleq
_DEDUP_INTERVAL = struct.Struct("<HH")

BlockRedo = Callable[[DecodedRecord, int, "bytearray | None"], bytearray]


# ---------------------------------------------------------------------------------------------
# Page and tuple helpers


def opaque(page: bytes | bytearray) -> tuple[int, int, int, int, int]:
    """(btpo_prev, btpo_next, btpo_level, btpo_flags, btpo_cycleid)."""
    return _OPAQUE.unpack_from(page, get_special(page))


def set_opaque(page: bytearray, prev: int, nxt: int, level: int, flags: int, cycle: int) -> None:
    _OPAQUE.pack_into(page, get_special(page), prev, nxt, level, flags, cycle)


def _flags(page: bytes | bytearray) -> int:
    return int(_U16.unpack_from(page, get_special(page) + _FLAGS_AT)[0])


def _set_flags(page: bytearray, flags: int) -> None:
    _U16.pack_into(page, get_special(page) + _FLAGS_AT, flags)


def _set_next(page: bytearray, nxt: int) -> None:
    _U32.pack_into(page, get_special(page) + 4, nxt)


def _set_prev(page: bytearray, prev: int) -> None:
    _U32.pack_into(page, get_special(page), prev)


def bt_page_init() -> bytearray:
    """_bt_pageinit: a fresh page with a zeroed BTPageOpaqueData."""
    return new_page(BT_OPAQUE_SIZE)


def first_data_key(page: bytes | bytearray) -> int:
    """P_FIRSTDATAKEY: 1 on the rightmost page (no high key), else 2."""
    return P_HIKEY if opaque(page)[1] == P_NONE else P_HIKEY + 1


def tuple_size(tup: bytes | bytearray | memoryview, pos: int = 0) -> int:
    """IndexTupleSize."""
    return int(_U16.unpack_from(tup, pos + 6)[0]) & INDEX_SIZE_MASK


def _tid_block(tup: bytes | bytearray, pos: int = 0) -> int:
    hi, lo, _ = _TID.unpack_from(tup, pos)
    return (hi << 16) | lo


def _set_tid_block(tup: bytearray, pos: int, blkno: int) -> None:
    _U32.pack_into(tup, pos, ((blkno >> 16) & 0xFFFF) | ((blkno & 0xFFFF) << 16))


def is_posting(tup: bytes | bytearray) -> bool:
    posid = _U16.unpack_from(tup, 4)[0]
    return bool(_U16.unpack_from(tup, 6)[0] & INDEX_ALT_TID_MASK) and bool(posid & BT_IS_POSTING)


def posting_info(tup: bytes | bytearray) -> tuple[int, int]:
    """(offset of the TID array, number of TIDs) of a posting tuple."""
    return _tid_block(tup), _U16.unpack_from(tup, 4)[0] & BT_OFFSET_MASK


def form_posting(base: bytes | bytearray, tids: bytes) -> bytes:
    """_bt_form_posting: `base`'s key with the concatenated 6-byte heap TIDs in `tids`."""
    keysize = posting_info(base)[0] if is_posting(base) else tuple_size(base)
    ntids = len(tids) // TID_SIZE
    newsize = maxalign(keysize + len(tids)) if ntids > 1 else keysize
    out = bytearray(newsize)
    out[:keysize] = base[:keysize]
    info = _U16.unpack_from(out, 6)[0]
    info = (info & ~INDEX_SIZE_MASK) | newsize
    if ntids > 1:
        info |= INDEX_ALT_TID_MASK
        _set_tid_block(out, 0, keysize)
        _U16.pack_into(out, 4, ntids | BT_IS_POSTING)
        out[keysize : keysize + len(tids)] = tids
    else:
        info &= ~INDEX_ALT_TID_MASK
        out[0:TID_SIZE] = tids[:TID_SIZE]
    _U16.pack_into(out, 6, info)
    return bytes(out)


def _tids_of(tup: bytes | bytearray) -> bytes:
    """The heap TIDs of a plain or posting tuple, concatenated."""
    if is_posting(tup):
        off, n = posting_info(tup)
        return bytes(tup[off : off + n * TID_SIZE])
    return bytes(tup[0:TID_SIZE])


def swap_posting(newitem: bytearray, oposting: bytes | bytearray, postingoff: int) -> bytes:
    """_bt_swap_posting: the posting tuple with newitem's TID inserted at `postingoff`.

    The last TID falls off and becomes newitem's TID (newitem is changed in place).
    """
    off, n = posting_info(oposting)
    if not 0 < postingoff < n:
        raise PageError(f"posting list tuple with {n} items cannot be split at offset {postingoff}")
    size = tuple_size(oposting)
    nposting = bytearray(oposting[:size])
    at = off + postingoff * TID_SIZE
    last = off + (n - 1) * TID_SIZE
    maxtid = bytes(oposting[last : last + TID_SIZE])
    nposting[at + TID_SIZE : last + TID_SIZE] = oposting[at:last]
    nposting[at : at + TID_SIZE] = newitem[0:TID_SIZE]
    newitem[0:TID_SIZE] = maxtid
    return bytes(nposting)


def _item(page: bytes | bytearray, offnum: int) -> bytes:
    return get_item(page, offnum)


def _add(page: bytearray, item: bytes | bytearray | memoryview, offnum: int, what: str) -> None:
    page_add_item(page, item, offnum, overwrite=False, is_heap=False)


def _temp_copy_special(page: bytes | bytearray) -> bytearray:
    """PageGetTempPageCopySpecial: a PageInit'ed page keeping `page`'s special area."""
    special = get_special(page)
    out = new_page(BLCKSZ - special)
    out[special:] = page[special:]
    return out


def restore_items(page: bytearray, data: bytes) -> None:
    """_bt_restore_page: items logged in page order are re-added last-first at 1..n."""
    items: list[bytes] = []
    pos = 0
    while pos < len(data):
        if pos + INDEX_TUPLE_HEADER > len(data):
            raise PageError("_bt_restore_page: truncated index tuple")
        size = maxalign(tuple_size(data, pos))
        if size == 0:
            raise PageError("_bt_restore_page: zero-length index tuple")
        items.append(data[pos : pos + size])
        pos += size
    n = len(items)
    for i in range(n - 1, -1, -1):
        page_add_item(page, items[i], n - i, overwrite=False, is_heap=False)


def restore_meta(record: DecodedRecord, block_id: int) -> bytearray:
    """_bt_restore_meta: rebuild the metapage from xl_btree_metadata."""
    md = parse_metadata(block_ref(record, block_id).data)
    page = bt_page_init()
    _META.pack_into(
        page,
        SIZE_OF_PAGE_HEADER,
        BTREE_MAGIC,
        md.version,
        md.root,
        md.level,
        md.fastroot,
        md.fastlevel,
        md.last_cleanup_num_delpages,
        -1.0,
        md.allequalimage,
    )
    set_opaque(page, 0, 0, 0, BTP_META, 0)
    set_lower(page, BTREE_METAPAGE_END)
    return page


def _clear_incomplete_split(
    record: DecodedRecord, block_id: int, page: bytearray | None
) -> bytearray:
    page = existing(record, block_id, page)
    _set_flags(page, _flags(page) & ~BTP_INCOMPLETE_SPLIT)
    return page


def _halfdead_leaf(prev: int, nxt: int, topparent: int) -> bytearray:
    """A half-dead leaf with its dummy high key pointing at the top parent."""
    page = bt_page_init()
    set_opaque(page, prev, nxt, 0, BTP_HALF_DEAD | BTP_LEAF, 0)
    trunc = bytearray(INDEX_TUPLE_HEADER)
    _set_tid_block(trunc, 0, topparent)
    _U16.pack_into(trunc, 6, INDEX_TUPLE_HEADER | INDEX_ALT_TID_MASK)
    _add(page, trunc, P_HIKEY, "half-dead leaf")
    return page


# ---------------------------------------------------------------------------------------------
# Record types


def _insert(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    op = record.info & 0xF0
    if block_id == 1:
        return _clear_incomplete_split(record, block_id, page)
    if block_id == 2:
        return restore_meta(record, block_id)
    page = existing(record, block_id, page)
    offnum = _U16.unpack_from(record.main_data, 0)[0]
    data = block_ref(record, block_id).data
    if op != XLOG_BTREE_INSERT_POST:
        _add(page, data, offnum, "btree INSERT")
        return page
    postingoff = _U16.unpack_from(data, 0)[0]
    newitem = bytearray(data[2:])
    opos = item_offset(page, offnum - 1)
    oposting = _item(page, offnum - 1)
    nposting = swap_posting(newitem, oposting, postingoff)
    size = maxalign(tuple_size(nposting))
    page[opos : opos + size] = nposting.ljust(size, b"\0")[:size]
    _add(page, newitem, offnum, "btree INSERT_POST")
    return page


def _split(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    xl = decode(record.info, record.main_data)
    assert isinstance(xl, BtreeSplit)
    isleaf = xl.level == 0
    if block_id == 3:
        return _clear_incomplete_split(record, block_id, page)
    right_blk = block_ref(record, 1).blkno
    if block_id == 2:
        page = existing(record, block_id, page)
        _set_prev(page, right_blk)
        return page
    left_blk = block_ref(record, 0).blkno
    if block_id == 1:
        sib = record.block(2)
        rpage = bt_page_init()
        set_opaque(
            rpage,
            left_blk,
            sib.blkno if sib is not None else P_NONE,
            xl.level,
            BTP_LEAF if isleaf else 0,
            0,
        )
        restore_items(rpage, block_ref(record, 1).data)
        return rpage
    orig = existing(record, block_id, page)
    data = block_ref(record, 0).data
    pos = 0
    newitem = b""
    nposting = b""
    replacepostingoff = 0
    if xl.new_item_on_left or xl.postingoff:
        newsize = maxalign(tuple_size(data, 0))
        newitem = bytes(data[:newsize])
        pos = newsize
        if xl.postingoff:
            replacepostingoff = xl.newitemoff - 1
            mutable = bytearray(data[: tuple_size(data, 0)])
            nposting = swap_posting(mutable, _item(orig, replacepostingoff), xl.postingoff)
            newitem = bytes(mutable).ljust(newsize, b"\0")[:newsize]
    hikeysz = maxalign(tuple_size(data, pos))
    hikey = data[pos : pos + hikeysz]
    left = _temp_copy_special(orig)
    _add(left, hikey, P_HIKEY, "split high key")
    leftoff = P_HIKEY + 1
    off = first_data_key(orig)
    while off < xl.firstrightoff:
        if off == replacepostingoff:
            _add(left, nposting.ljust(maxalign(len(nposting)), b"\0"), leftoff, "split posting")
            leftoff += 1
            off += 1
            continue
        if xl.new_item_on_left and off == xl.newitemoff:
            _add(left, newitem, leftoff, "split new item")
            leftoff += 1
        _add(left, _item(orig, off), leftoff, "split old item")
        leftoff += 1
        off += 1
    if xl.new_item_on_left and off == xl.newitemoff:
        _add(left, newitem, leftoff, "split new item")
    prev, _, level, _, _ = opaque(orig)
    set_opaque(left, prev, right_blk, level, BTP_INCOMPLETE_SPLIT | (BTP_LEAF if isleaf else 0), 0)
    return left


def _dedup(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    xl = decode(record.info, record.main_data)
    assert isinstance(xl, BtreeDedup)
    page = existing(record, block_id, page)
    data = block_ref(record, block_id).data
    if len(data) < xl.nintervals * _DEDUP_INTERVAL.size:
        raise PageError(f"btree DEDUP at {format_lsn(record.lsn)}: intervals truncated")
    intervals = list(_DEDUP_INTERVAL.iter_unpack(data[: xl.nintervals * _DEDUP_INTERVAL.size]))
    newpage = _temp_copy_special(page)
    if opaque(page)[1] != P_NONE:
        _add(newpage, _item(page, P_HIKEY), P_HIKEY, "dedup high key")
    minoff = first_data_key(page)
    maxoff = max_offset(page)
    ninterval = 0
    base = b""
    baseoff = 0
    nitems = 0
    tids: list[bytes] = []

    def finish() -> None:
        nonlocal ninterval
        target = max_offset(newpage) + 1
        if nitems == 1:
            _add(newpage, base, target, "dedup item")
        else:
            _add(newpage, form_posting(base, b"".join(tids)), target, "dedup posting")
            ninterval += 1

    for offnum in range(minoff, maxoff + 1):
        itup = _item(page, offnum)
        if offnum != minoff and (
            ninterval < len(intervals)
            and baseoff == intervals[ninterval][0]
            and nitems < intervals[ninterval][1]
        ):
            tids.append(_tids_of(itup))
            nitems += 1
            continue
        if offnum != minoff:
            finish()
        base, baseoff, nitems, tids = itup, offnum, 1, [_tids_of(itup)]
    if maxoff >= minoff:
        finish()
    _set_flags(newpage, _flags(newpage) & ~BTP_HAS_GARBAGE)
    return newpage


def _vacuum_or_delete(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    xl = decode(record.info, record.main_data)
    assert isinstance(xl, BtreeVacuum | BtreeDelete)
    page = existing(record, block_id, page)
    data = block_ref(record, block_id).data
    nd, nu = xl.ndeleted, xl.nupdated
    if len(data) < 2 * (nd + nu):
        raise PageError(f"btree {record.type_name} at {format_lsn(record.lsn)}: data truncated")
    deleted = struct.unpack_from(f"<{nd}H", data, 0)
    updated = struct.unpack_from(f"<{nu}H", data, 2 * nd)
    pos = 2 * (nd + nu)
    for offnum in updated:
        ndeletedtids = _U16.unpack_from(data, pos)[0]
        drop = set(struct.unpack_from(f"<{ndeletedtids}H", data, pos + 2))
        pos += 2 + 2 * ndeletedtids
        orig = _item(page, offnum)
        if not is_posting(orig):
            raise PageError(f"btree {record.type_name}: item {offnum} is not a posting list")
        toff, n = posting_info(orig)
        keep = b"".join(
            orig[toff + i * TID_SIZE : toff + (i + 1) * TID_SIZE] for i in range(n) if i not in drop
        )
        newtup = form_posting(orig, keep)
        if not page_index_tuple_overwrite(page, offnum, newtup):
            raise PageError(f"btree {record.type_name}: failed to update partially dead item")
    if nd:
        page_index_multi_delete(page, deleted)
    _set_flags(page, _flags(page) & ~BTP_HAS_GARBAGE)
    return page


def _mark_page_halfdead(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    xl = decode(record.info, record.main_data)
    assert isinstance(xl, BtreeMarkPageHalfdead)
    if block_id == 0:
        return _halfdead_leaf(xl.leftblk, xl.rightblk, xl.topparent)
    page = existing(record, block_id, page)
    nextoff = xl.poffset + 1
    rightsib = _tid_block(page, item_offset(page, nextoff))
    _set_tid_block(page, item_offset(page, xl.poffset), rightsib)
    page_index_tuple_delete(page, nextoff)
    return page


def _unlink_page(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    xl = decode(record.info, record.main_data)
    assert isinstance(xl, BtreeUnlinkPage)
    if block_id == 0:
        target = bt_page_init()
        flags = BTP_DELETED | BTP_HAS_FULLXID | (BTP_LEAF if xl.level == 0 else 0)
        set_opaque(target, xl.leftsib, xl.rightsib, xl.level, flags, 0)
        set_lower(target, maxalign(SIZE_OF_PAGE_HEADER) + 8)
        set_upper(target, get_special(target))
        _U64.pack_into(target, maxalign(SIZE_OF_PAGE_HEADER), xl.safexid)
        return target
    if block_id == 1:
        page = existing(record, block_id, page)
        _set_next(page, xl.rightsib)
        return page
    if block_id == 2:
        page = existing(record, block_id, page)
        _set_prev(page, xl.leftsib)
        return page
    if block_id == 3:
        return _halfdead_leaf(xl.leafleftsib, xl.leafrightsib, xl.leaftopparent)
    return restore_meta(record, block_id)


def _newroot(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    xl = decode(record.info, record.main_data)
    assert isinstance(xl, BtreeNewroot)
    if block_id == 1:
        return _clear_incomplete_split(record, block_id, page)
    if block_id == 2:
        return restore_meta(record, block_id)
    root = bt_page_init()
    set_opaque(root, P_NONE, P_NONE, xl.level, BTP_ROOT | (BTP_LEAF if xl.level == 0 else 0), 0)
    if xl.level > 0:
        restore_items(root, block_ref(record, block_id).data)
    return root


def _meta_cleanup(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    return restore_meta(record, block_id)


_REDO: dict[int, BlockRedo] = {
    XLOG_BTREE_INSERT_LEAF: _insert,
    XLOG_BTREE_INSERT_UPPER: _insert,
    XLOG_BTREE_INSERT_META: _insert,
    XLOG_BTREE_INSERT_POST: _insert,
    XLOG_BTREE_SPLIT_L: _split,
    XLOG_BTREE_SPLIT_R: _split,
    XLOG_BTREE_DEDUP: _dedup,
    XLOG_BTREE_VACUUM: _vacuum_or_delete,
    XLOG_BTREE_DELETE: _vacuum_or_delete,
    XLOG_BTREE_MARK_PAGE_HALFDEAD: _mark_page_halfdead,
    XLOG_BTREE_UNLINK_PAGE: _unlink_page,
    XLOG_BTREE_UNLINK_PAGE_META: _unlink_page,
    XLOG_BTREE_NEWROOT: _newroot,
    XLOG_BTREE_META_CLEANUP: _meta_cleanup,
}


def apply(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """Redo one block of a Btree record (REUSE_PAGE has no blocks and changes no page)."""
    fn = _REDO.get(record.info & 0xF0)
    if fn is None:
        raise unsupported(record)
    return fn(record, block_id, page)


def mask(page: bytearray) -> None:
    """btree_mask: hints, free space, leaf LP flags, HAS_GARBAGE, SPLIT_END, cycle id."""
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    mask_unused_space(page)
    special = get_special(page)
    if special + BT_OPAQUE_SIZE > BLCKSZ:
        raise PageError(f"btree page has special area at {special}")
    flags = _flags(page)
    if flags & BTP_LEAF:
        mask_lp_flags(page)
    _U16.pack_into(page, special + _FLAGS_AT, flags & ~(BTP_HAS_GARBAGE | BTP_SPLIT_END))
    _U16.pack_into(page, special + _FLAGS_AT + 2, 0)


_ = (FIRST_OFFSET, ITEM_ID_SIZE)
