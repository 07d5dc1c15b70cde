"""Masking helpers of wal_consistency_checking (src/backend/access/common/bufmask.c).

Before comparing a redone page with the image PostgreSQL logged, both copies are masked:
fields that may legitimately differ (LSN, checksum, hint bits, free space, and whatever an
rmgr's own mask adds) are overwritten with MASK_MARKER (0). All functions work in place.
"""

from __future__ import annotations

import struct

from pageserver.redo.page import (
    HEADER,
    OFF_CHECKSUM,
    OFF_FLAGS,
    OFF_LOWER,
    OFF_PRUNE_XID,
    OFF_UPPER,
    PD_ALL_VISIBLE,
    PD_HAS_FREE_LINES,
    PD_PAGE_FULL,
    SIZE_OF_PAGE_HEADER,
    PageError,
    line_pointer_array,
    max_offset,
)
from pg15.constants import BLCKSZ

MASK_MARKER = 0

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_LSN = struct.Struct("<II")
_LP_FLAGS_CLEAR = ~(3 << 15) & 0xFFFFFFFF


def mask_page_lsn_and_checksum(page: bytearray) -> None:
    """pd_lsn and pd_checksum always differ between the logged image and the redone page."""
    _LSN.pack_into(page, 0, MASK_MARKER, MASK_MARKER)
    _U16.pack_into(page, OFF_CHECKSUM, MASK_MARKER)


def mask_page_hint_bits(page: bytearray) -> None:
    """pd_prune_xid and the page-level hint flags are set without WAL."""
    _U32.pack_into(page, OFF_PRUNE_XID, MASK_MARKER)
    flags = _U16.unpack_from(page, OFF_FLAGS)[0]
    _U16.pack_into(page, OFF_FLAGS, flags & ~(PD_PAGE_FULL | PD_HAS_FREE_LINES | PD_ALL_VISIBLE))


def mask_unused_space(page: bytearray) -> None:
    """The hole between pd_lower and pd_upper holds stale bytes; PageError if pointers are bad."""
    _, _, _, _, lower, upper, special, _, _ = HEADER.unpack_from(page, 0)
    if lower > upper or special < upper or lower < SIZE_OF_PAGE_HEADER or special > BLCKSZ:
        raise PageError(f"invalid page pd_lower {lower} pd_upper {upper} pd_special {special}")
    page[lower:upper] = bytes(upper - lower)


def mask_lp_flags(page: bytearray) -> None:
    """Line-pointer flags of used items (e.g. LP_DEAD hints on btree leaves) are not logged.

    Clearing the flags of every line pointer is the same: unused ones already have none.
    """
    nline = max_offset(page)
    if nline:
        layout = line_pointer_array(nline)
        layout.pack_into(
            page,
            SIZE_OF_PAGE_HEADER,
            *[raw & _LP_FLAGS_CLEAR for raw in layout.unpack_from(page, SIZE_OF_PAGE_HEADER)],
        )


def mask_page_content(page: bytearray) -> None:
    """Everything after the header, plus pd_lower and pd_upper (metapages of some index AMs)."""
    page[SIZE_OF_PAGE_HEADER:BLCKSZ] = bytes(BLCKSZ - SIZE_OF_PAGE_HEADER)
    _U16.pack_into(page, OFF_LOWER, MASK_MARKER)
    _U16.pack_into(page, OFF_UPPER, MASK_MARKER)
