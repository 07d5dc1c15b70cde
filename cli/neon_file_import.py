"""`neon snapshot import` and `pull` of a whole `.neon` file: the pageserver reads the file
itself (pageserver/ingest/import_neon.py), so that the data directory's big relation files
are never written out and read back (that was most of a pull's CPU: the CLI's kernel copying
a GiB into the page cache, the pageserver reading it again).

The file must be local: a local file is given as it is; a remote one is fetched (through the
pull's spool, cli/transport/spool.py) into the import's private work directory as it is,
compressed (the 1 GiB pgbench database of bench.exchange is a 47 MiB file), and the
pageserver reads it as it grows (until a `.done` file beside it; `.failed`: the fetch gave
up, and the import with it). The
pageserver verifies every frame before using it and the whole file before anything becomes
visible. A delta file keeps its own way (cli/snapshot_file_source.py), as does anything that
is not a `.neon` file.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Generic, TypeVar

from cli.progress import Progress
from cli.snapshot_file_source import chained, peek_manifest
from cli.transport import parse_location
from cli.transport.base import read_object
from cli.transport.file import FileStore
from snapfile.delta import SnapshotIdentity
from snapfile.manifest import Manifest, origin_of
from snapfile.reader import read_manifest
from snapfile.verified import check_manifest

FETCHED_NAME = "fetched.neon"
DONE_SUFFIX, FAILED_SUFFIX = ".done", ".failed"
"""Beside a file being fetched: the fetch ended, or gave up (pageserver/ingest/import_neon.py)."""

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LocalNeonFile:
    path: Path
    label: str
    """The source's URL (errors name it)."""
    origin: str
    """`origin_of` its manifest."""
    fetching: bool = False
    """Still being written here (a remote file: the import reads it as it arrives)."""


Send = Callable[[LocalNeonFile], T]
"""The import request for a local file (blocking: run on a thread of its own)."""


def import_whole_file(source: str, workdir: Path, progress: Progress, send: Send[T]) -> T | None:
    """Import the whole `.neon` file at `source` (a path or URL) through `send`: a local
    file as it is; a remote one fetched into `workdir`, the import reading it as it grows.
    None for a delta, or when the file's manifest is not found (the other way says why)."""
    return asyncio.run(_import(source, workdir, progress, send))


async def _import(source: str, workdir: Path, progress: Progress, send: Send[T]) -> T | None:
    location = parse_location(source)
    label = location.url
    if isinstance(location.store, FileStore):
        path = (location.store.directory / location.object_name).absolute()  # for the pageserver
        if not path.is_file():
            return None  # the other way names what is wrong
        with path.open("rb") as f:
            manifest = read_manifest(f, label=label)
        if not _whole(manifest, label):
            return None
        size = path.stat().st_size
        progress.update(size, size)
        return await asyncio.to_thread(send, LocalNeonFile(path, label, origin_of(manifest)))
    chunks = read_object(location, progress.update)
    try:
        head, first = await peek_manifest(chunks, label)
        if head is None or not _whole(head, label):
            return None
        target = workdir / FETCHED_NAME
        async with GrowingFile(target, label, origin_of(head), send) as growing:
            await growing.write(chained(first, chunks))
            return await asyncio.to_thread(growing.finish)
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


class GrowingFile(Generic[T]):
    """A whole `.neon` file written at `target` here (a fetch, or a push `neon snapshot
    recv` takes) while the import `send` (on a thread of its own, begun at once) reads it as
    it grows: `write` its chunks, then `finish` (the file is complete: the import's answer).
    Leaving the block without `finish` marks the file failed and waits for the import to end
    (it fails, and the pageserver removes what it wrote)."""

    def __init__(self, target: Path, label: str, origin: str, send: Send[T]) -> None:
        self._target = target
        # The owner's only whatever the umask (the commands and daemons set 077; a caller
        # that did not, a test or bench, made it 0644 in a 0711 work directory that
        # PostgreSQL's account enters): it is the whole database.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._out = os.fdopen(fd, "wb", buffering=0)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, "neon-file-import")
        # The disk writes run on a thread of their own, one chunk at a time in order: on the
        # event loop (in a pageserver or `neon snapshot recv` taking pushes, the only one)
        # every other connection waited on this file's disk (helper-56's review). One write
        # in flight while the next chunk arrives; memory stays two chunks.
        self._writer = concurrent.futures.ThreadPoolExecutor(1, "neon-file-writer")
        self._written: concurrent.futures.Future[None] | None = None
        whole = LocalNeonFile(target, label, origin, fetching=True)
        self._request = self._pool.submit(send, whole)
        self._ended = False

    async def write(self, chunks: AsyncIterator[bytes]) -> None:
        """Append `chunks` to the file (on the writer thread; returns once all are written);
        an import that ended already (refused: a damaged frame, a name taken) stops the
        transfer with its error."""
        async for chunk in chunks:
            if self._request.done():  # it failed (it cannot end before the file does)
                self._request.result()
                raise AssertionError("the import ended before its file was complete")
            await self._wait_written()
            self._written = self._writer.submit(_write_all, self._out, chunk)
        await self._wait_written()

    async def _wait_written(self) -> None:
        """The write in flight is done (its error raised here)."""
        if self._written is not None:
            await asyncio.wrap_future(self._written)
            self._written = None

    def finish(self) -> T:
        """The file is complete: the import's answer (blocking; the pageserver may still be
        reading the file's end)."""
        if self._written is not None:
            self._written.result()
        self._out.close()
        _mark(self._target, DONE_SUFFIX)
        self._ended = True
        return self._request.result()

    async def __aenter__(self) -> GrowingFile[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._written is not None:  # cut short: the write in flight ends before the close
            with contextlib.suppress(BaseException):
                await asyncio.wrap_future(self._written)
        self._writer.shutdown(wait=False)
        self._out.close()
        if not self._ended:
            self._ended = True
            _mark(self._target, FAILED_SUFFIX)
            with contextlib.suppress(BaseException):
                await asyncio.wrap_future(self._request)
        self._pool.shutdown(wait=False)


def _write_all(out: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[out.write(view) or 0 :]


def _mark(target: Path, suffix: str) -> None:
    Path(f"{target}{suffix}").touch(0o600)


def _whole(manifest: Manifest, label: str) -> bool:
    if SnapshotIdentity.parent_of(manifest) is not None:
        return False
    check_manifest(manifest, label)
    return True
