"""The local cache of a PITR area kept in a remote storage: layer files the bucket holds may be
evicted from the disk, and are fetched back, verified, when a read needs them.

`-c local_cache=SIZE` on the storage (RemoteSettings.local_cache) bounds the bytes of layer
files of the area's timelines kept on disk. After each upload round the uploader calls
`enforce()`: while the layers on disk exceed the bound, it evicts those the bucket's index
holds with the same size and SHA-256 (never one it does not hold yet), first the layers never
read back, oldest data (lowest end LSN) first, then those fetched back, least recently first.
An eviction writes the layer's marker, swaps the layer in its timeline for an evicted one
(pageserver/storage/layers/evicted.py; manifest unchanged) and removes the file, under the
timeline's compaction lock (compaction and GC replace layers under it: neither ever holds a
layer object that is no longer in the map). Without the option nothing is evicted.

`fetch()` is registered for the history's root, whatever the option, so layers evicted under
an earlier setting can still be read: it takes the layer's object from the bucket's index,
downloads it, refuses it unless its size and SHA-256 match (ChecksumMismatch, the object
named: no page is read from it), and writes it durably in place.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from durable_files import fsync_dir, write_file_durably
from pageserver.history.node_store import NodeStore
from pageserver.remote.index import INDEX_NAME, RemoteIndex, RemoteObject, decode_index, verified
from pageserver.remote.local_objects import HashCache
from pageserver.remote.objects import open_bucket
from pageserver.remote.settings import RemoteSettings
from pageserver.storage.layers.evicted import (
    EVICTED_SUFFIX,
    EvictedLayer,
    evicted_layer,
    register_fetcher,
    unregister_fetcher,
)
from pageserver.storage.layers.persistent import PersistentLayer
from pageserver.storage.timeline import Timeline
from proto.errors import NotFound

log = logging.getLogger(__name__)
T = TypeVar("T")


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to its end from any thread, even one running an event loop (a read may
    come from the pageserver's loop thread): then on a thread of its own."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


@dataclass(frozen=True, slots=True)
class CacheStatus:
    limit_bytes: int | None
    resident_bytes: int
    evicted_layers: int
    evictions_total: int
    fetches_total: int
    fetched_bytes_total: int


class LayerCache:
    """One area's cache; `index` gives the bucket's index as the uploader last wrote it."""

    def __init__(
        self, settings: RemoteSettings, prefix: str, store: Callable[[], NodeStore],
        index: Callable[[], RemoteIndex | None], hashes: HashCache,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.prefix = prefix
        self._store = store
        self._index = index
        self._hashes = hashes
        self.root: Path | None = None
        self.evictions_total = 0
        self.fetches_total = 0
        self.fetched_bytes_total = 0

    def register(self) -> None:
        self.root = self._store().history.root
        register_fetcher(self.root, self.fetch)

    def unregister(self) -> None:
        if self.root is not None:
            unregister_fetcher(self.root, self.fetch)

    # --- fetch (any reader thread) ---------------------------------------------------------

    def _object(self, timeline_id: str, name: str) -> RemoteObject:
        path = f"timelines/{timeline_id}/{name}"
        index = self._index()
        obj = None if index is None else index.objects.get(path)
        if obj is None:  # not read yet (just after a restart): the bucket's index
            key = f"{self.prefix}/{INDEX_NAME}"

            async def read() -> bytes | None:
                async with open_bucket(self.settings) as bucket:
                    return await bucket.get_if_exists(key)

            raw = run_blocking(read())
            if raw is not None:
                obj = decode_index(raw, self.settings.object_url(key)).objects.get(path)
        if obj is None:
            raise NotFound(
                f"layer {name} of timeline {timeline_id} was evicted, and the index of "
                f"{self.settings.url} does not name it"
            )
        return obj

    def fetch(self, timeline_id: str, name: str, size: int, target: Path) -> None:
        obj = self._object(timeline_id, name)
        key = f"{self.prefix}/{obj.key}"

        async def get() -> bytes:
            async with open_bucket(self.settings) as bucket:
                return await bucket.get(key)

        body = verified(run_blocking(get()), obj, self.settings.object_url(key))
        if len(body) != size:
            raise NotFound(f"layer {name}: the bucket holds {len(body)} bytes, not {size}")
        write_file_durably(target, body)
        self.fetches_total += 1
        self.fetched_bytes_total += len(body)
        log.info("fetched evicted layer %s/%s (%d bytes)", timeline_id, name, len(body))

    # --- eviction (the uploader's thread) --------------------------------------------------

    def _timelines(self) -> list[Timeline]:
        store = self._store()
        if store.state is None:
            return []
        history = store.history
        return [history.timelines.get(t) for t in history.with_ancestors([store.state.timeline_id])]

    def status(self) -> CacheStatus:
        resident = evicted = 0
        for timeline in self._timelines():
            for layer in timeline.layer_map().layers():
                if isinstance(layer, EvictedLayer) and not layer.resident:
                    evicted += 1
                else:
                    resident += layer.file_size
        return CacheStatus(
            self.settings.local_cache, resident, evicted, self.evictions_total,
            self.fetches_total, self.fetched_bytes_total,
        )  # fmt: skip

    def _uploaded(self, index: RemoteIndex, timeline: Timeline, layer: PersistentLayer) -> bool:
        obj = index.objects.get(f"timelines/{timeline.timeline_id}/{layer.name.file_name}")
        if obj is None or obj.size != layer.file_size:
            return False
        if isinstance(layer, EvictedLayer):
            return True  # it came from the bucket, verified
        try:
            size, sha = self._hashes.sha256(layer.path)
        except FileNotFoundError:
            return False
        return size == obj.size and sha == obj.sha256

    def fetch_all(self) -> int:
        """Fetch back every evicted layer of the area's timelines (the area is destroyed: no
        fetcher will be registered for them); the bytes fetched."""
        fetched = 0
        for timeline in self._timelines():
            for layer in timeline.layer_map().layers():
                if isinstance(layer, EvictedLayer) and not layer.resident:
                    _fetched = layer.file  # the property fetches it, verified
                    fetched += layer.file_size
                marker = layer.path.with_name(layer.path.name + EVICTED_SUFFIX)
                if layer.path.exists():
                    marker.unlink(missing_ok=True)
        return fetched

    def enforce(self, limit: int | None = None) -> int:
        """Evict uploaded layers until those on disk fit in `limit` (default: the storage's
        local_cache; None: keep everything); the bytes evicted."""
        limit = self.settings.local_cache if limit is None else limit
        index = self._index()
        if limit is None or index is None:
            return 0
        candidates: list[tuple[tuple[int, float, int], Timeline, PersistentLayer]] = []
        on_disk = 0
        for timeline in self._timelines():
            layers = timeline.layer_map().layers()
            names = {layer.name.file_name for layer in layers}
            for marker in timeline.directory.glob(f"*{EVICTED_SUFFIX}"):
                if marker.name.removesuffix(EVICTED_SUFFIX) not in names:
                    marker.unlink(missing_ok=True)  # its layer was compacted or GC'd away
            for layer in layers:
                if isinstance(layer, EvictedLayer) and not layer.resident:
                    continue
                on_disk += layer.file_size
                if self._uploaded(index, timeline, layer):
                    fetched = layer.fetched_at if isinstance(layer, EvictedLayer) else 0.0
                    order = (1 if fetched else 0, fetched, layer.name.lsn_end)
                    candidates.append((order, timeline, layer))
        freed = 0
        for _order, timeline, layer in sorted(candidates, key=lambda c: c[0]):
            if on_disk - freed <= limit:
                break
            if evict(timeline, layer):
                freed += layer.file_size
                self.evictions_total += 1
        return freed


def evict(timeline: Timeline, layer: PersistentLayer) -> bool:
    """Drop one layer's local copy (False: compaction or GC holds the timeline now, or the
    layer left the map meanwhile)."""
    if not timeline.compaction_lock.acquire(blocking=False):
        return False
    try:
        if all(x is not layer for x in timeline.layer_map().layers()):
            return False
        if isinstance(layer, EvictedLayer):
            return layer.evict()
        write_file_durably(layer.path.with_name(layer.path.name + EVICTED_SUFFIX), b"")
        fsync_dir(layer.path.parent)
        gone = evicted_layer(layer.path.parent, layer.name, timeline.cache, layer.file_size)
        timeline.replace_layers([gone], [layer])  # same manifest; the file is removed
        return True
    finally:
        timeline.compaction_lock.release()
