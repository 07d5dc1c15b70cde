"""The C fast path of native redo (pageserver/redo/_redo.c) against the Python reference.

On real WAL: one PostgreSQL 15 server runs the redo verification workload (pgbench, updates,
deletes, VACUUM, index builds, posting lists) plus random-key inserts that split btree pages
both ways; every Heap/Heap2/Btree block reference and every full-page image is redone by both
implementations from the same previous page, and the pages must be byte-identical. The C
path must have handled (not handed back) every block of the hot record types, so the test
cannot pass with C doing nothing. Hand-built records cover what a workload rarely reaches.
"""

from __future__ import annotations

import random
import shutil
import struct
import types
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.waldump import collect_segments, iter_records
from pageserver.redo import (
    REDO_BY_RMGR,
    PageError,
    needs_previous,
    redo_block,
    redo_block_python,
)
from pageserver.redo import btree as bt
from pageserver.redo.native import NativeLayoutError, _check_layout
from pageserver.redo.native import redo as native
from pageserver.redo.page import (
    LP_DEAD,
    LP_NORMAL,
    LP_REDIRECT,
    LP_UNUSED,
    PD_HAS_FREE_LINES,
    get_item_id,
    max_offset,
    new_page,
    page_add_item,
    set_flags,
    set_item_id,
    set_lower,
    set_lsn,
)
from pg15.constants import RM_BTREE_ID, RM_HEAP2_ID, RM_HEAP_ID
from pg15.records import BKPIMAGE_APPLY, BKPIMAGE_COMPRESS_LZ4, BlockImage, DecodedRecord
from proto.errors import NeonError
from tests.native_ext import require_c_extension
from tests.pageserver.redo.test_verify import SETTINGS, run_workload
from tests.pgtest import PgTestCluster
from tests.redo_helpers import LSN, Blk, record


@pytest.fixture
def c_extension() -> None:
    require_c_extension(native, "pageserver.redo._redo")


pytestmark = pytest.mark.usefixtures("c_extension")

RANDOM_SPLITS = """
CREATE TABLE r (k float8, pad text);
CREATE INDEX r_k ON r (k);
INSERT INTO r SELECT random(), repeat('x', 20) FROM generate_series(1, 30000);
DELETE FROM r WHERE k < 0.4;
SET enable_seqscan = off;
SELECT count(*) FROM r WHERE k < 0.4;
RESET enable_seqscan;
INSERT INTO r SELECT random() * 0.4, 'y' FROM generate_series(1, 20000);
UPDATE r SET pad = 'z' WHERE k > 0.9;
VACUUM r;
"""


def c_redo(record: DecodedRecord, block_id: int, page: bytes | bytearray | None) -> bytes | None:
    assert native is not None
    return native.try_redo_block(record, block_id, page)


@pytest.fixture(scope="module")
def wal_dir(
    pg_cluster_module: PgTestCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """The WAL of a server that ran the redo workload and random-key btree inserts."""
    server = pg_cluster_module.create(SETTINGS)
    server.psql("CHECKPOINT")  # every page touched from here on starts with an image
    run_workload(server)
    server.psql(RANDOM_SPLITS)
    server.psql("SELECT pg_switch_wal();")
    server.stop()
    out = tmp_path_factory.mktemp("native-redo-wal")
    for seg in sorted(server.wal_dir.iterdir()):
        if seg.is_file() and len(seg.name) == 24:
            shutil.copy(seg, out / seg.name)
    yield out


# Record types whose every block the C path must redo itself on this workload.
ALL_IN_C = {
    "Heap INSERT",
    "Heap INSERT+INIT",
    "Heap UPDATE",
    "Heap HOT_UPDATE",
    "Heap DELETE",
    "Heap LOCK",
    "Heap INPLACE",
    "Heap2 PRUNE",
    "Heap2 VACUUM",
    "Heap2 FREEZE_PAGE",
    "Heap2 MULTI_INSERT",
    "Btree INSERT_LEAF",
    "Btree INSERT_UPPER",
    "Btree INSERT_POST",
    "Btree SPLIT_L",
    "Btree SPLIT_R",
    "Btree DEDUP",
    "Btree VACUUM",
    "image",
}
# Handled in part: VISIBLE's VM page (block 0) goes to Python.
SOME_IN_C = {"Heap2 VISIBLE"}


def test_c_redo_equals_python_on_real_wal(wal_dir: Path) -> None:
    segments, seg_size = collect_segments([wal_dir])
    pages: dict[tuple[object, int, int], bytes] = {}
    handled: Counter[str] = Counter()
    total: Counter[str] = Counter()
    calls = 0
    for rec in iter_records(segments, seg_size, None, None):
        for ref in rec.blocks:
            key = (ref.rnode, ref.fork, ref.blkno)
            if not ref.apply_image and rec.rmgr_id not in REDO_BY_RMGR:
                pages.pop(key, None)
                continue
            prev = pages.get(key)
            if prev is None and needs_previous(rec, ref.block_id):
                continue
            try:
                expected: bytes | None = redo_block_python(rec, ref.block_id, prev)
            except NeonError:
                expected = None
            calls += 1
            # bytes and bytearray pages alike; the input must stay as it was
            given = bytearray(prev) if prev is not None and calls % 2 else prev
            got = c_redo(rec, ref.block_id, given)
            if given is not None:
                assert bytes(given) == prev
            what = "image" if ref.apply_image else f"{rec.rmgr_name} {rec.type_name}"
            total[what] += 1
            if got is not None:
                handled[what] += 1
                assert got == expected, (
                    f"C redo differs from Python: {what} at {rec.lsn:X} block "
                    f"{ref.block_id}: " + (repr(_first_diff(got, expected)))
                )
            if expected is None:
                pages.pop(key, None)
            else:
                pages[key] = expected
    summary = {k: (handled[k], total[k]) for k in sorted(total)}
    print(summary)
    for what in ALL_IN_C:
        assert total[what] > 0, f"the workload made no {what}: {summary}"
        assert handled[what] == total[what], f"C handed back {what}: {summary}"
    for what in SOME_IN_C:
        assert handled[what] > 0, f"C handled no {what}: {summary}"
    assert handled["Btree DELETE"] == total["Btree DELETE"], summary


def _mutated(rng: random.Random, data: bytes, flips: int) -> bytes:
    out = bytearray(data)
    for _ in range(flips):
        out[rng.randrange(len(out))] = rng.randrange(256)
    return bytes(out)


def test_c_redo_hands_back_what_it_cannot_redo_like_python(wal_dir: Path) -> None:
    """Damaged pages, block data and main data from real records: the C path must give
    Python's page or hand the block back, never a page where Python fails or differs."""
    rng = random.Random(10)
    segments, seg_size = collect_segments([wal_dir])
    pages: dict[tuple[object, int, int], bytes] = {}
    tried = handed_back = 0
    for n, rec in enumerate(iter_records(segments, seg_size, None, None)):
        for ref in rec.blocks:
            key = (ref.rnode, ref.fork, ref.blkno)
            if not ref.apply_image and rec.rmgr_id not in REDO_BY_RMGR:
                pages.pop(key, None)
                continue
            prev = pages.get(key)
            if prev is None and needs_previous(rec, ref.block_id):
                continue
            if n % 7 == 0 and rec.rmgr_id in (RM_HEAP_ID, RM_HEAP2_ID, RM_BTREE_ID):
                for _ in range(3):
                    bad_prev = _mutated(rng, prev, rng.choice((1, 4, 16))) if prev else prev
                    if prev and rng.random() < 0.5:  # the header and line pointers
                        head = _mutated(rng, prev[:64], 2)
                        bad_prev = head + (bad_prev or prev)[64:]
                    bad_ref = ref._replace(
                        data=_mutated(rng, ref.data, 2) if ref.data else ref.data
                    )
                    blocks = tuple(bad_ref if b is ref else b for b in rec.blocks)
                    main = _mutated(rng, rec.main_data, 1) if rec.main_data else rec.main_data
                    bad = rec._replace(blocks=blocks, main_data=main)
                    try:
                        expected: bytes | None = redo_block_python(bad, ref.block_id, bad_prev)
                    except Exception:  # PageError, struct.error...: C must hand it back
                        expected = None
                    got = c_redo(bad, ref.block_id, bad_prev)
                    tried += 1
                    if got is None:
                        handed_back += 1
                    else:
                        assert got == expected, (
                            f"C redo of a damaged {rec.rmgr_name} {rec.type_name} at "
                            f"{rec.lsn:X} block {ref.block_id}: {_first_diff(got, expected)}"
                        )
            try:
                pages[key] = redo_block_python(rec, ref.block_id, prev)
            except NeonError:
                pages.pop(key, None)
    print(f"{tried} damaged blocks, {handed_back} handed back")
    assert tried > 1000 and 0 < handed_back < tried


def _first_diff(a: bytes, b: bytes | None) -> tuple[int, int, int] | None:
    if b is None:
        return None
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            return i, x, y
    return None


# -- hand-built records -----------------------------------------------------------------------


def same(rec: DecodedRecord, block_id: int, page: bytes | None) -> bytes:
    """C and Python agree, and C did it."""
    got = c_redo(rec, block_id, page)
    assert got is not None, "C handed the record back"
    assert got == redo_block_python(rec, block_id, page)
    return got


def heap_tuple(n: int, blkno: int = 0, off: int = 1) -> bytes:
    head = struct.pack("<IIIHHHHHB", 600, 0, 0, blkno >> 16, blkno & 0xFFFF, off, 2, 0x0902, 24)
    return head + b"\0" + bytes([n]) * (8 + n)


def heap_page(count: int) -> bytearray:
    page = new_page(0)
    for i in range(count):
        page_add_item(page, heap_tuple(i, off=i + 1), 0, overwrite=False, is_heap=True)
    set_lsn(page, LSN - 8)
    return page


def test_prune_with_redirects_dead_and_unused_repacks_the_page() -> None:
    page = heap_page(8)
    # 1 -> 3 redirect, 5 -> 7 redirect; 2, 4 dead; 6, 8 unused (8 is trailing: cut off)
    data = struct.pack("<8H", 1, 3, 5, 7, 2, 4, 6, 8)
    rec = record(RM_HEAP2_ID, 0x10, struct.pack("<IHH", 0, 2, 2), [Blk(0, 0, data)])
    out = same(rec, 0, bytes(page))
    assert [get_item_id(out, i)[1] for i in range(1, max_offset(out) + 1)] == [
        LP_REDIRECT,
        LP_DEAD,
        LP_NORMAL,
        LP_DEAD,
        LP_REDIRECT,
        LP_UNUSED,
        LP_NORMAL,
    ]


def test_vacuum_truncates_trailing_unused_line_pointers() -> None:
    page = heap_page(6)
    for off in (2, 5, 6):
        set_item_id(page, off, 0, LP_DEAD, 0)
    rec = record(RM_HEAP2_ID, 0x20, struct.pack("<H", 3), [Blk(0, 0, struct.pack("<3H", 2, 5, 6))])
    out = same(rec, 0, bytes(page))
    assert max_offset(out) == 4


def test_insert_reuses_a_free_line_pointer_and_update_across_pages() -> None:
    page = heap_page(3)
    set_item_id(page, 2, 0, LP_UNUSED, 0)
    set_flags(page, PD_HAS_FREE_LINES)
    tup = struct.pack("<HHB", 2, 0x0802, 24) + b"\0" + b"new tuple"
    rec = record(RM_HEAP_ID, 0x00, struct.pack("<HB", 2, 1), [Blk(0, 0, tup)])
    same(rec, 0, bytes(page))
    main = struct.pack("<IHBBIH", 910, 1, 0, 3, 0, 1)  # old/new all-visible cleared
    update = record(RM_HEAP_ID, 0x20 | 0x80, main, [Blk(0, 9, tup, True), Blk(1, 0)], xid=910)
    same(update, 0, None)
    same(update, 1, bytes(page))


def itup(key: int, blk: int, off: int, size: int = 16) -> bytes:
    body = struct.pack("<I", key).ljust(size - 8, b"\0")[: size - 8]
    return struct.pack("<HHHH", blk >> 16, blk & 0xFFFF, off, size) + body


def leaf(items: list[bytes], *, nxt: int = 0) -> bytes:
    page = bt.bt_page_init()
    bt.set_opaque(page, 0, nxt, 0, bt.BTP_LEAF, 0)
    for i, item in enumerate(items, 1):
        page_add_item(page, item, i, overwrite=False, is_heap=False)
    set_lsn(page, LSN - 8)
    return bytes(page)


@pytest.mark.parametrize("new_item_on_left", [True, False])
def test_split_with_the_new_item_on_either_side(new_item_on_left: bool) -> None:
    items = [itup(100, 0, 0)] + [itup(k, 1, k) for k in range(1, 9)]  # high key first
    orig = leaf(items, nxt=7)
    newitemoff = 4 if new_item_on_left else 7
    main = struct.pack("<IHHH", 0, 6, newitemoff, 0)  # level 0, firstrightoff 6
    new_item = itup(55, 2, 2)
    hikey = itup(6, 0, 0, 8)
    left_data = (new_item if new_item_on_left else b"") + hikey
    right_data = b"".join(reversed(items[5:]))
    rec = record(
        RM_BTREE_ID,
        0x30 if new_item_on_left else 0x40,
        main,
        [Blk(0, 1, left_data), Blk(1, 5, right_data, True), Blk(2, 7), Blk(3, 11)],
    )
    left = same(rec, 0, orig)
    assert max_offset(left) == (6 if new_item_on_left else 5)
    same(rec, 1, None)
    same(rec, 2, leaf([itup(9, 1, 1)]))
    child = bytearray(leaf([itup(1, 1, 1)]))
    bt.set_opaque(child, 0, 0, 0, bt.BTP_LEAF | bt.BTP_INCOMPLETE_SPLIT, 0)
    same(rec, 3, bytes(child))


def test_split_of_a_posting_list() -> None:
    posting = bt.form_posting(itup(3, 1, 1), itup(3, 1, 1)[:6] + itup(3, 1, 5)[:6])
    items = [itup(1, 1, 1), itup(2, 1, 2), posting, itup(4, 1, 4), itup(5, 1, 5)]
    orig = leaf(items)
    new_item = itup(3, 1, 3)
    main = struct.pack("<IHHH", 0, 4, 4, 1)  # posting at 3 splits; new item at 4 goes right
    rec = record(
        RM_BTREE_ID,
        0x40,
        main,
        [Blk(0, 1, new_item + itup(3, 0, 0, 8)), Blk(1, 5, b"".join(reversed(items[3:])), True)],
    )
    same(rec, 0, orig)


def test_btree_insert_delete_and_vacuum_of_many_items() -> None:
    page = leaf([itup(k, 1, k) for k in range(1, 12)])
    insert = record(RM_BTREE_ID, 0x00, struct.pack("<H", 4), [Blk(0, 1, itup(99, 3, 3))])
    inserted = same(insert, 0, page)
    offsets = struct.pack("<5H", 1, 2, 6, 7, 12)
    later = LSN + 0x1000  # after the insert's end: no BLK_DONE
    vacuum = record(
        RM_BTREE_ID, 0xC0, struct.pack("<HH", 5, 0), [Blk(0, 1, offsets)], end_lsn=later
    )
    assert max_offset(same(vacuum, 0, inserted)) == 7
    two = record(
        RM_BTREE_ID, 0x70, struct.pack("<IHH", 0, 2, 0), [Blk(0, 1, offsets[:4])], end_lsn=later
    )
    assert max_offset(same(two, 0, inserted)) == 10


def test_uncompressed_images_in_c_compressed_ones_handed_back() -> None:
    page = heap_page(3)
    lower, upper = struct.unpack_from("<HH", page, 12)
    body = bytes(page[:lower]) + bytes(page[upper:])
    image = BlockImage(body, lower, upper - lower, BKPIMAGE_APPLY)
    rec = record(RM_HEAP_ID, 0x00, b"\0\0\0", [Blk(0, 0, image=image)])
    assert same(rec, 0, None)[8:] == bytes(page)[8:]
    lz4 = BlockImage(b"x", 0, 0, BKPIMAGE_APPLY | BKPIMAGE_COMPRESS_LZ4)
    assert c_redo(record(RM_HEAP_ID, 0x00, b"\0\0\0", [Blk(0, 0, image=lz4)]), 0, None) is None


def test_what_python_rejects_is_handed_back_untouched() -> None:
    page = heap_page(2)
    set_lower(page, 8190)  # pd_lower above pd_upper: corrupt
    tup = struct.pack("<HHB", 2, 0x0802, 24) + b"\0" + b"abc"
    rec = record(RM_HEAP_ID, 0x00, struct.pack("<HB", 3, 0), [Blk(0, 0, tup)])
    before = bytes(page)
    assert c_redo(rec, 0, page) is None
    assert bytes(page) == before
    with pytest.raises(PageError):
        redo_block(rec, 0, bytes(page))
    # a record type left to Python (btree NEWROOT) and a missing previous page
    newroot = record(RM_BTREE_ID, 0xA0, struct.pack("<II", 3, 1), [Blk(0, 3, b"", True)])
    assert c_redo(newroot, 0, None) is None
    assert c_redo(rec, 0, None) is None


def tid(blk: int, off: int) -> bytes:
    return struct.pack("<HHH", blk >> 16, blk & 0xFFFF, off)


def test_dedup_and_posting_list_updates() -> None:
    posting = bt.form_posting(itup(2, 1, 1), tid(1, 1) + tid(1, 4) + tid(1, 6))
    items = [itup(1, 1, 1), posting, itup(2, 1, 7), itup(2, 1, 8), itup(3, 1, 3), itup(3, 1, 9)]
    page = leaf([itup(50, 0, 0), *items], nxt=4)
    # intervals: (2, 3) merges plain tuple 2, the posting list and 4; (5, 2) two plain ones
    intervals = struct.pack("<4H", 2, 3, 5, 2)
    dedup = record(RM_BTREE_ID, 0x60, struct.pack("<H", 2), [Blk(0, 1, intervals)])
    merged = same(dedup, 0, page)
    assert max_offset(merged) == 4
    later = LSN + 0x1000
    # VACUUM: posting list 2 loses TIDs #0 and #2, posting list 3 all but one; item 4 goes
    data = struct.pack("<H", 4) + struct.pack("<2H", 2, 3) + struct.pack("<3H", 2, 0, 2)
    data += struct.pack("<2H", 1, 0)
    vacuum = record(RM_BTREE_ID, 0xC0, struct.pack("<HH", 1, 2), [Blk(0, 1, data)], end_lsn=later)
    same(vacuum, 0, merged)
    delete = record(
        RM_BTREE_ID, 0x70, struct.pack("<IHH", 0, 0, 1), [Blk(0, 1, data[2:])], end_lsn=later
    )
    same(delete, 0, merged)


def test_the_c_module_refuses_to_load_when_a_record_field_moved() -> None:
    """The C code reads DecodedRecord/BlockRef/BlockImage by position: a moved field is an
    import error naming the field, not silently wrong redo."""
    assert native is not None
    _check_layout(native)  # the built module matches pg15/records.py
    moved = types.ModuleType("fake")
    moved.RECORD_FIELDS = {**native.RECORD_FIELDS, "BlockRef": {"blkno": 2}}  # type: ignore[attr-defined]
    with pytest.raises(NativeLayoutError, match=r"BlockRef\.blkno at position 2"):
        _check_layout(moved)
