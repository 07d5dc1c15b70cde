"""A `.neon` snapshot file as an import source: a local path or a URL of any transport
(cli/transport/: file://, ssh://, http(s)://), which `neon snapshot pull` uses too.

The file is read as a stream and never staged (a cut connection is resumed at the offset
reached, see `read_object`): its bytes go through `SnapshotFileReader`
(snapfile/, which verifies every frame before passing on a byte of it) and the verified
basebackup tar goes through a pipe into the checked extractor (`cli.untar`). Memory stays about
one frame whatever the snapshot's size. The reader must also see the end of the file: the
trailing `checksums.json` proves that no frame is missing and that the frames belong to this
file, so the extracted directory is only used once the whole file was read and verified. A
damaged or cut file raises CorruptData naming the member and offset; the caller's work
directory (with whatever was extracted) is then removed, so nothing is imported.

What the file holds is the data directory of a pageserver basebackup at the snapshot's LSN:
cleanly shut down, so it is imported as it is, with no recovery.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from cli.progress import Progress
from cli.transport import is_transport_url, parse_location
from cli.transport.base import read_object
from cli.untar import extract_stream
from pg15.constants import PG_MAJOR_VERSION
from pg15.pg_control import read_control_file
from proto.errors import CorruptData, InvalidArgument
from snapfile.manifest import Manifest
from snapfile.reader import (
    ManifestRead,
    ReaderEvent,
    SnapshotEnd,
    SnapshotFileReader,
    TarData,
    looks_like_snapshot_file,
)


def is_url_source(source: str) -> bool:
    """Whether `source` is a `.neon` file's URL (file://, ssh://, http(s)://): a URL of
    another scheme is not (basebackup:// is a server)."""
    return is_transport_url(source)


def is_snapshot_file(path: Path) -> bool:
    """Whether `path` is a regular file that starts like a `.neon` file (its first block)."""
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return looks_like_snapshot_file(f.read(512))


def check_manifest(manifest: Manifest, label: str) -> None:
    """Refuse what cannot become a snapshot here, before any data is extracted."""
    if manifest.pg_version != PG_MAJOR_VERSION:
        raise InvalidArgument(
            f"{label} holds a PostgreSQL {manifest.pg_version} snapshot; pg-neon works with "
            f"PostgreSQL {PG_MAJOR_VERSION} only"
        )
    if manifest.parent is not None:
        raise InvalidArgument(
            f"{label} is a delta on snapshot {manifest.parent!r}, not a whole snapshot; "
            "import a file made by `neon snapshot export` (a whole snapshot)"
        )


async def verified_tar(
    chunks: AsyncIterator[bytes], label: str, on_manifest: Callable[[Manifest], None]
) -> AsyncIterator[bytes]:
    """The verified basebackup tar inside the `.neon` file arriving as `chunks`; raises
    CorruptData (after the tar's last byte at the latest) unless the whole file checks out."""
    reader = SnapshotFileReader(label)
    ended = False

    def take(events: Iterator[ReaderEvent]) -> list[bytes]:
        nonlocal ended
        out = []
        for event in events:
            if isinstance(event, ManifestRead):
                on_manifest(event.manifest)
            elif isinstance(event, TarData):
                out.append(event.data)
            elif isinstance(event, SnapshotEnd):
                ended = True
        return out

    async for chunk in chunks:
        for data in take(reader.feed(chunk)):
            yield data
    for data in take(reader.finish()):
        yield data
    if not ended:
        raise CorruptData(f"{label} ended before its checksums")  # finish() raises first


async def unpack_snapshot_file(source: str, pgdata: Path, progress: Progress) -> Manifest:
    """Extract the `.neon` file at `source` (a path or a URL of any transport: file, ssh,
    http(s), s3) into `pgdata`; return its manifest. Nothing is left in `pgdata` that the
    caller may use unless this returns."""
    location = parse_location(source)
    chunks = read_object(location, progress.update)
    return await unpack_snapshot_stream(chunks, location.url, pgdata)


async def unpack_snapshot_stream(
    chunks: AsyncIterator[bytes], label: str, pgdata: Path
) -> Manifest:
    """Extract the `.neon` file arriving as `chunks` (`label` names it in errors) into
    `pgdata`; return its manifest, once the whole file checked out."""
    seen: list[Manifest] = []

    def on_manifest(manifest: Manifest) -> None:
        check_manifest(manifest, label)
        seen.append(manifest)

    await extract_stream(verified_tar(chunks, label, on_manifest), pgdata)
    [manifest] = seen
    control = read_control_file(pgdata)
    if control.system_identifier != manifest.system_identifier:
        raise CorruptData(
            f"{label}: its data directory's system identifier {control.system_identifier} "
            f"differs from its manifest's {manifest.system_identifier}"
        )
    return manifest
