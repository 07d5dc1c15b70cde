"""Import a cleanly shut-down PostgreSQL 15 data directory as the base of a timeline.

Everything is written as image layers at one LSN (streamed in key order by `ImageRunWriter`, so
an import of any size holds about one layer in memory): the **end of the shutdown checkpoint
record** that pg_control points at (for a record that does not cross a page, checkpoint LSN +
120: 114 bytes MAXALIGNed; computed exactly across page headers, and checked against the WAL
segment when it is present). That is the LSN a read must use to see exactly this directory, and
the EndRecPtr a WAL reader reports for the checkpoint record; ingest continues with the records
after it (`WalIngest.ingest_record` skips records whose end LSN is not above it, so the caller
may feed WAL from the segment start). prev_record_lsn is the checkpoint record's LSN.

What is imported (value formats: `pageserver.reconstruct.value_format`):

* every relation fork file of global/ and base/<db>/ (segments ``.1``... of 1 GiB, forks
  main, fsm, vm and init; temporary ``t<backend>_<relnode>`` files skipped), pages as Images
  (all-zero pages are not stored: below the relation size they read as zeros), sizes, the
  relation directory of each database and the database directory (``(1664, 0)`` = global/);
* relmap files (global/ and each database's pg_filenode.map);
* SLRU pages of pg_xact, pg_multixact/offsets and pg_multixact/members, segment sizes, dirs;
* pg_twophase state files;
* the checkpoint counters (the CheckPoint of pg_control), pg_control itself and the node
  metadata (system identifier, PG version, WAL segment size, catalog version, timeline).

* non-default tablespaces: every ``pg_tblspc/OID`` (a symlink, or a directory for an in-place
  tablespace) enters the tablespace map with its location, and the databases in its
  ``PG_15_202209061`` directory are imported like those of base/ under (OID, db); which
  location is recorded: pageserver/ingest/datadir_tablespaces.py.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol, cast, runtime_checkable

from pageserver.ingest.datadir_tablespaces import tablespace_locations, tablespaces
from pageserver.ingest.import_settings import import_settings
from pageserver.ingest.live_import import EarlyImport, receive_early
from pageserver.ingest.live_journal import journal_path
from pageserver.reconstruct.value_format import (
    encode_ints,
    encode_metadata,
    encode_pairs,
    encode_tablespaces,
    encode_u32,
)
from pageserver.storage.keys import (
    CHECKPOINT_KEY,
    CONTROLFILE_KEY,
    DB_DIR_KEY,
    FULL_KEYSPACE,
    KEY_MAX,
    KEY_MIN,
    NODE_METADATA_KEY,
    TABLESPACE_MAP_KEY,
    TWOPHASE_DIR_KEY,
    U32_MAX,
    Key,
    KeyRange,
    SlruKind,
    rel_block_key,
    rel_dir_key,
    rel_size_key,
    relmap_file_key,
    slru_block_key,
    slru_dir_key,
    slru_segment_size_key,
    twophase_file_key,
)
from pageserver.storage.layers.image import ImageRunWriter
from pageserver.storage.timeline import Timeline
from pg15.constants import (
    BLCKSZ,
    DEFAULTTABLESPACE_OID,
    GLOBALTABLESPACE_OID,
    PG_MAJOR_VERSION,
    RELSEG_SIZE,
    RM_XLOG_ID,
    SLRU_PAGES_PER_SEGMENT,
    XLOG_BLCKSZ,
)
from pg15.datadir_layout import (
    SLRU_SEGMENT_FILE,
    TWOPHASE_FILE,
    parse_relation_file_name,
)
from pg15.lsn import format_lsn, segment_file_name
from pg15.pg_control import DB_SHUTDOWNED, ControlFile, read_control_file
from pg15.rmgr.xlog import CHECKPOINT_RECORD_SIZE, XLOG_CHECKPOINT_SHUTDOWN
from pg15.xlog_reader import (
    LONG_PAGE_HEADER_SIZE,
    SHORT_PAGE_HEADER_SIZE,
    WalReader,
)
from proto.errors import Conflict, CorruptData

_BATCH = 256

IMPORT_THREADS = 2
"""Threads writing a big import (a run of image layers each, over its own key range)."""
THREADED_BYTES = 64 * 1024 * 1024
"""Relation files below this size are imported by one thread."""


def record_end_lsn(start: int, length: int, segment_size: int) -> int:
    """EndRecPtr of a record of `length` bytes starting at `start`: skips the page headers of
    the pages it continues on (long at segment starts), then MAXALIGNs."""
    pos, remaining = start, length
    while True:
        page_end = (pos // XLOG_BLCKSZ + 1) * XLOG_BLCKSZ
        take = min(remaining, page_end - pos)
        pos += take
        remaining -= take
        if not remaining:
            return (pos + 7) & ~7
        pos = page_end + (
            LONG_PAGE_HEADER_SIZE if page_end % segment_size == 0 else SHORT_PAGE_HEADER_SIZE
        )


_CHECKPOINT_READ = 64 * 1024
"""Bytes of the WAL segment read at a time looking for the checkpoint record (one read: a
shutdown checkpoint record is ~100 bytes)."""


def _check_checkpoint_record(datadir: Path, control: ControlFile, end_lsn: int) -> None:
    """If pg_wal has the segment, the checkpoint record there must be what pg_control says."""
    seg_size = control.wal_segment_size
    lsn = control.checkpoint_lsn
    name = segment_file_name(control.checkpoint.this_timeline, lsn // seg_size, seg_size)
    path = datadir / "pg_wal" / name
    if not path.exists():
        return
    reader = WalReader(lsn, seg_size, control.checkpoint.this_timeline)
    record = None
    with path.open("rb") as f:
        f.seek(lsn % seg_size)
        # Read on only until the record is whole: the rest of the segment (16 MiB, zeros
        # after a shutdown) read and copied into the reader was ~10 ms of a delta's import.
        while record is None and (data := f.read(_CHECKPOINT_READ)):
            reader.feed(data)
            record = next(iter(reader.records()), None)
    if record is None:
        raise CorruptData(f"{path}: no checkpoint record at {format_lsn(lsn)}")
    rmid, info = record.data[17], record.data[16]
    if rmid != RM_XLOG_ID or info & 0xF0 != XLOG_CHECKPOINT_SHUTDOWN:
        raise CorruptData(f"{path}: the record at {format_lsn(lsn)} is not a shutdown checkpoint")
    if record.end_lsn != end_lsn:
        raise CorruptData(
            f"{path}: the checkpoint record ends at {format_lsn(record.end_lsn)}, "
            f"expected {format_lsn(end_lsn)}"
        )


def import_lsn_of(datadir: Path) -> int:
    """The LSN `import_datadir` would import `datadir` at (validates its state)."""
    control = read_control_file(datadir)
    return _validate(datadir, control)


def _validate(datadir: Path, control: ControlFile) -> int:
    if control.state != DB_SHUTDOWNED:
        raise Conflict(
            f"data directory {datadir} was not shut down cleanly (state: "
            f"{control.state_name}); stop the server with a fast or smart shutdown first"
        )
    if control.checkpoint.redo != control.checkpoint_lsn:
        raise Conflict(
            f"data directory {datadir}: the last checkpoint is not a shutdown checkpoint "
            f"(redo {format_lsn(control.checkpoint.redo)}, checkpoint "
            f"{format_lsn(control.checkpoint_lsn)})"
        )
    tablespaces(datadir)  # a dangling or foreign pg_tblspc entry is refused (before any put,
    # but for a delta file's pages put as they arrive: its branch is deleted)
    end = record_end_lsn(control.checkpoint_lsn, CHECKPOINT_RECORD_SIZE, control.wal_segment_size)
    _check_checkpoint_record(datadir, control, end)
    return end


def _relation_files(directory: Path) -> dict[tuple[int, int], list[tuple[int, Path]]]:
    """(relnode, fork) -> [(segment number, path)] of the relation files in a directory."""
    found: dict[tuple[int, int], list[tuple[int, Path]]] = {}
    for path in directory.iterdir():
        parsed = parse_relation_file_name(path.name)
        if parsed is None or not path.is_file():
            continue
        rel, fork, segno = parsed
        found.setdefault((rel, fork), []).append((segno, path))
    return found


_READ_PAGES = 128
"""Pages read at once: one read call per 1 MiB, not one per page."""


def page_chunks(path: Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(block within the file of the first page, whole pages) of blocks start..stop-1 (all,
    by default), read a MiB at a time; the file's length must be a whole number of pages."""
    size = path.stat().st_size
    if size % BLCKSZ:
        raise CorruptData(f"{path} has {size} bytes, not a whole number of {BLCKSZ}-byte pages")
    with path.open("rb", buffering=0) as f:
        blkno = start
        f.seek(start * BLCKSZ)
        while True:
            want = _READ_PAGES if stop is None else min(_READ_PAGES, stop - blkno)
            chunk = f.read(want * BLCKSZ) if want > 0 else b""
            if not chunk:
                return
            if len(chunk) % BLCKSZ:
                raise CorruptData(f"{path} changed while it was read (a partial page)")
            yield blkno, chunk
            blkno += len(chunk) // BLCKSZ


def pages(path: Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(block within the file, page) of every not-all-zero page (of blocks start..stop-1
    only, if given); the file's length must be a whole number of pages."""
    for blkno, chunk in page_chunks(path, start, stop):
        for at in range(0, len(chunk), BLCKSZ):
            if not chunk.startswith(_ZERO_PAGE, at):
                yield blkno + at // BLCKSZ, chunk[at : at + BLCKSZ]


_ZERO_PAGE = bytes(BLCKSZ)


def _import_database(
    writer: ImageSink, directory: Path, spc: int, db: int, forks: ForkFiles
) -> None:
    rels = forks.find(directory)
    relmap = directory / "pg_filenode.map"
    if relmap.exists():
        writer.add(relmap_file_key(spc, db), relmap.read_bytes())
    writer.add(rel_dir_key(spc, db), encode_pairs(rels))
    for (rel, fork), found in sorted(rels.items()):
        forks.add_fork(writer, spc, db, rel, fork, found)


def _import_slru(writer: ImageSink, datadir: Path, kind: SlruKind) -> None:
    directory = datadir / kind.directory
    segments: dict[int, Path] = {}
    if directory.is_dir():
        for path in directory.iterdir():
            if SLRU_SEGMENT_FILE.match(path.name) and path.is_file():
                segments[int(path.name, 16)] = path
    writer.add(slru_dir_key(kind), encode_ints(segments))
    for segno, path in sorted(segments.items()):
        size = path.stat().st_size
        if size % BLCKSZ or size // BLCKSZ > SLRU_PAGES_PER_SEGMENT:
            raise CorruptData(f"{path} has {size} bytes: not an SLRU segment")
        for blkno, page in pages(path):
            writer.add(slru_block_key(kind, segno, blkno), page)
        writer.add(slru_segment_size_key(kind, segno), encode_u32(size // BLCKSZ))


def _databases(datadir: Path) -> list[tuple[int, int, Path]]:
    """(tablespace, database, directory) of every database directory: global/, base/<db>
    and each tablespace's <db> directories."""
    found = [(GLOBALTABLESPACE_OID, 0, datadir / "global")]
    for path in (datadir / "base").iterdir():
        if path.is_dir() and path.name.isdigit():
            found.append((DEFAULTTABLESPACE_OID, int(path.name), path))
    for spc, version_dir in tablespaces(datadir).items():
        if not version_dir.is_dir():
            continue  # a tablespace with nothing of PostgreSQL 15 in it yet
        for path in version_dir.iterdir():
            if path.is_dir() and path.name.isdigit():
                found.append((spc, int(path.name), path))
    return found


def import_datadir(
    timeline: Timeline, datadir: Path, at_lsn: int | None = None, threads: int = IMPORT_THREADS
) -> int:
    """Import `datadir` (cleanly shut down) into an empty root timeline; returns the LSN.

    `at_lsn` puts the images at another LSN than the directory's own checkpoint: that of a
    recovered base backup is the source server's state at the backup's end LSN, while its
    shutdown checkpoint was written by the local recovery at or after it, on WAL the server
    never had (`neon pg attach` streams the server's WAL from the backup's end). The record
    before `at_lsn` is then unknown here (prev_record_lsn 0: the first record ingested after
    it sets it)."""
    check_empty(timeline)
    early = None
    if at_lsn is None and journal_path(datadir).is_file():
        early = receive_early(timeline, datadir)  # the directory is final once it returns
    try:
        return _import_final(timeline, datadir, at_lsn, threads, early)
    except BaseException:
        if early is not None:
            early.abort()
        raise


def check_empty(timeline: Timeline) -> None:
    """An import goes onto a new, empty root timeline."""
    if timeline.last_record_lsn != 0 or timeline.ancestor is not None:
        raise Conflict(
            f"timeline {timeline.timeline_id} is not empty (last record LSN "
            f"{format_lsn(timeline.last_record_lsn)}); import needs a new root timeline"
        )


def _import_final(
    timeline: Timeline, datadir: Path, at_lsn: int | None, threads: int,
    early: EarlyImport | None, *, early_only: bool = False,
) -> int:  # fmt: skip
    """`early_only`: the early files hold no data in `datadir` (pageserver/ingest/
    import_neon.py): early layers that cannot stand fail the import instead of the
    directory being read whole."""
    control = read_control_file(datadir)
    own_lsn = _validate(datadir, control)
    if at_lsn is not None and at_lsn > own_lsn:
        raise Conflict(
            f"data directory {datadir} ends at {format_lsn(own_lsn)}; it cannot be imported "
            f"as the state at the later {format_lsn(at_lsn)}"
        )
    lsn = own_lsn if at_lsn is None else at_lsn
    # Every function below adds its keys in ascending key order (pageserver/storage/keys.py:
    # a database's relmap, then its relation directory, then each relation fork's pages and
    # size; an SLRU's directory, then each segment's pages and size; and so on), so a run
    # writer holds about one layer's index whatever the directory's size. A big directory is
    # cut into `threads` key ranges of about equal bytes, each written by a thread of its own
    # (`_import_ranges`): a run's Python and another's zstd compression then run at once.
    if early is not None and not early.unchanged(lsn):
        if early_only:
            raise CorruptData(f"import of {datadir}: its relation files' early layers do not "
                              "stand for the final directory (a member twice?)")  # fmt: skip
        early.abort()  # the slow way, as if nothing had been imported early
        early = None
    ranges = _key_ranges(datadir, threads) if early is None else early.gaps()
    settings = import_settings(timeline.settings)
    runs = [
        ImageRunWriter(timeline.directory, lsn, settings, timeline.cache, key_range)
        for key_range in ranges
    ]
    try:
        if early is None:
            _import_ranges(runs, ranges, datadir, control, lsn)
        else:
            sink = _InGaps(runs, ranges)
            add_datadir_values(sink, datadir, control, lsn, _WholeFiles(skip=early.paths))
        layers = [layer for run in runs for layer in run.finish()]
    except BaseException:
        for run in runs:
            run.abort()
        raise
    if early is not None:
        layers = early.layers + layers
    timeline.replace_layers(add=layers, remove=[])
    timeline.advance_last_record_lsn(lsn, control.checkpoint_lsn if at_lsn is None else 0)
    return lsn


class ImageSink(Protocol):
    """Where imported values go: an image run (a whole import, keys ascending) or the puts of
    a delta onto a branch (pageserver/ingest/import_delta.py)."""

    def add(self, key: Key, data: bytes) -> None: ...


@runtime_checkable
class PageSink(ImageSink, Protocol):
    """An ImageSink that also takes a relation file's pages a chunk at a time."""

    def add_pages(self, key: Key, data: bytes) -> None:
        """The not-all-zero pages of `data` (whole pages of one relation file) as the values
        of `key` (a relation block key) and the next blocks' keys, as `add` of each would
        (ImageRunWriter.add_pages: one call per chunk, not several per page)."""
        ...


def add_file_pages(sink: ImageSink, key: Key, data: bytes) -> None:
    """`data`'s not-all-zero pages into `sink`, the first at `key`: a chunk at a time when
    the sink takes that (PageSink), else page by page."""
    if isinstance(sink, PageSink):
        sink.add_pages(key, data)
        return
    prefix, first = key[:-4], int.from_bytes(key[-4:])
    for at in range(0, len(data), BLCKSZ):
        if not data.startswith(_ZERO_PAGE, at):
            sink.add(Key(prefix + (first + at // BLCKSZ).to_bytes(4)), data[at : at + BLCKSZ])


class ForkFiles(Protocol):
    """How a database directory's relation forks are found and imported."""

    def find(self, directory: Path) -> Mapping[tuple[int, int], object]:
        """(relnode, fork) -> what `add_fork` needs, for each fork of the directory."""
        ...

    def add_fork(
        self, sink: ImageSink, spc: int, db: int, rel: int, fork: int, found: object
    ) -> None: ...


class _WholeFiles:
    """A data directory's own segment files: every not-all-zero page, and the size; with a
    `key_range`, only the pages in it are read (the size is added all the same: a sink
    keeping that range drops it if it is outside); the pages of the files in `skip` are not
    read at all (imported already: pageserver/ingest/live_import.py)."""

    def __init__(
        self, key_range: KeyRange = FULL_KEYSPACE, skip: frozenset[Path] = frozenset()
    ) -> None:
        self._range, self._skip = key_range, skip

    def find(self, directory: Path) -> Mapping[tuple[int, int], object]:
        return _relation_files(directory)

    def add_fork(
        self, sink: ImageSink, spc: int, db: int, rel: int, fork: int, found: object
    ) -> None:
        segments = sorted(cast(list[tuple[int, Path]], found))
        lo = _first_block_at(self._range.start, spc, db, rel, fork)
        hi = _first_block_at(self._range.end, spc, db, rel, fork)
        nblocks = 0
        for segno, path in segments:
            size = path.stat().st_size
            if not size:
                continue  # mdtruncate leaves inactive segments as empty files
            if segno * RELSEG_SIZE != nblocks:
                raise CorruptData(f"{path}: an earlier segment of this relation is incomplete")
            first = segno * RELSEG_SIZE
            start, stop = max(lo, first) - first, min(hi, first + size // BLCKSZ) - first
            if (start < stop or size % BLCKSZ) and path not in self._skip:
                for blkno, chunk in page_chunks(path, start, stop):
                    add_file_pages(sink, rel_block_key(spc, db, rel, fork, first + blkno), chunk)
            nblocks = first + size // BLCKSZ
        sink.add(rel_size_key(spc, db, rel, fork), encode_u32(nblocks))


def _first_block_at(bound: Key, spc: int, db: int, rel: int, fork: int) -> int:
    """The first block of the fork whose key is at or after `bound` (U32_MAX: none is)."""
    start = rel_block_key(spc, db, rel, fork, 0)
    if bound <= start:
        return 0
    if bound[:-4] == start[:-4]:  # the block is the key's last field (pageserver.storage.keys)
        return int.from_bytes(bound[-4:], "big")
    return U32_MAX


WHOLE_FILES: ForkFiles = _WholeFiles()


def _key_ranges(datadir: Path, threads: int) -> list[KeyRange]:
    """The keyspace cut at relation block keys into `threads` ranges of about equal bytes of
    relation files (one range for a directory under THREADED_BYTES)."""
    forks: list[tuple[int, int, int, int, int]] = []  # (spc, db, rel, fork, bytes), key order
    for spc, db, path in sorted(_databases(datadir), key=lambda d: (d[0], d[1])):
        for (rel, fork), found in sorted(_relation_files(path).items()):
            forks.append((spc, db, rel, fork, sum(p.stat().st_size for _s, p in found)))
    total = sum(f[4] for f in forks)
    if threads <= 1 or total < THREADED_BYTES:
        return [FULL_KEYSPACE]
    cuts: list[Key] = []
    done = 0
    for spc, db, rel, fork, size in forks:
        while len(cuts) < threads - 1 and done + size > total * (len(cuts) + 1) // threads:
            block = (total * (len(cuts) + 1) // threads - done) // BLCKSZ
            cut = rel_block_key(spc, db, rel, fork, block)
            if cuts and cut <= cuts[-1]:
                break
            cuts.append(cut)
        done += size
    bounds = [KEY_MIN, *cuts, KEY_MAX]
    return [KeyRange(a, b) for a, b in itertools.pairwise(bounds)]


class _Stopped(Exception):
    """Another range's thread failed: this one stops too."""


class _InRange:
    """The sink of one range's thread: the keys of its range go to its run, the others are
    dropped (every thread walks the whole directory's small values)."""

    def __init__(self, run: ImageRunWriter, key_range: KeyRange, failed: threading.Event) -> None:
        self._run, self._range, self._failed = run, key_range, failed

    def add(self, key: Key, data: bytes) -> None:
        if self._failed.is_set():
            raise _Stopped
        if self._range.start <= key < self._range.end:
            self._run.add(key, data)

    def add_pages(self, key: Key, data: bytes) -> None:
        """Only the range's pages of a fork are read (_WholeFiles), so they all belong here."""
        if self._failed.is_set():
            raise _Stopped
        self._run.add_pages(key, data)


class _InGaps:
    """The sink of an import whose big files are imported already (live_import.py): each
    key goes to the run of the gap it is in; the keys between the gaps (the early files'
    pages, not read) must not come."""

    def __init__(self, runs: list[ImageRunWriter], gaps: list[KeyRange]) -> None:
        self._runs, self._gaps, self._at = runs, gaps, 0

    def add(self, key: Key, data: bytes) -> None:
        self._gap_of(key, key).add(key, data)

    def add_pages(self, key: Key, data: bytes) -> None:
        """A chunk of a file that is not an early one: inside one gap, as the file is."""
        last = Key(key[:-4] + (int.from_bytes(key[-4:]) + len(data) // BLCKSZ - 1).to_bytes(4))
        self._gap_of(key, last).add_pages(key, data)

    def _gap_of(self, first: Key, last: Key) -> ImageRunWriter:
        """The run of the gap holding keys first..last (keys come in ascending order)."""
        while self._at < len(self._gaps) and first >= self._gaps[self._at].end:
            self._at += 1
        if self._at == len(self._gaps) or first < self._gaps[self._at].start:
            raise CorruptData(f"import: key {first.hex()} of an early file came again")
        if last >= self._gaps[self._at].end:
            raise CorruptData(f"import: key {last.hex()} of an early file came again")
        return self._runs[self._at]


def _import_ranges(
    runs: list[ImageRunWriter], ranges: list[KeyRange], datadir: Path, control: ControlFile,
    lsn: int,
) -> None:  # fmt: skip
    """Every value of the directory into the run of its key range; one thread per range
    (ranges read only their pages of the relation files). The first error is raised once
    every thread has stopped."""
    if len(runs) == 1:
        add_datadir_values(runs[0], datadir, control, lsn)
        return
    failed = threading.Event()

    def one(run: ImageRunWriter, key_range: KeyRange) -> None:
        try:
            sink = _InRange(run, key_range, failed)
            add_datadir_values(sink, datadir, control, lsn, _WholeFiles(key_range))
        except BaseException:
            failed.set()
            raise

    with concurrent.futures.ThreadPoolExecutor(len(runs), "import") as pool:
        futures = [
            pool.submit(one, run, key_range) for run, key_range in zip(runs, ranges, strict=True)
        ]
        concurrent.futures.wait(futures)
    errors = [f.exception() for f in futures]
    first = next((e for e in errors if e is not None and not isinstance(e, _Stopped)), None)
    if first is not None:
        raise first


def add_datadir_values(
    writer: ImageSink, datadir: Path, control: ControlFile, lsn: int,
    forks: ForkFiles = WHOLE_FILES,
) -> None:  # fmt: skip
    """Every value of the directory (see the module docstring), relation forks by `forks`."""
    databases = sorted(_databases(datadir), key=lambda d: (d[0], d[1]))
    writer.add(DB_DIR_KEY, encode_pairs([(spc, db) for spc, db, _path in databases]))
    for spc, db, path in databases:
        _import_database(writer, path, spc, db, forks)

    for kind in sorted(SlruKind):
        _import_slru(writer, datadir, kind)

    files: dict[int, Path] = {}
    twophase = datadir / "pg_twophase"
    if twophase.is_dir():
        for path in twophase.iterdir():
            if TWOPHASE_FILE.match(path.name) and path.is_file():
                files[int(path.name, 16)] = path
    writer.add(TWOPHASE_DIR_KEY, encode_ints(files))
    for xid, path in sorted(files.items()):
        writer.add(twophase_file_key(xid), path.read_bytes())

    writer.add(CONTROLFILE_KEY, control.raw)
    writer.add(CHECKPOINT_KEY, control.checkpoint.pack())
    writer.add(
        NODE_METADATA_KEY,
        encode_metadata(
            {
                "system_identifier": control.system_identifier,
                "pg_version": PG_MAJOR_VERSION,
                "catalog_version": control.catalog_version,
                "wal_segment_size": control.wal_segment_size,
                "timeline": control.checkpoint.this_timeline,
                "import_lsn": lsn,
                "checkpoint_lsn": control.checkpoint_lsn,
            }
        ),
    )
    writer.add(TABLESPACE_MAP_KEY, encode_tablespaces(tablespace_locations(datadir)))
