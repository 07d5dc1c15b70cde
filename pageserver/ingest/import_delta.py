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

A delta `.neon` file can also be read here whole (`import_delta_file`), as it arrives (a
`neon snapshot recv` writes it as it is pushed): its fork members' pages are put as their
frames come, verified, from the extractor's thread, and never written as a file; the rest
(a few small files) is extracted into a directory and put once the whole file checked
out. Before it, `recv` extracted the whole delta (the ~20 MiB of pages of a 1% change
into the pack), and only then did the pageserver read the pack back and put its pages:
~60 ms of a neon:// delta push after its last byte (bench/README.md, session 32).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from pageserver.ingest.import_datadir import ImageSink, add_datadir_values, import_lsn_of
from pageserver.reconstruct.value_format import encode_u32
from pageserver.storage.keys import Key, rel_block_key, rel_size_key
from pageserver.storage.timeline import Timeline
from pageserver.storage.values import Image
from pg15.constants import DEFAULTTABLESPACE_OID, GLOBALTABLESPACE_OID
from pg15.datadir_layout import database_directory, parse_relation_file_name
from pg15.lsn import format_lsn
from pg15.pg_control import ControlFile, read_control_file
from proto.errors import Conflict, CorruptData, InvalidArgument
from snapfile.delta import (
    BLOCK_NUMBER,
    DELTA_PREFIX,
    FORK_HEADER,
    PACK_NAME,
    ForkDelta,
    PackedFork,
    SnapshotIdentity,
    parse_fork_header,
    read_pack_index,
    record_size,
)

if TYPE_CHECKING:
    from pageserver.ingest.import_neon import NeonSource
    from snapfile.manifest import Manifest

BATCH_BYTES = 8 * 1024 * 1024
"""Values put at one LSN before the next (the in-memory layer freezes between them)."""
_LSN_STEP = 8
READ_RECORDS = 128
"""A fork member's records read at once (~1 MiB)."""


def import_delta(timeline: Timeline, datadir: Path) -> int:
    """Put the delta extracted at `datadir` on `timeline` (a fresh branch of its parent);
    returns the LSN to read the snapshot at."""
    start = timeline.last_record_lsn
    control, lsn = _delta_lsn(datadir, start)
    sink = _BranchPuts(timeline, start, lsn)
    pack = datadir / PACK_NAME
    if pack.exists() or pack.is_symlink():
        with _PackedForks(datadir, pack) as packed:
            add_datadir_values(sink, datadir, control, lsn, packed)
    else:  # extracted a file per member (before the pack)
        add_datadir_values(sink, datadir, control, lsn, _DeltaForks(datadir))
    sink.finish(control.checkpoint_lsn)
    return lsn


def import_delta_file(timeline: Timeline, source: NeonSource, datadir: Path, origin: str) -> int:
    """Put the delta `.neon` file `source` on `timeline` (a fresh branch of its parent), its
    fork members' pages as they are read, its other members extracted into `datadir` (absent
    or empty); returns the LSN to read the snapshot at. `origin`: the `origin_of` the
    manifest the caller read (refused if the file's differs). Anything wrong with the file
    fails the import (the caller deletes the branch: nothing of it shows)."""
    from pageserver.ingest.import_neon import check_origin, read_neon_file
    from snapfile.verified import check_pg_version

    label = source.label
    start = timeline.last_record_lsn
    forks = _StreamedForks(datadir)

    def on_manifest(manifest: Manifest) -> None:
        check_pg_version(manifest, label)
        check_origin(manifest, origin, label)
        if SnapshotIdentity.parent_of(manifest) is None:
            raise CorruptData(f"{label} is a whole snapshot file, not a delta")
        # Its pages go at LSNs just above the branch point, below the manifest's LSN (the
        # snapshot's: its shutdown checkpoint's record starts there), until the file's
        # pg_control (its last member) says the import LSN (that record's end): it must be
        # above them. The manifest's LSN may lie below the branch point (the parent's
        # import LSN: its checkpoint record's end) where little WAL separates the two
        # snapshots: only a batch of pages with no LSN left below it is refused.
        forks.sink = _BranchPuts(timeline, start, manifest.lsn)

    read_neon_file(source, datadir, on_manifest, delta_members=forks.member)
    assert forks.sink is not None
    control, lsn = _delta_lsn(datadir, start)
    forks.sink.end_at(lsn)
    add_datadir_values(forks.sink, datadir, control, lsn, forks)
    forks.check_all_taken()
    forks.sink.finish(control.checkpoint_lsn)
    return lsn


def _delta_lsn(datadir: Path, start: int) -> tuple[ControlFile, int]:
    """The extracted delta's pg_control and import LSN, which must be above `start` (its
    parent's LSN on the branch)."""
    control = read_control_file(datadir)
    lsn = import_lsn_of(datadir)
    _check_above(lsn, start, "its parent's")
    return control, lsn


def _check_above(lsn: int, below: int, what: str) -> None:
    if lsn <= below:
        raise Conflict(
            f"the delta's LSN {format_lsn(lsn)} is not above {what} {format_lsn(below)} on "
            "this pageserver"
        )


class _BranchPuts:
    """An ImageSink putting Images on the branch, a batch per LSN (see the module)."""

    def __init__(self, timeline: Timeline, start: int, final: int) -> None:
        self._timeline, self._final = timeline, final
        self._next = start + _LSN_STEP
        self._batch: list[tuple[Key, int, Image]] = []
        self._bytes = 0

    def end_at(self, final: int) -> None:
        """The final LSN, once known: above every batch put before it."""
        _check_above(final, self._next - _LSN_STEP, "the last LSN its pages were put at,")
        self._final = final

    def add(self, key: Key, data: bytes) -> None:
        self._batch.append((key, 0, Image(data)))
        self._bytes += len(data)
        if self._bytes >= BATCH_BYTES:
            if self._next >= self._final:  # the batch would only grow: memory, unbounded
                raise Conflict(
                    f"the delta carries more pages than fit between its parent's LSN and its "
                    f"own ({format_lsn(self._final)}) on this pageserver; push it whole "
                    "with --full"
                )
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
            rel_fork = _fork_of(path.name, str(path))
            if rel_fork is not None and path.is_file():
                found[rel_fork] = path
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
    records = ForkRecords(_fork_pages(sink, spc, db, rel, fork), size, name)
    records.write(read(FORK_HEADER.size))
    record = record_size()
    pages = 0 if records.delta is None else records.delta.pages  # None: `end` says why
    for first in range(0, pages, READ_RECORDS):
        want = min(pages - first, READ_RECORDS) * record
        data = read(want)
        records.write(data)
        if len(data) != want:
            break
    records.end()
    sink.add(rel_size_key(spc, db, rel, fork), encode_u32(records.nblocks))


def _fork_pages(
    sink: ImageSink, spc: int, db: int, rel: int, fork: int
) -> Callable[[int, bytes], None]:
    """What a fork's pages go to: `sink`, each at its block's key."""

    def add(blkno: int, page: bytes) -> None:
        sink.add(rel_block_key(spc, db, rel, fork, blkno), page)

    return add


class ForkRecords:
    """A delta fork member (snapfile/delta.py) taken in pieces of any size (`write`): each
    page goes to `add` (block number, page) as soon as its record is whole; `end` checks
    the member was whole, then `nblocks` is the fork's size (also told to `ended`). Every
    reader of a fork member (a file, the pack, a delta file read as it arrives) goes
    through it."""

    def __init__(
        self, add: Callable[[int, bytes], None], size: int, name: str,
        ended: Callable[[int], None] | None = None,
    ) -> None:  # fmt: skip
        self._add, self._size, self._name, self._ended = add, size, name, ended
        self._record = record_size()
        self._held = bytearray()  # a header or a record begun in one piece, to end in the next
        self._taken = 0
        self._previous = -1
        self.delta: ForkDelta | None = None
        """The member's header, once read."""
        self.nblocks = 0
        """The fork's size in blocks (once `end` returned)."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """The member's next bytes: its header first, then whole records go on."""
        view = memoryview(data).cast("B")
        self._taken += len(view)
        if self._taken > self._size:
            raise CorruptData(f"delta member {self._name!r} is longer than its {self._size} bytes")
        if self.delta is None:
            view = self._hold(view, FORK_HEADER.size)
            if len(self._held) < FORK_HEADER.size:
                return
            self.delta = parse_fork_header(bytes(self._held), self._size, self._name)
            self._held.clear()
        if self._held:
            view = self._hold(view, self._record)
            if len(self._held) < self._record:
                return
            self._page(self._held, 0)
            self._held.clear()
        whole = len(view) - len(view) % self._record
        for at in range(0, whole, self._record):
            self._page(view, at)
        self._held += view[whole:]

    def _hold(self, view: memoryview, size: int) -> memoryview:
        """Hold `view`'s first bytes up to `size` held; the rest of it."""
        take = size - len(self._held)
        self._held += view[:take]
        return view[take:]

    def _page(self, records: bytes | bytearray | memoryview, at: int) -> None:
        (blkno,) = BLOCK_NUMBER.unpack_from(records, at)
        assert self.delta is not None
        if not self._previous < blkno < self.delta.nblocks:
            raise CorruptData(
                f"delta member {self._name!r}: block {blkno} after {self._previous} in a fork "
                f"of {self.delta.nblocks} blocks"
            )
        self._previous = blkno
        if at + self._record <= len(records):
            self._add(blkno, bytes(records[at + BLOCK_NUMBER.size : at + self._record]))

    def end(self) -> None:
        """The member ended: CorruptData unless all of it came (named where it was cut)."""
        if self.delta is None:  # cut in its header
            parse_fork_header(bytes(self._held), self._size, self._name)
        assert self.delta is not None
        if self._taken != self._size:
            if len(self._held) >= BLOCK_NUMBER.size:
                self._page(self._held, 0)  # its order checked, as a whole record's
                (blkno,) = BLOCK_NUMBER.unpack_from(self._held)
                raise CorruptData(f"delta member {self._name!r} ends inside block {blkno}")
            if self._held:
                raise CorruptData(f"delta member {self._name!r} ends inside a block number")
            where = f"block {self._previous}" if self._previous >= 0 else "its header"
            raise CorruptData(f"delta member {self._name!r} ends after {where}")
        self.nblocks = self.delta.nblocks
        if self._ended is not None:
            self._ended(self.nblocks)


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
            rel_fork = _fork_of(file_name, member.fork_path)
            if rel_fork is not None:
                self._dirs.setdefault(parent, {})[rel_fork] = member

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


class _StreamedForks:
    """The fork members of a delta file read here (`import_delta_file`): `member` (the
    extractor's DeltaMembers) puts each one's pages on `sink` as they arrive; once the file
    checked out, its directory is imported with these as its forks (a ForkFiles, adding
    their sizes) and `check_all_taken` refuses a member of no database directory."""

    def __init__(self, datadir: Path) -> None:
        self._datadir = datadir
        self.sink: _BranchPuts | None = None
        """Set by the manifest, which comes before any member."""
        self._dirs: dict[str, dict[tuple[int, int], _StreamedFork]] = {}
        self._found: set[str] = set()

    def member(self, fork_path: str, size: int) -> ForkRecords | _Stray:
        """The parser member `fork_path` (below neon-delta/, `size` bytes) is fed to."""
        directory, _, file_name = fork_path.rpartition("/")
        name = DELTA_PREFIX + fork_path
        rel_fork = _fork_of(file_name, name)
        if rel_fork is None:
            return _Stray()  # as a stray file among the members: not a fork
        place = _database_of(directory)
        if place is None:
            raise CorruptData(f"delta member {name} is not in a database's directory")
        forks = self._dirs.setdefault(directory, {})
        if rel_fork in forks:
            raise CorruptData(f"the delta holds member {name!r} twice")
        assert self.sink is not None
        # Only its place and size are kept once it ended (not the parser: a delta of a
        # million bare fork headers is a few MiB of file).
        fork = forks[rel_fork] = _StreamedFork(*place)
        pages = _fork_pages(self.sink, *place, *rel_fork)
        return ForkRecords(pages, size, name, ended=fork.ended)

    def find(self, directory: Path) -> Mapping[tuple[int, int], object]:
        relative = str(directory.relative_to(self._datadir))
        self._found.add(relative)
        return self._dirs.get(relative, {})

    def add_fork(
        self, sink: ImageSink, spc: int, db: int, rel: int, fork: int, found: object
    ) -> None:
        streamed = cast(_StreamedFork, found)
        if (streamed.spc, streamed.db) != (spc, db):  # not what the directory walk says
            raise CorruptData(f"delta member for relation {rel} is in another database's place")
        sink.add(rel_size_key(spc, db, rel, fork), encode_u32(streamed.nblocks))

    def check_all_taken(self) -> None:
        """Every member was in a database directory of the delta (its pages were put)."""
        for directory in sorted(set(self._dirs) - self._found):
            raise CorruptData(
                f"the delta has fork members under {DELTA_PREFIX}{directory} but no database "
                f"directory {directory}"
            )


@dataclass(slots=True)
class _StreamedFork:
    """Where a streamed fork member's pages went, and its fork's size once it ended."""

    spc: int
    db: int
    nblocks: int = 0

    def ended(self, nblocks: int) -> None:
        self.nblocks = nblocks


def _fork_of(file_name: str, name: str) -> tuple[int, int] | None:
    """(relnode, fork) of a delta member's file name; None for a file that is no fork (a
    stray file among the members, skipped); CorruptData for a segment's name."""
    parsed = parse_relation_file_name(file_name)
    if parsed is None:
        return None
    rel, fork, segno = parsed
    if segno != 0:
        raise CorruptData(f"delta member {name}: names a segment, not a fork")
    return rel, fork


class _Stray:
    """A member under neon-delta/ that is no fork: its bytes are dropped."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def end(self) -> None:
        pass


def _database_of(directory: str) -> tuple[int, int] | None:
    """The (tablespace, database) whose directory inside PGDATA `directory` is (global,
    base/<db>, pg_tblspc/<spc>/PG_15_.../<db>: datadir_layout's `database_directory`)."""
    if directory == "global":
        return GLOBALTABLESPACE_OID, 0
    head, _, db = directory.rpartition("/")
    if not _oid_text(db):
        return None
    if head == "base":
        spc = DEFAULTTABLESPACE_OID
    else:
        parts = head.split("/")
        if len(parts) != 3 or parts[0] != "pg_tblspc" or not _oid_text(parts[1]):
            return None
        spc = int(parts[1])
    place = spc, int(db)
    try:
        return place if database_directory(*place) == directory else None
    except InvalidArgument:  # a default tablespace's OID under pg_tblspc
        return None


def _oid_text(text: str) -> bool:
    """ASCII digits only (str.isdigit takes "²", which int() refuses)."""
    return text.isascii() and text.isdigit()
