"""Sequence rmgr (15) redo and mask, after seq_redo / seq_mask (src/backend/commands/sequence.c)."""

from __future__ import annotations

import struct

from pageserver.redo.heap import unsupported
from pageserver.redo.masks import mask_page_lsn_and_checksum, mask_unused_space
from pageserver.redo.page import FIRST_OFFSET, PageError, new_page, page_add_item
from pg15.lsn import format_lsn
from pg15.records import DecodedRecord
from pg15.rmgr.sequence import XLOG_SEQ_LOG

SEQ_MAGIC = 0x1717
SEQUENCE_MAGIC_SIZE = 4
XL_SEQ_REC_SIZE = 12  # RelFileNode

_SEQ_MAGIC = struct.Struct("<I")


def apply(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    """LOG: the page is always rebuilt from the logged tuple (the old version is ignored)."""
    if record.info & 0xF0 != XLOG_SEQ_LOG:
        raise unsupported(record)
    tup = record.main_data[XL_SEQ_REC_SIZE:]
    if not tup:
        raise PageError(f"Sequence LOG at {format_lsn(record.lsn)}: no tuple")
    page = new_page(SEQUENCE_MAGIC_SIZE)
    _SEQ_MAGIC.pack_into(page, len(page) - 8, SEQ_MAGIC)
    page_add_item(page, tup, FIRST_OFFSET, overwrite=False, is_heap=False)
    return page


def mask(page: bytearray) -> None:
    """seq_mask."""
    mask_page_lsn_and_checksum(page)
    mask_unused_space(page)


def always_init(record: DecodedRecord, block_id: int) -> bool:
    """seq_redo uses XLogInitBufferForRedo: no previous version is needed."""
    return True
