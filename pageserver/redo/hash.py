"""Hash index redo (hash_xlog.c) and hash_mask, over one block at a time.

A hash index is a metapage (block 0), bucket pages, overflow pages chained from them and
bitmap pages tracking free overflow pages. Every page has a 16-byte special area
(HashPageOpaqueData); the metapage and bitmap pages keep their data right after the header.
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
    has_block,
    image_required,
    index_tuple_size,
    main_struct,
    offsets,
    unknown,
)
from pageserver.redo.masks import (
    mask_lp_flags,
    mask_page_content,
    mask_page_hint_bits,
    mask_page_lsn_and_checksum,
    mask_unused_space,
)
from pageserver.redo.page import (
    SIZE_OF_PAGE_HEADER,
    PageError,
    get_special,
    maxalign,
    new_page,
    page_add_item,
    page_index_multi_delete,
    page_init,
    set_lower,
)
from pg15.constants import BLCKSZ
from pg15.records import DecodedRecord

INIT_META_PAGE = 0x00
INIT_BITMAP_PAGE = 0x10
INSERT = 0x20
ADD_OVFL_PAGE = 0x30
SPLIT_ALLOCATE_PAGE = 0x40
SPLIT_PAGE = 0x50
SPLIT_COMPLETE = 0x60
MOVE_PAGE_CONTENTS = 0x70
SQUEEZE_PAGE = 0x80
DELETE = 0x90
SPLIT_CLEANUP = 0xA0
UPDATE_META_PAGE = 0xB0
VACUUM_ONE_PAGE = 0xC0

# hasho_flag bits
LH_UNUSED_PAGE = 0
LH_OVERFLOW_PAGE = 1 << 0
LH_BUCKET_PAGE = 1 << 1
LH_BITMAP_PAGE = 1 << 2
LH_META_PAGE = 1 << 3
LH_BUCKET_NEEDS_SPLIT_CLEANUP = 1 << 6
LH_PAGE_HAS_DEAD_TUPLES = 1 << 7
LH_PAGE_TYPE = LH_OVERFLOW_PAGE | LH_BUCKET_PAGE | LH_BITMAP_PAGE | LH_META_PAGE
HASHO_PAGE_ID = 0xFF80
INVALID_BUCKET = 0xFFFFFFFF

SPECIAL_SIZE = 16
# HashPageOpaqueData: prevblkno, nextblkno, bucket, flag, page_id.
OPAQUE = struct.Struct("<IIIHH")
OFF_PREV = 0
OFF_NEXT = 4
OFF_FLAG = 12

HASH_MAGIC = 0x6440640
HASH_VERSION = 4
HASH_MAX_SPLITPOINTS = (32 - 10) * 4 + 10
HASH_MAX_BITMAPS = 1024
SPLITPOINT_GROUPS_WITH_ONE_PHASE = 10
SPLITPOINT_PHASE_BITS = 2

# HashMetaPageData at the page contents (offset 24): the fields up to hashm_procid.
META = SIZE_OF_PAGE_HEADER
META_HEAD = struct.Struct("<IIdHHHHIIIIIII")
M_NTUPLES = META + 8
M_MAXBUCKET = META + 24
M_HIGHMASK = META + 28
M_LOWMASK = META + 32
M_OVFLPOINT = META + 36
M_FIRSTFREE = META + 40
M_NMAPS = META + 44
M_SPARES = META + 52
M_MAPP = M_SPARES + 4 * HASH_MAX_SPLITPOINTS
# sizeof(HashMetaPageData): the fields end at M_MAPP + 4096, padded to the double alignment.
META_END = META + maxalign(M_MAPP - META + 4 * HASH_MAX_BITMAPS)
BITMAP = SIZE_OF_PAGE_HEADER  # HashPageGetBitmap: the uint32 array at the page contents
_DOUBLE = struct.Struct("<d")

# Main-data structs of hash_xlog.h (C layouts, padding included).
_INIT_META = struct.Struct("<dIH")
_ADD_OVFL = struct.Struct("<H?")
_SPLIT_ALLOC = struct.Struct("<IHHB")
_SPLIT_COMPLETE = struct.Struct("<HH")
_MOVE = struct.Struct("<H?")
_SQUEEZE = struct.Struct("<IIH??")
_DELETE = struct.Struct("<??")
_VACUUM_ONE = struct.Struct("<Ii")
XLH_SPLIT_META_UPDATE_MASKS = 1 << 0
XLH_SPLIT_META_UPDATE_SPLITPOINT = 1 << 1


@dataclass(frozen=True, slots=True)
class InitMeta:
    num_tuples: float
    procid: int
    ffactor: int


@dataclass(frozen=True, slots=True)
class SplitAllocate:
    new_bucket: int
    old_bucket_flag: int
    new_bucket_flag: int
    flags: int


@dataclass(frozen=True, slots=True)
class Squeeze:
    prevblkno: int
    nextblkno: int
    ntups: int
    is_prim_bucket_same_wrt: bool
    is_prev_bucket_same_wrt: bool


# ---------------------------------------------------------------------------------------------
# Page initialisation (hashpage.c, hashovfl.c)


def _set_opaque(page: bytearray, prev: int, nxt: int, bucket: int, flag: int) -> None:
    OPAQUE.pack_into(page, get_special(page), prev, nxt, bucket, flag, HASHO_PAGE_ID)


def _opaque_flag(page: bytearray) -> int:
    return U16.unpack_from(page, get_special(page) + OFF_FLAG)[0]


def _set_opaque_flag(page: bytearray, flag: int) -> None:
    U16.pack_into(page, get_special(page) + OFF_FLAG, flag)


def _set_opaque_u32(page: bytearray, field: int, value: int) -> None:
    U32.pack_into(page, get_special(page) + field, value)


def _ceil_log2(n: int) -> int:
    return 0 if n <= 1 else (n - 1).bit_length()


def spare_index(num_bucket: int) -> int:
    """_hash_spareindex: the splitpoint phase that holds bucket count `num_bucket`."""
    group = _ceil_log2(num_bucket)
    if group < SPLITPOINT_GROUPS_WITH_ONE_PHASE:
        return group
    phases = SPLITPOINT_GROUPS_WITH_ONE_PHASE
    phases += (group - SPLITPOINT_GROUPS_WITH_ONE_PHASE) << SPLITPOINT_PHASE_BITS
    phases += ((num_bucket - 1) >> (group - (SPLITPOINT_PHASE_BITS + 1))) & 3
    return phases


def total_buckets(phase: int) -> int:
    """_hash_get_totalbuckets: buckets allocated once splitpoint `phase` is complete."""
    if phase < SPLITPOINT_GROUPS_WITH_ONE_PHASE:
        return 1 << phase
    group = SPLITPOINT_GROUPS_WITH_ONE_PHASE + (
        (phase - SPLITPOINT_GROUPS_WITH_ONE_PHASE) >> SPLITPOINT_PHASE_BITS
    )
    within = ((phase - SPLITPOINT_GROUPS_WITH_ONE_PHASE) & 3) + 1
    return (1 << (group - 1)) + ((1 << (group - 1)) >> SPLITPOINT_PHASE_BITS) * within


def init_metapage(num_tuples: float, procid: int, ffactor: int) -> bytearray:
    """_hash_init_metabuffer on a fresh page."""
    dnumbuckets = num_tuples / ffactor
    if dnumbuckets <= 2.0:
        num_buckets = 2
    elif dnumbuckets >= float(0x40000000):
        num_buckets = 0x40000000
    else:
        num_buckets = total_buckets(spare_index(int(dnumbuckets)))
    spare = spare_index(num_buckets)
    page = new_page(SPECIAL_SIZE)
    _set_opaque(page, INVALID_BLOCK, INVALID_BLOCK, INVALID_BUCKET, LH_META_PAGE)
    bsize = get_special(page) - SIZE_OF_PAGE_HEADER  # HashGetMaxBitmapSize
    lshift = bsize.bit_length() - 1
    highmask = (1 << num_buckets.bit_length()) - 1  # pg_nextpower2_32(n + 1) - 1
    META_HEAD.pack_into(
        page,
        META,
        HASH_MAGIC,
        HASH_VERSION,
        0.0,
        ffactor,
        bsize,
        1 << lshift,
        lshift + 3,
        num_buckets - 1,
        highmask,
        highmask >> 1,
        spare,
        0,
        0,
        procid,
    )
    U32.pack_into(page, M_SPARES + 4 * spare, 1)
    set_lower(page, META_END)
    return page


def init_bitmap_page(bmsize: int) -> bytearray:
    """_hash_initbitmapbuffer: all overflow pages it covers start out "in use" (bits set)."""
    page = new_page(SPECIAL_SIZE)
    _set_opaque(page, INVALID_BLOCK, INVALID_BLOCK, INVALID_BUCKET, LH_BITMAP_PAGE)
    page[BITMAP : BITMAP + bmsize] = b"\xff" * bmsize
    set_lower(page, BITMAP + bmsize)
    return page


def init_bucket_page(prev: int, bucket: int, flag: int) -> bytearray:
    """_hash_initbuf (hasho_prevblkno carries hashm_maxbucket for primary bucket pages)."""
    page = new_page(SPECIAL_SIZE)
    _set_opaque(page, prev, INVALID_BLOCK, bucket, flag)
    return page


# ---------------------------------------------------------------------------------------------
# Helpers over record payloads


def _add_tuples(page: bytearray, data: bytes, ntups: int) -> None:
    """MOVE_PAGE_CONTENTS / SQUEEZE_PAGE: target offsets, then MAXALIGNed index tuples."""
    if ntups == 0:
        return
    targets = offsets(data, 0, ntups)
    pos = 2 * ntups
    view = memoryview(data)
    for target in targets:
        size = maxalign(index_tuple_size(view, pos))
        page_add_item(page, view[pos : pos + size], target, overwrite=False, is_heap=False)
        pos += size
    if pos != len(data):
        raise PageError("hash: tuple payload does not match the number of target offsets")


def _delete_listed(page: bytearray, data: bytes) -> None:
    """PageIndexMultiDelete of the OffsetNumber array that forms the block data."""
    if data:
        page_index_multi_delete(page, offsets(data, 0, len(data) // 2))


def _set_bit(page: bytearray, bit: int, value: bool) -> None:
    pos = BITMAP + 4 * (bit >> 5)
    word = U32.unpack_from(page, pos)[0]
    mask = 1 << (bit & 31)
    U32.pack_into(page, pos, word | mask if value else word & ~mask)


def _meta_u32(page: bytearray, off: int) -> int:
    return U32.unpack_from(page, off)[0]


# ---------------------------------------------------------------------------------------------
# Redo


def apply(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """Redo `record` on its block `block_id`; `page` is the block's previous version."""
    op = record.rmgr_info
    ref = block_ref(record, block_id)
    if op == INIT_META_PAGE:
        xl = InitMeta(*main_struct(_INIT_META, record))
        return init_metapage(xl.num_tuples, xl.procid, xl.ffactor)
    if op == INIT_BITMAP_PAGE:
        (bmsize,) = main_struct(U16, record)
        if block_id == 0:
            return init_bitmap_page(bmsize)
        page = existing(page, record, block_id)
        nmaps = _meta_u32(page, M_NMAPS)
        U32.pack_into(page, M_MAPP + 4 * nmaps, _meta_u32(page, M_MAXBUCKET) + 2)
        U32.pack_into(page, M_NMAPS, nmaps + 1)
        return page
    if op == INSERT:
        page = existing(page, record, block_id)
        if block_id == 0:
            (offnum,) = main_struct(U16, record)
            page_add_item(page, ref.data, offnum, overwrite=False, is_heap=False)
        else:
            ntuples = _DOUBLE.unpack_from(page, M_NTUPLES)[0]
            _DOUBLE.pack_into(page, M_NTUPLES, ntuples + 1)
        return page
    if op == ADD_OVFL_PAGE:
        return _add_ovfl_page(record, block_id, page)
    if op == SPLIT_ALLOCATE_PAGE:
        return _split_allocate(record, block_id, page)
    if op == SPLIT_PAGE:
        raise image_required(record, block_id)
    if op == SPLIT_COMPLETE:
        old_flag, new_flag = main_struct(_SPLIT_COMPLETE, record)
        page = existing(page, record, block_id)
        _set_opaque_flag(page, old_flag if block_id == 0 else new_flag)
        return page
    if op == MOVE_PAGE_CONTENTS:
        ntups, _ = main_struct(_MOVE, record)
        page = existing(page, record, block_id)
        if block_id == 1:
            _add_tuples(page, ref.data, ntups)
        elif block_id == 2:
            _delete_listed(page, ref.data)
        return page  # block 0, the primary bucket page, is only locked
    if op == SQUEEZE_PAGE:
        return _squeeze(record, block_id, page)
    if op == DELETE:
        clear_dead, _ = main_struct(_DELETE, record)
        page = existing(page, record, block_id)
        if block_id != 1:
            return page  # block 0, the primary bucket page, is only locked
        _delete_listed(page, ref.data)
        if clear_dead:
            _set_opaque_flag(page, _opaque_flag(page) & ~LH_PAGE_HAS_DEAD_TUPLES)
        return page
    if op == SPLIT_CLEANUP:
        page = existing(page, record, block_id)
        _set_opaque_flag(page, _opaque_flag(page) & ~LH_BUCKET_NEEDS_SPLIT_CLEANUP)
        return page
    if op == UPDATE_META_PAGE:
        (ntuples,) = main_struct(_DOUBLE, record)
        page = existing(page, record, block_id)
        _DOUBLE.pack_into(page, M_NTUPLES, ntuples)
        return page
    if op == VACUUM_ONE_PAGE:
        _, ntuples = main_struct(_VACUUM_ONE, record)
        page = existing(page, record, block_id)
        if block_id == 0:
            if len(record.main_data) > _VACUUM_ONE.size:
                page_index_multi_delete(page, offsets(record.main_data, _VACUUM_ONE.size, ntuples))
            _set_opaque_flag(page, _opaque_flag(page) & ~LH_PAGE_HAS_DEAD_TUPLES)
        else:
            count = _DOUBLE.unpack_from(page, M_NTUPLES)[0]
            _DOUBLE.pack_into(page, M_NTUPLES, count - ntuples)
        return page
    raise unknown(record)


def _add_ovfl_page(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """Blocks: 0 new overflow page, 1 its left neighbour, 2 bitmap page, 3 new bitmap, 4 meta."""
    bmsize, bmpage_found = main_struct(_ADD_OVFL, record)
    data = block_ref(record, block_id).data
    if block_id == 0:
        (bucket,) = U32.unpack_from(data, 0)
        return init_bucket_page(block_number(record, 1), bucket, LH_OVERFLOW_PAGE)
    if block_id == 3:
        return init_bitmap_page(bmsize)
    page = existing(page, record, block_id)
    if block_id == 1:
        _set_opaque_u32(page, OFF_NEXT, block_number(record, 0))
    elif block_id == 2:
        _set_bit(page, U32.unpack_from(data, 0)[0], True)
    elif block_id == 4:
        U32.pack_into(page, M_FIRSTFREE, U32.unpack_from(data, 0)[0])
        if not bmpage_found:
            spare = M_SPARES + 4 * _meta_u32(page, M_OVFLPOINT)
            bump = 1
            if has_block(record, 3):
                nmaps = _meta_u32(page, M_NMAPS)
                U32.pack_into(page, M_MAPP + 4 * nmaps, block_number(record, 3))
                U32.pack_into(page, M_NMAPS, nmaps + 1)
                bump = 2
            U32.pack_into(page, spare, _meta_u32(page, spare) + bump)
    return page


def _split_allocate(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """Blocks: 0 old bucket, 1 new bucket (initialised), 2 metapage."""
    xl = SplitAllocate(*main_struct(_SPLIT_ALLOC, record))
    if block_id == 1:
        return init_bucket_page(xl.new_bucket, xl.new_bucket, xl.new_bucket_flag)
    if block_id == 0:
        page = existing(page, record, 0)
        _set_opaque_flag(page, xl.old_bucket_flag)
        _set_opaque_u32(page, OFF_PREV, xl.new_bucket)
        return page
    page = existing(page, record, block_id)
    U32.pack_into(page, M_MAXBUCKET, xl.new_bucket)
    data = block_ref(record, block_id).data
    pos = 0
    if xl.flags & XLH_SPLIT_META_UPDATE_MASKS:
        lowmask, highmask = struct.unpack_from("<II", data, pos)
        U32.pack_into(page, M_LOWMASK, lowmask)
        U32.pack_into(page, M_HIGHMASK, highmask)
        pos += 8
    if xl.flags & XLH_SPLIT_META_UPDATE_SPLITPOINT:
        ovflpoint, ovflpages = struct.unpack_from("<II", data, pos)
        U32.pack_into(page, M_SPARES + 4 * ovflpoint, ovflpages)
        U32.pack_into(page, M_OVFLPOINT, ovflpoint)
    return page


def _squeeze(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """Blocks: 0 primary bucket, 1 write page, 2 freed overflow page, 3 its previous page,
    4 its next page, 5 bitmap page, 6 metapage."""
    xl = Squeeze(*main_struct(_SQUEEZE, record))
    data = block_ref(record, block_id).data
    if block_id == 2:
        # Re-initialised as an unused page whatever it held.
        fresh = page if page is not None else bytearray(BLCKSZ)
        page_init(fresh, SPECIAL_SIZE)
        _set_opaque(fresh, INVALID_BLOCK, INVALID_BLOCK, INVALID_BUCKET, LH_UNUSED_PAGE)
        return fresh
    page = existing(page, record, block_id)
    if block_id == 0:
        return page  # the primary bucket page is only locked
    if block_id == 1:
        _add_tuples(page, data, xl.ntups)
        if xl.is_prev_bucket_same_wrt:
            _set_opaque_u32(page, OFF_NEXT, xl.nextblkno)
    elif block_id == 3:
        if not xl.is_prev_bucket_same_wrt:
            _set_opaque_u32(page, OFF_NEXT, xl.nextblkno)
    elif block_id == 4:
        _set_opaque_u32(page, OFF_PREV, xl.prevblkno)
    elif block_id == 5:
        _set_bit(page, U32.unpack_from(data, 0)[0], False)
    elif block_id == 6:
        U32.pack_into(page, M_FIRSTFREE, U32.unpack_from(data, 0)[0])
    return page


def keeps_lsn(record: DecodedRecord, block_id: int) -> bool:
    """The primary bucket page (block 0) of a squeeze or delete is only cleanup-locked by
    redo: PostgreSQL leaves its pd_lsn alone."""
    return block_id == 0 and record.rmgr_info in (MOVE_PAGE_CONTENTS, SQUEEZE_PAGE, DELETE)


def mask(page: bytearray) -> None:
    """hash_mask: unused pages entirely, LP flags on bucket/overflow pages, the dead hint."""
    mask_page_lsn_and_checksum(page)
    mask_page_hint_bits(page)
    mask_unused_space(page)
    flag = _opaque_flag(page)
    pagetype = flag & LH_PAGE_TYPE
    if pagetype == LH_UNUSED_PAGE:
        mask_page_content(page)
    elif pagetype in (LH_BUCKET_PAGE, LH_OVERFLOW_PAGE):
        mask_lp_flags(page)
    _set_opaque_flag(page, _opaque_flag(page) & ~LH_PAGE_HAS_DEAD_TUPLES)
