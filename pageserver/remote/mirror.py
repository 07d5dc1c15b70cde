"""A PITR area's history attached from the bucket alone, read-only (disaster recovery).

On this machine it is a storage history like any other (pageserver/history/node_store.py)
under ``<workdir>/remote/<storage>/<area>/pagestore``, built from the bucket's index: the
node's state, the PITR area, its snapshots, the LSN index, and manifests that name only the
layer files downloaded so far. An extraction at LSN L first downloads the layers a read at L
needs (pageserver/remote/layer_selection.py) and, by ranged GETs, only the blocks of WAL from
the LSN index's record boundary at or below L through L (pageserver/remote/wal_blocks.py),
then runs as it does on the machine that wrote the history, reading the WAL through
`wal_reader`.

Every object is checked against the SHA-256 its index gives before it is written where the
history reads it: a mismatch is refused (CorruptData naming the object), the object is not
kept and no page is read from it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TypeVar

from durable_files import write_file_durably
from pageserver.history.node_store import NodeState
from pageserver.history.pitr import PitrArea
from pageserver.history.snapshots import Snapshot
from pageserver.ingest.lsn_index import INDEX_FILE, LsnIndex, ReadWal
from pageserver.remote.index import (
    INDEX_NAME,
    RemoteIndex,
    RemoteObject,
    decode_index,
    verified,
)
from pageserver.remote.layer_selection import layers_for_read
from pageserver.remote.objects import NoSuchObject, ObjectStore, open_bucket
from pageserver.remote.settings import RemoteSettings
from pageserver.remote.uploader import area_prefix
from pageserver.remote.wal_blocks import SUMS_DIR, BlockSums, block_sums, decode_sums
from pageserver.storage.layers.names import LayerName, parse_layer_name
from pageserver.storage.manifest import LayerEntry, TimelineManifest, write_manifest
from pg15.lsn import parse_lsn, parse_segment_file_name
from proto.errors import CorruptData, NotFound, Unavailable


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_file_durably(path, data)


KEPT_INDEX = "remote_index.json"
"""The bucket's index as last read, beside the history laid out from it."""
WAL_BLOCKS = "wal_blocks"
"""``wal_blocks/<segment>~<sha>/<block>``: verified blocks of the segments read here, and the
segment's block sums (SUMS_FILE)."""
SUMS_FILE = "sums"
REREADS = 5
"""How many times a read of the area runs, each from the index read anew, before it gives
up because the writer replaced what it read each time."""

T = TypeVar("T")


def _same_bytes(path: Path, obj: RemoteObject) -> bool:
    """The file holds the object already (not downloaded again)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return False
    return len(data) == obj.size and hashlib.sha256(data).hexdigest() == obj.sha256


def timeline_manifest(body: dict[str, object], layers: list[LayerEntry]) -> TimelineManifest:
    """A timeline's manifest from its body in the index, naming only `layers`."""
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
        self._index_raw: bytes | None = None
        """The bytes of `index`."""
        kept = root / KEPT_INDEX
        if kept.exists():  # attached before a restart: what the bucket said then
            self._index_raw = kept.read_bytes()
            self.index = decode_index(self._index_raw, str(kept))

    @property
    def node_id(self) -> str:
        assert self.index is not None
        return self.index.node_id

    # --- the index -------------------------------------------------------------------------

    def refresh(self) -> RemoteIndex:
        """Read the bucket's index and lay the history out from it (layers not fetched)."""
        with self._lock:
            self._retrying(lambda: None, read_first=True)
            assert self.index is not None
            return self.index

    def _adopt_index(self, raw: bytes, index: RemoteIndex) -> None:
        """Lay the history out from the bucket's index `index` (its bytes: `raw`), the lock
        held."""
        self._lay_out(index)
        _write(self.root / KEPT_INDEX, raw)
        self.index, self._index_raw = index, raw

    def _retrying(self, work: Callable[[], T], *, read_first: bool) -> T:
        """`work` (the lock held), which downloads objects the index names. When one is gone
        from the bucket, its writer has replaced the index since and deleted what the new one
        no longer names (its deletions follow the index at once: pageserver/remote/uploader.py):
        read the index again, lay the history out from it and run `work` again. Gone while the
        index still names it, the bucket is damaged."""
        read, gone, used = read_first, None, self._index_raw
        for _ in range(REREADS):
            try:
                if read:
                    raw, index = asyncio.run(self._read_index())
                    if gone is not None and raw == used:
                        raise CorruptData(
                            f"{gone}, though the index of PITR area {self.name!r} in "
                            f"{self.settings.url} names it"
                        )
                    used = raw
                    self._adopt_index(raw, index)
                return work()
            except NoSuchObject as exc:
                read, gone = True, exc
        raise Unavailable(
            f"PITR area {self.name!r} in {self.settings.url} was rewritten while it was read, "
            f"{REREADS} times in a row ({gone}); try again"
        )

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
        """The history's files as `index` says, its LSN index downloaded first: a download
        that fails (gone since: the writer's next round) leaves the files as they were."""
        root = self.root
        state = NodeState(**index.node_state)
        lsn_index = index.objects.get(f"lsn_index/{INDEX_FILE}")
        target = root / "lsn_index" / state.timeline_id / INDEX_FILE
        body = None
        if lsn_index is not None and not _same_bytes(target, lsn_index):
            body = asyncio.run(self._fetch({f"lsn_index/{INDEX_FILE}": lsn_index}))
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
        for timeline_id, timeline in index.timelines.items():
            self._write_manifest(index, timeline_id, timeline, self._local_layers(timeline_id))
        if body is not None:
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
        write_manifest(directory, timeline_manifest(body, entries))

    # --- downloads -------------------------------------------------------------------------

    async def _fetch(
        self, wanted: dict[str, RemoteObject], bucket: ObjectStore | None = None
    ) -> dict[str, bytes]:
        """Download and verify whole objects (path -> bytes), a few at once."""
        if bucket is None:
            async with open_bucket(self.settings) as opened:
                return await self._fetch(wanted, opened)
        slots = asyncio.Semaphore(4)

        async def one(path: str, obj: RemoteObject) -> tuple[str, bytes]:
            async with slots:
                where = self.settings.object_url(f"{self.prefix}/{obj.key}")
                body = await bucket.get(f"{self.prefix}/{obj.key}")
                return path, verified(body, obj, where)

        pairs = await asyncio.gather(*(one(p, o) for p, o in wanted.items()))
        self.downloaded_bytes += sum(len(b) for _p, b in pairs)
        return dict(pairs)

    def needed_layers(
        self, lsn: int, since: int | None = None, timeline: str | None = None
    ) -> dict[str, RemoteObject]:
        """The objects of the layers a read of `timeline` (default: the node's current one) at
        `lsn` needs (at any LSN in [since, lsn] when `since` is given)."""
        index = self.index
        assert index is not None
        wanted: dict[str, RemoteObject] = {}
        timeline_id: str | None = timeline or index.timeline_id
        at, low = lsn, lsn if since is None else since
        while timeline_id is not None:
            body = index.timelines.get(timeline_id)
            if body is None:  # the writer's node left it (a checkout), or gc removed it
                raise NotFound(
                    f"timeline {timeline_id} is no longer in the index of PITR area "
                    f"{self.name!r} in {self.settings.url}"
                )
            names = list(_layer_names(body).values())
            needed, read_ancestor = layers_for_read(names, at, low)
            for name in needed:
                path = f"timelines/{timeline_id}/{name.file_name}"
                obj = index.objects.get(path)
                if obj is None:
                    raise CorruptData(f"the index of {self.name!r} names no object for {path}")
                wanted[path] = obj
            ancestor = body["ancestor_id"]
            if not read_ancestor or ancestor is None:
                break
            branch = parse_lsn(str(body["ancestor_lsn"]))
            at, low = min(at, branch), min(low, branch)
            timeline_id = str(ancestor)
        return wanted

    def wal_start(self, lsn: int) -> int:
        """Where snapping `lsn` to a record end starts reading WAL: the LSN index's record
        boundary at or below it (pageserver/ingest/lsn_index.py, LsnIndex.snap)."""
        assert self.index is not None
        state = NodeState(**self.index.node_state)
        lsn_index = LsnIndex(self.root / "lsn_index" / state.timeline_id, state.wal_segment_size)
        try:
            return min(lsn_index.wal_needed_from(lsn), lsn)
        except NotFound:  # no sample yet: the history's own start is a boundary
            return min(state.start_lsn, lsn)

    def _segments(self) -> dict[int, tuple[str, RemoteObject]]:
        """Per segment number, the object a read takes, as archive_reader picks a file: the
        newest PostgreSQL timeline's, complete before partial."""
        assert self.index is not None
        size = NodeState(**self.index.node_state).wal_segment_size
        chosen: dict[int, tuple[tuple[int, bool], str, RemoteObject]] = {}
        for path, obj in self.index.objects.items():
            if path.startswith("wal/"):
                tli, segno, partial = parse_segment_file_name(path[4:], size)
                rank = (tli, not partial)
                if segno not in chosen or chosen[segno][0] < rank:
                    chosen[segno] = (rank, path, obj)
        return {segno: (path, obj) for segno, (_rank, path, obj) in chosen.items()}

    def _blocks_dir(self, path: str, obj: RemoteObject) -> Path:
        """Where the verified blocks of one segment object are kept (by its SHA-256: a partial
        segment uploaded again is another object)."""
        return self.root / WAL_BLOCKS / f"{path[4:]}~{obj.sha256[:16]}"

    async def _segment_sums(self, bucket: ObjectStore, path: str, obj: RemoteObject) -> BlockSums:
        """The segment's block sums: kept here, or downloaded and verified; for a segment
        uploaded before block sums existed, the whole segment (verified) split into blocks."""
        assert self.index is not None
        directory = self._blocks_dir(path, obj)
        kept = directory / SUMS_FILE
        if kept.exists():
            return decode_sums(kept.read_bytes(), str(kept))
        sums_obj = self.index.objects.get(f"{SUMS_DIR}/{path[4:]}")
        if sums_obj is None:
            body = (await self._fetch({path: obj}, bucket))[path]
            sums = block_sums(body)
            for n in range(len(sums.digests)):
                start, end = sums.span(n)
                _write(directory / _block_name(n), body[start:end])
        else:
            raw = (await self._fetch({"sums": sums_obj}, bucket))["sums"]
            sums = decode_sums(raw, self.settings.object_url(f"{self.prefix}/{sums_obj.key}"))
            if sums.size != obj.size:
                raise CorruptData(
                    f"WAL block sums of {path} in {self.settings.url} are for {sums.size} "
                    f"bytes, the segment has {obj.size}; refused"
                )
        _write(kept, sums.encode())
        return sums

    async def _fetch_wal(self, bucket: ObjectStore, start: int, end: int) -> int:
        """Download, verified, the blocks of WAL [start, end) not kept here yet; bytes."""
        assert self.index is not None
        size = NodeState(**self.index.node_state).wal_segment_size
        segments = self._segments()
        before = self.downloaded_bytes
        slots = asyncio.Semaphore(4)

        async def block(path: str, obj: RemoteObject, sums: BlockSums, n: int) -> None:
            first, last = sums.span(n)
            key = f"{self.prefix}/{obj.key}"
            async with slots:
                data = await bucket.get_range(key, first, last)
            self.downloaded_bytes += len(data)
            sums.check(n, data, self.settings.object_url(key))
            _write(self._blocks_dir(path, obj) / _block_name(n), data)

        jobs = []
        for segno in range(start // size, (end - 1) // size + 1 if end > start else 0):
            if segno not in segments:
                break  # not uploaded: the read stops short there, as on the writer's disk
            path, obj = segments[segno]
            low = max(start - segno * size, 0)
            high = min(end - segno * size, size, obj.size)
            if low >= high:
                continue
            sums = await self._segment_sums(bucket, path, obj)
            directory = self._blocks_dir(path, obj)
            for n in range(low // sums.block, (high - 1) // sums.block + 1):
                if not (directory / _block_name(n)).exists():
                    jobs.append((path, obj, sums, n))
        await asyncio.gather(*(block(*job) for job in jobs))
        return self.downloaded_bytes - before

    def wal_reader(self) -> ReadWal:
        """A `read_wal` over the WAL blocks downloaded here (archive_reader's semantics:
        reads stop short where a block is not here)."""
        assert self.index is not None
        size = NodeState(**self.index.node_state).wal_segment_size
        segments = self._segments()
        sums: dict[int, BlockSums] = {}

        def read_wal(start: int, end: int) -> bytes:
            out = bytearray()
            pos = start
            while pos < end:
                segno, offset = divmod(pos, size)
                if segno not in segments:
                    break
                directory = self._blocks_dir(*segments[segno])
                if segno not in sums:
                    try:
                        sums[segno] = decode_sums((directory / SUMS_FILE).read_bytes(), "")
                    except FileNotFoundError:
                        break
                n, within = divmod(offset, sums[segno].block)
                try:
                    data = (directory / _block_name(n)).read_bytes()
                except FileNotFoundError:
                    break
                piece = data[within : within + end - pos]
                if not piece:
                    break
                out += piece
                pos += len(piece)
            return bytes(out)

        return read_wal

    def prepare(self, lsn: int, *, exact: bool = False, timeline: str | None = None) -> int:
        """Download what an extraction at `lsn` needs; the bytes downloaded now.

        `exact`: `lsn` is a record end already (a snapshot's, a commit's): only the layers a
        read there needs. Otherwise also the WAL from the LSN index's boundary below `lsn`
        through `lsn` (only those blocks of its segment) that snapping it to a record end
        reads, and the layers a read anywhere in that span needs. `timeline`: a snapshot's,
        when not the node's current one."""
        with self._lock:
            return self._retrying(lambda: self._download(lsn, exact, timeline), read_first=False)

    def _download(self, lsn: int, exact: bool, timeline: str | None) -> int:
        """prepare's downloads, from the index read last (the lock held)."""
        assert self.index is not None
        since = lsn if exact else self.wal_start(lsn)
        wanted = self.needed_layers(lsn, since, timeline)
        missing = {p: o for p, o in wanted.items() if not self._have(p, o)}

        async def download() -> int:
            async with open_bucket(self.settings) as bucket:
                bodies = await self._fetch(missing, bucket) if missing else {}
                for path, data in bodies.items():
                    _write(self.root / path, data)
                wal = await self._fetch_wal(bucket, since, lsn)
            return sum(len(b) for b in bodies.values()) + wal

        got = asyncio.run(download())
        if missing:
            index = self.index
            for timeline_id, body in index.timelines.items():
                self._write_manifest(index, timeline_id, body, self._local_layers(timeline_id))
        return got

    def _have(self, path: str, obj: RemoteObject) -> bool:
        """Downloaded already."""
        try:
            return (self.root / path).stat().st_size == obj.size
        except FileNotFoundError:
            return False


def _block_name(n: int) -> str:
    return f"{n:05d}"
