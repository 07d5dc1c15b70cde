"""Heap / Heap2 / Sequence redo and the dispatcher, on hand-built pages and records."""

from __future__ import annotations

import struct

import pytest

from pageserver.redo import PageError, UnsupportedRecord, needs_previous, redo_block
from pageserver.redo import heap as h
from pageserver.redo.clog import (
    TRANSACTION_STATUS_ABORTED,
    TRANSACTION_STATUS_COMMITTED,
    TRANSACTION_STATUS_SUB_COMMITTED,
    clog_get_status,
    clog_set_status,
    zero_page,
)
from pageserver.redo.multixact import apply_create
from pageserver.redo.page import (
    LP_DEAD,
    LP_NORMAL,
    LP_REDIRECT,
    LP_UNUSED,
    PD_ALL_VISIBLE,
    get_flags,
    get_item,
    get_item_id,
    get_lsn,
    get_prune_xid,
    max_offset,
    new_page,
    page_add_item,
    set_flags,
    set_lsn,
)
from pageserver.redo.visibilitymap import (
    HEAPBLOCKS_PER_PAGE,
    VISIBILITYMAP_ALL_FROZEN,
    VISIBILITYMAP_ALL_VISIBLE,
    VISIBILITYMAP_VALID_BITS,
    vm_block,
    vm_changes,
    vm_clear,
    vm_get,
    vm_set,
)
from pg15.constants import (
    MULTIXACT_MEMBERS_PER_PAGE,
    MULTIXACT_OFFSETS_PER_PAGE,
    RM_HEAP2_ID,
    RM_HEAP_ID,
    RM_SEQ_ID,
)
from pg15.records import BKPIMAGE_APPLY, BlockImage
from pg15.rmgr.multixact import MultiXactCreate, MultiXactMember
from tests.redo_helpers import END_LSN, LSN, Blk, record

XMIN = 700


def xl_header(infomask2: int = 2, infomask: int = 0x0802, hoff: int = 24) -> bytes:
    return struct.pack("<HHB", infomask2, infomask, hoff)


def heap_tuple(data: bytes, blkno: int = 0, off: int = 1, xmin: int = 600) -> bytes:
    head = struct.pack("<IIIHHHHHB", xmin, 0, 5, blkno >> 16, blkno & 0xFFFF, off, 2, 0x0922, 24)
    return head + b"\0" + data


def page_with(*tuples: bytes) -> bytes:
    page = new_page(0)
    for t in tuples:
        page_add_item(page, t, 0, overwrite=False, is_heap=True)
    set_lsn(page, LSN - 8)
    return bytes(page)


def field(page: bytes, off: int, fmt: str, at: int) -> int:
    return int(struct.unpack_from(fmt, page, get_item_id(page, off)[0] + at)[0])


def test_insert_init_builds_tuple_and_stamps_lsn() -> None:
    body = b"\0" + b"\x2a\0\0\0"
    rec = record(RM_HEAP_ID, 0x80, struct.pack("<HB", 1, 0), [Blk(0, 7, xl_header() + body, True)])
    assert not needs_previous(rec, 0)
    page = redo_block(rec, 0, None)
    assert get_lsn(page) == END_LSN and max_offset(page) == 1
    tup = get_item(page, 1)
    assert len(tup) == 23 + len(body)
    xmin, xmax, cid, hi, lo, posid, im2, im, hoff = struct.unpack_from("<IIIHHHHHB", tup)
    assert (xmin, xmax, cid, (hi << 16) | lo, posid) == (XMIN, 0, 0, 7, 1)
    assert (im2, im, hoff) == (2, 0x0802, 24)
    assert tup[23:] == body


def test_insert_clears_all_visible_and_skips_done_pages() -> None:
    page = bytearray(page_with(heap_tuple(b"old")))
    set_flags(page, PD_ALL_VISIBLE)
    rec = record(RM_HEAP_ID, 0x00, struct.pack("<HB", 2, 0x01), [Blk(0, 0, xl_header() + b"x")])
    out = redo_block(rec, 0, bytes(page))
    assert max_offset(out) == 2 and not get_flags(out) & PD_ALL_VISIBLE
    assert vm_changes(rec)[0].flags == VISIBILITYMAP_VALID_BITS
    # BLK_DONE: the page already reflects this record.
    set_lsn(page, END_LSN)
    assert redo_block(rec, 0, bytes(page)) == bytes(page)
    with pytest.raises(PageError, match="no previous version"):
        redo_block(rec, 0, None)


def test_delete_sets_xmax_infomask_ctid_and_prune_xid() -> None:
    page = page_with(heap_tuple(b"a" * 9), heap_tuple(b"b" * 9, off=2))
    main = struct.pack("<IHBB", 901, 2, 0x02 | 0x10, 0)  # LOCK_ONLY + KEYS_UPDATED infobits
    out = redo_block(record(RM_HEAP_ID, 0x10, main, [Blk(0, 3)], xid=901), 0, page)
    assert field(out, 2, "<I", h.T_XMAX) == 901
    assert field(out, 2, "<I", h.T_CID) == 0
    im2 = field(out, 2, "<H", h.T_INFOMASK2)
    im = field(out, 2, "<H", h.T_INFOMASK)
    assert im & h.HEAP_XMAX_LOCK_ONLY and not im & h.HEAP_COMBOCID and im2 & h.HEAP_KEYS_UPDATED
    assert not im & (h.HEAP_XMAX_INVALID | h.HEAP_XMAX_IS_MULTI)
    ctid = struct.unpack_from("<HHH", out, get_item_id(out, 2)[0] + h.T_CTID)
    assert ctid == (0, 3, 2)
    assert get_prune_xid(out) == 901
    assert get_item(out, 1) == get_item(page, 1)


def test_update_same_page_with_prefix_and_suffix() -> None:
    old_data = b"PREFIX-middle-SUFFIX"
    page = page_with(heap_tuple(old_data))
    flags = 0x20 | 0x40  # PREFIX_FROM_OLD | SUFFIX_FROM_OLD
    main = struct.pack("<IHBBIH", 950, 1, 0, flags, 0, 2)
    data = struct.pack("<HH", 7, 6) + xl_header() + b"\0" + b"NEW"
    out = redo_block(record(RM_HEAP_ID, 0x40, main, [Blk(0, 0, data)], xid=950), 0, page)
    assert get_item(out, 2)[24:] == b"PREFIX-NEWSUFFIX"
    assert field(out, 1, "<H", h.T_INFOMASK2) & h.HEAP_HOT_UPDATED
    assert field(out, 1, "<I", h.T_XMAX) == 950
    assert struct.unpack_from("<HHH", out, get_item_id(out, 1)[0] + h.T_CTID)[2] == 2


def test_update_across_pages_touches_each_block_separately() -> None:
    old_page = page_with(heap_tuple(b"old"))
    main = struct.pack("<IHBBIH", 960, 1, 0, 0x01, 0, 1)
    rec = record(
        RM_HEAP_ID,
        0xA0,  # UPDATE+INIT
        main,
        [Blk(0, 9, xl_header() + b"\0new", True), Blk(1, 4)],
        xid=960,
    )
    new = redo_block(rec, 0, None)
    assert get_item(new, 1)[24:] == b"new"
    old = redo_block(rec, 1, old_page)
    assert max_offset(old) == 1
    assert not field(old, 1, "<H", h.T_INFOMASK2) & h.HEAP_HOT_UPDATED
    assert struct.unpack_from("<HHH", old, get_item_id(old, 1)[0] + h.T_CTID) == (0, 9, 1)
    assert [c.heap_blkno for c in vm_changes(rec)] == [4]


def test_lock_only_resets_ctid_and_hot_flag() -> None:
    t = bytearray(heap_tuple(b"row"))
    struct.pack_into("<HHH", t, h.T_CTID, 0, 8, 3)
    struct.pack_into("<H", t, h.T_INFOMASK2, 2 | h.HEAP_HOT_UPDATED)
    page = page_with(bytes(t))
    main = struct.pack("<IHBB", 42, 1, 0x02 | 0x04, 0x01)  # LOCK_ONLY|EXCL, ALL_FROZEN_CLEARED
    rec = record(RM_HEAP_ID, 0x60, main, [Blk(0, 5)])
    out = redo_block(rec, 0, page)
    assert field(out, 1, "<I", h.T_XMAX) == 42
    assert not field(out, 1, "<H", h.T_INFOMASK2) & h.HEAP_HOT_UPDATED
    assert struct.unpack_from("<HHH", out, get_item_id(out, 1)[0] + h.T_CTID) == (0, 5, 1)
    assert vm_changes(rec)[0].flags == VISIBILITYMAP_ALL_FROZEN


def test_inplace_requires_same_length() -> None:
    page = page_with(heap_tuple(b"abcdefgh"))
    rec = record(RM_HEAP_ID, 0x70, struct.pack("<H", 1), [Blk(0, 0, b"ABCDEFGH")])
    assert get_item(redo_block(rec, 0, page), 1)[24:] == b"ABCDEFGH"
    bad = record(RM_HEAP_ID, 0x70, struct.pack("<H", 1), [Blk(0, 0, b"short")])
    with pytest.raises(PageError, match="wrong tuple length"):
        redo_block(bad, 0, page)


def test_prune_then_vacuum() -> None:
    page = page_with(*(heap_tuple(bytes([65 + i]) * 20, off=i + 1) for i in range(5)))
    # redirect 1->3, 2 dead, 4 unused
    data = struct.pack("<HHHH", 1, 3, 2, 4)
    rec = record(RM_HEAP2_ID, 0x10, struct.pack("<IHH", 0, 1, 1), [Blk(0, 0, data)])
    out = redo_block(rec, 0, page)
    assert get_item_id(out, 1) == (3, LP_REDIRECT, 0)
    assert get_item_id(out, 2) == (0, LP_DEAD, 0)
    assert get_item_id(out, 4) == (0, LP_UNUSED, 0)
    assert get_item(out, 5) == get_item(page, 5) and get_item(out, 3) == get_item(page, 3)
    vac = record(
        RM_HEAP2_ID,
        0x20,
        struct.pack("<H", 1),
        [Blk(0, 0, struct.pack("<H", 2))],
        lsn=END_LSN,
        end_lsn=END_LSN + 32,
    )
    out2 = redo_block(vac, 0, out)
    assert get_item_id(out2, 2)[1] == LP_UNUSED and max_offset(out2) == 5


def test_freeze_page_replaces_infomasks() -> None:
    page = page_with(heap_tuple(b"x" * 8))
    plan = struct.pack("<IHHHBx", 0, 1, 2, 0x0B00, 0)
    rec = record(RM_HEAP2_ID, 0x30, struct.pack("<IH", 99, 1), [Blk(0, 0, plan)])
    out = redo_block(rec, 0, page)
    assert field(out, 1, "<H", h.T_INFOMASK) == 0x0B00


def test_visible_sets_vm_bits_and_heap_flag_without_heap_lsn() -> None:
    heap_blkno = HEAPBLOCKS_PER_PAGE + 13
    rec = record(
        RM_HEAP2_ID, 0x40, struct.pack("<IB", 5, 0x03), [Blk(0, 1, fork=2), Blk(1, heap_blkno)]
    )
    assert not needs_previous(rec, 0) and needs_previous(rec, 1)
    vm = redo_block(rec, 0, None)
    assert vm_get(vm, heap_blkno) == 3 and get_lsn(vm) == END_LSN
    heap_page = page_with(heap_tuple(b"y"))
    out = redo_block(rec, 1, heap_page)
    assert get_flags(out) & PD_ALL_VISIBLE and get_lsn(out) == get_lsn(heap_page)


def test_multi_insert_shortaligns_each_tuple() -> None:
    tuples = [b"\0abc", b"\0de"]  # 4 and 3 bytes: the second header starts on an odd offset
    data = b""
    for t in tuples:
        data += b"\0" * (len(data) % 2) + struct.pack("<HHHB", len(t), 2, 0x0802, 24) + t
    main = struct.pack("<BxH", 0x20, 2)  # ALL_FROZEN_SET, INIT: no offsets
    out = redo_block(record(RM_HEAP2_ID, 0xD0, main, [Blk(0, 2, data, True)]), 0, None)
    assert [get_item(out, i)[23:] for i in (1, 2)] == tuples
    assert get_flags(out) & PD_ALL_VISIBLE


def test_sequence_log_rebuilds_page() -> None:
    tup = heap_tuple(struct.pack("<qq?", 33, 0, True))
    rec = record(RM_SEQ_ID, 0x00, b"\0" * 12 + tup, [Blk(0, 0, will_init=True)])
    out = redo_block(rec, 0, b"\xff" * 8192)
    assert get_item(out, 1) == tup and struct.unpack_from("<I", out, 8184)[0] == 0x1717
    assert get_item_id(out, 1)[1] == LP_NORMAL


def test_apply_image_and_unsupported_rmgr() -> None:
    image_page = bytearray(page_with(heap_tuple(b"img")))
    image = BlockImage(bytes(image_page), 0, 0, BKPIMAGE_APPLY)
    rec = record(RM_HEAP_ID, 0x00, struct.pack("<HB", 9, 0), [Blk(0, 0, image=image)])
    out = redo_block(rec, 0, None)
    assert get_lsn(out) == END_LSN and out[8:] == image_page[8:]
    # A custom rmgr (RM_EXPERIMENTAL_ID): every built-in page rmgr has native redo.
    with pytest.raises(UnsupportedRecord, match="no native redo for custom128"):
        redo_block(record(128, 0x20, b"\0\0", [Blk(0, 1, b"x")]), 0, bytes(image_page))


def test_vm_clear_and_set() -> None:
    vm = bytearray(8192)
    assert vm_set(vm, 5, VISIBILITYMAP_VALID_BITS, 77)
    assert vm_block(5) == 0 and vm_get(vm, 5) == 3 and get_lsn(vm) == 77
    assert not vm_set(vm, 5, VISIBILITYMAP_VALID_BITS, 99)
    assert get_lsn(vm) == 77
    assert vm_clear(vm, 5, VISIBILITYMAP_ALL_FROZEN) and vm_get(vm, 5) == VISIBILITYMAP_ALL_VISIBLE
    assert not vm_clear(vm, 6, VISIBILITYMAP_VALID_BITS)
    assert get_lsn(vm) == 77


def test_clog_status_bits() -> None:
    page = zero_page()
    clog_set_status(page, [100, 101], TRANSACTION_STATUS_SUB_COMMITTED)
    clog_set_status(page, [100, 101, 102], TRANSACTION_STATUS_COMMITTED)
    clog_set_status(page, [101], TRANSACTION_STATUS_SUB_COMMITTED)
    clog_set_status(page, [103], TRANSACTION_STATUS_ABORTED)
    assert [clog_get_status(page, x) for x in range(99, 105)] == [0, 1, 1, 1, 2, 0]
    assert page[25] == 0b10_01_01_01
    with pytest.raises(PageError):
        clog_set_status(page, [40000], TRANSACTION_STATUS_COMMITTED, pageno=0)


def test_multixact_offsets_and_members_cross_pages() -> None:
    mid = MULTIXACT_OFFSETS_PER_PAGE - 1  # next multixact's offset goes to the next page
    moff = MULTIXACT_MEMBERS_PER_PAGE - 1  # members straddle two member pages
    members = (MultiXactMember(1000, 1), MultiXactMember(1001, 5))
    offsets: dict[int, bytearray] = {}
    member_pages: dict[int, bytearray] = {}
    apply_create(MultiXactCreate(mid, moff, members), offsets, member_pages)
    assert struct.unpack_from("<I", offsets[0], 8188)[0] == moff
    assert struct.unpack_from("<I", offsets[1], 0)[0] == moff + 2
    # Last member of page 0: group 408, slot 3 -> flags byte 408*20+3, xid at 408*20+4+12.
    assert member_pages[0][408 * 20 + 3] == 1
    assert struct.unpack_from("<I", member_pages[0], 408 * 20 + 16)[0] == 1000
    assert member_pages[1][0] == 5 and struct.unpack_from("<I", member_pages[1], 4)[0] == 1001
