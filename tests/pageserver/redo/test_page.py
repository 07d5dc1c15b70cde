"""Properties of the slotted-page primitives (pageserver/redo/page.py) and the masks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pageserver.redo import masks
from pageserver.redo.page import (
    LP_DEAD,
    LP_NORMAL,
    LP_REDIRECT,
    LP_UNUSED,
    MAX_HEAP_TUPLES_PER_PAGE,
    PD_ALL_VISIBLE,
    PD_HAS_FREE_LINES,
    PD_PAGE_FULL,
    PageError,
    get_flags,
    get_item,
    get_item_id,
    get_lower,
    get_lsn,
    get_prune_xid,
    get_special,
    get_upper,
    max_offset,
    maxalign,
    new_page,
    page_add_item,
    page_get_exact_free_space,
    page_get_free_space,
    page_get_heap_free_space,
    page_index_multi_delete,
    page_index_tuple_delete,
    page_index_tuple_delete_no_compact,
    page_index_tuple_overwrite,
    page_init,
    page_is_new,
    page_repair_fragmentation,
    page_truncate_line_pointer_array,
    set_flags,
    set_item_id,
    set_lsn,
    set_prune_xid,
    special_area,
)
from pg15.constants import BLCKSZ

items_st = st.lists(
    st.binary(min_size=1, max_size=200).map(lambda b: b.ljust(8, b"\x01")), min_size=1, max_size=30
)


def filled(items: list[bytes], special: int = 16) -> bytearray:
    page = new_page(special)
    for item in items:
        page_add_item(page, item, 0, overwrite=False, is_heap=False)
    return page


def all_items(page: bytearray) -> list[bytes]:
    return [get_item(page, i) for i in range(1, max_offset(page) + 1)]


def assert_compact(page: bytearray) -> None:
    """Items tile [pd_upper, pd_special) exactly, without overlap."""
    spans = sorted(
        (get_item_id(page, i)[0], maxalign(get_item_id(page, i)[2]))
        for i in range(1, max_offset(page) + 1)
        if get_item_id(page, i)[2]
    )
    pos = get_upper(page)
    for off, length in spans:
        assert off == pos
        pos += length
    assert pos == get_special(page)


def test_page_init_layout() -> None:
    page = bytearray(b"\xff" * BLCKSZ)
    page_init(page, 13)
    assert get_lower(page) == 24
    assert get_upper(page) == get_special(page) == BLCKSZ - 16
    assert page[18:20] == (0x2004).to_bytes(2, "little")
    assert get_lsn(page) == 0 and get_flags(page) == 0 and get_prune_xid(page) == 0
    assert not any(page[24:])
    assert len(special_area(page)) == 16
    assert page_is_new(bytes(BLCKSZ)) and not page_is_new(page)


def test_lsn_is_two_uint32_high_first() -> None:
    page = new_page(0)
    set_lsn(page, 0x0000000101234568)
    assert page[:8] == bytes.fromhex("0100000068452301")
    assert get_lsn(page) == 0x0000000101234568


@given(items_st)
def test_add_items_append_and_account_space(items: list[bytes]) -> None:
    page = filled(items)
    assert all_items(page) == items
    used = sum(maxalign(len(i)) for i in items)
    assert get_upper(page) == get_special(page) - used
    assert get_lower(page) == 24 + 4 * len(items)
    assert page_get_exact_free_space(page) == get_upper(page) - get_lower(page)
    assert page_get_free_space(page) == max(0, page_get_exact_free_space(page) - 4)
    assert_compact(page)


@given(items_st, st.data())
def test_add_item_in_the_middle_shifts_line_pointers(
    items: list[bytes], data: st.DataObject
) -> None:
    page = filled(items)
    at = data.draw(st.integers(1, len(items) + 1))
    new = b"NEWITEM!" * 2
    assert page_add_item(page, new, at, overwrite=False, is_heap=False) == at
    assert all_items(page) == [*items[: at - 1], new, *items[at - 1 :]]


def test_add_item_failures() -> None:
    page = filled([b"x" * 16])
    with pytest.raises(PageError, match="beyond"):
        page_add_item(page, b"y" * 8, 5, overwrite=False, is_heap=False)
    with pytest.raises(PageError, match="will not overwrite"):
        page_add_item(page, b"y" * 8, 1, overwrite=True, is_heap=True)
    with pytest.raises(PageError, match="do not fit"):
        page_add_item(page, b"z" * 8200, 0, overwrite=False, is_heap=False)
    heap = new_page(0)
    for _ in range(MAX_HEAP_TUPLES_PER_PAGE):
        page_add_item(heap, b"", 0, overwrite=False, is_heap=True)
    with pytest.raises(PageError, match="exceeds"):
        page_add_item(heap, b"", 0, overwrite=False, is_heap=True)


def test_overwrite_reuses_unused_slot_and_keeps_lower() -> None:
    page = filled([b"a" * 8, b"b" * 8, b"c" * 8], special=0)
    set_item_id(page, 2, 0, LP_UNUSED, 0)
    lower = get_lower(page)
    assert page_add_item(page, b"d" * 16, 2, overwrite=True, is_heap=True) == 2
    assert get_lower(page) == lower
    assert get_item(page, 2) == b"d" * 16
    # Free-slot search for offnum 0 only with the PD_HAS_FREE_LINES hint.
    set_item_id(page, 1, 0, LP_UNUSED, 0)
    assert page_add_item(page, b"e" * 8, 0, overwrite=False, is_heap=True) == 4
    set_flags(page, PD_HAS_FREE_LINES)
    assert page_add_item(page, b"f" * 8, 0, overwrite=False, is_heap=True) == 1
    assert page_add_item(page, b"g" * 8, 0, overwrite=False, is_heap=True) == 5
    assert not get_flags(page) & PD_HAS_FREE_LINES


@given(items_st, st.data())
def test_multi_delete_keeps_remaining_items(items: list[bytes], data: st.DataObject) -> None:
    page = filled(items)
    doomed = sorted(data.draw(st.sets(st.integers(1, len(items)), max_size=len(items))))
    page_index_multi_delete(page, doomed)
    kept = [item for i, item in enumerate(items, 1) if i not in doomed]
    assert all_items(page) == kept
    assert get_upper(page) == get_special(page) - sum(maxalign(len(i)) for i in kept)
    assert_compact(page)


def test_multi_delete_small_uses_retail_layout() -> None:
    """With <= 2 items the layout is that of PageIndexTupleDelete, not a fresh repack."""
    items = [bytes([65 + i]) * (8 * (i + 1)) for i in range(5)]
    retail = filled(items)
    page_index_multi_delete(retail, [2, 4])
    by_hand = filled(items)
    page_index_tuple_delete(by_hand, 4)
    page_index_tuple_delete(by_hand, 2)
    assert retail == by_hand
    bulk = filled(items)
    page_index_multi_delete(bulk, [2, 4, 5])
    assert all_items(bulk) == [items[0], items[2]]
    # Bulk repack puts item 1 right below pd_special; retail deletes keep the original order.
    assert get_item_id(bulk, 1)[0] == get_special(bulk) - 8


def test_multi_delete_rejects_bad_offsets() -> None:
    page = filled([b"x" * 8] * 4)
    with pytest.raises(PageError, match="incorrect index offsets"):
        page_index_multi_delete(page, [3, 2, 1])
    with pytest.raises(PageError, match="invalid index offnum"):
        page_index_tuple_delete(page, 9)


@given(items_st, st.data())
def test_tuple_delete_and_overwrite(items: list[bytes], data: st.DataObject) -> None:
    page = filled(items)
    at = data.draw(st.integers(1, len(items)))
    new = data.draw(st.binary(min_size=1, max_size=120))
    assert page_index_tuple_overwrite(page, at, new)
    expected = [*items[: at - 1], new, *items[at:]]
    assert all_items(page) == expected
    assert_compact(page)
    page_index_tuple_delete(page, at)
    assert all_items(page) == items[: at - 1] + items[at:]
    assert_compact(page)


def test_overwrite_too_big_returns_false() -> None:
    page = filled([b"x" * 4000, b"y" * 4000])
    assert not page_index_tuple_overwrite(page, 1, b"z" * 4200)


@given(items_st, st.data())
def test_delete_no_compact_keeps_numbering(items: list[bytes], data: st.DataObject) -> None:
    page = filled(items)
    at = data.draw(st.integers(1, len(items)))
    page_index_tuple_delete_no_compact(page, at)
    if at < len(items):
        assert max_offset(page) == len(items)
        assert get_item_id(page, at) == (0, LP_UNUSED, 0)
    else:
        assert max_offset(page) == len(items) - 1
    for i, item in enumerate(items, 1):
        if i != at and i <= max_offset(page):
            assert get_item(page, i) == item
    assert_compact(page)


lp_states = st.lists(
    st.tuples(st.sampled_from(["normal", "dead", "redirect", "unused"]), st.integers(1, 120)),
    min_size=1,
    max_size=60,
)


def heap_page(states: list[tuple[str, int]]) -> tuple[bytearray, dict[int, bytes]]:
    page = new_page(0)
    keep: dict[int, bytes] = {}
    for i, (_, size) in enumerate(states, 1):
        page_add_item(page, bytes([i % 251 + 1]) * size, 0, overwrite=False, is_heap=True)
    for i, (state, _) in enumerate(states, 1):
        if state == "normal":
            keep[i] = get_item(page, i)
        elif state == "dead":
            set_item_id(page, i, 0, LP_DEAD, 0)
        elif state == "redirect":
            set_item_id(page, i, 1, LP_REDIRECT, 0)
        else:
            set_item_id(page, i, 0, LP_UNUSED, 0)
    return page, keep


@given(lp_states)
def test_repair_fragmentation(states: list[tuple[str, int]]) -> None:
    page, keep = heap_page(states)
    page_repair_fragmentation(page)
    for off, item in keep.items():
        assert get_item(page, off) == item
        assert get_item_id(page, off)[1] == LP_NORMAL
    assert get_upper(page) == BLCKSZ - sum(maxalign(len(i)) for i in keep.values())
    assert_compact(page)
    # Items packed in line-pointer order downward from pd_special.
    offs = [get_item_id(page, o)[0] for o in sorted(keep)]
    assert offs == sorted(offs, reverse=True)
    last_used = max((i for i, (s, _) in enumerate(states, 1) if s != "unused"), default=0)
    assert max_offset(page) == last_used
    unused_left = any(s == "unused" for s, _ in states[:last_used])
    assert bool(get_flags(page) & PD_HAS_FREE_LINES) == unused_left


@given(lp_states)
def test_truncate_line_pointer_array(states: list[tuple[str, int]]) -> None:
    page, _ = heap_page(states)
    page_truncate_line_pointer_array(page)
    n = len(states)
    trailing = 0
    while trailing < n - 1 and states[n - 1 - trailing][0] == "unused":
        trailing += 1
    assert max_offset(page) == n - trailing
    remaining = states[: n - trailing]
    assert bool(get_flags(page) & PD_HAS_FREE_LINES) == any(s == "unused" for s, _ in remaining)


def test_heap_free_space_with_full_line_pointer_array() -> None:
    page = new_page(0)
    for _ in range(MAX_HEAP_TUPLES_PER_PAGE):
        page_add_item(page, b"", 0, overwrite=False, is_heap=True)
    assert page_get_free_space(page) > 0
    assert page_get_heap_free_space(page) == 0
    set_item_id(page, 5, 0, LP_UNUSED, 0)
    set_flags(page, PD_HAS_FREE_LINES)
    assert page_get_heap_free_space(page) == page_get_free_space(page)


@settings(max_examples=50)
@given(items_st)
def test_masks(items: list[bytes]) -> None:
    page = filled(items)
    page[get_lower(page) : get_upper(page)] = b"\xaa" * (get_upper(page) - get_lower(page))
    set_lsn(page, 12345)
    set_prune_xid(page, 77)
    set_flags(page, PD_ALL_VISIBLE | PD_PAGE_FULL | PD_HAS_FREE_LINES)
    set_item_id(page, 1, get_item_id(page, 1)[0], LP_DEAD, get_item_id(page, 1)[2])
    masks.mask_page_lsn_and_checksum(page)
    masks.mask_page_hint_bits(page)
    masks.mask_unused_space(page)
    masks.mask_lp_flags(page)
    assert get_lsn(page) == 0 and get_prune_xid(page) == 0 and get_flags(page) == 0
    assert not any(page[get_lower(page) : get_upper(page)])
    assert get_item_id(page, 1)[1] == LP_UNUSED
    assert all_items(page) == items
    masks.mask_page_content(page)
    assert not any(page[12:16]) and not any(page[24:])


def test_mask_unused_space_rejects_bad_pointers() -> None:
    page = new_page(0)
    page[12:14] = (9000).to_bytes(2, "little")
    with pytest.raises(PageError, match="invalid page"):
        masks.mask_unused_space(page)
