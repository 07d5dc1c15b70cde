"""A basebackup as a `.neon` snapshot file, encoded where the tar is made; whole, or a delta
on a parent snapshot the receiver has (snapfile/delta.py).

Compressing in the daemon rather than in the client sends about a twentieth of the bytes
over the socket (what a client decodes is the cost: its event loop, framing and copies), and
the frames are compressed on the daemon's threads, several at once (snapfile's
`encode_snapshot_file`). The manifest is made from what the tar describes before its first
byte, so nothing is buffered.

A delta's parent is chosen here, where the history is: among the snapshots the receiver
holds, the newest that is an ancestor state of the snapshot (same page history, on its
timeline's ancestry, at a lower LSN): a previous push of the same node.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass

from pageserver.basebackup.delta_tar import DeltaForks
from pageserver.basebackup.sources import TimelineSource
from pageserver.basebackup.tar_stream import AlignedChunks, BasebackupInfo
from pageserver.history.node_store import StorageHistory
from pageserver.history.snapshot_diff import ReadPoint, is_ancestor
from pageserver.history.snapshots import Snapshot
from proto.errors import NotFound
from snapfile import Manifest
from snapfile.manifest import snapshot_manifest
from snapfile.writer import encode_snapshot_file

COMPRESSION_THREADS = 2
FILE_BUFFERS = 24
"""The tar maker's 1 MiB buffers for a whole file: the frames in flight (2 x
COMPRESSION_THREADS and the one being cut, 4 MiB each) and the chunks it is making. With
none free it makes a bytearray (as before, only without the buffer's reuse)."""


class TarCounter:
    """Counts the tar bytes passing on to the encoder."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self.bytes = 0
        self._chunks = chunks

    def __iter__(self) -> Generator[bytes, None, None]:
        for chunk in self._chunks:
            self.bytes += len(chunk)
            yield chunk


@dataclass(frozen=True, slots=True)
class DeltaParent:
    """The snapshot a delta applies to, and the delta's relation forks."""

    name: str
    lsn: int
    forks: DeltaForks


def delta_parent(
    find: Callable[[str], tuple[StorageHistory, Snapshot]],
    snapshot: str,
    source: TimelineSource,
    candidates: Iterable[str],
) -> DeltaParent | None:
    """The newest of `candidates` (snapshot names; unknown ones are skipped) that is an
    ancestor state of `snapshot`, read from `source`; None: a whole file it is."""
    history, snap = find(snapshot)
    target = ReadPoint(source.timeline, source.lsn)
    best: tuple[Snapshot, ReadPoint] | None = None
    for name in candidates:
        try:
            found_in, candidate = find(name)
        except NotFound:
            continue
        if found_in is not history or candidate.name == snap.name or candidate.lsn >= snap.lsn:
            continue
        point = ReadPoint(history.timelines.get(candidate.timeline_id), candidate.lsn)
        if is_ancestor(point, target) and (best is None or candidate.lsn > best[0].lsn):
            best = (candidate, point)
    if best is None:
        return None
    return DeltaParent(best[0].name, best[0].lsn, DeltaForks(source, best[1]))


def snapshot_file_manifest(
    info: BasebackupInfo, source: str, created_at: int, parent: DeltaParent | None = None
) -> Manifest:
    return snapshot_manifest(
        info.system_identifier, info.lsn, info.pg_timeline, source, created_at,
        parent=None if parent is None else parent.name,
        parent_lsn=None if parent is None else parent.lsn,
    )  # fmt: skip


def snapshot_file_buffers() -> AlignedChunks:
    """Buffers for a whole file's tar (see snapshot_file_chunks)."""
    return AlignedChunks(FILE_BUFFERS)


def snapshot_file_chunks(
    manifest: Manifest, tar: TarCounter, aligned: AlignedChunks | None = None
) -> Generator[bytes, None, None]:
    """The `.neon` file's bytes, about one frame's worth at a time. Every chunk is
    compressed where it lies, not copied first: with `aligned` (the tar maker's buffers),
    each is given back once its frames are; without, the tar maker hands on no buffer it
    writes again (a delta's records are a bytearray each, everything else bytes), so
    none is given back. The copy was ~6-7 ms of a 1% delta's tar thread (22 MiB of pages,
    bench.exchange's), measured in-process."""
    release = _owned if aligned is None else aligned.release
    return encode_snapshot_file(manifest, tar, workers=COMPRESSION_THREADS, release=release)


def _owned(chunk: object) -> None:
    """A chunk no one writes again: nothing to give back once its frames are compressed."""
