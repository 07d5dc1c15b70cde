"""Import a whole `.neon` snapshot file read here, without its big relation files ever being
written as files.

Why: a pull unpacked the file's tar into a data directory (the CLI wrote ~1 GiB for a 1 GiB
database: most of its CPU was the kernel copying it into the page cache), and the pageserver
read the big relation files back to write their image layers (cli/live_import.py). Here the
pageserver reads the file itself and its relation segment files of EARLY_BYTES or more (a
database's bulk) go from the decompressed frames straight to image layers; every other
member is extracted into the data directory as before (datadir_files/untar.py: the same checks of
every member), the big ones as files of their size holding no data (sparse), so that the
directory's sizes are right. Once the whole file checked out, the directory is imported
with those layers standing for the big files (import_datadir's `_import_final`, as a live
import's early layers), and never read whole: the big files hold nothing to read.

Trust: each frame's SHA-256 is checked before a byte of it is used (snapfile.reader), and the
import becomes a snapshot only once the whole file checked out (checksums.json at its end),
the manifest is the one the caller read (its origin), and the directory is a cleanly shut
down one. Anything else fails the import: the caller deletes the timeline, so nothing shows.
A member that comes twice fails it too, big relation file or not (its layers would not be
the final file's): the extractor opens every member's file with O_EXCL before the diverter
is asked about it (datadir_files/untar.py `_Extractor._start`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from pageserver.ingest.import_datadir import IMPORT_THREADS, _import_final, check_empty
from pageserver.ingest.live_import import EarlyImport
from pageserver.ingest.live_journal import early_candidate, file_key
from pageserver.storage.keys import Key, KeyRange
from pageserver.storage.layers.image import ImageRunWriter
from pageserver.storage.timeline import Timeline
from pg15.constants import BLCKSZ
from pg15.pg_control import DB_SHUTDOWNED, read_control_file
from proto.errors import CorruptData, InvalidArgument, Unavailable

if TYPE_CHECKING:
    from datadir_files.untar import DeltaMembers, Divert
    from snapfile.manifest import Manifest

_READ_BYTES = 1 << 20


class _Pages:
    """A big relation file's data, taken in whatever pieces the tar comes in, to its run of
    image layers as whole pages (datadir_files.untar's Diverted)."""

    def __init__(
        self, early: EarlyImport, run: ImageRunWriter, path: Path, key_range: KeyRange, size: int
    ) -> None:  # fmt: skip
        self._early, self._run, self._path = early, run, path
        self._range, self._size = key_range, size
        self._first = int.from_bytes(key_range.start[-4:])
        self._prefix = key_range.start[:-4]
        self._done = 0  # bytes passed on to the run
        self._rest = bytearray()  # a page begun in one piece, to end in the next

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """The whole pages go on as views of `data` (a decompressed frame's bytes: the image
        writer copies each page once, into its block); a page cut across pieces waits."""
        view = memoryview(data).cast("B")
        if self._rest:
            take = BLCKSZ - len(self._rest)
            self._rest += view[:take]
            view = view[take:]
            if len(self._rest) < BLCKSZ:
                return
            self._add(self._rest)
            self._rest = bytearray()
        whole = len(view) // BLCKSZ * BLCKSZ
        if whole:
            self._add(view[:whole])
        self._rest += view[whole:]

    def _add(self, pages: bytes | bytearray | memoryview) -> None:
        block = self._first + self._done // BLCKSZ
        self._run.add_pages(Key(self._prefix + block.to_bytes(4)), pages)
        self._done += len(pages)

    def end(self, st: os.stat_result) -> None:
        if self._rest or self._done != self._size or st.st_size != self._size:
            raise CorruptData(f"tar member {self._path.name!r} ended short of its size")
        self._early.written(self._path, self._range, self._run.finish(), st)


class _Diverter:
    """Which members go to image layers (datadir_files.untar's Divert): big relation segment files,
    once the manifest gave the LSN of their layers."""

    def __init__(self, timeline: Timeline, pgdata: Path) -> None:
        self._timeline, self._pgdata = timeline, pgdata
        self.early: EarlyImport | None = None

    def divert(self, name: str, size: int) -> _Pages | None:
        """Asked once per name: a repeated member fails at its file's O_EXCL open first."""
        key = file_key(name)
        if self.early is None or key is None or not early_candidate(name, size):
            return None
        key_range = self.early.announce(size, key)
        if key_range is None:
            raise CorruptData(f"tar member {name!r} overlaps another relation file")
        run = self.early.run(self._timeline, key_range)
        return _Pages(self.early, run, self._pgdata / name, key_range, size)


DONE_SUFFIX, FAILED_SUFFIX = ".done", ".failed"
POLL_SECONDS = 0.01


@dataclass(frozen=True, slots=True)
class NeonSource:
    path: Path
    label: str
    """How errors name it (its URL)."""
    fetching: bool = False
    """The caller still writes it: read as it grows until `<path>.done` appears beside it
    (`.failed`: the caller gave up)."""
    abandoned: Callable[[], bool] = lambda: False
    """Whether the caller is gone (then a growing file never ends)."""

    def blocks(self) -> Generator[bytes, None, None]:
        """The file's bytes, read on this thread; for a file being fetched, as they are
        written (polled every POLL_SECONDS)."""
        with _open_regular(self.path) as f:
            while True:
                chunk = f.read(_READ_BYTES)
                if chunk:
                    yield chunk
                elif not self.fetching or self._ended():
                    if chunk := f.read(_READ_BYTES):
                        yield chunk  # written before the marker, after the read above
                        continue
                    return
                else:
                    time.sleep(POLL_SECONDS)

    async def chunks(self) -> AsyncIterator[bytes]:
        """`blocks`, each read (or waited for) on a worker thread."""
        blocks = self.blocks()
        try:
            while (chunk := await asyncio.to_thread(next, blocks, b"")) != b"":
                yield chunk
        finally:
            blocks.close()

    def _ended(self) -> bool:
        """The fetch ended (done); raises if it failed or its caller is gone."""
        base = str(self.path)
        if os.path.exists(base + FAILED_SUFFIX) or self.abandoned():
            raise Unavailable(f"the fetch of {self.label} was given up")
        return os.path.exists(base + DONE_SUFFIX)


def _open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading if it is a regular file, checked on the descriptor read
    from: a check by path before (the request's) leaves a window in which the name can be
    swapped for a FIFO (its open would wait for a writer for ever: O_NONBLOCK here) or a
    link (O_NOFOLLOW)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidArgument(f"{path} cannot be read ({exc.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidArgument(f"{path} is not a regular .neon file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def import_neon_file(
    timeline: Timeline, source: NeonSource, pgdata: Path, origin: str | None
) -> int:
    """Import the whole `.neon` file `source` into the empty root `timeline`, extracting
    its small members into `pgdata` (absent or empty); returns the import LSN. `origin`: the
    `origin_of` the manifest the caller read (refused if the file's differs)."""
    from snapfile.verified import check_manifest

    check_empty(timeline)
    diverter = _Diverter(timeline, pgdata)
    label = source.label

    def on_manifest(manifest: Manifest) -> None:
        check_manifest(manifest, label)
        check_origin(manifest, origin, label)
        diverter.early = EarlyImport(manifest.lsn)

    try:
        read_neon_file(source, pgdata, on_manifest, divert=diverter.divert)
        control = read_control_file(pgdata)
        if (pgdata / "backup_label").exists() or control.state != DB_SHUTDOWNED:
            raise CorruptData(f"{label} does not hold a cleanly shut-down data directory")
        return _import_final(
            timeline, pgdata, None, IMPORT_THREADS, diverter.early, early_only=True
        )
    except BaseException:
        if diverter.early is not None:
            diverter.early.abort()
        raise


def read_neon_file(
    source: NeonSource, pgdata: Path, on_manifest: Callable[[Manifest], None], *,
    divert: Divert | None = None, delta_members: DeltaMembers | None = None,
) -> Manifest:  # fmt: skip
    """Read the `.neon` file `source` here, extracting its tar into `pgdata` (absent or
    empty; `divert` and `delta_members`: the extractor's, datadir_files/untar.py); its
    manifest, once the whole file checked out and `pgdata`'s pg_control is of that
    database. `on_manifest` is told of the manifest before any member."""
    # The reader and extractor a CLI's pull runs: the same checks.
    from datadir_files.untar import extract_chunks
    from snapfile.frame_buffers import IMPORTS, FrameBuffers
    from snapfile.verified import check_control, verified_tar_blocking

    seen: list[Manifest] = []

    def take(manifest: Manifest) -> None:
        on_manifest(manifest)
        seen.append(manifest)

    # On this thread, no event loop: the frames are verified and decompressed here and the
    # tar extracted (the big files' pages packed, a delta's pages put) on the extractor's
    # thread. Each frame is decompressed into a buffer the extractor gives back once it used
    # it (a new 4 MiB object per frame is mapped and unmapped by the daemon's malloc
    # settings: every page of every frame faulted in again, snapfile/frame_buffers.py).
    buffers = FrameBuffers(IMPORTS)
    tar = verified_tar_blocking(source.blocks(), source.label, take, buffers)
    with contextlib.closing(tar):  # the file closed now when the extraction failed
        extract_chunks(
            tar, pgdata, divert=divert, used=buffers.give_back, delta_members=delta_members
        )
    [manifest] = seen
    check_control(pgdata, manifest, source.label)
    return manifest


def check_origin(manifest: Manifest, origin: str | None, label: str) -> None:
    """The file's manifest is the one its caller read first (`origin_of` it), if given."""
    from snapfile.manifest import origin_of

    if origin is not None and origin_of(manifest) != origin:
        raise CorruptData(f"{label} changed while it was read (its manifest differs)")
