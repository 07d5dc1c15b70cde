"""GiST redo (gistxlog.c) and gist_mask, over one block at a time.

GiST pages are slotted pages of IndexTuples with a 16-byte special area: the NSN (an LSN
recording the last split), the right link, flags and the page id.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pageserver.redo.amutil import (
    INVALID_BLOCK,
    U16,
    U32,
    block_number,
    block_ref,
    existing,
    index_tuple_size,
    index_tuples,
    main_struct,
    offsets,
    unknown,
)
from pageserver.redo.masks import (
    mask_lp_flags,
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
    max_offset,
    new_page,
    page_add_item,
    page_index_multi_delete,
    page_index_tuple_delete,
    page_index_tuple_overwrite,
    set_lower,
)
from pg15.records import DecodedRecord

PAGE_UPDATE = 0x00
DELETE = 0x10
PAGE_REUSE = 0x20
PAGE_SPLIT = 0x30
PAGE_DELETE = 0x60
ASSIGN_LSN = 0x70

F_LEAF = 1 << 0
F_DELETED = 1 << 1
F_TUPLES_DELETED = 1 << 2
F_FOLLOW_RIGHT = 1 << 3
F_HAS_GARBAGE = 1 << 4
GIST_PAGE_ID = 0xFF81
GIST_ROOT_BLKNO = 0

SPECIAL_SIZE = 16
# GISTPageOpaqueData: nsn {xlogid, xrecoff}, rightlink, flags, page id.
OPAQUE = struct.Struct("<IIIHH")
OFF_RIGHTLINK = 8
OFF_FLAGS = 12
_NSN = struct.Struct("<II")
_U64 = struct.Struct("<Q")

_PAGE_UPDATE = struct.Struct("<HH")
_DELETE = struct.Struct("<IH")
_PAGE_DELETE = struct.Struct("<QH")


@dataclass(frozen=True, slots=True)
class PageSplit:
    origrlink: int
    orignsn: int
    origleaf: bool
    npage: int
    markfollowright: bool


def _parse_split(record: DecodedRecord) -> PageSplit:
    data = record.main_data
    if len(data) < 21:
        raise PageError(f"{record.type_name}: main data of {len(data)} bytes is too short")
    origrlink, orignsn = struct.unpack_from("<IxxxxQ", data, 0)
    origleaf, npage, follow = struct.unpack_from("<?xH?", data, 16)
    return PageSplit(origrlink, orignsn, origleaf, npage, follow)


def _flags(page: bytearray) -> int:
    return U16.unpack_from(page, get_special(page) + OFF_FLAGS)[0]


def _set_flags(page: bytearray, flags: int) -> None:
    U16.pack_into(page, get_special(page) + OFF_FLAGS, flags)


def _set_nsn(page: bytearray, nsn: int) -> None:
    _NSN.pack_into(page, get_special(page), nsn >> 32, nsn & 0xFFFFFFFF)


def init_page(flags: int) -> bytearray:
    """gistinitpage: empty page, no right sibling, NSN 0."""
    page = new_page(SPECIAL_SIZE)
    OPAQUE.pack_into(page, get_special(page), 0, 0, INVALID_BLOCK, flags, GIST_PAGE_ID)
    return page


def _next_offset(page: bytearray) -> int:
    """Where gistfillbuffer appends: 1 on an empty page, else after the last item."""
    return FIRST_OFFSET if get_lower(page) <= SIZE_OF_PAGE_HEADER else max_offset(page) + 1


def _fill(page: bytearray, data: bytes | memoryview, start: int) -> int:
    off = _next_offset(page)
    count = 0
    for tup in index_tuples(data, start):
        page_add_item(page, tup, off, overwrite=False, is_heap=False)
        off += 1
        count += 1
    return count


def redo_over_image(record: DecodedRecord, block_id: int) -> bool:
    """gistRedoClearFollowRight also runs on a restored full-page image: the NSN it sets is
    the record's own end LSN, which no image taken before the insert can contain."""
    op = record.rmgr_info
    return (op == PAGE_UPDATE and block_id == 1) or (op == PAGE_SPLIT and block_id == 0)


def apply(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """Redo `record` on its block `block_id`; `page` is the block's previous version."""
    op = record.rmgr_info
    if redo_over_image(record, block_id):
        # The left child of a finished split gets the split's NSN and loses FOLLOW_RIGHT.
        page = existing(page, record, block_id)
        _set_nsn(page, record.end_lsn)
        _set_flags(page, _flags(page) & ~F_FOLLOW_RIGHT)
        return page
    if op == PAGE_UPDATE:
        return _page_update(record, existing(page, record, block_id))
    if op == DELETE:
        page = existing(page, record, block_id)
        _, ntodelete = main_struct(_DELETE, record)
        if len(record.main_data) > _DELETE.size:
            page_index_multi_delete(page, offsets(record.main_data, _DELETE.size, ntodelete))
        # PostgreSQL's redo also sets F_TUPLES_DELETED here, but the primary (gistprunepage)
        # never does, and wal_consistency_checking compares against the primary's page (the
        # flag is an unused hint): follow the primary so the pages we rebuild are its pages.
        _set_flags(page, _flags(page) & ~F_HAS_GARBAGE)
        return page
    if op == PAGE_SPLIT:
        return _page_split(record, block_id)
    if op == PAGE_DELETE:
        delete_xid, downlink_offset = main_struct(_PAGE_DELETE, record)
        page = existing(page, record, block_id)
        if block_id == 0:
            # GistPageSetDeleted: the FullTransactionId goes to the page contents.
            _set_flags(page, _flags(page) | F_DELETED)
            set_lower(page, SIZE_OF_PAGE_HEADER + 8)
            _U64.pack_into(page, SIZE_OF_PAGE_HEADER, delete_xid)
        else:
            page_index_tuple_delete(page, downlink_offset)
        return page
    if op in (PAGE_REUSE, ASSIGN_LSN):
        raise PageError(f"{record.type_name} references no blocks")
    raise unknown(record)


def _page_update(record: DecodedRecord, page: bytearray) -> bytearray:
    ntodelete, ntoinsert = main_struct(_PAGE_UPDATE, record)
    data = block_ref(record, 0).data
    if ntodelete == 1 and ntoinsert == 1:
        # One-for-one replacement keeps the tuple's slot (PageIndexTupleOverwrite).
        offnum = U16.unpack_from(data, 0)[0]
        tup = data[2 : 2 + index_tuple_size(data, 2)]
        if not page_index_tuple_overwrite(page, offnum, tup):
            raise PageError(f"failed to add item to GiST index page, size {len(tup)} bytes")
        return page
    pos = 0
    if ntodelete > 0:
        page_index_multi_delete(page, offsets(data, 0, ntodelete))
        pos = 2 * ntodelete
        if _flags(page) & F_LEAF:
            _set_flags(page, _flags(page) | F_TUPLES_DELETED)
    inserted = _fill(page, data, pos)
    if inserted != ntoinsert:
        raise PageError(f"GiST update carries {inserted} tuples, the record says {ntoinsert}")
    return page


def _page_split(record: DecodedRecord, block_id: int) -> bytearray:
    """Blocks 1..npage are the split halves, rebuilt from scratch, left to right."""
    xl = _parse_split(record)
    i = block_id - 1
    blkno = block_number(record, block_id)
    is_root_split = block_number(record, 1) == GIST_ROOT_BLKNO
    page = init_page(F_LEAF if xl.origleaf and blkno != GIST_ROOT_BLKNO else 0)
    data = block_ref(record, block_id).data
    (num,) = U32.unpack_from(data, 0)
    if _fill(page, data, 4) != num:
        raise PageError("GiST split page payload does not match its tuple count")
    flags = _flags(page)
    if blkno == GIST_ROOT_BLKNO:
        U32.pack_into(page, get_special(page) + OFF_RIGHTLINK, INVALID_BLOCK)
        flags &= ~F_FOLLOW_RIGHT
    else:
        last = i == xl.npage - 1
        rightlink = xl.origrlink if last else block_number(record, block_id + 1)
        U32.pack_into(page, get_special(page) + OFF_RIGHTLINK, rightlink)
        if not last and not is_root_split and xl.markfollowright:
            flags |= F_FOLLOW_RIGHT
        else:
            flags &= ~F_FOLLOW_RIGHT
    _set_nsn(page, xl.orignsn)
    _set_flags(page, flags)
    return page


def mask(page: bytearray) -> None:
    """gist_mask: NSN, FOLLOW_RIGHT (set after logging), leaf LP flags, HAS_GARBAGE."""
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    mask_unused_space(page)
    _set_nsn(page, 0)
    flags = _flags(page) | F_FOLLOW_RIGHT
    if flags & F_LEAF:
        mask_lp_flags(page)
    _set_flags(page, flags & ~F_HAS_GARBAGE)
