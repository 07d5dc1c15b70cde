"""Import a delta `.neon` file on a branch of its parent: work in proportion to the change.

A receiver that holds the parent of a pushed delta (snapfile/delta.py) need not rebuild the
whole data directory: the delta's tar, extracted as it is (every non-relation file whole,
each relation fork's `neon-delta/<fork path>` member in the one file PACK_NAME; a directory
extracted with a file per member is read too), goes onto a new timeline branched
from the parent snapshot. What a whole import writes (import_datadir.py) is put again, except
that a relation fork's pages are only those the member carries (written since the parent;
an all-zero one too, since below it the parent's page would show) and its size; the relation
directories list the forks the delta has, so a dropped relation is gone. Keys it does not put
read through to the parent: exactly the pages nobody wrote.

The values go through the timeline's in-memory layer, in batches put at successive LSNs just
above the branch point and advanced one by one, so that layers freeze at the usual size and
memory stays bounded; the snapshot is read at the import LSN a whole import of the same
directory would use (the end of its shutdown checkpoint record), above all of them.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import cast

from pageserver.ingest.import_datadir import ImageSink, add_datadir_values, import_lsn_of
from pageserver.reconstruct.value_format import encode_u32
from pageserver.storage.keys import Key, rel_block_key, rel_size_key
from pageserver.storage.timeline import Timeline
from pageserver.storage.values import Image
from pg15.datadir_layout import parse_relation_file_name
from pg15.lsn import format_lsn
from pg15.pg_control import read_control_file
from proto.errors import Conflict, CorruptData
from snapfile.delta import (
    BLOCK_NUMBER,
    DELTA_PREFIX,
    FORK_HEADER,
    PACK_NAME,
    PackedFork,
    parse_fork_header,
    read_pack_index,
    record_size,
)

BATCH_BYTES = 8 * 1024 * 1024
"""Values put at one LSN before the next (the in-memory layer freezes between them)."""
_LSN_STEP = 8
READ_RECORDS = 128
"""A fork member's records read at once (~1 MiB)."""


def import_delta(timeline: Timeline, datadir: Path) -> int:
    """Put the delta extracted at `datadir` on `timeline` (a fresh branch of its parent);
    returns the LSN to read the snapshot at."""
    control = read_control_file(datadir)
    lsn = import_lsn_of(datadir)
    start = timeline.last_record_lsn
    if lsn <= start:
        raise Conflict(
            f"the delta's LSN {format_lsn(lsn)} is not above its parent's "
            f"{format_lsn(start)} on this pageserver"
        )
    sink = _BranchPuts(timeline, start, lsn)
    pack = datadir / PACK_NAME
    if pack.exists() or pack.is_symlink():
        with _PackedForks(datadir, pack) as packed:
            add_datadir_values(sink, datadir, control, lsn, packed)
    else:  # extracted a file per member (before the pack)
        add_datadir_values(sink, datadir, control, lsn, _DeltaForks(datadir))
    sink.finish(control.checkpoint_lsn)
    return lsn


class _BranchPuts:
    """An ImageSink putting Images on the branch, a batch per LSN (see the module)."""

    def __init__(self, timeline: Timeline, start: int, final: int) -> None:
        self._timeline, self._final = timeline, final
        self._next = start + _LSN_STEP
        self._batch: list[tuple[Key, int, Image]] = []
        self._bytes = 0

    def add(self, key: Key, data: bytes) -> None:
        self._batch.append((key, 0, Image(data)))
        self._bytes += len(data)
        if self._bytes >= BATCH_BYTES and self._next < self._final:
            lsn = self._next
            self._put(lsn)
            self._timeline.advance_last_record_lsn(lsn, None)
            self._next += _LSN_STEP

    def _put(self, lsn: int) -> None:
        self._timeline.put_batch((key, lsn, value) for key, _, value in self._batch)
        self._batch, self._bytes = [], 0

    def finish(self, prev_record_lsn: int) -> None:
        self._put(self._final)
        self._timeline.advance_last_record_lsn(self._final, prev_record_lsn)


class _DeltaForks:
    """A database directory's forks are the delta's members under neon-delta/ (the first
    segment's path); each carries the fork's size and its pages written since the parent."""

    def __init__(self, datadir: Path) -> None:
        self._datadir = datadir
        self._members = datadir / DELTA_PREFIX.rstrip("/")

    def find(self, directory: Path) -> Mapping[tuple[int, int], object]:
        found: dict[tuple[int, int], object] = {}
        members = self._members / directory.relative_to(self._datadir)
        if not members.is_dir():
            return found
        for path in members.iterdir():
            parsed = parse_relation_file_name(path.name)
            if parsed is None or not path.is_file():
                continue
            rel, fork, segno = parsed
            if segno != 0:
                raise CorruptData(f"delta member {path}: names a segment, not a fork")
            found[(rel, fork)] = path
        return found

    def add_fork(
        self, sink: ImageSink, spc: int, db: int, rel: int, fork: int, found: object
    ) -> None:
        path = cast(Path, found)
        name = str(path.relative_to(self._datadir))
        with path.open("rb") as f:
            _add_member(sink, spc, db, rel, fork, f.read, path.stat().st_size, name)


def _add_member(
    sink: ImageSink, spc: int, db: int, rel: int, fork: int, read: Callable[[int], bytes],
    size: int, name: str,
) -> None:  # fmt: skip
    """The pages of fork member `name` (`size` bytes, read in order through `read`), then
    the fork's size. Read READ_RECORDS records at a time: a read per block number and one
    per page were two system calls a page, half of a 1% delta's import (~5,400 preads)."""
    delta = parse_fork_header(read(FORK_HEADER.size), size, name)
    record = record_size()
    previous = -1
    for first in range(0, delta.pages, READ_RECORDS):
        want = min(delta.pages - first, READ_RECORDS) * record
        records = read(want)
        for at in range(0, len(records), record):
            if at + BLOCK_NUMBER.size > len(records):
                raise CorruptData(f"delta member {name!r} ends inside a block number")
            (blkno,) = BLOCK_NUMBER.unpack_from(records, at)
            if not previous < blkno < delta.nblocks:
                raise CorruptData(
                    f"delta member {name!r}: block {blkno} after {previous} in a fork of "
                    f"{delta.nblocks} blocks"
                )
            previous = blkno
            if at + record > len(records):
                raise CorruptData(f"delta member {name!r} ends inside block {blkno}")
            page = records[at + BLOCK_NUMBER.size : at + record]
            sink.add(rel_block_key(spc, db, rel, fork, blkno), page)
        if len(records) != want:  # cut where a record ends
            where = f"block {previous}" if previous >= 0 else "its header"
            raise CorruptData(f"delta member {name!r} ends after {where}")
    sink.add(rel_size_key(spc, db, rel, fork), encode_u32(delta.nblocks))


class _PackedForks:
    """As _DeltaForks, the members read from the extraction's one pack file (snapfile/delta.py
    PACK_NAME), opened without following a link and checked to be a regular file."""

    def __init__(self, datadir: Path, pack: Path) -> None:
        self._datadir = datadir
        self._fd = os.open(pack, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptData(f"{pack} is not a regular file")
            members = read_pack_index(self._read_at, st.st_size)
        except BaseException:
            os.close(self._fd)
            raise
        self._dirs: dict[str, dict[tuple[int, int], PackedFork]] = {}
        for member in members:
            parent, _, file_name = member.fork_path.rpartition("/")
            parsed = parse_relation_file_name(file_name)
            if parsed is None:
                continue  # as a stray file among the members: not a fork
            rel, fork, segno = parsed
            if segno != 0:
                raise CorruptData(f"delta member {member.fork_path}: names a segment, not a fork")
            self._dirs.setdefault(parent, {})[(rel, fork)] = member

    def _read_at(self, offset: int, n: int) -> bytes:
        return os.pread(self._fd, n, offset)

    def __enter__(self) -> _PackedForks:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)

    def find(self, directory: Path) -> Mapping[tuple[int, int], object]:
        return self._dirs.get(str(directory.relative_to(self._datadir)), {})

    def add_fork(
        self, sink: ImageSink, spc: int, db: int, rel: int, fork: int, found: object
    ) -> None:
        member = cast(PackedFork, found)
        at = member.offset

        def read(n: int) -> bytes:
            nonlocal at
            data = self._read_at(at, min(n, member.offset + member.size - at))
            at += len(data)
            return data

        name = DELTA_PREFIX + member.fork_path
        _add_member(sink, spc, db, rel, fork, read, member.size, name)
