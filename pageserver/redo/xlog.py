"""XLOG rmgr (0) page redo: FPI and FPI_FOR_HINT (xlog.c xlog_redo).

Their images carry BKPIMAGE_APPLY and are restored by the dispatcher before `apply` is
reached. What remains: an FPI_FOR_HINT without an image (nothing to do) and an FPI without
one (corrupt). Other XLOG records have no block references.
"""

from __future__ import annotations

from pageserver.redo.heap import existing, unsupported
from pageserver.redo.page import PageError
from pg15.lsn import format_lsn
from pg15.records import DecodedRecord
from pg15.rmgr.xlog import XLOG_FPI, XLOG_FPI_FOR_HINT


def apply(record: DecodedRecord, block_id: int, page: bytearray | None) -> bytearray:
    op = record.info & 0xF0
    if op == XLOG_FPI_FOR_HINT:
        return existing(record, block_id, page)
    if op == XLOG_FPI:
        raise PageError(
            f"XLOG FPI at {format_lsn(record.lsn)}: block {block_id} has no full-page image"
        )
    raise unsupported(record)


def keeps_lsn(record: DecodedRecord, block_id: int) -> bool:
    """An FPI_FOR_HINT without image leaves the page, LSN included, untouched."""
    return True
