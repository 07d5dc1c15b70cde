"""Native redo: rebuild a page from its previous version and one WAL record.

`redo_block(record, block_id, page)` follows XLogReadBufferForRedo
(src/backend/access/transam/xlogutils.c):

* an image with BKPIMAGE_APPLY replaces the page (pd_lsn = EndRecPtr unless the page is new);
* a WILL_INIT block (or one the rmgr always re-initializes) needs no previous version;
* a block whose pd_lsn is already >= EndRecPtr is returned unchanged (BLK_DONE), and so is an
  all-zero page (BLK_NOTFOUND), unless the rmgr reads that block with RBM_ZERO_ON_ERROR;
* otherwise the rmgr's `apply` changes the page and pd_lsn becomes EndRecPtr, except for
  blocks the rmgr stamps itself (`keeps_lsn`).

Each rmgr registers one `RmgrRedo` line in REDO_BY_RMGR; `mask_for_rmgr` gives the
wal_consistency_checking mask from the same table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pageserver.redo import (
    brin,
    btree,
    generic,
    gin,
    gist,
    hash,
    heap,
    heap2,
    sequence,
    spgist,
    xlog,
)
from pageserver.redo.native import redo as _native
from pageserver.redo.page import PageError, UnsupportedRecord, get_lsn, page_is_new, set_lsn
from pg15.constants import (
    BLCKSZ,
    RM_BRIN_ID,
    RM_BTREE_ID,
    RM_GENERIC_ID,
    RM_GIN_ID,
    RM_GIST_ID,
    RM_HASH_ID,
    RM_HEAP2_ID,
    RM_HEAP_ID,
    RM_SEQ_ID,
    RM_SPGIST_ID,
    RM_XLOG_ID,
)
from pg15.fpi import restore_page
from pg15.lsn import format_lsn
from pg15.records import DecodedRecord

__all__ = [
    "REDO_BY_RMGR",
    "BlockMaskFn",
    "BlockPredicate",
    "MaskFn",
    "PageError",
    "RedoFn",
    "RmgrRedo",
    "UnsupportedRecord",
    "mask_for_rmgr",
    "mask_page",
    "needs_previous",
    "redo_block",
    "redo_block_python",
]

RedoFn = Callable[[DecodedRecord, int, "bytearray | None"], bytearray]
MaskFn = Callable[[bytearray], None]
BlockMaskFn = Callable[[bytearray, int], None]
BlockPredicate = Callable[[DecodedRecord, int], bool]


def _never(record: DecodedRecord, block_id: int) -> bool:
    return False


@dataclass(frozen=True, slots=True)
class RmgrRedo:
    """One rmgr's redo entry.

    apply: redo one block; gets a copy of the previous page (None for init blocks), returns
        the new page (may be the same bytearray, changed in place).
    mask: the rm_mask used by wal_consistency_checking, None if the rmgr has none.
    keeps_lsn: blocks whose pd_lsn `apply` manages itself (the dispatcher does not stamp).
    zero_on_missing: blocks read with RBM_ZERO_ON_ERROR: a missing or all-zero previous
        version is redone from a zero page instead of being skipped.
    always_init: blocks the rmgr rebuilds from scratch even without WILL_INIT.
    block_mask: a mask that needs the block number (rm_mask's second argument); used
        instead of `mask` by `mask_page` when set.
    redo_over_image: blocks whose redo PostgreSQL also runs on a restored APPLY image (GiST
        clears FOLLOW_RIGHT and sets the NSN of a split's left child even then).
    """

    apply: RedoFn
    mask: MaskFn | None = None
    keeps_lsn: BlockPredicate = _never
    zero_on_missing: BlockPredicate = _never
    always_init: BlockPredicate = _never
    block_mask: BlockMaskFn | None = None
    redo_over_image: BlockPredicate = _never


def _visible_vm_block(record: DecodedRecord, block_id: int) -> bool:
    return block_id == 0 and heap2.keeps_lsn(record, block_id)


REDO_BY_RMGR: dict[int, RmgrRedo] = {
    RM_XLOG_ID: RmgrRedo(xlog.apply, keeps_lsn=xlog.keeps_lsn),
    RM_HEAP2_ID: RmgrRedo(
        heap2.apply,
        heap.mask,
        keeps_lsn=heap2.keeps_lsn,
        zero_on_missing=_visible_vm_block,
        block_mask=heap.mask,
    ),
    RM_HEAP_ID: RmgrRedo(heap.apply, heap.mask, block_mask=heap.mask),
    RM_BTREE_ID: RmgrRedo(btree.apply, btree.mask),
    RM_SEQ_ID: RmgrRedo(sequence.apply, sequence.mask, always_init=sequence.always_init),
    RM_HASH_ID: RmgrRedo(hash.apply, hash.mask, keeps_lsn=hash.keeps_lsn),
    RM_GIN_ID: RmgrRedo(gin.apply, gin.mask),
    RM_GIST_ID: RmgrRedo(gist.apply, gist.mask, redo_over_image=gist.redo_over_image),
    RM_SPGIST_ID: RmgrRedo(spgist.apply, spgist.mask),
    RM_BRIN_ID: RmgrRedo(brin.apply, brin.mask),
    RM_GENERIC_ID: RmgrRedo(generic.apply, generic.mask),
}


def mask_for_rmgr(rmgr_id: int) -> MaskFn | None:
    """The wal_consistency_checking mask of an rmgr (None: no mask or no redo here)."""
    entry = REDO_BY_RMGR.get(rmgr_id)
    return entry.mask if entry is not None else None


def mask_page(rmgr_id: int, page: bytearray, blkno: int) -> bool:
    """Mask `page` (block `blkno`) in place for comparison; False if the rmgr has no mask."""
    entry = REDO_BY_RMGR.get(rmgr_id)
    if entry is None:
        return False
    if entry.block_mask is not None:
        entry.block_mask(page, blkno)
        return True
    if entry.mask is not None:
        entry.mask(page)
        return True
    return False


def _entry(record: DecodedRecord) -> RmgrRedo:
    entry = REDO_BY_RMGR.get(record.rmgr_id)
    if entry is None:
        raise UnsupportedRecord(
            f"no native redo for {record.rmgr_name} {record.type_name} at {format_lsn(record.lsn)}"
        )
    return entry


def needs_previous(record: DecodedRecord, block_id: int) -> bool:
    """Whether `redo_block` needs the block's previous version (UnsupportedRecord if unknown)."""
    ref = record.block(block_id)
    if ref is None:
        raise PageError(
            f"{record.rmgr_name} {record.type_name} at {format_lsn(record.lsn)} has no "
            f"block {block_id}"
        )
    if ref.apply_image or ref.will_init:
        return False
    entry = _entry(record)
    return not (entry.always_init(record, block_id) or entry.zero_on_missing(record, block_id))


def redo_block_python(record: DecodedRecord, block_id: int, page: bytes | None) -> bytes:
    """The block's new version after `record` (see the module docstring for the rules).

    The pure-Python reference; `redo_block` is this or the C fast path in front of it.
    """
    ref = record.block(block_id)
    if ref is None:
        raise PageError(
            f"{record.rmgr_name} {record.type_name} at {format_lsn(record.lsn)} has no "
            f"block {block_id}"
        )
    if ref.image is not None and ref.image.apply:
        restored = bytearray(restore_page(ref.image))
        over = REDO_BY_RMGR.get(record.rmgr_id)
        if over is not None and over.redo_over_image(record, block_id):
            restored = over.apply(record, block_id, restored)
        if not page_is_new(restored):
            set_lsn(restored, record.end_lsn)
        return bytes(restored)
    entry = _entry(record)
    work: bytearray | None
    if ref.will_init or entry.always_init(record, block_id):
        work = None
    else:
        if page is None:
            if not entry.zero_on_missing(record, block_id):
                raise PageError(
                    f"{record.rmgr_name} {record.type_name} at {format_lsn(record.lsn)}: no "
                    f"previous version of rel {ref.rnode} fork {ref.fork_name} blk {ref.blkno}"
                )
            page = bytes(BLCKSZ)
        elif len(page) != BLCKSZ:
            raise PageError(f"page of rel {ref.rnode} blk {ref.blkno} has {len(page)} bytes")
        if page_is_new(page) and not entry.zero_on_missing(record, block_id):
            return bytes(page)  # BLK_NOTFOUND: PostgreSQL skips all-zero pages
        if record.end_lsn <= get_lsn(page):
            return bytes(page)  # BLK_DONE
        work = bytearray(page)
    result = entry.apply(record, block_id, work)
    if not entry.keeps_lsn(record, block_id):
        set_lsn(result, record.end_lsn)
    return bytes(result)


RedoBlockFn = Callable[[DecodedRecord, int, "bytes | None"], bytes]
redo_block: RedoBlockFn
"""`redo_block(record, block_id, page)`: the block's new version after `record`.

With the C extension loaded (redo/native.py) it is the C function, which redoes the hot
Heap/Heap2/Btree records and uncompressed images itself and calls `redo_block_python` for the
rest: one call either way, no Python frame in front of the C path.
"""
if _native is not None:
    _native.init(redo_block_python)
    redo_block = _native.redo_block
else:
    redo_block = redo_block_python
