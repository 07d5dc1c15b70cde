"""Generic WAL redo (generic_xlog.c) and generic_mask.

Extensions such as bloom log whole pages or byte-range deltas: each block's data is a run of
fragments {uint16 offset, uint16 length, bytes}. New pages (GENERIC_XLOG_FULL_IMAGE) come as
forced full-page images, which the dispatcher restores before any rmgr code runs.
"""

from __future__ import annotations

import struct

from pageserver.redo.amutil import block_ref, existing
from pageserver.redo.masks import mask_page_lsn_and_checksum, mask_unused_space
from pageserver.redo.page import PageError, get_lower, get_upper
from pg15.constants import BLCKSZ
from pg15.records import DecodedRecord

_FRAGMENT = struct.Struct("<HH")


def apply_delta(page: bytearray, delta: bytes | memoryview) -> None:
    """applyPageRedo, then zero the hole as GenericXLogFinish leaves it."""
    view = memoryview(delta)
    pos = 0
    end = len(view)
    while pos < end:
        offset, length = _FRAGMENT.unpack_from(view, pos)
        pos += 4
        if pos + length > end or offset + length > BLCKSZ:
            raise PageError(f"generic WAL fragment {offset}+{length} runs past its page or record")
        page[offset : offset + length] = view[pos : pos + length]
        pos += length
    lower = get_lower(page)
    upper = get_upper(page)
    if lower < upper:
        page[lower:upper] = bytes(upper - lower)


def apply(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """Redo `record` on its block `block_id`; `page` is the block's previous version."""
    page = existing(page, record, block_id)
    apply_delta(page, block_ref(record, block_id).data)
    return page


def mask(page: bytearray) -> None:
    """generic_mask: LSN, checksum and the hole."""
    mask_page_lsn_and_checksum(page)
    mask_unused_space(page)
