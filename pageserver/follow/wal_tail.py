"""A stopped node's WAL tail: what its walsender had not sent, taken from its own pg_wal.

`pg checkout` stops the node at once (an immediate shutdown: every process quits, no
shutdown checkpoint, its walsender too), which saves the checkpoint's writes and fsyncs of
every dirty page, pages the checkout's delta rewrites anyway (cli/checkout_delta.py). What the
node last wrote is then in its pg_wal only: the walsender sends WAL once it is flushed and
was killed with the rest. Stock PostgreSQL, started on that directory, would replay its WAL to
the end of the valid WAL: recovery stops at the first record that fails validation (a page
header with the wrong address, a zero or impossible length, a wrong prev-link, a CRC that
does not match: xlogreader.c XLogReadRecord, "invalid record length", "incorrect resource
manager data checksum", ... end the redo loop of xlogrecovery.c PerformWalRecovery without an
error). The node's state is that of its last valid record, so the history is brought there:

1. a reader takes the stream up where the follower's decoder stands (the start of the record
   it reassembles, or of the next one: `WalReader.resume_point`), fed the archive's bytes up
   to its durable end, then the node's segment files from there, and finds the end of the
   last whole valid record (`valid_end`);
2. the bytes from the archive's end to there are appended to the archive (under the
   receiver's lock, fsynced, its clean-close mark written: a later receiver resumes exactly
   there), and only then decoded, as streamed WAL is: the layers never hold a record the
   archive does not.

The bytes past that end are never taken, so the node's own crash recovery (a failed checkout
starts it again) continues the archive exactly where it ends: PostgreSQL writes its next WAL
from the end of the last valid record (or, after a record whose continuation is missing, at
the page where it should have gone, with XLP_FIRST_IS_OVERWRITE_CONTRECORD: xlog.c
StartupXLOG), bytes the receiver then streams from there.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pg15.lsn import format_lsn, segment_file_name
from pg15.xlog_reader import WalCorrupt, WalReader
from proto.errors import CorruptData, Unavailable
from walreceiver.archive import WalArchive
from walreceiver.receiver import open_archive_lock, try_archive_lock

LOCK_WAIT = 5.0
LOCK_POLL = 0.002
"""The archive's lock is free once its receiver reported its end (it gives the lock up
before): waited for a little, should the report have raced the release."""
READ_CHUNK = 1 << 20
"""Bytes of a segment file read (and scanned) at a time: the scan stops at the end of the
valid WAL, usually in the first MiB of the tail."""


def pg_wal_bytes(
    pg_wal: Path,
    timeline: int,
    segment_size: int,
    start: int,
    end: int | None = None,
    sync: bool = False,
) -> Iterator[tuple[int, bytes]]:
    """(lsn, bytes) of `timeline`'s WAL from `start` (up to `end`, if given) in the segment
    files of the directory `pg_wal`, until the next segment's file does not exist, which is
    where PostgreSQL's WAL ends too (xlogrecovery.c XLogFileRead: ENOENT only; any other
    failure is an error there, and here: the WAL read so far would be taken for the end).
    The segment holding `start` must exist unless `start` begins it. Regular files of a
    segment's size only, never through a link (the directory is PostgreSQL's account's).
    `sync`: each file fsynced before its bytes are given (they are made durable elsewhere
    next: a node that crashed had not flushed all it wrote)."""
    lsn = start
    while end is None or lsn < end:
        segno, offset = divmod(lsn, segment_size)
        path = pg_wal / segment_file_name(timeline, segno, segment_size)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            if offset:
                raise Unavailable(
                    f"{path} does not exist: the node's WAL from {format_lsn(lsn)} is not "
                    f"in {pg_wal}"
                ) from None
            return
        except OSError as exc:
            raise Unavailable(f"cannot read {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != segment_size:
                raise CorruptData(
                    f"{path} is not a WAL segment ({st.st_size} bytes"
                    f"{'' if stat.S_ISREG(st.st_mode) else ', not a regular file'})"
                )
            if sync:
                os.fsync(fd)
            while offset < segment_size and (end is None or lsn < end):
                want = min(READ_CHUNK, segment_size - offset)
                if end is not None:
                    want = min(want, end - lsn)
                data = os.pread(fd, want, offset)
                if len(data) != want:
                    raise CorruptData(f"{path} was cut short while it was read")
                yield lsn, data
                lsn += want
                offset += want
        except OSError as exc:
            raise Unavailable(f"cannot read {path}: {exc.strerror}") from None
        finally:
            os.close(fd)


def valid_end(reader: WalReader, chunks: Iterable[tuple[int, bytes]]) -> int | None:
    """The end of the last whole valid record `reader` finds in `chunks` (contiguous, from
    where it stands), None for none: like recovery, the first record that fails validation
    (`WalCorrupt` included: a torn last record fails its CRC) or the ordinary end of written
    WAL ends it."""
    last = None
    for lsn, data in chunks:
        if lsn != reader.fed_lsn:
            raise ValueError(f"chunk at {format_lsn(lsn)} after {format_lsn(reader.fed_lsn)}")
        reader.feed(data)
        try:
            while batch := reader.read_batch():
                last = batch[-1].end_lsn
        except WalCorrupt:
            return last
        if reader.end_of_wal is not None:
            return last
    return last


@contextmanager
def locked_archive(directory: Path, segment_size: int) -> Iterator[WalArchive]:
    """The node's archive, for writing, under the lock a receiver process holds for its life
    (walreceiver/receiver.py lock_archive_dir): none may write it meanwhile."""
    fd = open_archive_lock(directory)
    try:
        deadline = time.monotonic() + LOCK_WAIT
        while not try_archive_lock(fd):
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"a walreceiver still writes {directory}: the node's WAL tail "
                    "cannot be added to it now; try again once `neon pg show` says the "
                    "node is paused"
                )
            time.sleep(LOCK_POLL)
        yield WalArchive(directory, segment_size)
    finally:
        os.close(fd)


def append_tail(archive: WalArchive, pg_wal: Path, timeline: int, start: int, end: int) -> None:
    """Append the node's WAL [start, end) from `pg_wal` to `archive` (which holds what is
    before `start`), durably, its clean-close mark at `end` (nothing appended where `end`
    is `start`: what the archive holds is made durable all the same)."""
    archive.begin(timeline, start)
    try:
        chunks = pg_wal_bytes(pg_wal, timeline, archive.segment_size, start, end, sync=True)
        for lsn, data in chunks:
            archive.write(lsn, data)
    finally:
        archive.close()  # what it wrote is valid WAL the scan read: kept, whatever follows
    if archive.flushed_lsn != end:
        raise Unavailable(
            f"{pg_wal} changed while its WAL was read: it ends at "
            f"{format_lsn(archive.flushed_lsn)} now, not {format_lsn(end)}"
        )
