"""SP-GiST redo (spgxlog.c) and spg_mask, over one block at a time.

SP-GiST pages hold inner tuples (prefix + nodes, each node an IndexTuple whose t_tid is the
downlink) or leaf tuples chained through nextOffset, plus "dead" tuples (REDIRECT,
PLACEHOLDER, DEAD) that keep offsets stable. The 8-byte special area counts redirects and
placeholders. Offsets are never renumbered, so replacements go through addOrReplaceTuple.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pageserver.redo.amutil import (
    INVALID_BLOCK,
    U16,
    U32,
    block_number,
    existing,
    has_block,
    index_tuple_size,
    main_struct,
    offsets,
    set_item_pointer,
    unknown,
)
from pageserver.redo.masks import (
    mask_page_hint_bits,
    mask_page_lsn_and_checksum,
    mask_unused_space,
)
from pageserver.redo.page import (
    ITEM_ID_SIZE,
    SIZE_OF_PAGE_HEADER,
    PageError,
    get_lower,
    get_special,
    item_offset,
    max_offset,
    new_page,
    page_add_item,
    page_index_multi_delete,
    page_index_tuple_delete,
)
from pg15.records import DecodedRecord

ADD_LEAF = 0x10
MOVE_LEAFS = 0x20
ADD_NODE = 0x30
SPLIT_TUPLE = 0x40
PICKSPLIT = 0x50
VACUUM_LEAF = 0x60
VACUUM_ROOT = 0x70
VACUUM_REDIRECT = 0x80

SPGIST_LEAF = 1 << 2
SPGIST_NULLS = 1 << 3
SPGIST_PAGE_ID = 0xFF82

LIVE = 0
REDIRECT = 1
DEAD = 2
PLACEHOLDER = 3

SPECIAL_SIZE = 8
OPAQUE = struct.Struct("<HHHH")  # flags, nRedirection, nPlaceholder, page id
OFF_NREDIRECTION = 2
OFF_NPLACEHOLDER = 4
SGDTSIZE = 16
_DEAD_TUPLE = struct.Struct("<IHHHHI")  # state|size<<2, t_info, pointer {hi, lo, posid}, xid
SGITHDRSZ = 8

# Main-data headers of spgxlog.h (C layouts with their padding).
_ADD_LEAF = struct.Struct("<??HHHH")
_MOVE_LEAFS = struct.Struct("<H???xHHxxI?xxx")
_ADD_NODE = struct.Struct("<HH?bHHxxI?xxx")
_SPLIT_TUPLE = struct.Struct("<HH??")
_PICKSPLIT = struct.Struct("<?xHH??H???xHHxxI?xxx")
_VACUUM_LEAF = struct.Struct("<HHHHI?xxx")
_VACUUM_ROOT = struct.Struct("<HxxI?xxx")
_VACUUM_REDIRECT = struct.Struct("<HHI")


@dataclass(frozen=True, slots=True)
class AddLeaf:
    new_page: bool
    stores_nulls: bool
    offnum_leaf: int
    offnum_head_leaf: int
    offnum_parent: int
    node_i: int


@dataclass(frozen=True, slots=True)
class MoveLeafs:
    n_moves: int
    new_page: bool
    replace_dead: bool
    stores_nulls: bool
    offnum_parent: int
    node_i: int
    my_xid: int
    is_build: bool


@dataclass(frozen=True, slots=True)
class AddNode:
    offnum: int
    offnum_new: int
    new_page: bool
    parent_blk: int
    offnum_parent: int
    node_i: int
    my_xid: int
    is_build: bool


@dataclass(frozen=True, slots=True)
class SplitTuple:
    offnum_prefix: int
    offnum_postfix: int
    new_page: bool
    postfix_blk_same: bool


@dataclass(frozen=True, slots=True)
class PickSplit:
    is_root_split: bool
    n_delete: int
    n_insert: int
    init_src: bool
    init_dest: bool
    offnum_inner: int
    init_inner: bool
    stores_nulls: bool
    inner_is_parent: bool
    offnum_parent: int
    node_i: int
    my_xid: int
    is_build: bool


# ---------------------------------------------------------------------------------------------
# Tuples and pages


def init_page(flags: int) -> bytearray:
    """SpGistInitPage: empty page with the given flags and zero counters."""
    page = new_page(SPECIAL_SIZE)
    OPAQUE.pack_into(page, get_special(page), flags, 0, 0, SPGIST_PAGE_ID)
    return page


def _leaf_flags(stores_nulls: bool) -> int:
    return SPGIST_LEAF | (SPGIST_NULLS if stores_nulls else 0)


def _bump(page: bytearray, field: int, delta: int) -> None:
    pos = get_special(page) + field
    U16.pack_into(page, pos, (U16.unpack_from(page, pos)[0] + delta) & 0xFFFF)


def dead_tuple(state: int, blkno: int = INVALID_BLOCK, offnum: int = 0, xid: int = 0) -> bytes:
    """spgFormDeadTuple: only a REDIRECT carries a target and the inserting xid."""
    if state != REDIRECT:
        blkno, offnum, xid = INVALID_BLOCK, 0, 0
    return _DEAD_TUPLE.pack(state | (SGDTSIZE << 2), 0, blkno >> 16, blkno & 0xFFFF, offnum, xid)


def _leaf_size(buf: bytes | memoryview, off: int) -> int:
    """SpGistLeafTupleData.size: the upper 30 bits of the first word."""
    return U32.unpack_from(buf, off)[0] >> 2


def _inner_size(buf: bytes | memoryview, off: int) -> int:
    """SpGistInnerTupleData.size: the uint16 after the bit-field word."""
    return U16.unpack_from(buf, off + 4)[0]


def _add_item_at(page: bytearray, item: bytes | memoryview, offnum: int) -> None:
    """PageAddItem that must land exactly on `offnum`."""
    got = page_add_item(page, item, offnum, overwrite=False, is_heap=False)
    if got != offnum:
        raise PageError(f"failed to add item of size {len(item)} to SPGiST index page")


def add_or_replace(page: bytearray, item: bytes | memoryview, offnum: int) -> None:
    """addOrReplaceTuple: an offset inside the page must hold a placeholder, which goes."""
    if offnum <= max_offset(page):
        state = U32.unpack_from(page, item_offset(page, offnum))[0] & 3
        if state != PLACEHOLDER:
            raise PageError("SPGiST tuple to be replaced is not a placeholder")
        _bump(page, OFF_NPLACEHOLDER, -1)
        page_index_tuple_delete(page, offnum)
    _add_item_at(page, item, offnum)


def _replace(page: bytearray, item: bytes | memoryview, offnum: int) -> None:
    """Delete whatever is at `offnum` and put `item` there."""
    page_index_tuple_delete(page, offnum)
    _add_item_at(page, item, offnum)


def multi_delete(
    page: bytearray,
    itemnos: Sequence[int],
    first_state: int,
    rest_state: int,
    blkno: int = INVALID_BLOCK,
    offnum: int = 0,
    xid: int = 0,
) -> None:
    """spgPageIndexMultiDelete: delete items and put dead tuples back at the same offsets.

    The first listed item (before sorting) becomes `first_state`, the others `rest_state`.
    """
    if not itemnos:
        return
    ordered = sorted(itemnos)
    page_index_multi_delete(page, ordered)
    first = itemnos[0]
    tuples = {
        first_state: dead_tuple(first_state, blkno, offnum, xid),
        rest_state: dead_tuple(rest_state, blkno, offnum, xid),
    }
    for itemno in ordered:
        state = first_state if itemno == first else rest_state
        _add_item_at(page, tuples[state], itemno)
        if state == REDIRECT:
            _bump(page, OFF_NREDIRECTION, 1)
        elif state == PLACEHOLDER:
            _bump(page, OFF_NPLACEHOLDER, 1)


def update_node_link(page: bytearray, offnum: int, node_i: int, blkno: int, target: int) -> None:
    """spgUpdateNodeLink: point node `node_i` of the inner tuple at `offnum` to (blkno, target)."""
    tup = item_offset(page, offnum)
    word = U32.unpack_from(page, tup)[0]
    n_nodes = (word >> 3) & 0x1FFF
    pos = tup + SGITHDRSZ + (word >> 16)
    for i in range(n_nodes):
        if i == node_i:
            set_item_pointer(page, pos, blkno, target)
            return
        pos += index_tuple_size(page, pos)
    raise PageError(f"failed to find requested node {node_i} in SPGiST inner tuple")


def _set_next_offset(page: bytearray, offnum: int, nxt: int) -> None:
    """SGLT_SET_NEXTOFFSET on the leaf tuple at `offnum` (flag bits kept)."""
    pos = item_offset(page, offnum) + 4
    t_info = U16.unpack_from(page, pos)[0]
    U16.pack_into(page, pos, (t_info & 0xC000) | (nxt & 0x3FFF))


def _split_leaves(data: bytes | memoryview, start: int, count: int) -> list[memoryview]:
    """`count` unaligned leaf tuples packed back to back from `start`."""
    view = memoryview(data)
    out: list[memoryview] = []
    pos = start
    for _ in range(count):
        size = _leaf_size(view, pos)
        if size == 0 or pos + size > len(view):
            raise PageError("SPGiST leaf tuple runs past the record data")
        out.append(view[pos : pos + size])
        pos += size
    return out


def _inner_tuple(data: bytes | memoryview, start: int) -> memoryview:
    size = _inner_size(data, start)
    if size == 0 or start + size > len(data):
        raise PageError("SPGiST inner tuple runs past the record data")
    return memoryview(data)[start : start + size]


# ---------------------------------------------------------------------------------------------
# Redo


def apply(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """Redo `record` on its block `block_id`; `page` is the block's previous version."""
    op = record.rmgr_info
    if op == ADD_LEAF:
        return _add_leaf(record, block_id, page)
    if op == MOVE_LEAFS:
        return _move_leafs(record, block_id, page)
    if op == ADD_NODE:
        return _add_node(record, block_id, page)
    if op == SPLIT_TUPLE:
        return _split_tuple(record, block_id, page)
    if op == PICKSPLIT:
        return _picksplit(record, block_id, page)
    if op == VACUUM_LEAF:
        return _vacuum_leaf(record, existing(page, record, block_id))
    if op == VACUUM_ROOT:
        (n_delete, _, _) = main_struct(_VACUUM_ROOT, record)
        page = existing(page, record, block_id)
        page_index_multi_delete(page, offsets(record.main_data, _VACUUM_ROOT.size, n_delete))
        return page
    if op == VACUUM_REDIRECT:
        return _vacuum_redirect(record, existing(page, record, block_id))
    raise unknown(record)


def _add_leaf(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """Block 0: the leaf page; block 1: the parent whose downlink now points at the leaf."""
    xl = AddLeaf(*main_struct(_ADD_LEAF, record))
    main = record.main_data
    if block_id == 1:
        page = existing(page, record, block_id)
        update_node_link(page, xl.offnum_parent, xl.node_i, block_number(record, 0), xl.offnum_leaf)
        return page
    if xl.new_page:
        page = init_page(_leaf_flags(xl.stores_nulls))
    else:
        page = existing(page, record, block_id)
    leaf = _split_leaves(main, _ADD_LEAF.size, 1)[0]
    if xl.offnum_leaf != xl.offnum_head_leaf:
        add_or_replace(page, leaf, xl.offnum_leaf)
        if xl.offnum_head_leaf != 0:
            _set_next_offset(page, xl.offnum_head_leaf, xl.offnum_leaf)
    else:
        _replace(page, leaf, xl.offnum_leaf)  # replacing a DEAD tuple
    return page


def _move_leafs(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """Block 0: source leaf page; 1: destination; 2: parent inner tuple's page."""
    xl = MoveLeafs(*main_struct(_MOVE_LEAFS, record))
    main = record.main_data
    n_insert = 1 if xl.replace_dead else xl.n_moves + 1
    pos = _MOVE_LEAFS.size
    to_delete = offsets(main, pos, xl.n_moves)
    pos += 2 * xl.n_moves
    to_insert = offsets(main, pos, n_insert)
    pos += 2 * n_insert
    blkno_dst = block_number(record, 1)
    if block_id == 1:
        if xl.new_page:
            page = init_page(_leaf_flags(xl.stores_nulls))
        else:
            page = existing(page, record, block_id)
        for leaf, target in zip(_split_leaves(main, pos, n_insert), to_insert, strict=True):
            add_or_replace(page, leaf, target)
        return page
    page = existing(page, record, block_id)
    if block_id == 0:
        multi_delete(
            page,
            to_delete,
            PLACEHOLDER if xl.is_build else REDIRECT,
            PLACEHOLDER,
            blkno_dst,
            to_insert[-1],
            xl.my_xid,
        )
    else:
        update_node_link(page, xl.offnum_parent, xl.node_i, blkno_dst, to_insert[-1])
    return page


def _add_node(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """In place (block 0 only), or moved: 1 gets the new tuple, 0 a redirect, 2 the parent."""
    xl = AddNode(*main_struct(_ADD_NODE, record))
    inner = _inner_tuple(record.main_data, _ADD_NODE.size)
    if not has_block(record, 1):
        page = existing(page, record, block_id)
        _replace(page, inner, xl.offnum)
        return page
    blkno_new = block_number(record, 1)
    if block_id == 1:
        page = init_page(0) if xl.new_page else existing(page, record, block_id)
        add_or_replace(page, inner, xl.offnum_new)
    else:
        page = existing(page, record, block_id)
        if block_id == 0:
            if xl.is_build:
                _replace(page, dead_tuple(PLACEHOLDER), xl.offnum)
                _bump(page, OFF_NPLACEHOLDER, 1)
            else:
                _replace(page, dead_tuple(REDIRECT, blkno_new, xl.offnum_new, xl.my_xid), xl.offnum)
                _bump(page, OFF_NREDIRECTION, 1)
    if xl.parent_blk == block_id:
        update_node_link(page, xl.offnum_parent, xl.node_i, blkno_new, xl.offnum_new)
    return page


def _split_tuple(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """Block 0 gets the new prefix tuple; the postfix goes to block 1 or beside it."""
    xl = SplitTuple(*main_struct(_SPLIT_TUPLE, record))
    main = record.main_data
    prefix = _inner_tuple(main, _SPLIT_TUPLE.size)
    postfix = _inner_tuple(main, _SPLIT_TUPLE.size + len(prefix))
    if block_id == 1:
        page = init_page(0) if xl.new_page else existing(page, record, block_id)
        add_or_replace(page, postfix, xl.offnum_postfix)
        return page
    page = existing(page, record, block_id)
    _replace(page, prefix, xl.offnum_prefix)
    if xl.postfix_blk_same:
        add_or_replace(page, postfix, xl.offnum_postfix)
    return page


def _picksplit(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """Blocks: 0 source leaf, 1 new leaf, 2 page of the new inner tuple, 3 parent."""
    xl = PickSplit(*main_struct(_PICKSPLIT, record))
    main = record.main_data
    pos = _PICKSPLIT.size
    to_delete = offsets(main, pos, xl.n_delete)
    pos += 2 * xl.n_delete
    to_insert = offsets(main, pos, xl.n_insert)
    pos += 2 * xl.n_insert
    select = main[pos : pos + xl.n_insert]
    pos += xl.n_insert
    inner = _inner_tuple(main, pos)
    pos += len(inner)
    blkno_inner = block_number(record, 2)
    if block_id in (0, 1):
        if block_id == 0 and xl.is_root_split:
            return existing(page, record, block_id)  # the root is rebuilt as block 2
        init = xl.init_src if block_id == 0 else xl.init_dest
        if init:
            page = init_page(_leaf_flags(xl.stores_nulls))
        else:
            page = existing(page, record, block_id)
            if block_id == 0:
                if xl.is_build:
                    multi_delete(page, to_delete, PLACEHOLDER, PLACEHOLDER)
                else:
                    multi_delete(
                        page,
                        to_delete,
                        REDIRECT,
                        PLACEHOLDER,
                        blkno_inner,
                        xl.offnum_inner,
                        xl.my_xid,
                    )
        want = 1 if block_id == 1 else 0
        leaves = _split_leaves(main, pos, xl.n_insert)
        for leaf, target, dest in zip(leaves, to_insert, select, strict=True):
            if (1 if dest else 0) == want:
                add_or_replace(page, leaf, target)
        return page
    if block_id == 2:
        if xl.init_inner:
            page = init_page(SPGIST_NULLS if xl.stores_nulls else 0)
        else:
            page = existing(page, record, block_id)
        add_or_replace(page, inner, xl.offnum_inner)
        if xl.inner_is_parent:
            update_node_link(page, xl.offnum_parent, xl.node_i, blkno_inner, xl.offnum_inner)
        return page
    page = existing(page, record, block_id)
    update_node_link(page, xl.offnum_parent, xl.node_i, blkno_inner, xl.offnum_inner)
    return page


def _vacuum_leaf(record: DecodedRecord, page: bytearray) -> bytearray:
    """Dead and placeholder conversions, moves (line-pointer swaps) and chain fixes."""
    n_dead, n_placeholder, n_move, n_chain, _, _ = main_struct(_VACUUM_LEAF, record)
    main = record.main_data
    pos = _VACUUM_LEAF.size
    lists: list[tuple[int, ...]] = []
    for count in (n_dead, n_placeholder, n_move, n_move, n_chain, n_chain):
        lists.append(offsets(main, pos, count))
        pos += 2 * count
    to_dead, to_placeholder, move_src, move_dest, chain_src, chain_dest = lists
    multi_delete(page, to_dead, DEAD, DEAD)
    multi_delete(page, to_placeholder, PLACEHOLDER, PLACEHOLDER)
    base = SIZE_OF_PAGE_HEADER - ITEM_ID_SIZE
    for src, dest in zip(move_src, move_dest, strict=True):
        a = base + src * ITEM_ID_SIZE
        b = base + dest * ITEM_ID_SIZE
        page[a : a + 4], page[b : b + 4] = page[b : b + 4], page[a : a + 4]
    multi_delete(page, move_src, PLACEHOLDER, PLACEHOLDER)
    for src, dest in zip(chain_src, chain_dest, strict=True):
        _set_next_offset(page, src, dest)
    return page


def _vacuum_redirect(record: DecodedRecord, page: bytearray) -> bytearray:
    """Redirects become placeholders; a trailing run of placeholders is cut off."""
    n_to_placeholder, first_placeholder, _ = main_struct(_VACUUM_REDIRECT, record)
    for offnum in offsets(record.main_data, _VACUUM_REDIRECT.size, n_to_placeholder):
        pos = item_offset(page, offnum)
        word = U32.unpack_from(page, pos)[0]
        U32.pack_into(page, pos, (word & ~3) | PLACEHOLDER)
        set_item_pointer(page, pos + 6, INVALID_BLOCK, 0)
    _bump(page, OFF_NREDIRECTION, -n_to_placeholder)
    _bump(page, OFF_NPLACEHOLDER, n_to_placeholder)
    if first_placeholder != 0:
        last = max_offset(page)
        _bump(page, OFF_NPLACEHOLDER, -(last - first_placeholder + 1))
        page_index_multi_delete(page, range(first_placeholder, last + 1))
    return page


def mask(page: bytearray) -> None:
    """spg_mask: the hole too, when pd_lower looks set."""
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    if get_lower(page) >= SIZE_OF_PAGE_HEADER:
        mask_unused_space(page)
