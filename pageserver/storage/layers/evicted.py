"""Layer files whose local copy was evicted because a remote storage holds them (issue 13:
"local copies may be evicted once uploaded; reads fetch evicted layers on demand").

An evicted layer (a marker file, EVICTED_SUFFIX, says so on disk) stays in its timeline's
manifest and layer map under its name and size: the map, GC and the uploader plan with it as
with any layer. Only its `file` is missing: the first read of it (GetPage, a basebackup,
compaction: every read goes through `PersistentLayer.file`) downloads it through the fetcher
registered for its history (pageserver/remote/eviction.py), which writes it in place only
once its SHA-256 matches the remote index; the layer then stays resident until it is evicted
again. A history with no fetcher registered (its remote storage detached) has no way to read
it: the read is refused naming the layer, never answered without it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from pageserver.storage.layers.blocks import BlockCache, LayerCorrupt, LayerFile
from pageserver.storage.layers.delta import DeltaLayer
from pageserver.storage.layers.image import ImageLayer
from pageserver.storage.layers.names import LayerName
from pageserver.storage.layers.persistent import PersistentLayer
from proto.errors import NeonError

EVICTED_SUFFIX = ".evicted"
"""``<layer file>.evicted`` beside where the file was: written before the file is removed, so a
timeline opened later (a restart) knows the missing file is kept remotely and not lost."""

Fetcher = Callable[[str, str, int, Path], None]
"""(timeline id, layer file name, size, where to write it): downloads, verifies and writes
the layer durably at that path, or raises."""

_fetchers: dict[Path, list[Fetcher]] = {}
"""Per history root, one fetcher per PITR area kept remotely over it (a node may have two)."""
_registry_lock = threading.Lock()


def register_fetcher(history_root: Path, fetcher: Fetcher) -> None:
    with _registry_lock:
        _fetchers.setdefault(history_root.resolve(), []).append(fetcher)


def unregister_fetcher(history_root: Path, fetcher: Fetcher) -> None:
    with _registry_lock:
        found = _fetchers.get(history_root.resolve(), [])
        if fetcher in found:
            found.remove(fetcher)


def fetcher_for(directory: Path) -> Fetcher | None:
    """A fetcher trying, in turn, each one registered for the history a timeline directory
    (``<root>/timelines/<id>``) is in; None when there is none."""
    with _registry_lock:
        found = list(_fetchers.get(directory.resolve().parent.parent, []))
    if not found:
        return None

    def fetch(timeline_id: str, name: str, size: int, target: Path) -> None:
        for fetcher in found[:-1]:
            try:
                return fetcher(timeline_id, name, size, target)
            except NeonError:
                continue  # not in that area's bucket (or unreachable): the next one
        return found[-1](timeline_id, name, size, target)

    return fetch


class EvictedLayer(PersistentLayer):
    """A layer whose file is fetched on first use (instances are DeltaLayer or ImageLayer
    too: the layer map sorts them by type)."""

    def __init__(self, directory: Path, name: LayerName, cache: BlockCache, size: int) -> None:
        # PersistentLayer.__init__ opens the file: not called; `file` is the property below.
        self.name = name
        self.path = directory / name.file_name
        self._directory = directory
        self._cache = cache
        self._size = size
        self._file: LayerFile | None = None
        self._fetch_lock = threading.Lock()
        self.fetched_at = 0.0
        """When the file last came back (0: not since it was evicted)."""

    def release_index(self) -> None:
        """Only a fetched file has mapped pages (`file` would fetch it)."""
        if self._file is not None:
            self._file.release_index()

    @property
    def file(self) -> LayerFile:  # type: ignore[override]
        f = self._file
        if f is not None:
            return f
        with self._fetch_lock:
            if self._file is None:
                if not self.path.exists():
                    fetch = fetcher_for(self._directory)
                    if fetch is None:
                        raise LayerCorrupt(
                            self.path, "evicted, and no remote storage is attached to fetch it"
                        )
                    fetch(self._directory.name, self.name.file_name, self._size, self.path)
                opened = LayerFile(self.path, self._cache)
                h = opened.header
                if (
                    h.kind != self.expected_kind
                    or h.key_range != self.name.key_range
                    or (h.lsn_start, h.lsn_end) != (self.name.lsn_start, self.name.lsn_end)
                ):
                    opened.close()
                    raise LayerCorrupt(self.path, "header does not match the file name")
                self._file = opened
                self.fetched_at = time.time()
            return self._file

    @property
    def file_size(self) -> int:
        return self._size

    @property
    def resident(self) -> bool:
        return self._file is not None

    def evict(self) -> bool:
        """Drop the local copy again. The file is not closed here: a reader may be in it; its
        mapping outlives the unlink and goes with the last reference, as a replaced layer's."""
        with self._fetch_lock:
            if self._file is None:
                return False
            self._file = None
            self.path.unlink(missing_ok=True)
            return True

    def close(self) -> None:
        with self._fetch_lock:
            if self._file is not None:
                self._file.close()
                self._file = None


class EvictedDeltaLayer(EvictedLayer, DeltaLayer):
    pass


class EvictedImageLayer(EvictedLayer, ImageLayer):
    pass


def evicted_layer(
    directory: Path, name: LayerName, cache: BlockCache, size: int
) -> PersistentLayer:
    """The layer `name`, read from its remote copy when first used."""
    cls = EvictedImageLayer if name.is_image else EvictedDeltaLayer
    return cls(directory, name, cache, size)
