"""pg_xact (CLOG) pages: 2 status bits per transaction (src/backend/access/transam/clog.c).

Commit/abort records set the status of the top-level xid and its subtransactions. PostgreSQL
marks subtransactions SUB_COMMITTED, then the top-level xid and the subtransactions COMMITTED;
only the final state is on the page, so a caller passes all of them with COMMITTED (or
ABORTED). Commit timestamps and group LSNs are not kept here.
"""

from __future__ import annotations

from collections.abc import Iterable

from pageserver.redo.page import PageError
from pg15.constants import BLCKSZ, CLOG_BITS_PER_XACT, CLOG_XACTS_PER_BYTE, CLOG_XACTS_PER_PAGE

TRANSACTION_STATUS_IN_PROGRESS = 0
TRANSACTION_STATUS_COMMITTED = 1
TRANSACTION_STATUS_ABORTED = 2
TRANSACTION_STATUS_SUB_COMMITTED = 3


def clog_page(xid: int) -> int:
    """TransactionIdToPage: the pg_xact page number holding `xid`."""
    return xid // CLOG_XACTS_PER_PAGE


def zero_page() -> bytearray:
    """CLOG ZEROPAGE (and MultiXact ZERO_OFF_PAGE / ZERO_MEM_PAGE): an all-zero page."""
    return bytearray(BLCKSZ)


def clog_get_status(page: bytes | bytearray, xid: int) -> int:
    byte = (xid % CLOG_XACTS_PER_PAGE) // CLOG_XACTS_PER_BYTE
    return (page[byte] >> ((xid % CLOG_XACTS_PER_BYTE) * CLOG_BITS_PER_XACT)) & 3


def clog_set_status(
    page: bytearray, xids: Iterable[int], status: int, *, pageno: int | None = None
) -> None:
    """TransactionIdSetStatusBit for each xid (all on this page; checked when `pageno` given).

    As in recovery, SUB_COMMITTED does not overwrite COMMITTED.
    """
    if not 0 <= status <= 3:
        raise PageError(f"invalid transaction status {status}")
    if len(page) != BLCKSZ:
        raise PageError(f"CLOG page has {len(page)} bytes")
    for xid in xids:
        if pageno is not None and clog_page(xid) != pageno:
            raise PageError(f"xid {xid} is on CLOG page {clog_page(xid)}, not {pageno}")
        byte = (xid % CLOG_XACTS_PER_PAGE) // CLOG_XACTS_PER_BYTE
        shift = (xid % CLOG_XACTS_PER_BYTE) * CLOG_BITS_PER_XACT
        cur = (page[byte] >> shift) & 3
        if status == TRANSACTION_STATUS_SUB_COMMITTED and cur == TRANSACTION_STATUS_COMMITTED:
            continue
        page[byte] = (page[byte] & ~(3 << shift) & 0xFF) | (status << shift)
