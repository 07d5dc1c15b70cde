"""Visibility-map pages (src/backend/access/heap/visibilitymap.c).

The VM fork is changed by heap records without being one of their block references: INSERT,
MULTI_INSERT, UPDATE and DELETE clear both bits of their heap block when their flags say so,
LOCK / LOCK_UPDATED clear only all-frozen, VISIBLE sets bits (its VM page *is* block 0).
`vm_changes(record)` lists those implied changes so the ingest code can apply them with
`vm_clear` / `vm_set` to the right VM page (`vm_block(heap_blkno)`).
"""

from __future__ import annotations

from dataclasses import dataclass

from pageserver.redo.page import (
    SIZE_OF_PAGE_HEADER,
    get_lsn,
    maxalign,
    page_init,
    page_is_new,
    set_lsn,
)
from pg15.constants import BLCKSZ, RM_HEAP2_ID, RM_HEAP_ID
from pg15.records import DecodedRecord, RelFileNode

VISIBILITYMAP_ALL_VISIBLE = 0x01
VISIBILITYMAP_ALL_FROZEN = 0x02
VISIBILITYMAP_VALID_BITS = 0x03

MAPSIZE = BLCKSZ - maxalign(SIZE_OF_PAGE_HEADER)
HEAPBLOCKS_PER_BYTE = 4
HEAPBLOCKS_PER_PAGE = MAPSIZE * HEAPBLOCKS_PER_BYTE

# Heap record flags that imply VM changes (heapam_xlog.h).
_XLH_INSERT_ALL_VISIBLE_CLEARED = 0x01
_XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED = 0x01
_XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED = 0x02
_XLH_DELETE_ALL_VISIBLE_CLEARED = 0x01
_XLH_LOCK_ALL_FROZEN_CLEARED = 0x01


def vm_block(heap_blkno: int) -> int:
    """The VM fork block holding the bits of heap block `heap_blkno`."""
    return heap_blkno // HEAPBLOCKS_PER_PAGE


def _locate(heap_blkno: int) -> tuple[int, int]:
    """(byte offset in the page, bit shift) of a heap block's two bits."""
    rem = heap_blkno % HEAPBLOCKS_PER_PAGE
    return SIZE_OF_PAGE_HEADER + rem // HEAPBLOCKS_PER_BYTE, (rem % HEAPBLOCKS_PER_BYTE) * 2


def vm_get(vm_page: bytes | bytearray, heap_blkno: int) -> int:
    """The VISIBILITYMAP_* bits of a heap block (0 on a new page)."""
    pos, shift = _locate(heap_blkno)
    return (vm_page[pos] >> shift) & VISIBILITYMAP_VALID_BITS


def vm_clear(vm_page: bytearray, heap_blkno: int, flags: int) -> bool:
    """visibilitymap_clear: clear `flags` for the block; True if a bit changed.

    A new (all-zero) page is PageInit'ed first, as PostgreSQL's VM reads do. The page LSN
    is not changed: these clears are never WAL-logged on their own.
    """
    if page_is_new(vm_page):
        page_init(vm_page, 0)
    pos, shift = _locate(heap_blkno)
    mask = (flags & VISIBILITYMAP_VALID_BITS) << shift
    if vm_page[pos] & mask:
        vm_page[pos] &= ~mask & 0xFF
        return True
    return False


def vm_set(vm_page: bytearray, heap_blkno: int, flags: int, lsn: int | None = None) -> bool:
    """visibilitymap_set during recovery: OR in `flags`; True if the byte was rewritten.

    As in PostgreSQL, nothing happens (and the LSN stays) when the block's bits already equal
    `flags`; otherwise the page LSN becomes `lsn` if given.
    """
    if page_is_new(vm_page):
        page_init(vm_page, 0)
    pos, shift = _locate(heap_blkno)
    flags &= VISIBILITYMAP_VALID_BITS
    if flags == (vm_page[pos] >> shift) & VISIBILITYMAP_VALID_BITS:
        return False
    vm_page[pos] |= flags << shift
    if lsn is not None:
        set_lsn(vm_page, lsn)
    return True


def vm_redo_visible(vm_page: bytearray | None, heap_blkno: int, flags: int, lsn: int) -> bytearray:
    """Block 0 of Heap2 VISIBLE: init a missing/new VM page, then set bits if `lsn` is newer."""
    page = vm_page if vm_page is not None else bytearray(BLCKSZ)
    if page_is_new(page):
        page_init(page, 0)
    if lsn > get_lsn(page):
        vm_set(page, heap_blkno, flags, lsn)
    return page


@dataclass(frozen=True, slots=True)
class VmChange:
    """One VM bit change a heap record implies for `heap_blkno` of `rnode` (clear or set)."""

    rnode: RelFileNode
    heap_blkno: int
    clear: bool
    flags: int

    @property
    def vm_blkno(self) -> int:
        return vm_block(self.heap_blkno)


def vm_changes(record: DecodedRecord) -> tuple[VmChange, ...]:
    """The VM clears that a Heap/Heap2 record implies without registering the VM page.

    VISIBLE is not listed: its VM page is block 0 of the record and goes through redo.
    """
    rmid = record.rmgr_id
    if rmid not in (RM_HEAP_ID, RM_HEAP2_ID) or not record.main_data or not record.blocks:
        return ()
    op = record.info & 0x70
    data = record.main_data
    first = record.blocks[0]
    if rmid == RM_HEAP_ID:
        if op == 0x00 and len(data) >= 3 and data[2] & _XLH_INSERT_ALL_VISIBLE_CLEARED:
            return (VmChange(first.rnode, first.blkno, True, VISIBILITYMAP_VALID_BITS),)
        if op == 0x10 and len(data) >= 8 and data[7] & _XLH_DELETE_ALL_VISIBLE_CLEARED:
            return (VmChange(first.rnode, first.blkno, True, VISIBILITYMAP_VALID_BITS),)
        if op in (0x20, 0x40) and len(data) >= 8:
            flags = data[7]
            old = record.block(1) or first
            out = []
            if flags & _XLH_UPDATE_OLD_ALL_VISIBLE_CLEARED:
                out.append(VmChange(old.rnode, old.blkno, True, VISIBILITYMAP_VALID_BITS))
            if flags & _XLH_UPDATE_NEW_ALL_VISIBLE_CLEARED:
                out.append(VmChange(first.rnode, first.blkno, True, VISIBILITYMAP_VALID_BITS))
            return tuple(out)
        if op == 0x60 and len(data) >= 8 and data[7] & _XLH_LOCK_ALL_FROZEN_CLEARED:
            return (VmChange(first.rnode, first.blkno, True, VISIBILITYMAP_ALL_FROZEN),)
        return ()
    if op == 0x50 and data[0] & _XLH_INSERT_ALL_VISIBLE_CLEARED:
        return (VmChange(first.rnode, first.blkno, True, VISIBILITYMAP_VALID_BITS),)
    if op == 0x60 and len(data) >= 8 and data[7] & _XLH_LOCK_ALL_FROZEN_CLEARED:
        return (VmChange(first.rnode, first.blkno, True, VISIBILITYMAP_ALL_FROZEN),)
    return ()
