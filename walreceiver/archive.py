"""A durable directory of raw WAL, laid out like pg_wal.

Files are named as PostgreSQL names segments. The segment being written carries a `.partial`
suffix and holds exactly the bytes received so far (no zero pre-fill, so its size says how
far it got). When it is full it is fsynced, renamed to its final name, and the directory
fsynced: a complete segment in the archive is always whole and byte-identical to the server's.

Resume rule (after a crash, SIGKILL or power loss): streaming restarts at the newest file's
valid prefix: a complete segment resumes at the next segment's start; a partial one at its
size rounded down to a WAL page (8192), then further down past any page whose header does not
carry its own address (`xlp_pageaddr`), which catches a torn or zero-filled tail left by a lost
page cache. Those bytes are truncated and received again; the server resends them because the
flush position we reported (and so the slot's restart_lsn) is never beyond what was fsynced,
and the resume point stays inside the segment the slot still retains.

A clean close (`close`: the stream ended, the node stopped, the receiver was told to stop)
records in CLOSED_MARKER how far the partial segment is durable, and `resume` starts exactly
there while that file is the newest and still holds those bytes, its whole pages and the page
those bytes end in carrying their address; the next `begin` removes the record before it
writes. Rounded down to a page, the last bytes of a stopped node's WAL (its shutdown
checkpoint, its last commits: up to 8 KiB) were left out of what a restarted pageserver
re-ingests from the archive until the node streamed again: a checkout waited 30 s for that
checkpoint, a branch at a snapshot in that tail 120 s (`_wait_reingested`). Streaming from
such a mid-page point is what PostgreSQL does anyway: START_REPLICATION sends from exactly
the requested LSN (walsender.c StartReplication: `sentPtr = cmd->startpoint`; XLogSendPhysical
sends from sentPtr, its XLogData's dataStart), not from that page's start.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from durable_files import fsync_dir, write_file_durably
from pg15.constants import XLOG_BLCKSZ
from pg15.lsn import (
    format_lsn,
    lsn_segno,
    parse_segment_file_name,
    segment_file_name,
    segment_start,
)
from proto.errors import CorruptData, InvalidArgument

PARTIAL = ".partial"
CLOSED_MARKER = ".closed"
"""`<timeline> <segno> <bytes>`: the partial segment was durable up to there at a clean close."""
_PAGEADDR = struct.Struct("<Q")
_PAGEADDR_OFFSET = 8
_SYSID_OFFSET = 24  # in the long header of a segment's first page


@dataclass(frozen=True, slots=True)
class ArchivedSegment:
    timeline: int
    segno: int
    partial: bool
    path: Path


class WalArchive:
    """Writes streamed WAL into segment files; `flush()` returns the fsynced end LSN.

    Not thread-safe: the owner serializes calls (the receiver runs them on one worker thread
    so fsync never blocks the event loop).
    """

    def __init__(self, directory: Path, segment_size: int) -> None:
        if segment_size < XLOG_BLCKSZ or segment_size & (segment_size - 1):
            raise InvalidArgument(f"WAL segment size {segment_size} is not a power of two")
        self.directory = Path(directory)
        self.segment_size = segment_size
        self.timeline = 0
        self.written_lsn = 0
        self.flushed_lsn = 0
        self.attempted_lsn = 0
        """The end of the WAL last asked to be written: past written_lsn after a failed
        write, whose bytes may be in the file in part."""
        self._fd: int | None = None
        self._segno = -1
        self._dirty = False
        self._dir_dirty = False
        self._begun = False
        self.directory.mkdir(parents=True, exist_ok=True)

    # -- inventory ------------------------------------------------------------------------

    def segments(self) -> list[ArchivedSegment]:
        """Every segment file, ordered by (timeline, segno), complete before partial."""
        out = []
        for entry in os.scandir(self.directory):
            try:
                tli, segno, partial = parse_segment_file_name(entry.name, self.segment_size)
            except InvalidArgument:
                continue
            out.append(ArchivedSegment(tli, segno, partial, Path(entry.path)))
        out.sort(key=lambda s: (s.timeline, s.segno, s.partial))
        return out

    def _valid_prefix(self, path: Path, seg_start: int) -> int:
        """Length of the partial file's page-aligned prefix whose pages carry their address."""
        size = path.stat().st_size
        if size > self.segment_size:
            raise CorruptData(
                f"{path} is {size} bytes, larger than a {self.segment_size}-byte segment; "
                "was the archive written with another wal_segment_size? Move it away."
            )
        end = size - size % XLOG_BLCKSZ
        with open(path, "rb") as f:
            while end > 0:
                page = end - XLOG_BLCKSZ
                f.seek(page + _PAGEADDR_OFFSET)
                raw = f.read(_PAGEADDR.size)
                if len(raw) == _PAGEADDR.size and _PAGEADDR.unpack(raw)[0] == seg_start + page:
                    break
                end = page
        return end

    def system_identifier(self) -> int | None:
        """The xlp_sysid in the newest segment's long page header, if it has one."""
        segs = self.segments()
        if not segs:
            return None
        with open(segs[-1].path, "rb") as f:
            head = f.read(_SYSID_OFFSET + 8)
        if len(head) < _SYSID_OFFSET + 8:
            return None
        return int(_PAGEADDR.unpack_from(head, _SYSID_OFFSET)[0])

    def resume(self) -> tuple[int, int] | None:
        """(timeline, LSN) to restart streaming from, or None for an empty archive."""
        segs = self.segments()
        if not segs:
            return None
        newest = segs[-1]
        start = segment_start(newest.segno, self.segment_size)
        if not newest.partial:
            return newest.timeline, start + self.segment_size
        valid = self._valid_prefix(newest.path, start)
        closed = self._closed_at(newest)
        if (
            closed is not None
            and closed - closed % XLOG_BLCKSZ == valid  # its whole pages carry their address
            and self._tail_page_ok(newest.path, start, closed)
        ):
            return newest.timeline, start + closed
        return newest.timeline, start + valid

    @staticmethod
    def _tail_page_ok(path: Path, seg_start: int, closed: int) -> bool:
        """The page `closed` ends in carries its address too, when it holds that far: bytes
        trusted past the whole pages are never received again, so a torn or zeroed tail page
        (fsynced data lost after all) would stay in the archive, unlike the rounded-down rule,
        which receives it again."""
        page = closed - closed % XLOG_BLCKSZ
        if closed - page < _PAGEADDR_OFFSET + _PAGEADDR.size:
            return True  # the header's address is not there yet
        with open(path, "rb") as f:
            f.seek(page + _PAGEADDR_OFFSET)
            raw = f.read(_PAGEADDR.size)
        return len(raw) == _PAGEADDR.size and _PAGEADDR.unpack(raw)[0] == seg_start + page

    def _closed_at(self, newest: ArchivedSegment) -> int | None:
        """The bytes of `newest` a clean close made durable, if it recorded them for this
        very file and the file still holds them."""
        try:
            timeline, segno, size = map(int, (self.directory / CLOSED_MARKER).read_text().split())
        except (OSError, ValueError):
            return None
        if (timeline, segno) != (newest.timeline, newest.segno):
            return None
        if not 0 <= size <= min(newest.path.stat().st_size, self.segment_size):
            return None
        return size

    # -- writing --------------------------------------------------------------------------

    def _path(self, timeline: int, segno: int, partial: bool) -> Path:
        name = segment_file_name(timeline, segno, self.segment_size)
        return self.directory / (name + (PARTIAL if partial else ""))

    def begin(self, timeline: int, lsn: int) -> None:
        """Position for writing at `lsn` on `timeline` (a segment start or a resume point).

        Mid-segment starts need that segment's partial file to hold at least the bytes before
        `lsn`; anything after it is truncated (it will be received again).
        """
        self._close_current()
        (self.directory / CLOSED_MARKER).unlink(missing_ok=True)  # the files change from here
        segno = lsn_segno(lsn, self.segment_size)
        offset = lsn - segment_start(segno, self.segment_size)
        if self._path(timeline, segno, False).exists():
            raise InvalidArgument(
                f"segment {segment_file_name(timeline, segno, self.segment_size)} is already "
                f"complete in {self.directory}; cannot write {format_lsn(lsn)} into it again"
            )
        path = self._path(timeline, segno, True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        size = os.fstat(fd).st_size
        if size < offset:
            os.close(fd)
            raise CorruptData(
                f"cannot resume at {format_lsn(lsn)}: {path} holds only {size} bytes of that "
                "segment; streaming must start at a segment boundary"
            )
        if size != offset:
            os.ftruncate(fd, offset)
        if offset:
            # The bytes before `lsn` are reported flushed from here on (and so to the server,
            # which may then recycle them); a writer that was killed or failed left them in
            # the page cache only, so they are made durable first, the file's name too.
            try:
                os.fsync(fd)
                fsync_dir(self.directory)
            except OSError as exc:
                os.close(fd)
                raise OSError(exc.errno, f"fsync failed: {exc.strerror}", str(path)) from None
        os.lseek(fd, offset, os.SEEK_SET)
        self._fd, self._segno, self.timeline = fd, segno, timeline
        self._begun = True
        self.written_lsn = self.flushed_lsn = lsn
        self._dirty = size != offset
        self._dir_dirty = size == 0

    def write(self, lsn: int, data: bytes | memoryview) -> None:
        """Append WAL received at `lsn`; it must continue exactly where the last write ended."""
        if not self._begun:
            raise InvalidArgument("WalArchive.write before begin()")
        if lsn != self.written_lsn:
            raise CorruptData(
                f"WAL chunk at {format_lsn(lsn)} does not continue the archive at "
                f"{format_lsn(self.written_lsn)}"
            )
        self.attempted_lsn = lsn + len(data)
        view = memoryview(data)
        while view:
            if self._fd is None:  # the previous segment just completed
                path = self._path(self.timeline, self._segno, True)
                self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                self._dir_dirty = True
            seg_end = segment_start(self._segno + 1, self.segment_size)
            n = min(len(view), seg_end - self.written_lsn)
            piece = view[:n]
            try:
                while piece:
                    written = os.write(self._fd, piece)
                    piece = piece[written:]
            except OSError as exc:  # ENOSPC above all: say which file (write() does not)
                path = self._path(self.timeline, self._segno, True)
                raise OSError(exc.errno, exc.strerror, str(path)) from None
            self.written_lsn += n
            self._dirty = True
            view = view[n:]
            if self.written_lsn == seg_end:
                self._complete_segment()

    def _complete_segment(self) -> None:
        """fsync the full segment and give it its final name; the next opens on demand."""
        assert self._fd is not None
        self._fsync_or_forget()
        os.close(self._fd)
        self._fd = None
        os.replace(
            self._path(self.timeline, self._segno, True),
            self._path(self.timeline, self._segno, False),
        )
        try:
            fsync_dir(self.directory)
        except OSError:
            # The bytes are durable, the new name may not be: the archive ends without
            # reporting the segment flushed (a write would otherwise reopen this segment's
            # number); `begin` again resumes after what the directory holds.
            self._end_unflushed()
            raise
        self.flushed_lsn = self.written_lsn
        self._segno += 1
        self._dirty = False

    def _fsync_or_forget(self) -> None:
        """fsync the segment being written. When that fails, what was written since the last
        good fsync is not durable, and a later fsync would not say so: Linux reports a
        writeback error once, then marks the lost pages clean ("fsyncgate"; PostgreSQL PANICs
        on it, data_sync_retry = off). So the file is cut back to the durable end, the archive
        ends (`begin` again resumes there) and the error is raised: those bytes are received
        again, never reported as flushed."""
        assert self._fd is not None
        try:
            os.fsync(self._fd)
        except OSError as exc:
            path = self._path(self.timeline, self._segno, True)
            durable = max(0, self.flushed_lsn - segment_start(self._segno, self.segment_size))
            try:
                os.ftruncate(self._fd, durable)
            finally:
                os.close(self._fd)
                self._fd = None
                self._end_unflushed()
            raise OSError(exc.errno, f"fsync failed: {exc.strerror}", str(path)) from None

    def _end_unflushed(self) -> None:
        """End the archive at what was last made durable (`flushed_lsn`): nothing more is
        written until `begin`, and what was written since is not reported flushed."""
        self._begun = False
        self.written_lsn = self.flushed_lsn
        self._dirty = False

    def flush(self) -> int:
        """fsync what was written; return the LSN up to which WAL is durable."""
        if self._fd is not None and self._dirty:
            self._fsync_or_forget()
            self._dirty = False
        if self._dir_dirty:
            fsync_dir(self.directory)
            self._dir_dirty = False
        self.flushed_lsn = self.written_lsn
        return self.flushed_lsn

    def write_history(self, filename: str, content: bytes) -> Path:
        """Store a timeline history file (atomically: temp file, fsync, rename, dir fsync)."""
        if "/" in filename or not filename.endswith(".history"):
            raise CorruptData(f"refusing to store history file with name {filename!r}")
        path = self.directory / filename
        tmp = path.with_name(filename + ".tmp")
        with open(tmp, "wb") as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.directory)
        return path

    def _close_current(self) -> None:
        if self._begun:
            self.flush()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._begun = False

    def close(self) -> int:
        """Flush and close; the current segment stays `.partial`, how far it is durable
        recorded (CLOSED_MARKER). Returns the flushed LSN."""
        begun, segno, timeline = self._begun, self._segno, self.timeline
        self._close_current()
        if begun and self.flushed_lsn:
            partial = self._path(timeline, segno, True)
            size = self.flushed_lsn - segment_start(segno, self.segment_size)
            if partial.exists() and 0 <= size < self.segment_size:
                write_file_durably(
                    self.directory / CLOSED_MARKER, f"{timeline} {segno} {size}\n".encode()
                )
        return self.flushed_lsn
