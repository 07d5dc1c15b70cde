"""Slotted-page primitives of PostgreSQL 15 (bufpage.c), over an 8192-byte bytearray.

Redo must leave pages byte-identical to what PostgreSQL produces (wal_consistency_checking
compares them), so every function here reproduces the C layout exactly: which bytes move,
which are left stale, which line pointers shrink away. PostgreSQL's source:
src/include/storage/bufpage.h (PageHeaderData, ItemIdData) and
src/backend/storage/page/bufpage.c (PageAddItemExtended, PageRepairFragmentation, ...).

Pages are `bytearray`s of BLCKSZ bytes. Line pointers are 1-based offset numbers; 0 is
InvalidOffsetNumber. Nothing here does I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from functools import lru_cache

from pg15.constants import BLCKSZ
from proto.errors import CorruptData, NeonError

MAXIMUM_ALIGNOF = 8
SIZE_OF_PAGE_HEADER = 24
ITEM_ID_SIZE = 4
PG_PAGE_LAYOUT_VERSION = 4
PAGESIZE_VERSION = BLCKSZ | PG_PAGE_LAYOUT_VERSION

INVALID_OFFSET = 0
FIRST_OFFSET = 1

# pd_flags
PD_HAS_FREE_LINES = 0x0001
PD_PAGE_FULL = 0x0002
PD_ALL_VISIBLE = 0x0004

# lp_flags
LP_UNUSED = 0
LP_NORMAL = 1
LP_REDIRECT = 2
LP_DEAD = 3

# MaxHeapTuplesPerPage: (BLCKSZ - header) / (MAXALIGN(heap tuple header) + line pointer).
MAX_HEAP_TUPLES_PER_PAGE = (BLCKSZ - SIZE_OF_PAGE_HEADER) // (24 + ITEM_ID_SIZE)

# Header: pd_lsn {hi, lo}, checksum, flags, lower, upper, special, pagesize_version, prune_xid.
HEADER = struct.Struct("<IIHHHHHHI")
_LSN = struct.Struct("<II")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
OFF_CHECKSUM = 8
OFF_FLAGS = 10
OFF_LOWER = 12
OFF_UPPER = 14
OFF_SPECIAL = 16
OFF_PAGESIZE_VERSION = 18
OFF_PRUNE_XID = 20


class PageError(CorruptData):
    """Redo cannot proceed on this page: the message says what is wrong and why."""


class UnsupportedRecord(NeonError):
    """A record type native redo cannot replay (yet): the message names rmgr, type and LSN."""

    code = "unsupported_record"


def maxalign(n: int) -> int:
    return (n + 7) & ~7


@lru_cache(maxsize=512)
def line_pointer_array(count: int) -> struct.Struct:
    """Precompiled layout of `count` consecutive line pointers (raw uint32 each)."""
    return struct.Struct(f"<{count}I")


_u32_array = line_pointer_array


def _lp_raw(off: int, flags: int, length: int) -> int:
    return off | (flags << 15) | (length << 17)


# ---------------------------------------------------------------------------------------------
# Header accessors


def page_init(page: bytearray, special_size: int) -> None:
    """PageInit: zero the page and lay out an empty one with `special_size` bytes of special."""
    special = BLCKSZ - maxalign(special_size)
    page[:] = bytes(BLCKSZ)
    HEADER.pack_into(
        page, 0, 0, 0, 0, 0, SIZE_OF_PAGE_HEADER, special, special, PAGESIZE_VERSION, 0
    )


def new_page(special_size: int) -> bytearray:
    """A fresh PageInit'ed page."""
    page = bytearray(BLCKSZ)
    page_init(page, special_size)
    return page


def page_is_new(page: bytes | bytearray) -> bool:
    """PageIsNew: pd_upper == 0 (an all-zero page as read from an extended relation)."""
    return _U16.unpack_from(page, OFF_UPPER)[0] == 0


def get_lsn(page: bytes | bytearray) -> int:
    hi, lo = _LSN.unpack_from(page, 0)
    return (hi << 32) | lo


def set_lsn(page: bytearray, lsn: int) -> None:
    _LSN.pack_into(page, 0, lsn >> 32, lsn & 0xFFFFFFFF)


def get_flags(page: bytes | bytearray) -> int:
    return _U16.unpack_from(page, OFF_FLAGS)[0]


def set_flags(page: bytearray, flags: int) -> None:
    _U16.pack_into(page, OFF_FLAGS, flags)


def get_lower(page: bytes | bytearray) -> int:
    return _U16.unpack_from(page, OFF_LOWER)[0]


def set_lower(page: bytearray, lower: int) -> None:
    _U16.pack_into(page, OFF_LOWER, lower)


def get_upper(page: bytes | bytearray) -> int:
    return _U16.unpack_from(page, OFF_UPPER)[0]


def set_upper(page: bytearray, upper: int) -> None:
    _U16.pack_into(page, OFF_UPPER, upper)


def get_special(page: bytes | bytearray) -> int:
    return _U16.unpack_from(page, OFF_SPECIAL)[0]


def get_prune_xid(page: bytes | bytearray) -> int:
    return _U32.unpack_from(page, OFF_PRUNE_XID)[0]


def set_prune_xid(page: bytearray, xid: int) -> None:
    _U32.pack_into(page, OFF_PRUNE_XID, xid)


def special_area(page: bytearray) -> memoryview:
    """The special space [pd_special, BLCKSZ), writable."""
    return memoryview(page)[get_special(page) :]


def max_offset(page: bytes | bytearray) -> int:
    """PageGetMaxOffsetNumber: 0 for a page whose pd_lower is at or below the header."""
    lower = _U16.unpack_from(page, OFF_LOWER)[0]
    if lower <= SIZE_OF_PAGE_HEADER:
        return 0
    return (lower - SIZE_OF_PAGE_HEADER) // ITEM_ID_SIZE


# ---------------------------------------------------------------------------------------------
# Line pointers and items


def get_item_id(page: bytes | bytearray, offnum: int) -> tuple[int, int, int]:
    """(lp_off, lp_flags, lp_len) of line pointer `offnum` (1-based)."""
    raw = _U32.unpack_from(page, SIZE_OF_PAGE_HEADER + (offnum - 1) * ITEM_ID_SIZE)[0]
    return raw & 0x7FFF, (raw >> 15) & 3, raw >> 17


def set_item_id(page: bytearray, offnum: int, lp_off: int, lp_flags: int, lp_len: int) -> None:
    _U32.pack_into(
        page, SIZE_OF_PAGE_HEADER + (offnum - 1) * ITEM_ID_SIZE, _lp_raw(lp_off, lp_flags, lp_len)
    )


def item_offset(page: bytes | bytearray, offnum: int) -> int:
    """Byte offset of the item of `offnum` (lp_off), checked to lie within the page."""
    raw = _U32.unpack_from(page, SIZE_OF_PAGE_HEADER + (offnum - 1) * ITEM_ID_SIZE)[0]
    off = raw & 0x7FFF
    if off + (raw >> 17) > BLCKSZ:
        raise PageError(f"line pointer {offnum} points past the end of the page")
    return off


def get_item(page: bytes | bytearray, offnum: int) -> bytes:
    """A copy of the item bytes of line pointer `offnum`."""
    if not FIRST_OFFSET <= offnum <= max_offset(page):
        raise PageError(f"item {offnum} does not exist (page has {max_offset(page)})")
    off, _, length = get_item_id(page, offnum)
    if off + length > BLCKSZ:
        raise PageError(f"line pointer {offnum} points past the end of the page")
    return bytes(page[off : off + length])


def _check_pointers(
    page: bytes | bytearray, what: str, *, aligned_special: bool = True
) -> tuple[int, int, int]:
    """(lower, upper, special) after the sanity checks bufpage.c makes before changing a page."""
    _, _, _, _, lower, upper, special, _, _ = HEADER.unpack_from(page, 0)
    if (
        lower < SIZE_OF_PAGE_HEADER
        or lower > upper
        or upper > special
        or special > BLCKSZ
        or (aligned_special and special != maxalign(special))
    ):
        raise PageError(
            f"{what}: corrupted page pointers: lower = {lower}, upper = {upper}, "
            f"special = {special}"
        )
    return lower, upper, special


def page_add_item(
    page: bytearray,
    item: bytes | bytearray | memoryview,
    offnum: int,
    *,
    overwrite: bool,
    is_heap: bool,
) -> int:
    """PageAddItemExtended: place `item` at `offnum` (0 = first free slot or append).

    With `overwrite` an existing slot must be unused and is reused; otherwise later line
    pointers shift up. The MAXALIGN padding after the item is not written (stale bytes stay).
    Returns the offset number used; PageError where PostgreSQL would return InvalidOffsetNumber.
    """
    lower, upper, _ = _check_pointers(page, "add item", aligned_special=False)
    limit = (lower - SIZE_OF_PAGE_HEADER) // ITEM_ID_SIZE + 1
    needshuffle = False
    if offnum != INVALID_OFFSET:
        if offnum < limit:
            if overwrite:
                _, flags, length = get_item_id(page, offnum)
                if flags != LP_UNUSED or length != 0:
                    raise PageError(f"add item: will not overwrite used line pointer {offnum}")
            else:
                needshuffle = True
    else:
        offnum = limit
        if _U16.unpack_from(page, OFF_FLAGS)[0] & PD_HAS_FREE_LINES:
            for cand in range(FIRST_OFFSET, limit):
                _, flags, length = get_item_id(page, cand)
                if flags == LP_UNUSED and length == 0:
                    offnum = cand
                    break
            else:
                set_flags(page, get_flags(page) & ~PD_HAS_FREE_LINES)
    if offnum > limit:
        raise PageError(f"add item: offset {offnum} is beyond the line pointer array ({limit - 1})")
    if is_heap and offnum > MAX_HEAP_TUPLES_PER_PAGE:
        raise PageError(f"add item: heap offset {offnum} exceeds {MAX_HEAP_TUPLES_PER_PAGE}")
    size = len(item)
    new_lower = lower + ITEM_ID_SIZE if (offnum == limit or needshuffle) else lower
    new_upper = upper - maxalign(size)
    if new_lower > new_upper:
        raise PageError(
            f"add item: {size} bytes do not fit at offset {offnum} (lower {lower}, upper {upper})"
        )
    pos = SIZE_OF_PAGE_HEADER + (offnum - 1) * ITEM_ID_SIZE
    if needshuffle:
        page[pos + ITEM_ID_SIZE : lower + ITEM_ID_SIZE] = page[pos:lower]
    _U32.pack_into(page, pos, _lp_raw(new_upper, LP_NORMAL, size))
    page[new_upper : new_upper + size] = item
    _U16.pack_into(page, OFF_LOWER, new_lower)
    _U16.pack_into(page, OFF_UPPER, new_upper)
    return offnum


def _compactify(page: bytearray, items: Sequence[tuple[int, int, int, int]], special: int) -> None:
    """compactify_tuples: pack (offnum, raw lp, itemoff, alignedlen) downward from pd_special.

    The first listed item ends at pd_special, the next just below it, and so on; each item
    moves with its MAXALIGN padding. Line pointers keep their flags and lengths.
    """
    src = bytes(page)
    upper = special
    base = SIZE_OF_PAGE_HEADER - ITEM_ID_SIZE
    for offnum, raw, itemoff, alignedlen in items:
        upper -= alignedlen
        page[upper : upper + alignedlen] = src[itemoff : itemoff + alignedlen]
        _U32.pack_into(page, base + offnum * ITEM_ID_SIZE, (raw & ~0x7FFF) | upper)
    _U16.pack_into(page, OFF_UPPER, upper)


def _line_pointers(page: bytes | bytearray, nline: int) -> tuple[int, ...]:
    return _u32_array(nline).unpack_from(page, SIZE_OF_PAGE_HEADER) if nline else ()


def page_repair_fragmentation(page: bytearray) -> None:
    """PageRepairFragmentation: defragment a heap page after pruning.

    Unused line pointers are normalised, items with storage are repacked in line-pointer
    order, trailing unused line pointers are cut, and PD_HAS_FREE_LINES says whether unused
    ones remain.
    """
    lower, upper, special = _check_pointers(page, "repair fragmentation")
    nline = (lower - SIZE_OF_PAGE_HEADER) // ITEM_ID_SIZE
    items: list[tuple[int, int, int, int]] = []
    totallen = 0
    nunused = 0
    finalused = 0
    for i, raw in enumerate(_line_pointers(page, nline), start=FIRST_OFFSET):
        flags = (raw >> 15) & 3
        if flags != LP_UNUSED:
            length = raw >> 17
            if length:
                off = raw & 0x7FFF
                if off < upper or off >= special:
                    raise PageError(f"repair fragmentation: corrupted line pointer {i}: {off}")
                aligned = maxalign(length)
                totallen += aligned
                items.append((i, raw, off, aligned))
            finalused = i
        else:
            if raw:
                set_item_id(page, i, 0, LP_UNUSED, 0)
            nunused += 1
    if not items:
        _U16.pack_into(page, OFF_UPPER, special)
    else:
        if totallen > special - lower:
            raise PageError(
                f"repair fragmentation: corrupted item lengths: total {totallen}, "
                f"available space {special - lower}"
            )
        _compactify(page, items, special)
    if finalused != nline:
        nunused -= nline - finalused
        _U16.pack_into(page, OFF_LOWER, lower - ITEM_ID_SIZE * (nline - finalused))
    flags = get_flags(page)
    set_flags(page, flags | PD_HAS_FREE_LINES if nunused > 0 else flags & ~PD_HAS_FREE_LINES)


def page_truncate_line_pointer_array(page: bytearray) -> None:
    """PageTruncateLinePointerArray: drop trailing unused line pointers (never #1)."""
    nline = max_offset(page)
    nunusedend = 0
    countdone = False
    sethint = False
    for i in range(nline, FIRST_OFFSET - 1, -1):
        unused = (get_item_id(page, i)[1]) == LP_UNUSED
        if not countdone and i > FIRST_OFFSET:
            if unused:
                nunusedend += 1
            else:
                countdone = True
        elif unused:
            sethint = True
            break
    if nunusedend > 0:
        set_lower(page, get_lower(page) - ITEM_ID_SIZE * nunusedend)
    flags = get_flags(page)
    set_flags(page, flags | PD_HAS_FREE_LINES if sethint else flags & ~PD_HAS_FREE_LINES)


def _checked_item(
    page: bytearray, offnum: int, nline: int, upper: int, special: int, what: str
) -> tuple[int, int]:
    """(offset, length) of an index item, checked the way the index deletion routines do."""
    if not FIRST_OFFSET <= offnum <= nline:
        raise PageError(f"{what}: invalid index offnum {offnum} (page has {nline})")
    off, _, size = get_item_id(page, offnum)
    if off < upper or off + size > special or off != maxalign(off):
        raise PageError(f"{what}: corrupted line pointer {offnum}: offset = {off}, size = {size}")
    return off, size


def page_index_tuple_delete(page: bytearray, offnum: int) -> None:
    """PageIndexTupleDelete: remove an index item and close both gaps (line pointer, data)."""
    lower, upper, special = _check_pointers(page, "index tuple delete")
    nline = (lower - SIZE_OF_PAGE_HEADER) // ITEM_ID_SIZE
    offset, size = _checked_item(page, offnum, nline, upper, special, "index tuple delete")
    size = maxalign(size)
    pos = SIZE_OF_PAGE_HEADER + offnum * ITEM_ID_SIZE
    if lower > pos:
        page[pos - ITEM_ID_SIZE : lower - ITEM_ID_SIZE] = page[pos:lower]
    if offset > upper:
        page[upper + size : offset + size] = page[upper:offset]
    lower -= ITEM_ID_SIZE
    _U16.pack_into(page, OFF_UPPER, upper + size)
    _U16.pack_into(page, OFF_LOWER, lower)
    if lower > SIZE_OF_PAGE_HEADER:
        _shift_offsets(page, nline - 1, offset, size, storage_only=False)


def _shift_offsets(
    page: bytearray, nline: int, limit: int, delta: int, *, storage_only: bool
) -> None:
    """Add `delta` to lp_off of every line pointer whose item lies at or below `limit`."""
    if not nline:
        return
    layout = _u32_array(nline)
    lps = list(layout.unpack_from(page, SIZE_OF_PAGE_HEADER))
    for i, raw in enumerate(lps):
        if (raw & 0x7FFF) <= limit and (not storage_only or raw >> 17):
            lps[i] = raw + delta
    layout.pack_into(page, SIZE_OF_PAGE_HEADER, *lps)


def page_index_tuple_delete_no_compact(page: bytearray, offnum: int) -> None:
    """PageIndexTupleDeleteNoCompact: remove an item's data but keep line-pointer numbering.

    The line pointer becomes unused, unless it is the last one, which is cut off.
    """
    lower, upper, special = _check_pointers(page, "index tuple delete (no compact)")
    nline = (lower - SIZE_OF_PAGE_HEADER) // ITEM_ID_SIZE
    offset, size = _checked_item(
        page, offnum, nline, upper, special, "index tuple delete (no compact)"
    )
    size = maxalign(size)
    if offnum < nline:
        set_item_id(page, offnum, 0, LP_UNUSED, 0)
    else:
        # The last one is cut off (unused ones before it are left alone, as in PostgreSQL).
        lower -= ITEM_ID_SIZE
        nline -= 1
        _U16.pack_into(page, OFF_LOWER, lower)
    if offset > upper:
        page[upper + size : offset + size] = page[upper:offset]
    _U16.pack_into(page, OFF_UPPER, upper + size)
    if lower > SIZE_OF_PAGE_HEADER:
        _shift_offsets(page, nline, offset, size, storage_only=True)


def page_index_multi_delete(page: bytearray, offnums: Sequence[int]) -> None:
    """PageIndexMultiDelete: delete the (ascending) `offnums` and repack the rest.

    With at most two items PostgreSQL deletes them one by one (last listed first), which leaves
    a different physical layout than the bulk path; both are reproduced.
    """
    nitems = len(offnums)
    if nitems <= 2:
        for offnum in reversed(offnums):
            page_index_tuple_delete(page, offnum)
        return
    lower, upper, special = _check_pointers(page, "index multi delete")
    nline = (lower - SIZE_OF_PAGE_HEADER) // ITEM_ID_SIZE
    kept: list[tuple[int, int, int, int]] = []
    kept_raw: list[int] = []
    totallen = 0
    nextitm = 0
    for i, raw in enumerate(_line_pointers(page, nline), start=FIRST_OFFSET):
        off = raw & 0x7FFF
        size = raw >> 17
        if off < upper or off + size > special or off != maxalign(off):
            raise PageError(
                f"index multi delete: corrupted line pointer {i}: offset = {off}, size = {size}"
            )
        if nextitm < nitems and i == offnums[nextitm]:
            nextitm += 1
            continue
        aligned = maxalign(size)
        totallen += aligned
        kept_raw.append(raw)
        kept.append((len(kept_raw), raw, off, aligned))
    if nextitm != nitems:
        raise PageError("index multi delete: incorrect index offsets supplied")
    if totallen > special - lower:
        raise PageError(
            f"index multi delete: corrupted item lengths: total {totallen}, "
            f"available space {special - lower}"
        )
    nused = len(kept_raw)
    if nused:
        _u32_array(nused).pack_into(page, SIZE_OF_PAGE_HEADER, *kept_raw)
    _U16.pack_into(page, OFF_LOWER, SIZE_OF_PAGE_HEADER + nused * ITEM_ID_SIZE)
    if nused:
        _compactify(page, kept, special)
    else:
        _U16.pack_into(page, OFF_UPPER, special)


def page_index_tuple_overwrite(
    page: bytearray, offnum: int, item: bytes | bytearray | memoryview
) -> bool:
    """PageIndexTupleOverwrite: replace an index item in place, shifting data if its size changes.

    False if the new item does not fit (PostgreSQL's callers treat that as an error).
    """
    lower, upper, special = _check_pointers(page, "index tuple overwrite")
    nline = (lower - SIZE_OF_PAGE_HEADER) // ITEM_ID_SIZE
    offset, oldsize = _checked_item(page, offnum, nline, upper, special, "index tuple overwrite")
    oldsize = maxalign(oldsize)
    newsize = len(item)
    aligned = maxalign(newsize)
    if aligned > oldsize + (upper - lower):
        return False
    diff = oldsize - aligned
    if diff:
        page[upper + diff : offset + diff] = page[upper:offset]
        _U16.pack_into(page, OFF_UPPER, upper + diff)
        _shift_offsets(page, nline, offset, diff, storage_only=True)
    _, flags, _ = get_item_id(page, offnum)
    set_item_id(page, offnum, offset + diff, flags, newsize)
    page[offset + diff : offset + diff + newsize] = item
    return True


# ---------------------------------------------------------------------------------------------
# Free space


def page_get_exact_free_space(page: bytes | bytearray) -> int:
    """PageGetExactFreeSpace: the gap between pd_lower and pd_upper."""
    return max(0, get_upper(page) - get_lower(page))


def page_get_free_space(page: bytes | bytearray) -> int:
    """PageGetFreeSpace: the gap minus room for one more line pointer."""
    space = get_upper(page) - get_lower(page)
    return 0 if space < ITEM_ID_SIZE else space - ITEM_ID_SIZE


def page_get_heap_free_space(page: bytes | bytearray) -> int:
    """PageGetHeapFreeSpace: 0 when no new heap line pointer could be added."""
    space = page_get_free_space(page)
    if space > 0:
        nline = max_offset(page)
        if nline >= MAX_HEAP_TUPLES_PER_PAGE:
            if get_flags(page) & PD_HAS_FREE_LINES:
                if all(get_item_id(page, i)[1] != LP_UNUSED for i in range(1, nline + 1)):
                    space = 0
            else:
                space = 0
    return space
