"""Delta layers: every version of the keys of a key range over an LSN range [start, end).

An L0 delta layer is a flushed in-memory layer and spans the whole keyspace; compaction merges
L0 layers into L1 layers that split the keyspace into ranges of about the target size.
"""

from __future__ import annotations

from pathlib import Path

from pageserver.storage.keys import Key, KeyRange
from pageserver.storage.layers.blocks import (
    KIND_DELTA,
    BlockCache,
    LayerFileWriter,
    MergeSource,
    PackSource,
    StreamSource,
    VersionList,
)
from pageserver.storage.layers.names import LayerName
from pageserver.storage.layers.persistent import PersistentLayer
from pageserver.storage.settings import StoreSettings


class DeltaLayer(PersistentLayer):
    expected_kind = KIND_DELTA


class DeltaLayerWriter:
    """Builds one delta layer from (key, LSN, encoded value) in (key, LSN) order."""

    def __init__(
        self,
        directory: Path,
        lsn_start: int,
        lsn_end: int,
        settings: StoreSettings,
        *,
        level0: bool = False,
    ) -> None:
        """level0: an L0 layer, written in format version 1 (the C L0 merge reads it; see
        blocks.py), the others in the narrow version 2 where their entries fit."""
        self._dir = directory
        self._name: LayerName | None = None
        self._lsn_start = lsn_start
        self._lsn_end = lsn_end
        self._writer = LayerFileWriter(
            directory,
            KIND_DELTA,
            lsn_start,
            lsn_end,
            block_size=settings.block_size,
            zstd_level=settings.zstd_level,
            narrow=not level0,
        )

    def add(self, key: Key, lsn: int, encoded: bytes) -> None:
        self._writer.add(key, lsn, encoded)

    def add_key(self, key: Key, versions: VersionList) -> None:
        """Every version of one key, in LSN order (cheaper than `add` per version)."""
        self._writer.add_key(key, versions)

    def add_packed(self, source: PackSource) -> None:
        """Every version of an in-memory layer's arena, into this empty writer."""
        self._writer.add_packed(source)

    def add_packed_stream(self, source: StreamSource) -> None:
        """add_packed, packed in steps that compress as the next are packed."""
        self._writer.add_packed_stream(source)

    def add_merged(self, merge: MergeSource, target: int, paths: list[Path]) -> int:
        """Keys of the C L0 merge, until `target` bytes (LayerFileWriter.add_merged)."""
        return self._writer.add_merged(merge, target, paths)

    @property
    def uncompressed_bytes(self) -> int:
        return self._writer.uncompressed_bytes

    @property
    def first_key(self) -> Key | None:
        return self._writer.first_key

    @property
    def last_key(self) -> Key | None:
        return self._writer.last_key

    def finish(self, key_range: KeyRange, cache: BlockCache) -> DeltaLayer:
        self.seal(key_range)
        return self.publish(cache)

    def seal(self, key_range: KeyRange) -> None:
        """Complete the file: not yet durable nor visible (`publish`, which may run on
        another thread while the next layer is written)."""
        self._name = LayerName.delta(key_range, self._lsn_start, self._lsn_end)
        self._writer.seal(key_range)

    def publish(self, cache: BlockCache) -> DeltaLayer:
        """fsync the sealed file and give it its name; the layer, opened."""
        name = self._name
        assert name is not None, "a layer is sealed before it is published"
        self._writer.publish(name.file_name)
        return DeltaLayer(self._dir, name, cache)

    def abort(self) -> None:
        self._writer.abort()
