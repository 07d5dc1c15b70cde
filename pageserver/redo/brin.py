"""BRIN redo (brin_xlog.c) and brin_mask, over one block at a time.

A BRIN index is a metapage, revmap pages (an array of item pointers, one per heap range,
pointing at the summary tuple) and regular pages of summary tuples. Every page ends with an
8-byte special area whose last two uint16 are the flags and the page type.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pageserver.redo.amutil import (
    INVALID_BLOCK,
    U16,
    block_number,
    block_ref,
    existing,
    main_struct,
    set_item_pointer,
    unknown,
)
from pageserver.redo.masks import (
    mask_page_hint_bits,
    mask_page_lsn_and_checksum,
    mask_unused_space,
)
from pageserver.redo.page import (
    SIZE_OF_PAGE_HEADER,
    PageError,
    get_lower,
    get_special,
    max_offset,
    new_page,
    page_add_item,
    page_index_tuple_delete_no_compact,
    page_index_tuple_overwrite,
    set_lower,
)
from pg15.records import DecodedRecord

CREATE_INDEX = 0x00
INSERT = 0x10
UPDATE = 0x20
SAMEPAGE_UPDATE = 0x30
REVMAP_EXTEND = 0x40
DESUMMARIZE = 0x50
OPMASK = 0x70
INIT_PAGE = 0x80

PAGETYPE_META = 0xF091
PAGETYPE_REVMAP = 0xF092
PAGETYPE_REGULAR = 0xF093
EVACUATE_PAGE = 1 << 0

SPECIAL_SIZE = 8
OFF_FLAGS = 4  # within the special area: vector[2]
OFF_TYPE = 6  # vector[3]
BRIN_META_MAGIC = 0xA8109CFA
META = struct.Struct("<IIII")  # magic, version, pagesPerRange, lastRevmapPage
META_LAST_REVMAP = SIZE_OF_PAGE_HEADER + 12
REVMAP_PAGE_MAXITEMS = (8192 - SIZE_OF_PAGE_HEADER - SPECIAL_SIZE) // 6

_CREATE = struct.Struct("<IH")
_INSERT = struct.Struct("<IIH")  # heapBlk, pagesPerRange, offnum
_UPDATE = struct.Struct("<HxxIIH")  # oldOffnum, then xl_brin_insert
_SAMEPAGE = struct.Struct("<H")
_REVMAP_EXTEND = struct.Struct("<I")
_DESUMMARIZE = struct.Struct("<IIH")  # pagesPerRange, heapBlk, regOffset


@dataclass(frozen=True, slots=True)
class Insert:
    heap_blk: int
    pages_per_range: int
    offnum: int


def init_page(page_type: int) -> bytearray:
    """brin_page_init: an empty page tagged with its type."""
    page = new_page(SPECIAL_SIZE)
    U16.pack_into(page, get_special(page) + OFF_TYPE, page_type)
    return page


def init_metapage(pages_per_range: int, version: int) -> bytearray:
    """brin_metapage_init: lastRevmapPage starts at 0 (the metapage itself)."""
    page = init_page(PAGETYPE_META)
    META.pack_into(page, SIZE_OF_PAGE_HEADER, BRIN_META_MAGIC, version, pages_per_range, 0)
    set_lower(page, SIZE_OF_PAGE_HEADER + META.size)
    return page


def page_type(page: bytearray) -> int:
    return U16.unpack_from(page, get_special(page) + OFF_TYPE)[0]


def set_revmap_entry(
    page: bytearray, pages_per_range: int, heap_blk: int, blkno: int, offnum: int
) -> None:
    """brinSetHeapBlockItemptr: the revmap slot of the range holding `heap_blk`."""
    index = (heap_blk // pages_per_range) % REVMAP_PAGE_MAXITEMS
    set_item_pointer(page, SIZE_OF_PAGE_HEADER + 6 * index, blkno, offnum)


def apply(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """Redo `record` on its block `block_id`; `page` is the block's previous version."""
    op = record.rmgr_info & OPMASK
    if op == CREATE_INDEX:
        pages_per_range, version = main_struct(_CREATE, record)
        return init_metapage(pages_per_range, version)
    if op == INSERT:
        return _insert_update(record, block_id, page, Insert(*main_struct(_INSERT, record)))
    if op == UPDATE:
        old_offnum, *insert = main_struct(_UPDATE, record)
        if block_id == 2:
            page = existing(page, record, block_id)
            page_index_tuple_delete_no_compact(page, old_offnum)
            return page
        return _insert_update(record, block_id, page, Insert(*insert))
    if op == SAMEPAGE_UPDATE:
        (offnum,) = main_struct(_SAMEPAGE, record)
        page = existing(page, record, block_id)
        if not page_index_tuple_overwrite(page, offnum, block_ref(record, block_id).data):
            raise PageError("brin_xlog_samepage_update: failed to replace tuple")
        return page
    if op == REVMAP_EXTEND:
        (target,) = main_struct(_REVMAP_EXTEND, record)
        if block_id == 1:
            return init_page(PAGETYPE_REVMAP)
        page = existing(page, record, block_id)
        struct.pack_into("<I", page, META_LAST_REVMAP, target)
        set_lower(page, SIZE_OF_PAGE_HEADER + META.size)
        return page
    if op == DESUMMARIZE:
        pages_per_range, heap_blk, reg_offset = main_struct(_DESUMMARIZE, record)
        page = existing(page, record, block_id)
        if block_id == 0:
            set_revmap_entry(page, pages_per_range, heap_blk, INVALID_BLOCK, 0)
        else:
            page_index_tuple_delete_no_compact(page, reg_offset)
        return page
    raise unknown(record)


def _insert_update(
    record: DecodedRecord, block_id: int, page: bytearray | None, xl: Insert
) -> bytearray:
    """Block 0: the regular page taking the tuple; block 1: the revmap page pointing at it."""
    if block_id == 1:
        page = existing(page, record, block_id)
        set_revmap_entry(page, xl.pages_per_range, xl.heap_blk, block_number(record, 0), xl.offnum)
        return page
    if record.rmgr_info & INIT_PAGE:
        page = init_page(PAGETYPE_REGULAR)
    else:
        page = existing(page, record, block_id)
    if max_offset(page) + 1 < xl.offnum:
        raise PageError("brin_xlog_insert_update: invalid max offset number")
    page_add_item(page, block_ref(record, 0).data, xl.offnum, overwrite=True, is_heap=False)
    return page


def mask(page: bytearray) -> None:
    """brin_mask: the hole of regular pages (and of metapages with pd_lower set), EVACUATE."""
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    kind = page_type(page)
    if kind == PAGETYPE_REGULAR or (
        kind == PAGETYPE_META and get_lower(page) > SIZE_OF_PAGE_HEADER
    ):
        mask_unused_space(page)
    pos = get_special(page) + OFF_FLAGS
    U16.pack_into(page, pos, U16.unpack_from(page, pos)[0] & ~EVACUATE_PAGE)
