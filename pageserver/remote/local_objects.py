"""What of a node's local history a PITR area on s3 must have in the bucket now.

Read in this order, so what is read later covers at least what is read first: the manifests
(the layers and their disk_consistent_lsn), then the LSN index (flushed before the layers:
pageserver/history/node_store.py), then the WAL archive (written before it is ingested). So
an extraction at any LSN up to the manifest's disk_consistent_lsn finds its record boundary
(LSN index, WAL) and its pages (layers) in the same index. Each WAL segment comes with its
block sums (``wal_sums/<segment>``, pageserver/remote/wal_blocks.py), so a reader may fetch
and verify only the part of the segment it needs.

Every object's key carries the first 16 hex digits of its SHA-256
(``objects/<path>~<sha>~g<generation>``): an object is never overwritten with other bytes,
not even when a file of the same name is rewritten (the LSN index, the partial WAL segment, a
layer made again by compaction), so an index in the bucket always matches the bytes under its
keys. It carries the lease generation that uploaded it too (an object the bucket's index names
keeps its key): a writer sweeps no orphan of a later generation, so a stale writer never
deletes what the pageserver that took its history over uploaded (pageserver/remote/uploader.py
_sweep), and the objects a stale writer's last deletions remove are never ones the new owner
named (it reuses only the keys of the newest index, whose objects the old writer keeps).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from pageserver.history.node_store import NodeStore
from pageserver.ingest.lsn_index import INDEX_FILE
from pageserver.remote.index import RemoteIndex, RemoteObject
from pageserver.remote.upload_queue import Upload
from pageserver.remote.wal_blocks import SUMS_DIR, BlockHasher, block_sums
from pageserver.storage.layers.evicted import fetcher_for
from pageserver.storage.manifest import MANIFEST_NAME, read_manifest
from pg15.lsn import parse_lsn, segment_file_name
from proto.errors import NotFound
from walreceiver.archive import PARTIAL, WalArchive

OBJECTS = "objects"


@dataclass(frozen=True, slots=True)
class LocalObject:
    path: str
    file: Path
    size: int
    sha256: str
    data: bytes | None = None
    """The bytes as read when planned (files that change: the LSN index, a partial segment)."""
    key: str = ""
    """Its key under the area's prefix (`object_key`, or the bucket's index's), set by
    plan_index."""

    def read(self) -> bytes:
        return self.data if self.data is not None else self.file.read_bytes()

    def upload(self, area_prefix: str) -> Upload:
        return Upload(self.path, f"{area_prefix}/{self.key}", self.size, self.sha256, self.read)


GENERATION_MARK = "~g"


def object_key(path: str, sha256: str, generation: int) -> str:
    """The key a writer of `generation` uploads the object of `path` with these bytes under."""
    return f"{OBJECTS}/{path}~{sha256[:16]}{GENERATION_MARK}{generation}"


def key_generation(key: str) -> int:
    """The generation that uploaded the object under `key` (0: a key made before keys had
    one)."""
    _head, mark, tail = key.rpartition(GENERATION_MARK)
    return int(tail) if mark and tail.isdigit() else 0


class HashCache:
    """SHA-256 of files that do not change once written (layers, complete WAL segments, with
    a segment's block sums), by (path, size, mtime, inode): each is read once to hash it, not
    every round."""

    def __init__(self) -> None:
        self._known: dict[str, tuple[tuple[int, int, int], str, bytes | None]] = {}

    def _hash(self, path: Path, blocks: bool) -> tuple[int, str, bytes | None]:
        st = os.stat(path)
        ident = (st.st_size, st.st_mtime_ns, st.st_ino)
        known = self._known.get(str(path))
        if known is not None and known[0] == ident and (known[2] is not None or not blocks):
            return st.st_size, known[1], known[2]
        hasher = BlockHasher()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                hasher.update(chunk)
        sums = hasher.sums().encode() if blocks else None
        self._known[str(path)] = (ident, hasher.whole.hexdigest(), sums)
        return st.st_size, hasher.whole.hexdigest(), sums

    def sha256(self, path: Path) -> tuple[int, str]:
        size, sha, _sums = self._hash(path, False)
        return size, sha

    def segment(self, path: Path) -> tuple[int, str, bytes]:
        """A complete WAL segment's size, SHA-256 and encoded block sums."""
        size, sha, sums = self._hash(path, True)
        assert sums is not None
        return size, sha, sums


def _mutable(path: str, file: Path) -> LocalObject:
    data = file.read_bytes()
    return _in_memory(path, file, data)


def _in_memory(path: str, file: Path, data: bytes) -> LocalObject:
    return LocalObject(path, file, len(data), hashlib.sha256(data).hexdigest(), data)


def plan_index(
    store: NodeStore, area: dict[str, object], pgdata: str, generation: int, hashes: HashCache,
    remote: RemoteIndex | None = None,
) -> tuple[RemoteIndex, list[LocalObject]]:  # fmt: skip
    """The index the bucket should hold now for `area` over `store`'s node, and its objects
    (a layer evicted from the disk: as `remote`, the bucket's index, has it).
    FileNotFoundError when a file went away while reading (plan again)."""
    state = store.state
    if state is None:
        raise NotFound(f"node {store.node_id} has no page history yet")
    history = store.history
    objects: list[LocalObject] = []
    timelines: dict[str, dict[str, object]] = {}
    chain = history.with_ancestors([state.timeline_id])
    for timeline_id in sorted(chain):
        directory = history.root / "timelines" / timeline_id
        if not (directory / MANIFEST_NAME).exists():
            raise FileNotFoundError(directory / MANIFEST_NAME)
        manifest = read_manifest(directory)
        timelines[timeline_id] = manifest.to_json_body()
        for entry in manifest.layers:
            file = directory / entry.name.file_name
            path = f"timelines/{timeline_id}/{file.name}"
            known = None if remote is None else remote.objects.get(path)
            if known is not None and known.size == entry.size and not file.exists():
                objects.append(LocalObject(path, file, known.size, known.sha256))  # evicted
                continue
            fetch = fetcher_for(directory)
            if not file.exists() and fetch is not None:  # evicted by another area: back
                fetch(timeline_id, file.name, entry.size, file)
            size, sha = hashes.sha256(file)
            objects.append(LocalObject(path, file, size, sha))
    index_file = history.root / "lsn_index" / state.timeline_id / INDEX_FILE
    if index_file.exists():
        objects.append(_mutable(f"lsn_index/{INDEX_FILE}", index_file))
    archive = WalArchive(store.wal_dir, state.wal_segment_size)
    for seg in archive.segments():
        name = segment_file_name(seg.timeline, seg.segno, state.wal_segment_size)
        if seg.partial:
            segment = _mutable(f"wal/{name}{PARTIAL}", seg.path)
            assert segment.data is not None
            sums = block_sums(segment.data).encode()
            name += PARTIAL
        else:
            size, sha, sums = hashes.segment(seg.path)
            segment = LocalObject(f"wal/{name}", seg.path, size, sha)
        objects += [segment, _in_memory(f"{SUMS_DIR}/{name}", seg.path, sums)]
    snapshots = [  # those whose pages the layers named here hold already
        asdict(s)
        for s in history.snapshots.all()
        if s.node_id == store.node_id
        and s.timeline_id in timelines
        and s.lsn <= parse_lsn(str(timelines[s.timeline_id]["disk_consistent_lsn"]))
    ]
    objects = [_keyed(o, generation, remote) for o in objects]
    index = RemoteIndex(
        generation=generation,
        area=area,
        node_id=store.node_id,
        pgdata=pgdata,
        node_state=asdict(state),
        timelines=timelines,
        objects={o.path: RemoteObject(o.key, o.size, o.sha256) for o in objects},
        snapshots=snapshots,
    )
    return index, objects


def _keyed(obj: LocalObject, generation: int, remote: RemoteIndex | None) -> LocalObject:
    """`obj` with its key: the bucket index's for the same bytes (not uploaded again), else a
    new one of this generation."""
    known = None if remote is None else remote.objects.get(obj.path)
    if known is not None and known.sha256 == obj.sha256:
        return replace(obj, key=known.key)
    return replace(obj, key=object_key(obj.path, obj.sha256, generation))
