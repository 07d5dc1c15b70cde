"""A `.neon` file read as a verified basebackup tar, and the checks of what it holds before
it becomes a snapshot: the same for the CLI's pull or import (cli/snapshot_file_source.py)
and for the pageserver's import of a whole file (pageserver/ingest/import_neon.py), so it
belongs to neither.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator
from pathlib import Path

from pg15.constants import PG_MAJOR_VERSION
from proto.errors import CorruptData, InvalidArgument
from snapfile.delta import SnapshotIdentity
from snapfile.frame_buffers import FrameBuffers
from snapfile.manifest import Manifest
from snapfile.reader import ManifestRead, ReaderEvent, SnapshotEnd, SnapshotFileReader, TarData


def check_manifest(manifest: Manifest, label: str) -> None:
    """Refuse what cannot become a snapshot here, before any data is extracted."""
    check_pg_version(manifest, label)
    parent = SnapshotIdentity.parent_of(manifest)
    if parent is not None:
        raise InvalidArgument(
            f"{label} is a delta on snapshot {parent}, not a whole snapshot; pull it from the "
            "store that holds its parent, or push the snapshot whole with "
            "`neon snapshot push --full`"
        )


def check_pg_version(manifest: Manifest, label: str) -> None:
    """Refuse a snapshot (whole or delta) of another PostgreSQL major version."""
    if manifest.pg_version != PG_MAJOR_VERSION:
        raise InvalidArgument(
            f"{label} holds a PostgreSQL {manifest.pg_version} snapshot; pg-neon works with "
            f"PostgreSQL {PG_MAJOR_VERSION} only"
        )


_FEED_SIZE = 128 * 1024
"""Bytes of a `.neon` file verified and decompressed at a time (see verified_tar)."""


async def verified_tar(
    chunks: AsyncIterator[bytes], label: str, on_manifest: Callable[[Manifest], None]
) -> AsyncIterator[bytes | memoryview]:
    """The verified basebackup tar inside the `.neon` file arriving as `chunks`; raises
    CorruptData (after the tar's last byte at the latest) unless the whole file checks out.

    Three things run at once: the next chunk is read here while the one before is verified
    and decompressed on a worker thread, and the whole tar's SHA-256 runs on a thread of its
    own (the reader's background hash); zstd and hashlib release the GIL."""
    reader = SnapshotFileReader(label, hash_in_background=True)
    events = _TarEvents(on_manifest)
    take = events.take

    def feed(chunk: memoryview) -> list[bytes | memoryview]:
        return take(reader.feed(chunk))

    working: asyncio.Future[list[bytes | memoryview]] | None = None  # the chunk before, being read
    try:
        async for chunk in chunks:
            # A copy of a mutable chunk: its source may reuse it while the worker reads it.
            taken = memoryview(chunk if isinstance(chunk, bytes) else bytes(chunk))
            # Fed in pieces: what one piece decompresses to (a few frames) is what waits
            # here, whatever the transport's chunk size (a MiB of a .neon file of pgbench
            # data is ~40 MiB of tar).
            for at in range(0, len(taken), _FEED_SIZE):
                if working is not None:
                    for data in await working:
                        yield data
                piece = taken[at : at + _FEED_SIZE]
                working = asyncio.ensure_future(asyncio.to_thread(feed, piece))
        if working is not None:
            done, working = working, None
            for data in await done:
                yield data
        for data in await asyncio.to_thread(lambda: take(reader.finish())):
            yield data
    finally:
        if working is not None:  # stopped early: the reader's thread finishes its chunk
            with contextlib.suppress(Exception):
                await asyncio.shield(working)
        reader.close()
    if not events.ended:
        raise CorruptData(f"{label} ended before its checksums")  # finish() raises first


class _TarEvents:
    """A verified .neon file reader's events: the manifest to `on_manifest`, the tar's
    bytes returned, whether the file's end (its checksums) was read."""

    def __init__(self, on_manifest: Callable[[Manifest], None]) -> None:
        self._on_manifest = on_manifest
        self.ended = False

    def take(self, events: Iterator[ReaderEvent]) -> list[bytes | memoryview]:
        out: list[bytes | memoryview] = []
        for event in events:
            if isinstance(event, ManifestRead):
                self._on_manifest(event.manifest)
            elif isinstance(event, TarData):
                out.append(event.data)
            elif isinstance(event, SnapshotEnd):
                self.ended = True
        return out


def verified_tar_blocking(
    chunks: Iterable[bytes], label: str, on_manifest: Callable[[Manifest], None],
    buffers: FrameBuffers | None = None,
) -> Generator[bytes | memoryview, None, None]:  # fmt: skip
    """verified_tar for a caller with a thread of its own and no event loop (the
    pageserver's import of a .neon file): the same checks, each piece verified and
    decompressed on this thread (zstd and hashlib release the GIL), with no hop to a
    worker thread and back per piece (~400 for a 1 GiB pgbench file; in a loaded process
    each waited for the GIL to wake the loop). With `buffers`, each piece of the tar is a
    view of a buffer lent from them, for the consumer to give back once used."""
    reader = SnapshotFileReader(label, hash_in_background=True, buffers=buffers)
    events = _TarEvents(on_manifest)
    try:
        for chunk in chunks:
            taken = memoryview(chunk)
            for at in range(0, len(taken), _FEED_SIZE):  # bounded output: see verified_tar
                yield from events.take(reader.feed(taken[at : at + _FEED_SIZE]))
        yield from events.take(reader.finish())
    finally:
        reader.close()
    if not events.ended:
        raise CorruptData(f"{label} ended before its checksums")  # finish() raises first


def check_control(pgdata: Path, manifest: Manifest, label: str) -> None:
    """The extracted directory is the manifest's database (its pg_control's system identifier)."""
    # Imported here: a push reads manifests through cli/snapshot_file_source.py, which
    # imports this module, and needs none of pg_control's reader (its crc32c and WAL record
    # layouts: 20-40 ms of its start).
    from pg15.pg_control import read_control_file

    control = read_control_file(pgdata)
    if control.system_identifier != manifest.system_identifier:
        raise CorruptData(
            f"{label}: its data directory's system identifier {control.system_identifier} "
            f"differs from its manifest's {manifest.system_identifier}"
        )
