"""GIN redo (ginxlog.c) and gin_mask, over one block at a time.

GIN pages carry an 8-byte special area (rightlink, maxoff, flags). Entry-tree pages are
ordinary slotted pages of IndexTuples; posting-tree ("data") pages keep a right-bound item
pointer at the page contents and then either PostingItems (internal pages) or a run of
compressed posting-list segments (leaf pages), with pd_lower marking the end of the data.
Leaf changes are logged in the "disassembled" form: a list of per-segment actions.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pageserver.redo.amutil import (
    INVALID_BLOCK,
    U16,
    U32,
    block_ref,
    existing,
    get_block_id,
    image_required,
    index_tuple_size,
    index_tuples,
    main_struct,
    set_block_id,
    set_item_pointer,
    unknown,
)
from pageserver.redo.masks import (
    mask_page_content,
    mask_page_hint_bits,
    mask_page_lsn_and_checksum,
    mask_unused_space,
)
from pageserver.redo.page import (
    FIRST_OFFSET,
    SIZE_OF_PAGE_HEADER,
    PageError,
    get_lower,
    get_special,
    item_offset,
    max_offset,
    new_page,
    page_add_item,
    page_index_tuple_delete,
    set_lower,
    set_prune_xid,
)
from pg15.constants import BLCKSZ
from pg15.records import DecodedRecord

CREATE_PTREE = 0x10
INSERT = 0x20
SPLIT = 0x30
VACUUM_PAGE = 0x40
DELETE_PAGE = 0x50
UPDATE_META_PAGE = 0x60
INSERT_LISTPAGE = 0x70
DELETE_LISTPAGE = 0x80
VACUUM_DATA_LEAF_PAGE = 0x90

# GinPageOpaqueData.flags
GIN_DATA = 1 << 0
GIN_LEAF = 1 << 1
GIN_DELETED = 1 << 2
GIN_META = 1 << 3
GIN_LIST = 1 << 4
GIN_LIST_FULLROW = 1 << 5
GIN_INCOMPLETE_SPLIT = 1 << 6
GIN_COMPRESSED = 1 << 7

GIN_INSERT_ISDATA = 0x01
GIN_INSERT_ISLEAF = 0x02

SPECIAL_SIZE = 8
OPAQUE = struct.Struct("<IHH")  # rightlink, maxoff, flags
OFF_MAXOFF = 4
OFF_FLAGS = 6

# Posting-tree pages: right bound (MAXALIGN(6) = 8 bytes) at the contents, then the data.
DATA_START = SIZE_OF_PAGE_HEADER + 8
POSTING_ITEM_SIZE = 10  # BlockIdData child + ItemPointerData key
META_SIZE = 56  # sizeof(GinMetaPageData)

# Segment actions of ginxlogRecompressDataLeaf.
SEGMENT_DELETE = 1
SEGMENT_INSERT = 2
SEGMENT_REPLACE = 3
SEGMENT_ADDITEMS = 4

OFFSET_BITS = 11  # MaxHeapTuplesPerPageBits: item pointers pack as block << 11 | offset
_SEGMENT_HEAD = struct.Struct("<HHHH")  # first {bi_hi, bi_lo, posid}, nbytes

_DELETE_PAGE = struct.Struct("<HxxII")
_UPDATE_META_TAIL = struct.Struct("<IIi")  # prevTail, newRightlink, ntuples (after metadata)
_UPDATE_META_META = 16  # offset of metadata in ginxlogUpdateMeta (after the RelFileNode)
_INSERT_LIST = struct.Struct("<Ii")


@dataclass(frozen=True, slots=True)
class DeletePage:
    parent_offset: int
    right_link: int
    delete_xid: int


@dataclass(frozen=True, slots=True)
class UpdateMeta:
    metadata: bytes
    prev_tail: int
    new_rightlink: int
    ntuples: int


def _parse_update_meta(record: DecodedRecord) -> UpdateMeta:
    data = record.main_data
    tail = _UPDATE_META_META + META_SIZE
    if len(data) < tail + _UPDATE_META_TAIL.size:
        raise PageError(f"{record.type_name}: main data of {len(data)} bytes is too short")
    prev_tail, new_rightlink, ntuples = _UPDATE_META_TAIL.unpack_from(data, tail)
    return UpdateMeta(bytes(data[_UPDATE_META_META:tail]), prev_tail, new_rightlink, ntuples)


# ---------------------------------------------------------------------------------------------
# Pages


def init_page(flags: int) -> bytearray:
    """GinInitPage: an empty page with the given flags and no right sibling."""
    page = new_page(SPECIAL_SIZE)
    OPAQUE.pack_into(page, get_special(page), INVALID_BLOCK, 0, flags)
    return page


def init_metapage(metadata: bytes) -> bytearray:
    """GinInitMetabuffer followed by the logged GinMetaPageData (copied verbatim)."""
    page = init_page(GIN_META)
    page[SIZE_OF_PAGE_HEADER : SIZE_OF_PAGE_HEADER + META_SIZE] = metadata
    set_lower(page, SIZE_OF_PAGE_HEADER + META_SIZE)
    return page


def _flags(page: bytearray) -> int:
    return U16.unpack_from(page, get_special(page) + OFF_FLAGS)[0]


def _set_flags(page: bytearray, flags: int) -> None:
    U16.pack_into(page, get_special(page) + OFF_FLAGS, flags)


def _maxoff(page: bytearray) -> int:
    return U16.unpack_from(page, get_special(page) + OFF_MAXOFF)[0]


def _set_maxoff(page: bytearray, maxoff: int) -> None:
    U16.pack_into(page, get_special(page) + OFF_MAXOFF, maxoff)


def _set_rightlink(page: bytearray, blkno: int) -> None:
    U32.pack_into(page, get_special(page), blkno)


def _set_data_size(page: bytearray, size: int) -> None:
    """GinDataPageSetDataSize: pd_lower marks the end of the posting data."""
    set_lower(page, DATA_START + size)


# ---------------------------------------------------------------------------------------------
# Posting lists (ginpostinglist.c)


def decode_segment(buf: bytes | bytearray | memoryview, off: int = 0) -> tuple[list[int], int]:
    """ginPostingListDecode of one segment: (items as block << 11 | offset, segment size)."""
    hi, lo, posid, nbytes = _SEGMENT_HEAD.unpack_from(buf, off)
    val = (((hi << 16) | lo) << OFFSET_BITS) | posid
    items = [val]
    pos = off + 8
    end = pos + nbytes
    data = bytes(buf[pos:end])
    delta = 0
    shift = 0
    for byte in data:
        delta |= (byte & 0x7F) << shift
        if byte & 0x80:
            shift += 7
        else:
            val += delta
            items.append(val)
            delta = 0
            shift = 0
    return items, 8 + nbytes + (nbytes & 1)


def encode_segment(items: Sequence[int]) -> bytes:
    """ginCompressPostingList (maxsize BLCKSZ): first item plain, then varbyte deltas."""
    first = items[0]
    blk = first >> OFFSET_BITS
    out = bytearray()
    prev = first
    for val in items[1:]:
        delta = val - prev
        while delta > 0x7F:
            out.append(0x80 | (delta & 0x7F))
            delta >>= 7
        out.append(delta)
        prev = val
    nbytes = len(out)
    if nbytes > BLCKSZ - 8:
        raise PageError("GIN posting list does not fit in one segment")
    if nbytes & 1:
        out.append(0)
    head = _SEGMENT_HEAD.pack(blk >> 16, blk & 0xFFFF, first & ((1 << OFFSET_BITS) - 1), nbytes)
    return head + bytes(out)


def _item_pointers(buf: bytes | bytearray | memoryview, off: int, count: int) -> list[int]:
    """ItemPointerData[count] as block << 11 | offset values."""
    raw = struct.unpack_from(f"<{3 * count}H", buf, off)
    return [
        (((raw[i] << 16) | raw[i + 1]) << OFFSET_BITS) | raw[i + 2] for i in range(0, 3 * count, 3)
    ]


def _segments(page: bytearray) -> list[bytes]:
    """The compressed segments of a data leaf page, as stored."""
    end = get_lower(page)
    pos = DATA_START
    segs: list[bytes] = []
    while pos < end:
        nbytes = U16.unpack_from(page, pos + 6)[0]
        size = 8 + nbytes + (nbytes & 1)
        if pos + size > end:
            raise PageError("GIN posting-list segment runs past pd_lower")
        segs.append(bytes(page[pos : pos + size]))
        pos += size
    return segs


def recompress(page: bytearray, data: bytes | memoryview, start: int = 0) -> None:
    """ginRedoRecompress: apply a ginxlogRecompressDataLeaf action list to a data leaf page.

    Segments are addressed by their number in the page as it was; INSERT puts a new segment
    before that one, DELETE drops it, REPLACE swaps it, ADDITEMS merges new items into it.
    """
    if not _flags(page) & GIN_COMPRESSED:
        _convert_uncompressed(page)
    old = _segments(page)
    view = memoryview(data)
    nactions = U16.unpack_from(view, start)[0]
    pos = start + 2
    out: list[bytes] = []
    segno = 0
    for _ in range(nactions):
        a_segno = view[pos]
        action = view[pos + 1]
        pos += 2
        newseg = b""
        if action in (SEGMENT_INSERT, SEGMENT_REPLACE):
            nbytes = U16.unpack_from(view, pos + 6)[0]
            size = 8 + nbytes + (nbytes & 1)
            newseg = bytes(view[pos : pos + size])
            pos += size
        elif action == SEGMENT_ADDITEMS:
            nitems = U16.unpack_from(view, pos)[0]
            added = _item_pointers(view, pos + 2, nitems)
            pos += 2 + 6 * nitems
        if a_segno < segno or a_segno > len(old):
            raise PageError(f"GIN leaf action on segment {a_segno} is out of order")
        out.extend(old[segno:a_segno])
        segno = a_segno
        if action == SEGMENT_ADDITEMS:
            if segno >= len(old):
                raise PageError(f"GIN ADDITEMS on missing segment {segno}")
            olditems, _ = decode_segment(old[segno])
            newseg = encode_segment(sorted(set(olditems).union(added)))
            action = SEGMENT_REPLACE
        if action == SEGMENT_DELETE:
            segno += 1
        elif action == SEGMENT_INSERT:
            out.append(newseg)
        elif action == SEGMENT_REPLACE:
            out.append(newseg)
            segno += 1
        else:
            raise PageError(f"unexpected GIN leaf action: {action}")
    out.extend(old[segno:])
    body = b"".join(out)
    if DATA_START + len(body) > get_special(page):
        raise PageError("GIN leaf data does not fit in the page")
    page[DATA_START : DATA_START + len(body)] = body
    _set_data_size(page, len(body))


def _convert_uncompressed(page: bytearray) -> None:
    """Pre-9.4 leaf pages hold plain ItemPointers; they are compressed before any change."""
    count = _maxoff(page)
    size = 0
    if count:
        seg = encode_segment(_item_pointers(page, DATA_START, count))
        page[DATA_START : DATA_START + len(seg)] = seg
        size = len(seg)
    _set_data_size(page, size)
    _set_flags(page, _flags(page) | GIN_COMPRESSED)
    _set_maxoff(page, 0)


# ---------------------------------------------------------------------------------------------
# Redo


def apply(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """Redo `record` on its block `block_id`; `page` is the block's previous version."""
    op = record.rmgr_info
    if op == CREATE_PTREE:
        (size,) = main_struct(U32, record)
        fresh = init_page(GIN_DATA | GIN_LEAF | GIN_COMPRESSED)
        fresh[DATA_START : DATA_START + size] = record.main_data[4 : 4 + size]
        _set_data_size(fresh, size)
        return fresh
    if op == INSERT:
        return _insert(record, block_id, existing(page, record, block_id))
    if op == SPLIT:
        if block_id == 3:
            return _clear_incomplete_split(existing(page, record, block_id), record)
        raise image_required(record, block_id)
    if op == VACUUM_PAGE:
        raise image_required(record, block_id)
    if op == VACUUM_DATA_LEAF_PAGE:
        page = existing(page, record, block_id)
        recompress(page, block_ref(record, block_id).data)
        return page
    if op == DELETE_PAGE:
        xl = DeletePage(*main_struct(_DELETE_PAGE, record))
        page = existing(page, record, block_id)
        if block_id == 2:
            _set_rightlink(page, xl.right_link)
        elif block_id == 0:
            _set_flags(page, _flags(page) | GIN_DELETED)
            set_prune_xid(page, xl.delete_xid)  # GinPageSetDeleteXid
        else:
            _delete_posting_item(page, xl.parent_offset)
        return page
    if op == UPDATE_META_PAGE:
        return _update_meta(record, block_id, page)
    if op == INSERT_LISTPAGE:
        rightlink, ntuples = main_struct(_INSERT_LIST, record)
        fresh = init_page(GIN_LIST)
        _set_rightlink(fresh, rightlink)
        if rightlink == INVALID_BLOCK:
            _set_flags(fresh, _flags(fresh) | GIN_LIST_FULLROW)
            _set_maxoff(fresh, 1)
        _add_tuples(fresh, block_ref(record, block_id).data, ntuples, FIRST_OFFSET)
        return fresh
    if op == DELETE_LISTPAGE:
        if block_id == 0:
            return init_metapage(record.main_data[:META_SIZE])
        return init_page(GIN_DELETED)
    raise unknown(record)


def _clear_incomplete_split(page: bytearray, record: DecodedRecord) -> bytearray:
    _set_flags(page, _flags(page) & ~GIN_INCOMPLETE_SPLIT)
    return page


def _insert(record: DecodedRecord, block_id: int, page: bytearray) -> bytearray:
    """Block 0 gets the insertion; block 1 (non-leaf inserts) is the child whose split ends."""
    main = record.main_data
    (flags,) = main_struct(U16, record)
    if block_id == 1:
        return _clear_incomplete_split(page, record)
    is_leaf = bool(flags & GIN_INSERT_ISLEAF)
    right_child = INVALID_BLOCK if is_leaf else get_block_id(main, 6)
    payload = block_ref(record, 0).data
    if flags & GIN_INSERT_ISDATA:
        if is_leaf:
            recompress(page, payload)
        else:
            offset = U16.unpack_from(payload, 0)[0]
            # Point the old downlink at the new right half, then add the new item before it.
            set_block_id(page, _posting_item_pos(offset), right_child)
            _add_posting_item(page, payload[2 : 2 + POSTING_ITEM_SIZE], offset)
    else:
        offset = U16.unpack_from(payload, 0)[0]
        is_delete = payload[2] != 0
        if right_child != INVALID_BLOCK:
            set_item_pointer(page, item_offset(page, offset), right_child, 0)  # GinSetDownlink
        if is_delete:
            page_index_tuple_delete(page, offset)
        tuple_size = index_tuple_size(payload, 4)
        page_add_item(page, payload[4 : 4 + tuple_size], offset, overwrite=False, is_heap=False)
    return page


def _posting_item_pos(offset: int) -> int:
    return DATA_START + (offset - 1) * POSTING_ITEM_SIZE


def _add_posting_item(page: bytearray, item: bytes, offset: int) -> None:
    """GinDataPageAddPostingItem: insert at `offset` (0 = append), shifting later items."""
    maxoff = _maxoff(page)
    if offset == 0:
        offset = maxoff + 1
    pos = _posting_item_pos(offset)
    end = _posting_item_pos(maxoff + 1)
    if offset != maxoff + 1:
        page[pos + POSTING_ITEM_SIZE : end + POSTING_ITEM_SIZE] = page[pos:end]
    page[pos : pos + POSTING_ITEM_SIZE] = item
    _set_maxoff(page, maxoff + 1)
    _set_data_size(page, (maxoff + 1) * POSTING_ITEM_SIZE)


def _delete_posting_item(page: bytearray, offset: int) -> None:
    """GinPageDeletePostingItem: close the gap left by item `offset`."""
    maxoff = _maxoff(page)
    if not FIRST_OFFSET <= offset <= maxoff:
        raise PageError(f"GIN posting item {offset} does not exist (page has {maxoff})")
    if offset != maxoff:
        pos = _posting_item_pos(offset)
        end = _posting_item_pos(maxoff + 1)
        page[pos : end - POSTING_ITEM_SIZE] = page[pos + POSTING_ITEM_SIZE : end]
    _set_maxoff(page, maxoff - 1)
    _set_data_size(page, (maxoff - 1) * POSTING_ITEM_SIZE)


def _add_tuples(page: bytearray, data: bytes, ntuples: int, offnum: int) -> None:
    """Pending-list tuples, packed unaligned, go to consecutive offsets from `offnum`."""
    count = 0
    for tup in index_tuples(data):
        page_add_item(page, tup, offnum, overwrite=False, is_heap=False)
        offnum += 1
        count += 1
    if count != ntuples:
        raise PageError(f"GIN list payload has {count} tuples, the record says {ntuples}")


def _update_meta(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """Block 0: the metapage, rewritten whole; block 1: the pending list's tail page."""
    xl = _parse_update_meta(record)
    if block_id == 0:
        return init_metapage(xl.metadata)
    page = existing(page, record, block_id)
    if xl.ntuples > 0:
        start = FIRST_OFFSET if get_lower(page) <= SIZE_OF_PAGE_HEADER else max_offset(page) + 1
        _add_tuples(page, block_ref(record, block_id).data, xl.ntuples, start)
        _set_maxoff(page, _maxoff(page) + 1)
    elif xl.prev_tail != INVALID_BLOCK:
        _set_rightlink(page, xl.new_rightlink)
    return page


def mask(page: bytearray) -> None:
    """gin_mask: deleted pages entirely; otherwise the hole, if pd_lower looks set."""
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    if _flags(page) & GIN_DELETED:
        mask_page_content(page)
    elif get_lower(page) > SIZE_OF_PAGE_HEADER:
        mask_unused_space(page)
