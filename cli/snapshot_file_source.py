"""A `.neon` snapshot file as an import source: a local path or an http(s):// URL (GET).

The file is read as a stream and never staged: its bytes go through `SnapshotFileReader`
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

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

from cli.progress import Progress
from cli.storages import mask_url
from cli.untar import extract_stream
from pg15.constants import PG_MAJOR_VERSION
from pg15.pg_control import read_control_file
from proto.errors import CorruptData, InvalidArgument, NotFound, Unavailable
from snapfile.manifest import Manifest
from snapfile.reader import (
    ManifestRead,
    ReaderEvent,
    SnapshotEnd,
    SnapshotFileReader,
    TarData,
    looks_like_snapshot_file,
)

CHUNK = 1024 * 1024
HTTP_SCHEMES = ("http", "https")
CONNECT_TIMEOUT, READ_TIMEOUT = 30, 300  # seconds; no limit on the whole download


def is_http_source(source: str) -> bool:
    return source.split(":", 1)[0].lower() in HTTP_SCHEMES


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


async def file_chunks(path: Path, progress: Progress) -> AsyncIterator[bytes]:
    total = path.stat().st_size
    done = 0
    with path.open("rb") as f:
        while chunk := await asyncio.to_thread(f.read, CHUNK):
            done += len(chunk)
            progress.update(done, total)
            yield chunk


async def http_chunks(url: str, progress: Progress) -> AsyncIterator[bytes]:
    """GET `url`, streamed; a failed request is one line naming the URL (password masked)."""
    import aiohttp  # 0.2 s of CLI start-up for every command otherwise

    shown = mask_url(url)
    timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url) as response,
        ):
            if response.status == 404:
                raise NotFound(f"{shown}: no such file on the server (HTTP 404)")
            if response.status != 200:
                raise Unavailable(f"{shown}: the server answered HTTP {response.status}")
            total = response.content_length
            done = 0
            async for chunk in response.content.iter_chunked(CHUNK):
                done += len(chunk)
                progress.update(done, total)
                yield chunk
            if total is not None and done != total:
                raise CorruptData(f"{shown}: the download ended after {done} of {total} bytes")
    except (aiohttp.ClientError, TimeoutError) as exc:
        reason = str(exc) or type(exc).__name__
        raise Unavailable(f"cannot download {shown}: {reason}") from None


def check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme.lower() not in HTTP_SCHEMES or not parts.hostname:
        raise InvalidArgument(
            f"invalid snapshot URL {mask_url(url)!r}: expected http(s)://HOST[:PORT]/PATH.neon"
        )


async def unpack_snapshot_file(source: str, pgdata: Path, progress: Progress) -> Manifest:
    """Extract the `.neon` file at `source` (a path or an http(s) URL) into `pgdata`; return
    its manifest. Nothing is left in `pgdata` that the caller may use unless this returns."""
    if is_http_source(source):
        check_url(source)
        label, chunks = mask_url(source), http_chunks(source, progress)
    else:
        path = Path(source)
        label, chunks = str(path), file_chunks(path, progress)
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
