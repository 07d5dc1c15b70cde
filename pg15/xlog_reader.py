"""Sans-I/O reader of the PostgreSQL 15 WAL byte stream: pages in, whole raw records out.

The reader knows nothing about files or sockets. Feed it the WAL bytes in order, starting at
the LSN given to the constructor, in chunks of any size (whole segment files, 128 KB replication
messages, single bytes); then iterate `records()` for every record completed so far:

    reader = WalReader(start_lsn, segment_size, timeline)
    reader.feed(chunk)
    for record in reader.records():      # RawRecord(lsn, end_lsn, data)
        ...
    if reader.end_of_wal is not None:    # valid WAL stopped here (zeros, recycled page, ...)
        ...

Partial records are kept across feeds. Page headers are validated (magic, info bits, long
header fields, xlp_pageaddr, xlp_rem_len), records are reassembled across pages and segments,
XLOG_SWITCH padding is skipped and every record's CRC-32C is checked. Damage raises
`WalCorrupt` naming the LSN and segment file; nothing after it is produced. The ordinary end of
written WAL (a zero page or record length, a recycled page with a stale xlp_pageaddr, a stale
record whose prev-link does not match) is not an error: `end_of_wal` reports where it is.

The start LSN is either a page boundary (normally a segment start; continuation data of a
record begun earlier is skipped) or the exact start of a record.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from pg15.checksum import crc32c
from pg15.constants import RM_MAX_BUILTIN_ID, RM_MIN_CUSTOM_ID, RM_XLOG_ID, XLOG_BLCKSZ
from pg15.lsn import DEFAULT_SEGMENT_SIZE, format_lsn, segment_file_name
from pg15.native import walscan
from proto.errors import CorruptData

XLOG_PAGE_MAGIC = 0xD110
XLP_FIRST_IS_CONTRECORD = 0x0001
XLP_LONG_HEADER = 0x0002
XLP_BKP_REMOVABLE = 0x0004
XLP_FIRST_IS_OVERWRITE_CONTRECORD = 0x0008
XLP_ALL_FLAGS = 0x000F
SHORT_PAGE_HEADER_SIZE = 24
LONG_PAGE_HEADER_SIZE = 40
RECORD_HEADER_SIZE = 24
MAX_RECORD_SIZE = 0x3FFFFFFF  # MaxAllocSize: xlogreader refuses anything larger
XLOG_SWITCH = 0x40

_SHORT_HEADER = struct.Struct("<HHIQI")
_LONG_HEADER_TAIL = struct.Struct("<QII")
_RECORD_HEADER = struct.Struct("<IIQBBxxI")
_U32 = struct.Struct("<I")
_unpack_record_header = _RECORD_HEADER.unpack_from
_new_tuple = tuple.__new__
SMALL_RECORD = 1024  # up to this size, one CRC call over a copy beats two calls


class WalCorrupt(CorruptData):
    """WAL bytes that fail validation: bad page header, bad record header or CRC mismatch."""

    def __init__(self, message: str, lsn: int, segment: str) -> None:
        super().__init__(message)
        self.lsn = lsn
        self.segment = segment


class RawRecord(NamedTuple):
    """One reassembled WAL record; `end_lsn` is PostgreSQL's EndRecPtr (what redo stamps)."""

    lsn: int
    end_lsn: int
    data: bytes


if walscan is not None:
    walscan.init_reader(RawRecord)
_native_scan = walscan.scan if walscan is not None else None
NATIVE_BATCH = 256
"""Records per call into the C fast path. A batch's Python around it (the fused ingest's and
the LSN index's calls, the lists) is ~10% of a catch-up's decode thread: 256 against 128 took
0.54-0.57 against 0.59-0.63 s of its CPU for 347 MiB of pgbench WAL (bench.ingest's loop, 4
pairs interleaved, load 2.7-2.8); 512 was no better than 256 (bench/README ingest)."""


@dataclass(frozen=True, slots=True)
class WalEnd:
    """Where valid WAL stops and why (not an error: the rest was never written)."""

    lsn: int
    reason: str


@dataclass(frozen=True, slots=True)
class PageHeader:
    magic: int
    info: int
    timeline: int
    pageaddr: int
    rem_len: int
    system_id: int | None = None
    segment_size: int | None = None
    block_size: int | None = None

    @property
    def size(self) -> int:
        return LONG_PAGE_HEADER_SIZE if self.info & XLP_LONG_HEADER else SHORT_PAGE_HEADER_SIZE


def parse_page_header(data: bytes | memoryview, offset: int = 0) -> PageHeader:
    """Unpack a short or long page header (no validation; the long part needs 40 bytes)."""
    magic, info, tli, pageaddr, rem_len = _SHORT_HEADER.unpack_from(data, offset)
    if info & XLP_LONG_HEADER and len(data) - offset >= LONG_PAGE_HEADER_SIZE:
        sysid, seg_size, blcksz = _LONG_HEADER_TAIL.unpack_from(data, offset + 24)
        return PageHeader(magic, info, tli, pageaddr, rem_len, sysid, seg_size, blcksz)
    return PageHeader(magic, info, tli, pageaddr, rem_len)


def pack_page_header(
    info: int,
    timeline: int,
    pageaddr: int,
    rem_len: int = 0,
    system_id: int | None = None,
    segment_size: int | None = None,
) -> bytes:
    """The bytes of a short (24) or, with XLP_LONG_HEADER, long (40) page header, for writers."""
    head = _SHORT_HEADER.pack(XLOG_PAGE_MAGIC, info, timeline, pageaddr, rem_len) + bytes(4)
    if not info & XLP_LONG_HEADER:
        return head
    if system_id is None or segment_size is None:
        raise ValueError("a long page header needs the system identifier and segment size")
    return head + _LONG_HEADER_TAIL.pack(system_id, segment_size, XLOG_BLCKSZ)


def maxalign(n: int) -> int:
    return (n + 7) & ~7


def record_crc(data: bytes | memoryview) -> int:
    """CRC-32C as PostgreSQL computes it: the body after the header, then header bytes 0..19."""
    if len(data) <= SMALL_RECORD:
        return crc32c(bytes(data[RECORD_HEADER_SIZE:]) + bytes(data[:20]))
    view = memoryview(data)
    return crc32c(view[:20], crc32c(view[RECORD_HEADER_SIZE:]))


class WalReader:
    """Incremental WAL reader: `feed()` bytes, iterate `records()`; see the module docstring."""

    def __init__(
        self,
        start_lsn: int,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        timeline: int = 1,
        system_id: int | None = None,
        prev_lsn: int | None = None,
    ) -> None:
        if segment_size & (segment_size - 1) or not (1 << 20) <= segment_size <= (1 << 30):
            raise CorruptData(f"invalid WAL segment size {segment_size}")
        if start_lsn % XLOG_BLCKSZ and start_lsn % 8:
            raise CorruptData(
                f"WAL reading must start at a page or record boundary, not {format_lsn(start_lsn)}"
            )
        self.segment_size = segment_size
        self.timeline = timeline
        self.system_id = system_id
        self._buf = b""
        self._buf_lsn = start_lsn
        self._pos = start_lsn
        # The record being reassembled across pages: its start, length and fragments so far.
        self._rec_lsn = -1
        self._rec_len = 0
        self._rec_parts: list[bytes] = []
        self._rec_got = 0
        self._rec_header_checked = False
        self._skipping_contrecord = False  # the stream began inside a record: drop its tail
        self._skip_to = start_lsn  # zeros after XLOG_SWITCH are skipped up to here
        self._start_lsn = start_lsn
        self._at_start = True  # nothing read yet: a continuation page here is legitimate
        self._prev_lsn = prev_lsn
        self._last_page_tli = 0
        self._end: WalEnd | None = None
        self._error: WalCorrupt | None = None
        self.last_end_lsn = start_lsn

    # ---- public state -------------------------------------------------------------------

    @property
    def end_of_wal(self) -> WalEnd | None:
        """Set once the reader met the end of valid WAL; later bytes are ignored."""
        return self._end

    @property
    def fed_lsn(self) -> int:
        """LSN just past the last byte fed so far."""
        return self._buf_lsn + len(self._buf)

    @property
    def next_record_lsn(self) -> int:
        """Where the next record will be looked for (EndRecPtr of the last record returned)."""
        return self.last_end_lsn

    @property
    def pending_record_lsn(self) -> int | None:
        """Start of a record that is only partly fed (None between records)."""
        return self._rec_lsn if self._rec_lsn >= 0 and not self._skipping_contrecord else None

    def resume_point(self) -> tuple[int, int | None] | None:
        """(start, prev-link) where a second reader takes the stream up from the same point:
        the end of the last record returned (where a record being reassembled begins too, or
        the page holding its start; past XLOG_SWITCH padding) and the prev-link the next
        record must carry; None while the reader skips the tail of a record begun before its
        start (no boundary known yet)."""
        if self._skipping_contrecord:
            return None
        return self.last_end_lsn, self._prev_lsn

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append the next bytes of the stream (no parsing happens here)."""
        if self._end is not None or self._error is not None or not data:
            return
        consumed = self._pos - self._buf_lsn
        if consumed >= len(self._buf):
            self._buf_lsn += len(self._buf)
            self._buf = bytes(data)
            # Consumed bytes may run past the buffer only while skipping switch padding.
        else:
            self._buf = self._buf[consumed:] + bytes(data)
            self._buf_lsn = self._pos

    def segment_name(self, lsn: int) -> str:
        return segment_file_name(self.timeline, lsn // self.segment_size, self.segment_size)

    # ---- parsing ------------------------------------------------------------------------

    def read_batch(self, max_records: int = NATIVE_BATCH) -> list[RawRecord]:
        """The next records completed by the bytes fed so far, as a list ([] when none yet);
        raise WalCorrupt on damage. The same records as `records()`, with less overhead per
        record: the bulk loop of catch-up."""
        if _native_scan is not None:
            batch = self._scan_native(max_records)
            if batch:
                last = batch[-1]
                self._prev_lsn = last[0]
                self._pos = self.last_end_lsn = last[1]
                return batch
            max_records = 1  # something unusual here: one record the Python way, then C again
        # _records() keeps its position exact per record, so stopping early loses nothing.
        return list(itertools.islice(self._records(native=False), max_records))

    def _scan_native(self, max_records: int) -> list[RawRecord]:
        """Ordinary records from the reader's position up to the first unusual thing, by the
        C fast path (pg15/_walscan.c); [] where only the Python code may go on. The
        caller moves the position past what it takes."""
        if (
            _native_scan is None
            or self._error is not None
            or self._end is not None
            or self._rec_lsn >= 0
            or self._pos < self._skip_to
            or self._prev_lsn is None
            or not self._last_page_tli
        ):
            return []
        batch: list[RawRecord] = _native_scan(
            self._buf,
            self._buf_lsn,
            self._pos,
            self._prev_lsn,
            self.segment_size,
            self.system_id,
            self._last_page_tli,
            max_records,
        )
        if batch:
            self._at_start = False
        return batch

    def records(self) -> Iterator[RawRecord]:
        """Yield every record completed by the bytes fed so far; raise WalCorrupt on damage."""
        return self._records(native=_native_scan is not None)

    def _records(self, native: bool) -> Iterator[RawRecord]:
        if self._error is not None:
            raise self._error
        # The parser runs right here (not behind a `yield from`): this is the per-record loop.
        try:
            block = XLOG_BLCKSZ
            while self._end is None:
                buf = self._buf
                base = self._buf_lsn
                avail_end = base + len(buf)
                pos = self._pos
                if native and (batch := self._scan_native(NATIVE_BATCH)):
                    # What the C path leaves (the first unusual thing) the code below handles.
                    for raw in batch:
                        self._prev_lsn = raw[0]
                        self._pos = self.last_end_lsn = raw[1]
                        yield raw
                    continue
                if pos < self._skip_to:
                    self._pos = min(self._skip_to, avail_end)
                    if self._pos < self._skip_to:
                        return
                    continue
                page_off = pos % block
                if page_off == 0:
                    if not self._read_page_header(buf, base, avail_end, pos):
                        return
                    continue
                if self._rec_lsn >= 0:
                    # Continuation of a record begun on an earlier page.
                    take = min(self._rec_len - self._rec_got, block - page_off, avail_end - pos)
                    if take <= 0:
                        return
                    if not self._skipping_contrecord:
                        self._rec_parts.append(buf[pos - base : pos - base + take])
                    self._rec_got += take
                    pos += take
                    self._pos = pos
                    if not self._skipping_contrecord and not self._rec_header_checked:
                        if self._rec_got < RECORD_HEADER_SIZE:
                            continue
                        head = b"".join(self._rec_parts)
                        self._rec_parts = [head]
                        if not self._check_record_header(head, self._rec_lsn):
                            return
                        self._rec_header_checked = True
                    if self._rec_got < self._rec_len:
                        continue
                    rec_lsn = self._rec_lsn
                    self._rec_lsn = -1
                    if self._skipping_contrecord:
                        self._skipping_contrecord = False
                        self._at_start = False
                        self._pos = self.last_end_lsn = maxalign(pos)
                        continue
                    data = b"".join(self._rec_parts)
                    self._rec_parts = []
                    self._pos = maxalign(pos)
                    yield self._finish_record(rec_lsn, data, self._pos)
                    continue
                # At the start of a record (8-aligned, inside a page after its header).
                if not pos & 7:
                    # Fast path: records that lie wholly inside this page and the bytes fed, with
                    # the expected prev-link, an ordinary rmgr id, no XLOG_SWITCH and a good CRC.
                    # Anything else (including every error) is left to the general path below.
                    page_end = pos - page_off + block
                    limit = avail_end if avail_end < page_end else page_end
                    prev_lsn = self._prev_lsn
                    first = pos
                    while limit - pos >= RECORD_HEADER_SIZE:
                        off = pos - base
                        tot_len, _, prev, info, rmid, stored = _unpack_record_header(buf, off)
                        if (
                            prev != prev_lsn
                            or tot_len > limit - pos
                            or tot_len < RECORD_HEADER_SIZE
                            or rmid > RM_MAX_BUILTIN_ID
                            or (rmid == RM_XLOG_ID and info & 0xF0 == XLOG_SWITCH)
                        ):
                            break
                        data = buf[off : off + tot_len]
                        if tot_len <= SMALL_RECORD:
                            computed = crc32c(data[RECORD_HEADER_SIZE:] + data[:20])
                        else:
                            computed = crc32c(data[:20], crc32c(data[RECORD_HEADER_SIZE:]))
                        if computed != stored:
                            break
                        end_lsn = pos + ((tot_len + 7) & ~7)
                        self._prev_lsn = prev_lsn = pos
                        self.last_end_lsn = self._pos = end_lsn
                        self._at_start = False
                        yield _new_tuple(RawRecord, (pos, end_lsn, data))
                        pos = end_lsn
                        if self._buf is not buf or self._pos != pos:
                            break  # fed (or moved) while the caller held the record
                    if pos != first:
                        continue
                if pos % 8:
                    raise self._fail(pos, "record start is not 8-byte aligned")
                if avail_end - pos < 4:
                    return
                off = pos - base
                (tot_len,) = _U32.unpack_from(buf, off)
                if tot_len == 0:
                    self._stop(pos, "zero record length")
                    return
                if tot_len < RECORD_HEADER_SIZE:
                    raise self._fail(pos, f"invalid record length {tot_len}")
                if tot_len > MAX_RECORD_SIZE:
                    raise self._fail(pos, f"record length {tot_len} too long")
                room = block - page_off
                if room >= RECORD_HEADER_SIZE and avail_end - pos >= RECORD_HEADER_SIZE:
                    if not self._check_record_header(buf[off : off + RECORD_HEADER_SIZE], pos):
                        return
                    header_checked = True
                else:
                    header_checked = False
                if tot_len <= room:
                    if avail_end - pos < tot_len:
                        return
                    data = buf[off : off + tot_len]
                    self._pos = pos + maxalign(tot_len)
                    yield self._finish_record(pos, data, self._pos)
                    continue
                # The record continues on the next page: keep what this page has.
                take = min(room, avail_end - pos)
                self._rec_lsn = pos
                self._rec_len = tot_len
                self._rec_parts = [buf[off : off + take]]
                self._rec_got = take
                self._rec_header_checked = header_checked
                self._pos = pos + take
        except WalCorrupt as exc:
            self._error = exc
            raise

    def _fail(self, lsn: int, what: str) -> WalCorrupt:
        segment = self.segment_name(lsn)
        offset = lsn % self.segment_size
        return WalCorrupt(
            f"corrupt WAL at {format_lsn(lsn)} (segment {segment}, offset {offset}): {what}",
            lsn,
            segment,
        )

    def _stop(self, lsn: int, reason: str) -> None:
        self._end = WalEnd(lsn, reason)
        self._buf = b""
        self._buf_lsn = self._pos = lsn

    def _check_record_header(self, head: bytes, lsn: int) -> bool:
        """Validate rmgr id and prev-link; False (end of WAL) on a stale prev-link."""
        _, _, prev, _, rmid, _ = _RECORD_HEADER.unpack_from(head, 0)
        if RM_MAX_BUILTIN_ID < rmid < RM_MIN_CUSTOM_ID:
            raise self._fail(lsn, f"invalid resource manager ID {rmid}")
        expected = self._prev_lsn
        if (expected is not None and prev != expected) or (expected is None and prev >= lsn):
            self._stop(
                self._rec_lsn if self._rec_lsn >= 0 else lsn,
                f"record with incorrect prev-link {format_lsn(prev)}",
            )
            return False
        return True

    def _finish_record(self, lsn: int, data: bytes, end_lsn: int) -> RawRecord:
        stored = _U32.unpack_from(data, 20)[0]
        computed = record_crc(data)
        if stored != computed:
            raise self._fail(
                lsn,
                f"incorrect resource manager data checksum in record "
                f"(stored {stored:08X}, computed {computed:08X})",
            )
        if data[17] == RM_XLOG_ID and data[16] & 0xF0 == XLOG_SWITCH:
            # The rest of the segment is padding; the record "ends" at the segment end.
            end_lsn = -(-end_lsn // self.segment_size) * self.segment_size
            self._skip_to = end_lsn
            self._pos = max(self._pos, min(end_lsn, self._buf_lsn + len(self._buf)))
        self._prev_lsn = lsn
        self.last_end_lsn = end_lsn
        self._at_start = False
        return RawRecord(lsn, end_lsn, data)

    def _read_page_header(self, buf: bytes, base: int, avail_end: int, pos: int) -> bool:
        """Validate the page header at `pos` and step over it; False if more bytes are needed."""
        if avail_end - pos < SHORT_PAGE_HEADER_SIZE:
            return False
        off = pos - base
        magic, info, tli, pageaddr, rem_len = _SHORT_HEADER.unpack_from(buf, off)
        if not any(buf[off : off + SHORT_PAGE_HEADER_SIZE]):
            self._stop(self._end_candidate(pos), "zeroed page")
            return False
        if magic != XLOG_PAGE_MAGIC:
            raise self._fail(pos, f"invalid magic number {magic:04X} in page header")
        if info & ~XLP_ALL_FLAGS:
            raise self._fail(pos, f"invalid info bits {info:04X} in page header")
        size = SHORT_PAGE_HEADER_SIZE
        if info & XLP_LONG_HEADER:
            size = LONG_PAGE_HEADER_SIZE
            if avail_end - pos < size:
                return False
            sysid, seg_size, blcksz = _LONG_HEADER_TAIL.unpack_from(buf, off + 24)
            if self.system_id is not None and sysid != self.system_id:
                raise self._fail(
                    pos,
                    f"WAL file is from a different database system (system identifier "
                    f"{sysid}, expected {self.system_id})",
                )
            if seg_size != self.segment_size:
                raise self._fail(pos, f"incorrect segment size {seg_size} in page header")
            if blcksz != XLOG_BLCKSZ:
                raise self._fail(pos, f"incorrect XLOG_BLCKSZ {blcksz} in page header")
            self.system_id = sysid
        elif pos % self.segment_size == 0:
            raise self._fail(pos, f"first page of segment lacks a long header (info {info:04X})")
        if pageaddr != pos:
            self._stop(self._end_candidate(pos), f"unexpected pageaddr {format_lsn(pageaddr)}")
            return False
        if tli < self._last_page_tli:
            raise self._fail(
                pos, f"out-of-sequence timeline ID {tli} (after {self._last_page_tli})"
            )
        self._last_page_tli = tli
        if self._rec_lsn >= 0:
            if info & XLP_FIRST_IS_OVERWRITE_CONTRECORD:
                # The partial record was abandoned by crash recovery; restart at this page.
                self._rec_lsn = -1
                self._rec_parts = []
                self._skipping_contrecord = False
            elif not info & XLP_FIRST_IS_CONTRECORD:
                raise self._fail(pos, "there is no contrecord flag")
            elif rem_len == 0 or rem_len != self._rec_len - self._rec_got:
                raise self._fail(
                    pos,
                    f"invalid contrecord length {rem_len} (expected "
                    f"{self._rec_len - self._rec_got})",
                )
        elif info & XLP_FIRST_IS_CONTRECORD:
            if not (self._at_start and pos == self._start_lsn):
                raise self._fail(pos, "unexpected contrecord flag between records")
            # Reading began inside a record: skip its remaining bytes.
            self._rec_lsn = pos
            self._rec_len = rem_len
            self._rec_got = 0
            self._rec_parts = []
            self._skipping_contrecord = True
        self._pos = pos + size
        return True

    def _end_candidate(self, pos: int) -> int:
        """Valid WAL ends before a partly written record, else at this page boundary."""
        if self._rec_lsn >= 0 and not self._skipping_contrecord:
            return self._rec_lsn
        return pos
