"""`neon snapshot import` and `pull` of a whole `.neon` file: the pageserver reads the file
itself (pageserver/ingest/import_neon.py), so that the data directory's big relation files
are never written out and read back (that was most of a pull's CPU: the CLI's kernel copying
a GiB into the page cache, the pageserver reading it again).

The CLI makes the file local first: a local file is given as it is; a remote one is fetched
(through the pull's spool, cli/transport/spool.py) into the import's private work directory
as it is, compressed (the 1 GiB pgbench database of bench.exchange is a 47 MiB file). The
pageserver verifies every frame before using it and the whole file before anything becomes
visible. A delta file keeps its own way (cli/snapshot_file_source.py), as does anything that
is not a `.neon` file.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from cli.progress import Progress
from cli.snapshot_file_source import chained, check_manifest, peek_manifest
from cli.transport import parse_location
from cli.transport.base import read_object
from cli.transport.file import FileStore
from snapfile.delta import SnapshotIdentity
from snapfile.manifest import Manifest, origin_of
from snapfile.reader import read_manifest

FETCHED_NAME = "fetched.neon"


@dataclass(frozen=True, slots=True)
class LocalNeonFile:
    path: Path
    label: str
    """The source's URL (errors name it)."""
    origin: str
    """`origin_of` its manifest."""


def local_whole_file(source: str, workdir: Path, progress: Progress) -> LocalNeonFile | None:
    """The whole `.neon` file at `source` (a path or URL) as a local file, fetched into
    `workdir` if it is remote; None for a delta (or a file whose manifest is not found: the
    other way reports why)."""
    return asyncio.run(_local(source, workdir, progress))


async def _local(source: str, workdir: Path, progress: Progress) -> LocalNeonFile | None:
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
        return LocalNeonFile(path, label, origin_of(manifest))
    chunks = read_object(location, progress.update)
    try:
        head, first = await peek_manifest(chunks, label)
        if head is None or not _whole(head, label):
            return None
        target = workdir / FETCHED_NAME
        with target.open("xb") as out:
            async for chunk in chained(first, chunks):
                out.write(chunk)
        return LocalNeonFile(target, label, origin_of(head))
    finally:
        await chunks.aclose()  # type: ignore[attr-defined]


def _whole(manifest: Manifest, label: str) -> bool:
    if SnapshotIdentity.parent_of(manifest) is not None:
        return False
    check_manifest(manifest, label)
    return True
