"""Import a data directory while it is still being written: its big relation files become
image layers as they arrive, the rest once the directory is final.

Why: `neon snapshot import --from basebackup://` unpacked the whole backup, had it recovered,
then the pageserver read it back and wrote the image layers: two steps of about the same
length one after the other. Most of a database's bytes are a few big relation files, which
the CLI has whole long before the backup ends; their layers are written here meanwhile, while
the pageserver would otherwise wait.

The protocol is a journal next to the data directory, appended by the CLI (one line per
event: pageserver/ingest/live_journal.py) and read here as it grows.

Why the result is what a plain import of the final directory writes: an early file's layers
hold its pages as they arrived (the extractor writes a file once, in order, and never
rewrites it; only whole pages below its size are read). Once the directory is final, each
early file must still have the inode, size and modification time it had when first seen whole
here, and those the writer recorded (its `whole` line) once the extraction ended and before
recovery began: a page read here and rewritten later (recovery rewrites pages in place) changes
the file after that line, even if this side first saw it whole only after the rewrite (it may
lag behind). Recovery's writes come hundreds of milliseconds after the extraction ended (a
postmaster start), well past the file system's timestamp granularity. Anything changed,
missing or unexpected: the early layers are removed and the whole directory is imported as
before. Else the rest of the keyspace (every
key outside the early files' page ranges: sizes, directories, small relations, SLRU, control)
is written at the import LSN by runs over the gaps between them, and the layers together
tile the keyspace: reads happen at the import LSN, above both, and where no layer at the
import LSN covers a key, the early layer below is its state there.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from pageserver.ingest.import_settings import import_settings
from pageserver.ingest.live_journal import MAGIC, file_key, journal_path
from pageserver.pid_file import pid_alive
from pageserver.storage.keys import FULL_KEYSPACE, Key, KeyRange, rel_block_key
from pageserver.storage.layers.image import ImageLayer, ImageRunWriter
from pageserver.storage.timeline import Timeline
from pg15.constants import BLCKSZ, RELSEG_SIZE
from proto.errors import CorruptData, Unavailable

POLL_SECONDS = 0.02
HEADER_SECONDS = 30.0  # the writer writes it right after creating the file
_READ_BYTES = 1 << 20


class _Journal:
    """The pageserver's end: whole lines as they are appended; fails when the writer says so
    or is gone."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._f = path.open("rb")
        self._buf = b""
        self._lock = threading.Lock()  # the file readers (EARLY_THREADS) share it
        self._done = False  # `done` was taken
        self._failed = False  # `failed` was taken
        self._stopped = False  # the import gave up: the file readers stop
        self.poll: Callable[[], None] | None = None
        """Called while `next` waits for a line (the receiver raises a reader's error)."""
        header = self._wait_line(None, deadline=time.monotonic() + HEADER_SECONDS)
        magic, _, pid = header.rpartition(" ")
        if magic != MAGIC or not pid.isdigit():
            raise CorruptData(f"{path} is not a live import journal")
        self._pid = int(pid)

    def close(self) -> None:
        self._f.close()

    def _wait_line(self, pid: int | None, deadline: float | None = None) -> str:
        while True:
            with self._lock:
                if b"\n" in self._buf:
                    line, _, self._buf = self._buf.partition(b"\n")
                    return line.decode(errors="replace")
                more = self._read_more_locked()
            if not more:
                self._check_writer(pid)
                if self.poll is not None:
                    self.poll()
                if deadline is not None and time.monotonic() > deadline:
                    raise CorruptData(f"{self._path} has no header line")
                time.sleep(POLL_SECONDS)

    def _read_more(self) -> bool:
        with self._lock:
            return self._read_more_locked()

    def _read_more_locked(self) -> bool:
        more = self._f.read(65536)
        self._buf += more
        return bool(more)

    def _check_writer(self, pid: int | None) -> None:
        """Raise if the writer gave up (a `failed` line, taken or maybe behind lines not yet
        taken) or is gone, or if the import stopped (`stop`)."""
        with self._lock:
            failed = self._failed or b"\nfailed\n" in b"\n" + self._buf
        if failed:
            raise Unavailable(f"the import through {self._path} was given up by its writer")
        if self._stopped:
            raise _Stopped
        if pid is not None and not pid_alive(pid):
            raise Unavailable(f"the process importing through {self._path} is gone")

    def next(self) -> str:
        """The next event line; `done` is the last."""
        line = self._wait_line(self._pid)
        if line == "failed":
            self._failed = True
            raise Unavailable(f"the import through {self._path} was given up by its writer")
        if line == "done":
            self._done = True
        return line

    def stop(self) -> None:
        """The import gave up: file readers raise _Stopped at their next look."""
        self._stopped = True

    def pages(
        self, path: Path, size: int, whole: list[os.stat_result]
    ) -> Iterator[tuple[int, bytes]]:
        """(first block, whole pages) of the file being written at `path`, a MiB at most at
        a time, as its first `size` bytes arrive: only whole pages below its current size are
        read (the extractor writes each file once, in order, so those bytes are final). A file that
        is not there yet is waited for; one that is not a regular file, or ends short of
        `size` (its writer moved on), ends early: `unchanged` then refuses it.

        `whole` gets the file's stat as it was first seen whole, before the pages read after
        it: the extractor is done with it then, so any later write (recovery, while this
        lags behind) changes it. A stat taken once all is read would already hold a write
        to a page read before it, and the page read would be kept."""
        fd = None
        try:
            while fd is None:
                final = self._final()
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                except FileNotFoundError:
                    if final:
                        return  # never written
                    self._wait()
                except OSError:
                    return  # a link or worse
            if not _regular(os.fstat(fd)):
                return
            done = 0
            while done < size:
                if self._stopped:
                    raise _Stopped
                final = self._final()  # before the size: a final directory's file stays
                st = os.fstat(fd)
                if not whole and st.st_size >= size:
                    whole.append(st)
                have = min(st.st_size, size) // BLCKSZ * BLCKSZ
                if have <= done:
                    if final:
                        return  # ends short (recovery truncated it; a hostile tar)
                    self._wait()
                    continue
                chunk = os.pread(fd, min(have - done, _READ_BYTES), done)
                if len(chunk) % BLCKSZ or not chunk:
                    return
                yield done // BLCKSZ, chunk
                done += len(chunk)
        finally:
            if fd is not None:
                os.close(fd)

    def _final(self) -> bool:
        """Whether the writer said `done` (maybe behind lines not yet taken): the directory
        is final, and a file short of its announced size will not grow (without this, a file
        recovery truncated kept the import waiting for the writer, which waits for it)."""
        with self._lock:
            return self._done or b"\ndone\n" in b"\n" + self._buf

    def _wait(self) -> None:
        self._read_more()
        self._check_writer(self._pid)
        time.sleep(POLL_SECONDS)


class _Stopped(Exception):
    """The import gave up (another file's reader failed, or the journal did)."""


def _regular(st: os.stat_result) -> bool:
    return (st.st_mode & 0o170000) == 0o100000


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return st.st_ino, st.st_size, st.st_mtime_ns


def _same(a: os.stat_result, b: os.stat_result) -> bool:
    return _identity(a) == _identity(b)


@dataclass(frozen=True, slots=True)
class EarlyFile:
    path: Path
    key_range: KeyRange
    """Its pages' keys: [its first block, its last block + 1)."""
    stat: os.stat_result
    """As it was first seen whole (`_Journal.pages`): the file must be unchanged when the
    directory is final."""


class EarlyImport:
    """The early layers of a live import (see the module docstring)."""

    def __init__(self, lsn: int) -> None:
        self.lsn = lsn
        self.files: list[EarlyFile] = []
        self.extracted: dict[Path, tuple[int, int, int]] = {}
        """Per announced file, (inode, size, mtime ns) as the writer's extractor left it (its
        `whole` lines)."""
        self.layers: list[ImageLayer] = []
        self._runs: list[ImageRunWriter] = []
        self._announced: list[KeyRange] = []
        self._lock = threading.Lock()
        self._spoiled = False

    def unchanged(self, lsn: int) -> bool:
        """Whether the early layers can stand for the final directory imported at `lsn`."""
        if self.lsn >= lsn or self._spoiled:
            return False
        for f in self.files:
            try:
                st = f.path.lstat()
            except OSError:
                return False
            if not _same(st, f.stat) or self.extracted.get(f.path) != _identity(st):
                return False
        return True

    def gaps(self) -> list[KeyRange]:
        """The keyspace outside the early files' page ranges, in order."""
        out, start = [], FULL_KEYSPACE.start
        for f in sorted(self.files, key=lambda f: f.key_range.start):
            if start < f.key_range.start:
                out.append(KeyRange(start, f.key_range.start))
            start = f.key_range.end
        if start < FULL_KEYSPACE.end:
            out.append(KeyRange(start, FULL_KEYSPACE.end))
        return out

    @property
    def paths(self) -> frozenset[Path]:
        return frozenset(f.path for f in self.files)

    def abort(self) -> None:
        """Remove every early layer (published or not)."""
        for run in self._runs:
            run.abort()
        self._runs, self.layers, self.files = [], [], []

    def announce(self, size: int, key: tuple[int, int, int, int, int]) -> KeyRange | None:
        """The key range of an announced file's pages; None if an earlier announcement
        overlaps it (a tar with the member twice: the second rewrites the file, maybe after
        it was read): the whole directory is imported as it ends up."""
        spc, db, rel, fork, segno = key
        first = segno * RELSEG_SIZE
        key_range = KeyRange(
            rel_block_key(spc, db, rel, fork, first),
            rel_block_key(spc, db, rel, fork, first + size // BLCKSZ),
        )
        if any(r.start < key_range.end and key_range.start < r.end for r in self._announced):
            self._spoiled = True
            return None
        self._announced.append(key_range)
        return key_range

    def run(self, timeline: Timeline, key_range: KeyRange) -> ImageRunWriter:
        """The run writing an announced file's layers (removed by `abort`)."""
        run = ImageRunWriter(timeline.directory, self.lsn, import_settings(timeline.settings),
                             timeline.cache, key_range)  # fmt: skip
        with self._lock:
            self._runs.append(run)
        return run

    def written(self, path: Path, key_range: KeyRange, layers: list[ImageLayer],
                st: os.stat_result) -> None:  # fmt: skip
        """An announced file's layers are written: the file (as `st` says, what its writer
        left; it must be so when the directory is final) stands for its pages."""
        with self._lock:
            self.layers += layers
            self.files.append(EarlyFile(path, key_range, st))
            self.extracted[path] = _identity(st)

    def add(
        self, timeline: Timeline, journal: _Journal, path: Path, size: int, key_range: KeyRange
    ) -> None:
        """Write the layers of an announced file's pages as they arrive (on a thread of
        receive_early's pool, beside the other files')."""
        run = self.run(timeline, key_range)
        whole: list[os.stat_result] = []
        first = key_range.start
        for blkno, chunk in journal.pages(path, size, whole):
            run.add_pages(Key(first[:-4] + (int.from_bytes(first[-4:]) + blkno).to_bytes(4)), chunk)
        layers = run.finish()
        with self._lock:
            self.layers += layers
            if not whole or whole[0].st_size != size:
                self._spoiled = True  # not the file announced: `unchanged` refuses them all
                return
            self.files.append(EarlyFile(path, key_range, whole[0]))


EARLY_THREADS = 2
"""Announced files imported at once. A backup's big files come one after the other (a table,
then its index); imported one after the other, the second waited for the first although it
had arrived whole, and the import ended that much after the transfer."""


def receive_early(timeline: Timeline, datadir: Path) -> EarlyImport | None:
    """Follow the journal of `datadir` until it says `done`, importing each announced file as
    it is complete (EARLY_THREADS at once); None when nothing was imported early. On any
    error the early layers are removed."""
    journal = _Journal(journal_path(datadir))
    early: EarlyImport | None = None
    pool = ThreadPoolExecutor(EARLY_THREADS, thread_name_prefix="live-import")
    adding: list[Future[None]] = []

    def raise_failed() -> None:
        for future in adding:
            if future.done() and future.exception() is not None:
                future.result()

    journal.poll = raise_failed
    try:
        while (line := journal.next()) != "done":
            raise_failed()
            kind, _, rest = line.partition(" ")
            if kind == "lsn" and early is None:
                try:
                    early = EarlyImport(int(rest, 16))
                except ValueError:
                    raise CorruptData(f"{journal_path(datadir)}: bad line {line!r}") from None
            elif kind == "file" and early is not None:
                size, _, name = rest.partition(" ")
                key = file_key(name)
                if key is None or not size.isdigit() or int(size) % BLCKSZ:
                    continue
                key_range = early.announce(int(size), key)
                if key_range is not None:
                    adding.append(
                        pool.submit(
                            early.add, timeline, journal, datadir / name, int(size), key_range
                        )
                    )
            elif kind == "whole" and early is not None:
                fields = rest.split(" ", 3)
                if len(fields) != 4 or not all(x.isdigit() for x in fields[:3]):
                    raise CorruptData(f"{journal_path(datadir)}: bad line {line!r}")
                ino, length, mtime = (int(x) for x in fields[:3])
                early.extracted[datadir / fields[3]] = (ino, length, mtime)
        for future in adding:
            future.result()
    except BaseException:
        journal.stop()  # a reader still at work raises _Stopped at its next look
        wait(adding)  # every reader stopped: nothing writes a layer after the abort
        if early is not None:
            early.abort()
        raise
    finally:
        pool.shutdown(wait=True)
        journal.close()
    return early if early is not None and early.files else None
