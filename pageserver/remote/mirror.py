"""A PITR area's history attached from the bucket alone, read-only (disaster recovery).

On this machine it is a storage history like any other (pageserver/history/node_store.py)
under ``<workdir>/remote/<storage>/<area>/pagestore``, built from the bucket's index: the
node's state, the PITR area, its snapshots, the LSN index, and manifests that name only the
layer files downloaded so far. An extraction at LSN L first downloads the layers a read at L
needs (pageserver/remote/layer_selection.py) and the WAL segments that hold L's record
boundary, then runs as it does on the machine that wrote the history.

Every object is checked against the SHA-256 its index gives before it is written where the
history reads it: a mismatch is refused (CorruptData naming the object), the object is not
kept and no page is read from it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from dataclasses import asdict
from pathlib import Path

from durable_files import write_file_durably
from pageserver.history.node_store import NodeState
from pageserver.history.pitr import PitrArea
from pageserver.history.snapshots import Snapshot
from pageserver.ingest.lsn_index import INDEX_FILE, LsnIndex
from pageserver.remote.index import INDEX_NAME, RemoteIndex, RemoteObject, decode_index
from pageserver.remote.layer_selection import layers_for_read
from pageserver.remote.objects import open_bucket
from pageserver.remote.settings import RemoteSettings
from pageserver.remote.uploader import area_prefix
from pageserver.storage.layers.names import LayerName, parse_layer_name
from pageserver.storage.manifest import LayerEntry, TimelineManifest, write_manifest
from pg15.lsn import parse_lsn, parse_segment_file_name
from proto.errors import CorruptData, NotFound


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_file_durably(path, data)


KEPT_INDEX = "remote_index.json"
"""The bucket's index as last read, beside the history laid out from it."""


class ChecksumMismatch(CorruptData):
    """An object's bytes do not match the SHA-256 its index gives."""


def verified(body: bytes, obj: RemoteObject, where: str) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    if len(body) != obj.size or digest != obj.sha256:
        raise ChecksumMismatch(
            f"object {where} is corrupt: {len(body)} bytes with SHA-256 {digest[:16]}..., "
            f"the index says {obj.size} bytes with {obj.sha256[:16]}...; refused, not used"
        )
    return body


def _manifest(body: dict[str, object], layers: list[LayerEntry]) -> TimelineManifest:
    prev = body["prev_record_lsn"]
    ancestor = body["ancestor_id"]
    return TimelineManifest(
        timeline_id=str(body["timeline_id"]),
        ancestor_id=None if ancestor is None else str(ancestor),
        ancestor_lsn=parse_lsn(str(body["ancestor_lsn"])),
        disk_consistent_lsn=parse_lsn(str(body["disk_consistent_lsn"])),
        prev_record_lsn=None if prev is None else parse_lsn(str(prev)),
        layers=tuple(layers),
    )


def _layer_names(body: dict[str, object]) -> dict[str, LayerName]:
    out = {}
    for entry in body["layers"]:  # type: ignore[attr-defined]
        name = parse_layer_name(str(entry["name"]))
        if name is None:
            raise CorruptData(f"remote index names a non-layer file {entry['name']!r}")
        out[name.file_name] = name
    return out


class MirrorArea:
    """One attached area; thread-safe (downloads are serialized)."""

    def __init__(self, settings: RemoteSettings, name: str, root: Path) -> None:
        self.settings = settings
        self.name = name
        self.root = root
        """The history root (``.../pagestore``)."""
        self.prefix = area_prefix(settings, name)
        self.index: RemoteIndex | None = None
        self.downloaded_bytes = 0
        self._lock = threading.Lock()
        kept = root / KEPT_INDEX
        if kept.exists():  # attached before a restart: what the bucket said then
            self.index = decode_index(kept.read_bytes(), str(kept))

    @property
    def node_id(self) -> str:
        assert self.index is not None
        return self.index.node_id

    # --- the index -------------------------------------------------------------------------

    def refresh(self) -> RemoteIndex:
        """Read the bucket's index and lay the history out from it (layers not fetched)."""
        with self._lock:
            raw, index = asyncio.run(self._read_index())
            self._lay_out(index)
            _write(self.root / KEPT_INDEX, raw)
            self.index = index
            return index

    async def _read_index(self) -> tuple[bytes, RemoteIndex]:
        key = f"{self.prefix}/{INDEX_NAME}"
        async with open_bucket(self.settings) as bucket:
            raw = await bucket.get_if_exists(key)
        if raw is None:
            raise NotFound(f"PITR area {self.name!r} has no index in {self.settings.url}")
        return raw, decode_index(raw, self.settings.object_url(key))

    def _local_layers(self, timeline_id: str) -> set[str]:
        directory = self.root / "timelines" / timeline_id
        if not directory.exists():
            return set()
        return {p.name for p in directory.iterdir() if parse_layer_name(p.name) is not None}

    def _lay_out(self, index: RemoteIndex) -> None:
        root = self.root
        state = NodeState(**index.node_state)
        _write(root / "nodes" / f"{index.node_id}.json", json.dumps(asdict(state)).encode())
        area = PitrArea(**index.area)
        _write(root / "pitr.json", json.dumps([asdict(area)], indent=1).encode())
        snapshots = {s["name"]: s for s in index.snapshots}
        path = root / "snapshots.json"
        if path.exists():  # extracted here: kept beside the bucket's
            for local in json.loads(path.read_text()):
                snapshots.setdefault(local["name"], local)
        records = [asdict(Snapshot(**s)) for s in snapshots.values()]
        _write(path, json.dumps(records, indent=1).encode())
        for timeline_id, body in index.timelines.items():
            self._write_manifest(index, timeline_id, body, self._local_layers(timeline_id))
        lsn_index = index.objects.get(f"lsn_index/{INDEX_FILE}")
        target = root / "lsn_index" / state.timeline_id / INDEX_FILE
        if lsn_index is not None:
            body = asyncio.run(self._fetch({f"lsn_index/{INDEX_FILE}": lsn_index}))
            target.parent.mkdir(parents=True, exist_ok=True)
            _write(target, next(iter(body.values())))

    def _write_manifest(
        self, index: RemoteIndex, timeline_id: str, body: dict[str, object], local: set[str]
    ) -> None:
        directory = self.root / "timelines" / timeline_id
        directory.mkdir(parents=True, exist_ok=True)
        names = _layer_names(body)
        sizes = {str(e["name"]): int(e["size"]) for e in body["layers"]}  # type: ignore[attr-defined]
        entries = [LayerEntry(names[n], sizes[n]) for n in sorted(local) if n in names]
        for stale in local - set(names):  # gone from the bucket's index (GC there)
            (directory / stale).unlink(missing_ok=True)
        write_manifest(directory, _manifest(body, entries))

    # --- downloads -------------------------------------------------------------------------

    async def _fetch(self, wanted: dict[str, RemoteObject]) -> dict[str, bytes]:
        """Download and verify objects (path -> bytes), a few at once."""
        slots = asyncio.Semaphore(4)
        async with open_bucket(self.settings) as bucket:

            async def one(path: str, obj: RemoteObject) -> tuple[str, bytes]:
                async with slots:
                    where = self.settings.object_url(f"{self.prefix}/{obj.key}")
                    body = await bucket.get(f"{self.prefix}/{obj.key}")
                    return path, verified(body, obj, where)

            pairs = await asyncio.gather(*(one(p, o) for p, o in wanted.items()))
        self.downloaded_bytes += sum(len(b) for _p, b in pairs)
        return dict(pairs)

    def needed_layers(self, lsn: int) -> dict[str, RemoteObject]:
        """The objects of the layers a read of the node's timeline at `lsn` needs."""
        index = self.index
        assert index is not None
        wanted: dict[str, RemoteObject] = {}
        timeline_id: str | None = index.timeline_id
        at = lsn
        while timeline_id is not None:
            body = index.timelines[timeline_id]
            names = list(_layer_names(body).values())
            needed, read_ancestor = layers_for_read(names, at)
            for name in needed:
                path = f"timelines/{timeline_id}/{name.file_name}"
                obj = index.objects.get(path)
                if obj is None:
                    raise CorruptData(f"the index of {self.name!r} names no object for {path}")
                wanted[path] = obj
            ancestor = body["ancestor_id"]
            if not read_ancestor or ancestor is None:
                break
            at = min(at, parse_lsn(str(body["ancestor_lsn"])))
            timeline_id = str(ancestor)
        return wanted

    def needed_wal(self, lsn: int) -> dict[str, RemoteObject]:
        """The WAL segments from the LSN index's sample at or below `lsn` through `lsn`."""
        index = self.index
        assert index is not None
        state = NodeState(**index.node_state)
        size = state.wal_segment_size
        lsn_index = LsnIndex(self.root / "lsn_index" / state.timeline_id, size)
        try:
            start = lsn_index.wal_needed_from(lsn)
        except NotFound:  # no sample yet: the history's own start is a boundary
            start = state.start_lsn
        first, last = start // size, lsn // size
        wanted = {}
        for path, obj in index.objects.items():
            if path.startswith("wal/"):
                _tli, segno, _partial = parse_segment_file_name(path[4:], size)
                if first <= segno <= last:
                    wanted[path] = obj
        return wanted

    def prepare(self, lsn: int) -> int:
        """Download what an extraction at `lsn` needs; the bytes downloaded now."""
        with self._lock:
            index = self.index
            assert index is not None
            state = NodeState(**index.node_state)
            wanted = {**self.needed_layers(lsn), **self.needed_wal(lsn)}
            missing = {p: o for p, o in wanted.items() if not self._have(p, o, state)}
            if not missing:
                return 0
            bodies = asyncio.run(self._fetch(missing))
            for path, data in bodies.items():
                _write(self._local_path(path, state), data)
            for timeline_id, body in index.timelines.items():
                self._write_manifest(index, timeline_id, body, self._local_layers(timeline_id))
            return sum(len(b) for b in bodies.values())

    def _local_path(self, path: str, state: NodeState) -> Path:
        if path.startswith("wal/"):
            return self.root / "wal" / self.node_id / state.timeline_id / path[4:]
        return self.root / path

    def _have(self, path: str, obj: RemoteObject, state: NodeState) -> bool:
        """Downloaded already (a partial segment that grew since is fetched again)."""
        try:
            return self._local_path(path, state).stat().st_size == obj.size
        except FileNotFoundError:
            return False
