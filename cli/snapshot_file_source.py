"""A `.neon` snapshot file as an import source: a local path or a URL of any transport
(cli/transport/: file://, ssh://, http(s)://), which `neon snapshot pull` uses too.

The file is read as a stream and never staged (a cut connection is resumed at the offset
reached, see `read_object`): its bytes go through `SnapshotFileReader`
(snapfile/, which verifies every frame before passing on a byte of it) and the verified
basebackup tar goes through a pipe into the checked extractor (`datadir_files.untar`).
Memory stays about one frame whatever the snapshot's size. The reader must also see the end
of the file: the trailing `checksums.json` proves that no frame is missing and that the frames
belong to this file, so the extracted directory is only used once the whole file was read and
verified. A damaged or cut file raises CorruptData naming the member and offset; the caller's
work directory (with whatever was extracted) is then removed, so nothing is imported.

What the file holds is the data directory of a pageserver basebackup at the snapshot's LSN:
cleanly shut down, so it is imported as it is, with no recovery. `neon snapshot import` and
`pull` of a whole file go another way (cli/neon_file_import.py: the pageserver reads the file
and writes no big relation file); this module's extraction serves deltas and `recv`, and
its reader and extractor are what the pageserver runs there.

A delta file (snapfile/delta.py) names its parent: its chain is resolved in the same store
(the manifests at the heads of the `.neon` files there, `snapshots_in`) down to a whole file,
which is extracted; then each delta is applied in order (cli/delta_apply.py), every one
verified as it streams. A parent found nowhere is one line naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
)
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.progress import Progress
from cli.transport import is_transport_url, parse_location
from cli.transport.base import Location, Store, read_object
from proto.errors import CorruptData, NotFound
from snapfile.delta import SnapshotIdentity
from snapfile.manifest import Manifest, decode_manifest, origin_of
from snapfile.reader import (
    ManifestRead,
    SnapshotFileReader,
    looks_like_snapshot_file,
)
from snapfile.verified import check_control, check_manifest, verified_tar

if TYPE_CHECKING:
    from cli.live_import import LiveImport

# The unpacking machinery (datadir_files/untar.py, cli/live_import.py) is imported where a file is
# unpacked: a push reads only the manifests at its destination (snapshots_in), and importing
# it cost ~5 ms of a push's start (8 modules).


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


def is_neon_source(source: str) -> bool:
    """Whether `source` names a `.neon` file: a URL of a transport or a local `.neon` file."""
    return is_url_source(source) or is_snapshot_file(Path(source))


HEAD_LIMIT = 128 * 1024
"""Bytes read at most to find a file's manifest (it ends within 67 KiB)."""
HEAD_READS = 8
"""Heads read at once when a store is listed."""


async def peek_manifest(
    chunks: AsyncIterator[bytes], label: str
) -> tuple[Manifest | None, list[bytes]]:
    """The verified manifest at the head of a file arriving as `chunks` (None when it is no
    `.neon` file), and the chunks read to find it (at most about HEAD_LIMIT bytes): the rest
    of `chunks` follows them."""
    reader = SnapshotFileReader(label)
    read: list[bytes] = []
    size = 0
    try:
        async for chunk in chunks:
            read.append(chunk)
            size += len(chunk)
            for event in reader.feed(chunk):
                if isinstance(event, ManifestRead):
                    return event.manifest, read
            if size > HEAD_LIMIT:
                break
    except CorruptData:
        pass
    return None, read


async def read_head(store: Store, name: str) -> Manifest | None:
    """The verified manifest at the head of object `name`; None when it is no `.neon` file."""
    try:
        async with await store.open_read(name) as stream:
            manifest, _read = await peek_manifest(aiter(stream), store.object_url(name))
            return manifest
    except NotFound:
        return None


async def chained(first: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in first:
        yield chunk
    async for chunk in rest:
        yield chunk


async def snapshots_in(store: Store) -> dict[str, Manifest]:
    """The manifest of every `.neon` file in `store`, by object name (a small read of each
    file's head; other objects are skipped)."""
    gate = asyncio.Semaphore(HEAD_READS)

    async def head(name: str) -> tuple[str, Manifest | None]:
        async with gate:
            return name, await read_head(store, name)

    objects = [o for o in await store.list() if o.name.endswith(".neon")]
    described = {o.name: o.described for o in objects if o.described is not None}
    names = [o.name for o in objects if o.name not in described]
    heads = await asyncio.gather(*(head(name) for name in names))
    found = {name: manifest for name, manifest in heads if manifest is not None}
    for name, fields in described.items():
        with contextlib.suppress(CorruptData):  # a description that makes no manifest
            found[name] = decode_manifest(json.dumps(fields).encode())
    return found


Chain = list[tuple[str, Manifest]]


def resolve_chain(
    name: str, manifest: Manifest, files: dict[str, Manifest]
) -> Chain | SnapshotIdentity:
    """The files to read for `manifest` (of object `name`), from a whole snapshot's up to it,
    among `files` (a whole file preferred where several hold one snapshot); else the identity
    of the first parent none of them holds."""
    by_identity: dict[SnapshotIdentity, tuple[str, Manifest]] = {}
    for other, held in sorted(files.items()):
        identity = SnapshotIdentity.of(held)
        have = by_identity.get(identity)
        if have is None or (have[1].parent is not None and held.parent is None):
            by_identity[identity] = (other, held)
    chain = [(name, manifest)]
    while (parent := SnapshotIdentity.parent_of(chain[-1][1])) is not None:
        if parent.lsn >= chain[-1][1].lsn:
            raise CorruptData(f"{chain[-1][0]}: its parent {parent} is not older than it")
        found = by_identity.get(parent)
        if found is None:
            return parent
        chain.append(found)
    return chain[::-1]


def missing_parent(url: str, parent: SnapshotIdentity, where: str) -> NotFound:
    return NotFound(
        f"{url} is a delta on snapshot {parent}, which {where} does not have; push the "
        "snapshot whole with `neon snapshot push --full`"
    )


ParentHere = Callable[[SnapshotIdentity], Awaitable[str | None]]
"""The snapshot of this home that is the given one, if any (cli/delta_import.py)."""


@dataclass(frozen=True, slots=True)
class Unpacked:
    manifest: Manifest
    delta_on: str | None = None
    """Set when the directory holds a delta's tar as it is (relation forks as neon-delta/
    members), to import on a branch of this snapshot of the home, its parent."""


async def unpack_snapshot_file(
    source: str,
    pgdata: Path,
    progress: Progress,
    parent_here: ParentHere | None = None,
    live: LiveImport[Any] | None = None,
) -> Unpacked:
    """Extract the `.neon` file at `source` (a path or a URL of any transport: file, ssh,
    http(s), s3) into `pgdata`. A delta whose parent this home holds (`parent_here`) is
    extracted as it is; any other delta is applied on its parents, read from the same store.
    A whole file begins `live` (cli/live_import.py). Nothing is left in `pgdata` that the
    caller may use unless this returns."""
    location = parse_location(source)
    chunks = read_object(location, progress.update)
    head, first = await peek_manifest(chunks, location.url)
    parent = None if head is None else SnapshotIdentity.parent_of(head)
    if head is None or parent is None:
        rest = chained(first, chunks)
        return Unpacked(await unpack_snapshot_stream(rest, location.url, pgdata, head, live))
    base = None if parent_here is None else await parent_here(parent)
    if base is not None:
        await unpack_delta(chained(first, chunks), location.url, pgdata, head)
        return Unpacked(head, base)
    await chunks.aclose()  # type: ignore[attr-defined]
    files = await snapshots_in(location.store)
    files[location.object_name] = head
    chain = resolve_chain(location.object_name, head, files)
    if isinstance(chain, SnapshotIdentity):
        raise missing_parent(location.url, chain, location.store.url)
    received = 0

    def meter(name: str) -> AsyncIterator[bytes]:
        start = received

        def update(done: int, total: int | None) -> None:
            nonlocal received
            received = start + done
            progress.update(received, None)

        return read_object(Location(location.store, name), update)

    (base, base_manifest), *deltas = chain
    url = location.store.object_url(base)
    await unpack_snapshot_stream(meter(base), url, pgdata, base_manifest)
    for name, manifest in deltas:
        await apply_delta_stream(meter(name), location.store.object_url(name), pgdata, manifest)
    return Unpacked(head)


async def unpack_delta(
    chunks: AsyncIterator[bytes], label: str, directory: Path, head: Manifest
) -> None:
    """Extract the delta arriving as `chunks` (its manifest `head`, read before) into
    `directory` as it is, its fork members in one file (snapfile/delta.py PACK_NAME, which
    pageserver/ingest/import_delta.py reads), once the whole file checked out."""
    from datadir_files.untar import extract_stream  # on use: see the imports

    tar = verified_tar(chunks, label, expect_manifest(label, head))
    await extract_stream(tar, directory, pack_deltas=True)
    check_control(directory, head, label)


def expect_manifest(label: str, expected: Manifest | None) -> Callable[[Manifest], None]:
    def check(manifest: Manifest) -> None:
        if expected is not None and manifest != expected:
            raise CorruptData(f"{label} changed while it was read (its manifest differs)")

    return check


async def apply_delta_stream(
    chunks: AsyncIterator[bytes],
    label: str,
    pgdata: Path,
    expected: Manifest,
    keep: Iterable[str] = (),
) -> None:
    """Apply the delta `.neon` file arriving as `chunks` (its manifest `expected`, read from
    its head before) to its parent's data directory `pgdata` (`keep`: DeltaApplier's)."""
    from cli.delta_apply import DeltaApplier

    applier = DeltaApplier(pgdata, keep, sparse_wal=True)  # DELTA_FORMAT_VERSION's WAL segment
    try:
        async for data in verified_tar(chunks, label, expect_manifest(label, expected)):
            await asyncio.to_thread(applier.feed, data)
        await asyncio.to_thread(applier.finish)
    finally:
        applier.close()
    check_control(pgdata, expected, label)


async def unpack_snapshot_stream(
    chunks: AsyncIterator[bytes],
    label: str,
    pgdata: Path,
    expected: Manifest | None = None,
    live: LiveImport[Any] | None = None,
) -> Manifest:
    """Extract the `.neon` file arriving as `chunks` (`label` names it in errors) into
    `pgdata`; return its manifest, once the whole file checked out (the one `expected`, when
    its head was read before). A whole file begins `live` at its LSN, and its big relation
    files are announced to it as they come (cli/live_import.py)."""
    from cli.live_import import announced  # on use: see the imports
    from datadir_files.untar import extract_stream

    seen: list[Manifest] = []
    expect = expect_manifest(label, expected)

    def on_manifest(manifest: Manifest) -> None:
        expect(manifest)
        check_manifest(manifest, label)
        seen.append(manifest)
        if live is not None and manifest.parent is None:
            live.begin(manifest.lsn, origin_of(manifest))

    tar: AsyncIterator[bytes | memoryview] = verified_tar(chunks, label, on_manifest)
    if live is not None:
        tar = announced(tar, live, backup_label=False)
    await extract_stream(tar, pgdata)
    [manifest] = seen
    check_control(pgdata, manifest, label)
    return manifest
