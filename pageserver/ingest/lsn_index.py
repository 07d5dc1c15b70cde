"""Per-timeline LSN indexes: sparse record boundaries and commit timestamps.

Two questions the page store cannot answer by itself:

- *Which LSN is a record boundary?* A basebackup (and a snapshot) must be taken at the end of
  a record (PostgreSQL's EndRecPtr). Keeping every boundary would cost a lot; instead
  `observe()` keeps a sparse sample (about one per SAMPLE_DISTANCE bytes of WAL, plus every
  commit and the exact boundaries known from elsewhere: the import LSN, a branch LSN), and
  `snap()` decodes forward from the nearest sample through the archived WAL.
- *Which LSN was current at time T?* Every COMMIT / COMMIT_PREPARED record's `xact_time` is
  kept with the record's end LSN; `lsn_for_time()` answers like PostgreSQL's
  `recovery_target_time` (inclusive): the end of the last commit before the first commit
  whose time is after T.

Layout: one append-only file `<directory>/lsn_index` of fixed 32-byte entries
``crc32c u32 | flags u32 | end_lsn u64 | start_lsn u64 | xact_time i64``, with strictly
increasing end LSNs. ``start_lsn`` is the record's own start (the xl_prev of the next record,
so decoding can resume at ``end_lsn`` with its prev-link checked); NO_LSN if unknown.

Durability: `observe()` only buffers (no I/O on the ingest hot path); `flush()` appends and
fsyncs. Call it *before* the timeline's layers are flushed, so the index is never behind the
layers' disk_consistent_lsn: after a crash, ingest re-observes every record above that LSN
and entries at or below the index's last LSN are ignored (no duplicates, no reordering).
A torn or corrupt tail is truncated to the last whole, valid entry on open.

The directory must not be the timeline's layer directory (its reopen deletes unknown files).
"""

from __future__ import annotations

import bisect
import os
import struct
import threading
from array import array
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from crc32c import crc32c

from durable_files import fsync_dir
from pageserver.ingest import native as _native
from pg15.constants import RM_XACT_ID
from pg15.lsn import format_lsn
from pg15.records import DecodedRecord, decode_record
from pg15.rmgr.xact import (
    XLOG_XACT_COMMIT,
    XLOG_XACT_COMMIT_PREPARED,
    XLOG_XACT_OPMASK,
)
from pg15.xlog_reader import RawRecord, WalReader
from proto.errors import CorruptData, InvalidArgument, NotFound
from walreceiver.archive import ArchivedSegment, WalArchive

INDEX_FILE = "lsn_index"
SAMPLE_DISTANCE = 256 * 1024
"""Bytes of WAL between two boundary samples: snap() decodes at most about this much."""
READ_CHUNK = 128 * 1024
NO_LSN = (1 << 64) - 1

FLAG_BOUNDARY = 1
FLAG_COMMIT = 2

_ENTRY = struct.Struct("<IIQQq")
ENTRY_SIZE = _ENTRY.size
_XACT_TIME = struct.Struct("<q")

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
"""TimestampTz counts microseconds from here (PostgreSQL's epoch, not Unix's)."""

ReadWal = Callable[[int, int], bytes]
"""read_wal(start, end): the WAL bytes [start, end), or a shorter prefix where WAL ends."""


def pg_time_to_datetime(pg_micros: int) -> datetime:
    """A TimestampTz (microseconds since 2000-01-01 UTC) as an aware datetime."""
    return PG_EPOCH + timedelta(microseconds=pg_micros)


def datetime_to_pg_time(t: datetime) -> int:
    """An aware datetime as a TimestampTz; naive datetimes are refused (which zone?)."""
    if t.tzinfo is None or t.utcoffset() is None:
        raise InvalidArgument(f"time {t.isoformat()} has no time zone; give one (e.g. +00:00)")
    return (t - PG_EPOCH) // timedelta(microseconds=1)


def _pack(flags: int, end_lsn: int, start_lsn: int, xact_time: int) -> bytes:
    body = _ENTRY.pack(0, flags, end_lsn, start_lsn, xact_time)[4:]
    return struct.pack("<I", crc32c(body)) + body


class LsnIndex:
    """Thread-safety: observe/add_boundary/flush from the ingest thread, queries from any."""

    def __init__(self, directory: Path, segment_size: int) -> None:
        self.directory = Path(directory)
        self.segment_size = segment_size
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / INDEX_FILE
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        """One flush at a time: a merged group's runs on the timeline's publisher thread, an
        L0 flush's on the flusher and NodeStore._write_layers' on its caller's."""
        self._b_end = array("Q")
        self._b_start = array("Q")
        self._c_end = array("Q")
        self._c_time = array("q")
        self._c_max = array("q")
        """Running maximum of commit times: monotonic, so bisectable."""
        self._pending = bytearray()
        self._last_lsn = -1
        self._last_sample = -1
        self._durable_size = 0
        """Bytes of the file holding entries made durable (by `_load` or `flush`)."""
        self._load()

    # --- durability ------------------------------------------------------------------------

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        valid = 0
        for offset in range(0, len(data) - ENTRY_SIZE + 1, ENTRY_SIZE):
            crc, flags, end, start, xtime = _ENTRY.unpack_from(data, offset)
            body = data[offset + 4 : offset + ENTRY_SIZE]
            if crc != crc32c(body) or end <= self._last_lsn or not flags:
                break
            self._append(flags, end, start, xtime)
            valid = offset + ENTRY_SIZE
        if valid != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(valid)
                f.flush()
                os.fsync(f.fileno())
        self._durable_size = valid

    def flush(self) -> None:
        """Append the buffered entries and fsync; a no-op when nothing is buffered."""
        with self._flush_lock:
            with self._lock:
                pending, self._pending = bytes(self._pending), bytearray()
            if not pending:
                return
            # The file's directory entry is not known durable until a flush succeeded (one
            # that failed after creating the file leaves that to the next).
            created = self._durable_size == 0
            try:
                self._write_at_durable_end(pending)
            except BaseException:
                with self._lock:
                    self._pending[:0] = pending
                raise
            self._durable_size += len(pending)
            if created:
                fsync_dir(self.directory)

    def _write_at_durable_end(self, data: bytes) -> None:
        """Write `data` after the entries known durable and fsync. A failed flush may have
        left some of its bytes in the file (a short write, or all of them with the fsync
        failing, which Linux reports once and a retry would not): they are cut off and
        written again, not appended twice (`_load` stops at the first repeated entry and
        would drop everything after it)."""
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, self._durable_size)
            view = memoryview(data)
            offset = self._durable_size
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- ingest ----------------------------------------------------------------------------

    def _append(self, flags: int, end: int, start: int, xtime: int) -> None:
        self._last_lsn = end
        if flags & FLAG_BOUNDARY:
            self._b_end.append(end)
            self._b_start.append(start)
            self._last_sample = end
        if flags & FLAG_COMMIT:
            self._c_end.append(end)
            self._c_time.append(xtime)
            self._c_max.append(max(xtime, self._c_max[-1]) if self._c_max else xtime)

    def _add(self, flags: int, end: int, start: int, xtime: int) -> None:
        with self._lock:
            if end <= self._last_lsn:
                return
            self._append(flags, end, start, xtime)
            self._pending += _pack(flags, end, start, xtime)

    def observe(self, record: DecodedRecord) -> None:
        """Note one ingested record (call for every record, in WAL order). O(1), no I/O."""
        end = record.end_lsn
        if end <= self._last_lsn:
            return  # re-ingest after a crash: already known
        if record.rmgr_id == RM_XACT_ID and (record.info & XLOG_XACT_OPMASK) in (
            XLOG_XACT_COMMIT,
            XLOG_XACT_COMMIT_PREPARED,
        ):
            if len(record.main_data) < _XACT_TIME.size:
                raise CorruptData(f"commit record at {format_lsn(record.lsn)} has no xact_time")
            (xtime,) = _XACT_TIME.unpack_from(record.main_data, 0)
            self._add(FLAG_BOUNDARY | FLAG_COMMIT, end, record.lsn, xtime)
        elif end - self._last_sample >= SAMPLE_DISTANCE:
            self._add(FLAG_BOUNDARY, end, record.lsn, 0)

    def observe_all(self, records: Sequence[DecodedRecord], start: int, stop: int) -> None:
        """`observe` each of records[start:stop], in one loop: most records need nothing
        (neither a commit nor SAMPLE_DISTANCE past the last sample), and a call per record
        was a tenth of a batch's ingest time; `_walingest.index_entries` runs this loop in C,
        this one is its reference and takes over where it stops)."""
        if isinstance(records, list):
            start = self._native_entries(records, start, stop)
        last, sample = self._last_lsn, self._last_sample
        for i in range(start, stop):
            record = records[i]
            end = record.end_lsn
            if end <= last:
                continue
            if record.rmgr_id == RM_XACT_ID or end - sample >= SAMPLE_DISTANCE:
                self.observe(record)
                last, sample = self._last_lsn, self._last_sample

    def observe_raw(self, batch: list[RawRecord], start: int, stop: int) -> None:
        """`observe_all` for records not decoded (those the fused C ingest took): the C
        loop reads them through their headers; a record it stops at is decoded here."""
        start = self._native_entries(batch, start, stop)
        for i in range(start, stop):
            self.observe(decode_record(batch[i]))

    def _native_entries(self, records: list[DecodedRecord] | list[RawRecord], start: int,
                        stop: int) -> int:  # fmt: skip
        """records[start:reached] observed by `_walingest.index_entries`; returns reached
        (`start` without the C extension)."""
        native = _native.walingest
        if native is None:
            return start
        with self._lock:
            c_max = self._c_max[-1] if self._c_max else None
            start, last, sample, *arrays, entries = native.index_entries(
                records, start, stop, self._last_lsn, self._last_sample, c_max,
                SAMPLE_DISTANCE,
            )  # fmt: skip
            targets = (self._b_end, self._b_start, self._c_end, self._c_time, self._c_max)
            for target, packed in zip(targets, arrays, strict=True):
                target.frombytes(packed)
            self._pending += entries
            self._last_lsn, self._last_sample = last, sample
        return start

    def add_boundary(self, end_lsn: int, record_start: int | None = None) -> None:
        """An exact record end known from elsewhere (import LSN, branch LSN); `record_start`
        is the start of the record ending there, if known (it validates the next prev-link)."""
        self._add(FLAG_BOUNDARY, end_lsn, NO_LSN if record_start is None else record_start, 0)

    @property
    def last_lsn(self) -> int:
        """The end LSN of the newest entry (-1 if none)."""
        return self._last_lsn

    # --- record boundaries -----------------------------------------------------------------

    def sample_at_or_below(self, lsn: int) -> tuple[int, int | None]:
        """The known record boundary at or below `lsn`, as (its LSN, the start of the record
        ending there or None): where decoding can start."""
        with self._lock:
            i = bisect.bisect_right(self._b_end, lsn) - 1
            if i < 0:
                raise NotFound(f"no WAL record boundary is known at or below {format_lsn(lsn)}")
            start = self._b_start[i]
            return self._b_end[i], None if start == NO_LSN else start

    def sample_at_or_above(self, lsn: int) -> tuple[int, int | None] | None:
        """The first known record boundary at or above `lsn` (as sample_at_or_below), if any."""
        with self._lock:
            i = bisect.bisect_left(self._b_end, lsn)
            if i == len(self._b_end):
                return None
            start = self._b_start[i]
            return self._b_end[i], None if start == NO_LSN else start

    def wal_needed_from(self, lsn: int) -> int:
        """Where snap(x) for any x >= lsn starts reading WAL: keep the archive from here."""
        return self.sample_at_or_below(lsn)[0]

    def snap(self, lsn: int, read_wal: ReadWal, timeline: int = 1) -> int:
        """The last record end at or below `lsn`, exactly (decoding from the nearest sample).

        Where the WAL that `read_wal` returns ends before `lsn`, the last record end in it
        (the caller keeps `lsn` at or below what was ingested).
        """
        pos, prev = self.sample_at_or_below(lsn)
        best = pos
        if pos == lsn:
            return lsn
        reader = WalReader(pos, self.segment_size, timeline, prev_lsn=prev)
        while True:
            data = read_wal(pos, pos + READ_CHUNK)
            if not data:
                return best
            reader.feed(data)
            pos += len(data)
            for rec in reader.records():
                if rec.end_lsn > lsn:
                    return best
                best = rec.end_lsn
                if best == lsn:
                    return best
            if reader.end_of_wal is not None or len(data) < READ_CHUNK:
                return best

    # --- commit timestamps -----------------------------------------------------------------

    def lsn_for_time(self, t: datetime) -> int | None:
        """The end LSN of the last commit before the first commit after `t` (inclusive
        recovery_target_time); None if the first known commit is already after `t`."""
        target = datetime_to_pg_time(t)
        with self._lock:
            i = bisect.bisect_right(self._c_max, target)
            return None if i == 0 else self._c_end[i - 1]

    def bounds(self) -> tuple[tuple[datetime, int], tuple[datetime, int]] | None:
        """((time, end LSN) of the first commit, of the last commit), or None if none."""
        with self._lock:
            if not self._c_end:
                return None
            return (
                (pg_time_to_datetime(self._c_time[0]), self._c_end[0]),
                (pg_time_to_datetime(self._c_time[-1]), self._c_end[-1]),
            )

    def commits(self) -> list[tuple[int, datetime]]:
        """Every (end LSN, time) known, in LSN order (for tests and listings)."""
        with self._lock:
            return [
                (e, pg_time_to_datetime(t)) for e, t in zip(self._c_end, self._c_time, strict=True)
            ]

    def boundaries(self) -> list[int]:
        with self._lock:
            return list(self._b_end)


def _newest_file(segs: list[ArchivedSegment], segno: int) -> ArchivedSegment | None:
    found = [s for s in segs if s.segno == segno]
    return max(found, key=lambda s: (s.timeline, not s.partial)) if found else None


def archive_reader(
    archive_dir: Path, segment_size: int, max_timeline: int | None = None
) -> ReadWal:
    """A `read_wal` over a WalArchive directory: per segment, the newest PostgreSQL timeline's
    file (complete before partial), up to `max_timeline` if given. Reads stop short where
    a segment file is missing or shorter."""
    archive = WalArchive(archive_dir, segment_size)

    def listing() -> list[ArchivedSegment]:
        return [s for s in archive.segments() if max_timeline is None or s.timeline <= max_timeline]

    def read_wal(start: int, end: int) -> bytes:
        segs = listing()
        out = bytearray()
        pos = start
        retried = False
        while pos < end:
            seg = _newest_file(segs, pos // segment_size)
            if seg is None:
                break
            offset = pos % segment_size
            want = min(end - pos, segment_size - offset)
            try:
                with open(seg.path, "rb") as f:
                    f.seek(offset)
                    data = f.read(want)
            except FileNotFoundError:
                if retried:
                    break
                retried = True  # the receiver completed (renamed) the partial file: look again
                segs = listing()
                continue
            out += data
            pos += len(data)
            if len(data) < want:
                break
        return bytes(out)

    return read_wal
