"""The one WAL segment a basebackup carries: a shutdown checkpoint record at C, and where C is.

See `pageserver.basebackup.tar_stream` for why C is placed as it is. Page and record layout:
`src/include/access/xlog_internal.h` (XLogPageHeaderData, XLogLongPageHeaderData) and
`src/include/access/xlogrecord.h` (XLogRecord, XLR_BLOCK_ID_DATA_SHORT).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from pg15.constants import RM_XLOG_ID, XLOG_BLCKSZ
from pg15.records import XLR_BLOCK_ID_DATA_SHORT
from pg15.rmgr.xlog import CHECKPOINT_RECORD_SIZE, XLOG_CHECKPOINT_SHUTDOWN, CheckPoint
from pg15.xlog_reader import (
    LONG_PAGE_HEADER_SIZE,
    SHORT_PAGE_HEADER_SIZE,
    XLP_FIRST_IS_CONTRECORD,
    XLP_LONG_HEADER,
    maxalign,
    pack_page_header,
    record_crc,
)

_RECORD_HEADER = struct.Struct("<IIQBB2xI")
_U32 = struct.Struct("<I")
_CHUNK_PAGES = 32  # WAL pages per yielded chunk of zeros (256 KiB)


def _page_header_size(lsn: int, segment_size: int) -> int:
    return LONG_PAGE_HEADER_SIZE if lsn % segment_size == 0 else SHORT_PAGE_HEADER_SIZE


def normalize_lsn(lsn: int, segment_size: int) -> int:
    """Where the shutdown checkpoint for a state at record boundary `lsn` is written.

    MAXALIGN; past the page header if on a page boundary (+40 at a segment start, else +24);
    if the 114-byte record would cross the page end, the next page's first usable byte.
    """
    pos = maxalign(lsn)
    if pos % XLOG_BLCKSZ == 0:
        pos += _page_header_size(pos, segment_size)
    if pos % XLOG_BLCKSZ + CHECKPOINT_RECORD_SIZE > XLOG_BLCKSZ:
        pos += XLOG_BLCKSZ - pos % XLOG_BLCKSZ
        pos += _page_header_size(pos, segment_size)
    return pos


def checkpoint_record(checkpoint: CheckPoint, prev_lsn: int) -> bytes:
    """The 114-byte XLOG_CHECKPOINT_SHUTDOWN record with its CRC."""
    body = bytes([XLR_BLOCK_ID_DATA_SHORT, CheckPoint.SIZE]) + checkpoint.pack()
    head = _RECORD_HEADER.pack(
        CHECKPOINT_RECORD_SIZE, 0, prev_lsn, XLOG_CHECKPOINT_SHUTDOWN, RM_XLOG_ID, 0
    )
    record = bytearray(head + body)
    _U32.pack_into(record, 20, record_crc(memoryview(record)))
    return bytes(record)


def _wal_page(
    page_start: int, record_lsn: int | None, record: bytes, pg_timeline: int, sysid: int, seg: int
) -> bytes:
    """One WAL page: its header and, if given, the record at `record_lsn` inside it."""
    long = page_start % seg == 0
    hdr_size = LONG_PAGE_HEADER_SIZE if long else SHORT_PAGE_HEADER_SIZE
    info = XLP_LONG_HEADER if long else 0
    gap = 0 if record_lsn is None else record_lsn - page_start - hdr_size
    if gap:
        info |= XLP_FIRST_IS_CONTRECORD
    head = pack_page_header(info, pg_timeline, page_start, gap, sysid, seg)
    page = bytearray(XLOG_BLCKSZ)
    page[: len(head)] = head
    if record_lsn is not None:
        off = record_lsn - page_start
        page[off : off + len(record)] = record
    return bytes(page)


def wal_segment_pages(
    checkpoint_lsn: int, record: bytes, pg_timeline: int, sysid: int, segment_size: int
) -> list[tuple[int, bytes]]:
    """The pages of the segment holding `checkpoint_lsn` that are not zeros, by their offset
    in it, in order: page 0 (its long header) and the record's page (a header, the record).
    Everything else in the segment is zeros."""
    seg_start = checkpoint_lsn - checkpoint_lsn % segment_size
    rec_page = checkpoint_lsn - checkpoint_lsn % XLOG_BLCKSZ
    page = _wal_page(rec_page, checkpoint_lsn, record, pg_timeline, sysid, segment_size)
    if rec_page == seg_start:
        return [(0, page)]
    first = _wal_page(seg_start, None, b"", pg_timeline, sysid, segment_size)
    return [(0, first), (rec_page - seg_start, page)]


def wal_segment_chunks(
    checkpoint_lsn: int, record: bytes, pg_timeline: int, sysid: int, segment_size: int
) -> Iterator[bytes]:
    """The segment holding `checkpoint_lsn` (`wal_segment_pages`, zeros elsewhere), full
    size, as PostgreSQL requires."""
    zeros = bytes(XLOG_BLCKSZ * _CHUNK_PAGES)
    at = 0
    for offset, page in wal_segment_pages(checkpoint_lsn, record, pg_timeline, sysid, segment_size):
        yield from _zeros(offset - at, zeros)
        yield page
        at = offset + len(page)
    yield from _zeros(segment_size - at, zeros)


def _zeros(n: int, chunk: bytes) -> Iterator[bytes]:
    while n > 0:
        take = min(n, len(chunk))
        yield chunk if take == len(chunk) else bytes(take)
        n -= take
