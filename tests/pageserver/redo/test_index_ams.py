"""Index-AM redo (hash, GIN, GiST, SP-GiST, BRIN, generic) on hand-built pages and records."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from pageserver.redo import brin, generic, gin, gist, hash, redo_block, spgist
from pageserver.redo.page import (
    get_item,
    get_lower,
    get_lsn,
    get_prune_xid,
    get_special,
    max_offset,
    page_add_item,
    set_lsn,
)
from pg15.constants import (
    RM_BRIN_ID,
    RM_GENERIC_ID,
    RM_GIN_ID,
    RM_GIST_ID,
    RM_HASH_ID,
    RM_SPGIST_ID,
)
from tests.redo_helpers import END_LSN, Blk, record

LATER = END_LSN + 0x100  # a second record after the first one (earlier pages are not "done")


def itup(blk: int, off: int, payload: bytes = b"\x01\x02\x03\x04") -> bytes:
    """An IndexTuple: t_tid, t_info (size), payload."""
    size = 8 + len(payload)
    return struct.pack("<HHHH", blk >> 16, blk & 0xFFFF, off, size) + payload


def with_items(page: bytearray, items: list[bytes]) -> bytearray:
    for item in items:
        page_add_item(page, item, 0, overwrite=False, is_heap=False)
    return page


# ---------------------------------------------------------------------------------------------
# Hash


def test_hash_splitpoint_arithmetic() -> None:
    assert [hash.spare_index(n) for n in (1, 2, 3, 4, 512, 513, 1024, 1025)] == [
        0,
        1,
        2,
        2,
        9,
        10,
        13,
        14,
    ]
    assert [hash.total_buckets(p) for p in (0, 1, 9, 10, 13, 14)] == [1, 2, 512, 640, 1024, 1280]


def test_hash_init_meta_page_and_insert_counts_tuples() -> None:
    rec = record(
        RM_HASH_ID,
        hash.INIT_META_PAGE,
        struct.pack("<dIH", 0.0, 450, 307),
        [Blk(0, 0, will_init=True)],
    )
    meta = redo_block(rec, 0, None)
    assert get_lower(meta) == 24 + 4544 and get_lsn(meta) == END_LSN
    fields = hash.META_HEAD.unpack_from(meta, hash.META)
    assert fields[0] == hash.HASH_MAGIC and fields[4:8] == (8152, 4096, 15, 1)
    assert fields[8:10] == (3, 1) and fields[10] == 1  # highmask, lowmask, ovflpoint
    assert struct.unpack_from("<I", meta, hash.M_SPARES + 4)[0] == 1
    bucket = hash.init_bucket_page(1, 0, hash.LH_BUCKET_PAGE)
    ins = record(RM_HASH_ID, hash.INSERT, struct.pack("<H", 1), [Blk(0, 1, itup(0, 5)), Blk(1, 0)])
    assert get_item(redo_block(ins, 0, bytes(bucket)), 1) == itup(0, 5)
    zeroed = bytearray(meta)
    set_lsn(zeroed, 0)
    assert struct.unpack_from("<d", redo_block(ins, 1, bytes(zeroed)), hash.M_NTUPLES)[0] == 1.0


def test_hash_delete_leaves_primary_bucket_lsn_alone() -> None:
    page = with_items(
        hash.init_bucket_page(1, 0, hash.LH_BUCKET_PAGE | hash.LH_PAGE_HAS_DEAD_TUPLES),
        [itup(0, i) for i in range(1, 5)],
    )
    set_lsn(page, 0x500)
    rec = record(
        RM_HASH_ID,
        hash.DELETE,
        struct.pack("<??", True, False),
        [Blk(0, 1), Blk(1, 7, struct.pack("<HH", 1, 3))],
    )
    assert redo_block(rec, 0, bytes(page)) == bytes(page)
    out = redo_block(rec, 1, bytes(page))
    assert max_offset(out) == 2 and get_item(out, 1) == itup(0, 2)
    flag = struct.unpack_from("<H", out, get_special(out) + hash.OFF_FLAG)[0]
    assert flag == hash.LH_BUCKET_PAGE


def test_hash_mask_hides_unused_pages_and_dead_hint() -> None:
    unused = hash.init_bucket_page(0, 0, hash.LH_UNUSED_PAGE)
    unused[100] = 0x55
    hash.mask(unused)
    assert not any(unused[24:])
    page = hash.init_bucket_page(1, 0, hash.LH_OVERFLOW_PAGE | hash.LH_PAGE_HAS_DEAD_TUPLES)
    hash.mask(page)
    assert (
        struct.unpack_from("<H", page, get_special(page) + hash.OFF_FLAG)[0]
        == hash.LH_OVERFLOW_PAGE
    )


# ---------------------------------------------------------------------------------------------
# GIN


def tid(blk: int, off: int) -> int:
    return (blk << gin.OFFSET_BITS) | off


tids = st.lists(
    st.tuples(st.integers(0, 2**32 - 2), st.integers(1, 2047)),
    min_size=1,
    max_size=200,
    unique=True,
)


@given(tids)
def test_gin_posting_list_round_trip(pairs: list[tuple[int, int]]) -> None:
    items = sorted(tid(b, o) for b, o in pairs)
    seg = gin.encode_segment(items)
    assert len(seg) % 2 == 0
    decoded, size = gin.decode_segment(seg)
    assert decoded == items and size == len(seg)


def data_leaf(segments: list[list[int]]) -> bytearray:
    page = gin.init_page(gin.GIN_DATA | gin.GIN_LEAF | gin.GIN_COMPRESSED)
    body = b"".join(gin.encode_segment(s) for s in segments)
    page[gin.DATA_START : gin.DATA_START + len(body)] = body
    gin._set_data_size(page, len(body))
    return page


def leaf_items(page: bytes) -> list[list[int]]:
    return [gin.decode_segment(s)[0] for s in gin._segments(bytearray(page))]


def test_gin_recompress_applies_every_action_kind() -> None:
    page = data_leaf([[tid(1, 1), tid(1, 2)], [tid(2, 1)], [tid(3, 1), tid(3, 5)]])
    added = struct.pack("<HHH", 0, 1, 3)
    new = gin.encode_segment([tid(4, 1)])
    actions = (
        bytes([0, gin.SEGMENT_ADDITEMS]) + struct.pack("<H", 1) + added
        + bytes([1, gin.SEGMENT_DELETE])
        + bytes([2, gin.SEGMENT_REPLACE]) + gin.encode_segment([tid(3, 1)])
        + bytes([3, gin.SEGMENT_INSERT]) + new
    )  # fmt: skip
    payload = struct.pack("<H", 4) + actions
    rec = record(RM_GIN_ID, gin.VACUUM_DATA_LEAF_PAGE, b"", [Blk(0, 5, payload)])
    out = redo_block(rec, 0, bytes(page))
    assert leaf_items(out) == [[tid(1, 1), tid(1, 2), tid(1, 3)], [tid(3, 1)], [tid(4, 1)]]


def test_gin_internal_data_insert_and_delete_posting_items() -> None:
    page = gin.init_page(gin.GIN_DATA)
    item_a = struct.pack("<HH", 0, 10) + struct.pack("<HHH", 0, 5, 1)
    item_b = struct.pack("<HH", 0, 11) + struct.pack("<HHH", 0, 9, 1)
    gin._add_posting_item(page, item_a, 0)
    gin._add_posting_item(page, item_b, 0)
    child = gin.init_page(gin.GIN_DATA | gin.GIN_LEAF | gin.GIN_INCOMPLETE_SPLIT)
    # The child (block 10) split: block 12 becomes the right half; a new item for 10 goes first.
    new_item = struct.pack("<HH", 0, 10) + struct.pack("<HHH", 0, 3, 1)
    main = struct.pack("<HHHHH", gin.GIN_INSERT_ISDATA, 0, 10, 0, 12)
    rec = record(
        RM_GIN_ID, gin.INSERT, main, [Blk(0, 1, struct.pack("<H", 1) + new_item), Blk(1, 10)]
    )
    out = redo_block(rec, 0, bytes(page))
    assert get_lower(out) == gin.DATA_START + 3 * gin.POSTING_ITEM_SIZE
    children = [struct.unpack_from("<HH", out, gin._posting_item_pos(i))[1] for i in (1, 2, 3)]
    assert children == [10, 12, 11]
    cleared = redo_block(rec, 1, bytes(child))
    assert gin._flags(bytearray(cleared)) == gin.GIN_DATA | gin.GIN_LEAF
    delete = record(
        RM_GIN_ID,
        gin.DELETE_PAGE,
        struct.pack("<HxxII", 2, 11, 900),
        [Blk(0, 12), Blk(1, 1), Blk(2, 10)],
        end_lsn=LATER,
    )
    parent = redo_block(delete, 1, out)
    assert [struct.unpack_from("<HH", parent, gin._posting_item_pos(i))[1] for i in (1, 2)] == [
        10,
        11,
    ]
    dead = redo_block(delete, 0, bytes(child))
    assert gin._flags(bytearray(dead)) & gin.GIN_DELETED and get_prune_xid(dead) == 900
    assert (
        struct.unpack_from("<I", redo_block(delete, 2, bytes(child)), get_special(child))[0] == 11
    )


def test_gin_entry_insert_updates_downlink_and_list_page_gets_tuples() -> None:
    page = with_items(gin.init_page(0), [itup(7, 0), itup(9, 0)])
    new = itup(8, 0, b"\x09\x09\x09\x09")
    main = struct.pack("<HHHHH", 0, 0, 7, 0, 20)  # non-leaf: left child 7, right child 20
    rec = record(
        RM_GIN_ID, gin.INSERT, main, [Blk(0, 1, struct.pack("<H?x", 1, False) + new), Blk(1, 7)]
    )
    out = redo_block(rec, 0, bytes(page))
    assert get_item(out, 1) == new and get_item(out, 2)[:6] == struct.pack("<HHH", 0, 20, 0)
    tuples = itup(1, 1) + itup(1, 2)
    lst = record(
        RM_GIN_ID, gin.INSERT_LISTPAGE, struct.pack("<Ii", 0xFFFFFFFF, 2), [Blk(0, 3, tuples, True)]
    )
    listpage = redo_block(lst, 0, None)
    assert max_offset(listpage) == 2 and get_item(listpage, 2) == itup(1, 2)
    assert gin._flags(bytearray(listpage)) == gin.GIN_LIST | gin.GIN_LIST_FULLROW
    assert gin._maxoff(bytearray(listpage)) == 1


def test_gin_mask_hides_deleted_pages() -> None:
    page = gin.init_page(gin.GIN_DATA | gin.GIN_DELETED)
    page[200] = 1
    gin.mask(page)
    assert not any(page[24:])


# ---------------------------------------------------------------------------------------------
# GiST


def test_gist_page_update_overwrites_one_for_one() -> None:
    page = with_items(gist.init_page(gist.F_LEAF), [itup(1, 1), itup(1, 2), itup(1, 3)])
    bigger = itup(1, 9, b"\x07" * 12)
    rec = record(
        RM_GIST_ID,
        gist.PAGE_UPDATE,
        struct.pack("<HH", 1, 1),
        [Blk(0, 4, struct.pack("<H", 2) + bigger)],
    )
    out = redo_block(rec, 0, bytes(page))
    assert [get_item(out, i) for i in (1, 2, 3)] == [itup(1, 1), bigger, itup(1, 3)]


def test_gist_split_links_halves_and_clears_left_child() -> None:
    main = struct.pack("<IxxxxQ?xH?xxx", 77, 0x1234, True, 2, True)
    half = struct.pack("<i", 1) + itup(1, 1)
    child = gist.init_page(gist.F_LEAF | gist.F_FOLLOW_RIGHT)
    rec = record(
        RM_GIST_ID, gist.PAGE_SPLIT, main, [Blk(0, 9), Blk(1, 3, half, True), Blk(2, 8, half, True)]
    )
    left, right = redo_block(rec, 1, None), redo_block(rec, 2, None)
    nsn_hi, nsn_lo, link, flags, _ = gist.OPAQUE.unpack_from(left, get_special(left))
    assert (nsn_lo, link, flags) == (0x1234, 8, gist.F_LEAF | gist.F_FOLLOW_RIGHT)
    assert gist.OPAQUE.unpack_from(right, get_special(right))[2:4] == (77, gist.F_LEAF)
    cleared = redo_block(rec, 0, bytes(child))
    nsn_hi, nsn_lo, _, flags, _ = gist.OPAQUE.unpack_from(cleared, get_special(cleared))
    assert flags == gist.F_LEAF and (nsn_hi << 32 | nsn_lo) == END_LSN


def test_gist_page_delete_marks_page_and_removes_downlink() -> None:
    rec = record(
        RM_GIST_ID, gist.PAGE_DELETE, struct.pack("<QH", 5 << 32 | 800, 2), [Blk(0, 6), Blk(1, 0)]
    )
    leaf = redo_block(rec, 0, bytes(gist.init_page(gist.F_LEAF)))
    assert get_lower(leaf) == 32 and struct.unpack_from("<Q", leaf, 24)[0] == 5 << 32 | 800
    parent = with_items(gist.init_page(0), [itup(5, 0xFFFF), itup(6, 0xFFFF)])
    assert max_offset(redo_block(rec, 1, bytes(parent))) == 1


# ---------------------------------------------------------------------------------------------
# SP-GiST


def inner_tuple(nodes: list[tuple[int, int]]) -> bytes:
    """An SP-GiST inner tuple without prefix; nodes are 8-byte IndexTuples."""
    body = b"".join(struct.pack("<HHHH", b >> 16, b & 0xFFFF, o, 8) for b, o in nodes)
    size = 8 + len(body)
    return struct.pack("<IHxx", len(nodes) << 3, size) + body


def test_spgist_add_node_moves_tuple_and_leaves_redirect() -> None:
    old = with_items(spgist.init_page(0), [inner_tuple([(0, 0)])])
    new_inner = inner_tuple([(0, 0), (0, 0)])
    main = struct.pack("<HH?bHHxxI?xxx", 1, 1, True, -1, 0, 0, 4242, False) + new_inner
    rec = record(RM_SPGIST_ID, spgist.ADD_NODE, main, [Blk(0, 1), Blk(1, 6, will_init=True)])
    moved = redo_block(rec, 1, None)
    assert get_item(moved, 1) == new_inner
    src = redo_block(rec, 0, bytes(old))
    assert get_item(src, 1) == spgist.dead_tuple(spgist.REDIRECT, 6, 1, 4242)
    _, nredirect, nplaceholder, _ = spgist.OPAQUE.unpack_from(src, get_special(src))
    assert (nredirect, nplaceholder) == (1, 0)


def test_spgist_vacuum_redirect_turns_redirects_into_placeholders() -> None:
    page = with_items(
        spgist.init_page(spgist.SPGIST_LEAF),
        [spgist.dead_tuple(spgist.REDIRECT, 3, 2, 9), spgist.dead_tuple(spgist.REDIRECT, 3, 4, 9)],
    )
    struct.pack_into("<H", page, get_special(page) + spgist.OFF_NREDIRECTION, 2)
    main = struct.pack("<HHI", 2, 2, 9) + struct.pack("<HH", 1, 2)
    out = redo_block(
        record(RM_SPGIST_ID, spgist.VACUUM_REDIRECT, main, [Blk(0, 4)]), 0, bytes(page)
    )
    assert max_offset(out) == 1
    # The state becomes PLACEHOLDER and the pointer invalid; the xid stays (as in PostgreSQL).
    word, _, hi, lo, posid, xid = spgist._DEAD_TUPLE.unpack_from(get_item(out, 1))
    assert (word & 3, hi, lo, posid, xid) == (spgist.PLACEHOLDER, 0xFFFF, 0xFFFF, 0, 9)
    assert spgist.OPAQUE.unpack_from(out, get_special(out))[1:3] == (0, 1)


# ---------------------------------------------------------------------------------------------
# BRIN and generic


def test_brin_insert_points_revmap_at_tuple_and_desummarize_clears_it() -> None:
    tup = struct.pack("<IBxH", 40, 8, 0) + b"\x00" * 8
    main = struct.pack("<IIH", 40, 4, 1)
    rec = record(RM_BRIN_ID, brin.INSERT | brin.INIT_PAGE, main, [Blk(0, 3, tup, True), Blk(1, 1)])
    regular = redo_block(rec, 0, None)
    assert (
        get_item(regular, 1) == tup and brin.page_type(bytearray(regular)) == brin.PAGETYPE_REGULAR
    )
    revmap = redo_block(rec, 1, bytes(brin.init_page(brin.PAGETYPE_REVMAP)))
    assert struct.unpack_from("<HHH", revmap, 24 + 6 * 10) == (0, 3, 1)
    undo = record(
        RM_BRIN_ID,
        brin.DESUMMARIZE,
        struct.pack("<IIH", 4, 40, 1),
        [Blk(0, 1), Blk(1, 3)],
        end_lsn=LATER,
    )
    assert struct.unpack_from("<HHH", redo_block(undo, 0, revmap), 24 + 60) == (0xFFFF, 0xFFFF, 0)
    gone = redo_block(undo, 1, regular)
    assert max_offset(gone) == 0


def test_generic_delta_writes_fragments_and_zeroes_hole() -> None:
    page = gist.init_page(0)
    page[1000] = 0x77  # stale byte in the hole
    delta = struct.pack("<HH", 8180, 3) + b"abc" + struct.pack("<HH", 12, 2) + struct.pack("<H", 40)
    out = redo_block(record(RM_GENERIC_ID, 0, b"", [Blk(0, 2, delta)]), 0, bytes(page))
    assert out[8180:8183] == b"abc" and get_lower(out) == 40 and out[1000] == 0
    masked = bytearray(out)
    generic.mask(masked)
    assert get_lsn(masked) == 0
