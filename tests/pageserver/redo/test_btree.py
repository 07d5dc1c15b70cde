"""Btree redo on hand-built pages: inserts, posting splits, splits, dedup, vacuum, deletion."""

from __future__ import annotations

import struct

import pytest

from pageserver.redo import PageError, mask_for_rmgr, redo_block
from pageserver.redo import btree as bt
from pageserver.redo.page import (
    LP_DEAD,
    get_item,
    get_item_id,
    get_lower,
    get_lsn,
    get_upper,
    max_offset,
    page_add_item,
    set_item_id,
    set_lsn,
)
from pg15.constants import RM_BTREE_ID
from tests.redo_helpers import END_LSN, LSN, Blk, record

RIGHT_SIB = 9


def itup(key: int, blk: int, off: int) -> bytes:
    """A 16-byte int4 leaf tuple pointing at heap TID (blk, off)."""
    return struct.pack("<HHHHi4x", blk >> 16, blk & 0xFFFF, off, 16, key)


def tid(blk: int, off: int) -> bytes:
    return struct.pack("<HHH", blk >> 16, blk & 0xFFFF, off)


def leaf(items: list[bytes], *, rightmost: bool = True, flags: int = bt.BTP_LEAF) -> bytes:
    page = bt.bt_page_init()
    bt.set_opaque(page, 0, 0 if rightmost else RIGHT_SIB, 0, flags, 7)
    for i, item in enumerate(items, 1):
        page_add_item(page, item, i, overwrite=False, is_heap=False)
    set_lsn(page, LSN - 8)
    return bytes(page)


def keys(page: bytes) -> list[int]:
    return [
        struct.unpack_from("<i", get_item(page, i), 8)[0] for i in range(1, max_offset(page) + 1)
    ]


def metadata(root: int, level: int) -> bytes:
    return struct.pack("<IIIIII?3x", 4, root, level, root, level, 0, True)


def test_insert_leaf_shifts_line_pointers() -> None:
    page = leaf([itup(10, 1, 1), itup(30, 1, 3)])
    rec = record(RM_BTREE_ID, 0x00, struct.pack("<H", 2), [Blk(0, 1, itup(20, 1, 2))])
    out = redo_block(rec, 0, page)
    assert keys(out) == [10, 20, 30] and get_lsn(out) == END_LSN


def test_insert_upper_clears_incomplete_split_and_insert_meta_rebuilds_metapage() -> None:
    child = leaf([itup(1, 1, 1)], flags=bt.BTP_LEAF | bt.BTP_INCOMPLETE_SPLIT)
    rec = record(
        RM_BTREE_ID,
        0x20,
        struct.pack("<H", 1),
        [Blk(0, 3, itup(5, 2, 0)), Blk(1, 2), Blk(2, 0, metadata(3, 1), True)],
    )
    assert bt.opaque(redo_block(rec, 1, child))[3] == bt.BTP_LEAF
    meta = redo_block(rec, 2, None)
    assert get_lower(meta) == 72 and bt.opaque(meta)[3] == bt.BTP_META
    magic, version, root, level = struct.unpack_from("<IIII", meta, 24)
    assert (magic, version, root, level) == (bt.BTREE_MAGIC, 4, 3, 1)
    assert struct.unpack_from("<d", meta, 56)[0] == -1.0


def test_posting_split_swaps_tids() -> None:
    posting = bt.form_posting(itup(7, 1, 1), tid(1, 1) + tid(1, 5) + tid(1, 9))
    assert bt.is_posting(posting) and bt.posting_info(posting) == (16, 3)
    page = leaf([posting])
    data = struct.pack("<H", 1) + itup(7, 1, 3)
    out = redo_block(record(RM_BTREE_ID, 0x50, struct.pack("<H", 2), [Blk(0, 1, data)]), 0, page)
    new_posting = get_item(out, 1)
    assert new_posting[16:34] == tid(1, 1) + tid(1, 3) + tid(1, 5)
    assert get_item(out, 2)[:6] == tid(1, 9)


def test_split_rebuilds_left_and_right_pages() -> None:
    items = [itup(k, 1, k) for k in range(1, 7)]
    orig = leaf(items)
    hikey = itup(4, 0, 0)
    right_data = b"".join(reversed(items[3:]))  # raw bytes pd_upper..pd_special
    main = struct.pack("<IHHH", 0, 4, 3, 0)  # level 0, firstrightoff 4, newitemoff 3
    new_item = itup(99, 2, 2)
    rec = record(
        RM_BTREE_ID,
        0x30,  # SPLIT_L: the new item goes left at offset 3
        main,
        [Blk(0, 1, new_item + hikey), Blk(1, 5, right_data, True), Blk(2, 8)],
    )
    right = redo_block(rec, 1, None)
    assert keys(right) == [4, 5, 6]
    assert bt.opaque(right)[:4] == (1, 8, 0, bt.BTP_LEAF)
    left = redo_block(rec, 0, orig)
    assert keys(left) == [4, 1, 2, 99, 3]
    assert bt.opaque(left) == (0, 5, 0, bt.BTP_LEAF | bt.BTP_INCOMPLETE_SPLIT, 0)
    sib = redo_block(rec, 2, leaf([itup(9, 1, 1)]))
    assert bt.opaque(sib)[0] == 5


def test_dedup_merges_intervals_into_posting_lists() -> None:
    page = leaf([itup(5, 1, i) for i in range(1, 5)] + [itup(6, 2, 1)])
    rec = record(RM_BTREE_ID, 0x60, struct.pack("<H", 1), [Blk(0, 1, struct.pack("<HH", 1, 3))])
    out = redo_block(rec, 0, page)
    assert max_offset(out) == 3
    posting = get_item(out, 1)
    assert bt.posting_info(posting) == (16, 3) and len(posting) == 40
    assert posting[16:34] == tid(1, 1) + tid(1, 2) + tid(1, 3)
    assert get_item(out, 2) == itup(5, 1, 4) and get_item(out, 3) == itup(6, 2, 1)


def test_vacuum_updates_posting_lists_and_deletes() -> None:
    posting = bt.form_posting(itup(3, 1, 1), tid(1, 1) + tid(1, 2))
    page = leaf([itup(1, 1, 1), itup(2, 1, 2), posting, itup(4, 1, 4), itup(5, 1, 5)])
    # delete offsets 1, 2, 5; update offset 3 dropping TID #0 -> plain tuple (1, 2)
    data = struct.pack("<HHHHHH", 1, 2, 5, 3, 1, 0)
    rec = record(RM_BTREE_ID, 0xC0, struct.pack("<HH", 3, 1), [Blk(0, 1, data)])
    out = redo_block(rec, 0, page)
    assert [get_item(out, i) for i in (1, 2)] == [itup(3, 1, 2), itup(4, 1, 4)]
    assert get_upper(out) == 8176 - 32


def test_delete_with_two_items_uses_retail_deletes() -> None:
    page = leaf([itup(k, 1, k) for k in range(1, 5)])
    rec = record(RM_BTREE_ID, 0x70, struct.pack("<IHH", 0, 2, 0), [Blk(0, 1, b"\1\0\3\0")])
    out = redo_block(rec, 0, page)
    assert keys(out) == [2, 4]


def test_halfdead_unlink_newroot_and_metacleanup() -> None:
    parent = leaf([itup(0, 11, 0), itup(1, 12, 0), itup(2, 13, 0)], flags=0)
    main = struct.pack("<H2xIIII", 1, 12, 11, 13, 20)
    rec = record(RM_BTREE_ID, 0xB0, main, [Blk(0, 12, will_init=True), Blk(1, 20)])
    p = redo_block(rec, 1, parent)
    assert [struct.unpack_from("<HH", get_item(p, i))[1] for i in (1, 2)] == [12, 13]
    half = redo_block(rec, 0, None)
    assert bt.opaque(half)[:4] == (11, 13, 0, bt.BTP_HALF_DEAD | bt.BTP_LEAF)
    assert get_item(half, 1) == struct.pack("<HHHH", 0, 20, 0, 0x2008)

    unlink = struct.pack("<III4xQIII", 11, 13, 0, 777, 0, 0, 0xFFFFFFFF)
    rec = record(RM_BTREE_ID, 0x80, unlink, [Blk(0, 12, will_init=True), Blk(1, 11), Blk(2, 13)])
    dead = redo_block(rec, 0, None)
    assert bt.opaque(dead)[3] == bt.BTP_DELETED | bt.BTP_HAS_FULLXID | bt.BTP_LEAF
    assert get_lower(dead) == 32 and struct.unpack_from("<Q", dead, 24)[0] == 777
    assert bt.opaque(redo_block(rec, 1, leaf([itup(1, 1, 1)])))[1] == 13
    assert bt.opaque(redo_block(rec, 2, leaf([itup(1, 1, 1)])))[0] == 11

    root_items = itup(50, 2, 0) + itup(0, 1, 0)  # split-right-page format: reversed
    rec = record(
        RM_BTREE_ID,
        0xA0,
        struct.pack("<II", 3, 1),
        [Blk(0, 3, root_items, True), Blk(1, 1), Blk(2, 0, metadata(3, 1), True)],
    )
    root = redo_block(rec, 0, None)
    assert keys(root) == [0, 50] and bt.opaque(root)[2:4] == (1, bt.BTP_ROOT)
    cleanup = record(RM_BTREE_ID, 0xE0, b"", [Blk(0, 0, metadata(3, 1), True)])
    assert struct.unpack_from("<I", redo_block(cleanup, 0, None), 32)[0] == 3


def test_mask_hides_hints_only() -> None:
    page = bytearray(leaf([itup(1, 1, 1)], flags=bt.BTP_LEAF | bt.BTP_HAS_GARBAGE))
    other = bytearray(leaf([itup(1, 1, 1)]))
    off, _, length = get_item_id(page, 1)
    set_item_id(page, 1, off, LP_DEAD, length)
    mask = mask_for_rmgr(RM_BTREE_ID)
    assert mask is not None
    mask(page)
    mask(other)
    assert page == other
    other[off + 8] ^= 1
    assert page != other


def test_corrupt_offsets_raise() -> None:
    rec = record(RM_BTREE_ID, 0x00, struct.pack("<H", 9), [Blk(0, 1, itup(1, 1, 1))])
    with pytest.raises(PageError):
        redo_block(rec, 0, leaf([itup(1, 1, 1)]))
