"""Image layers: every key of a key range, as a whole value, at one LSN.

A key of the range that is absent from the layer does not exist at that LSN: readers stop at
an image layer covering their key whether or not it holds the key.
"""

from __future__ import annotations

from pathlib import Path

from pageserver.storage.keys import Key, KeyRange, describe
from pageserver.storage.layers.blocks import KIND_IMAGE, BlockCache, LayerCorrupt, LayerFileWriter
from pageserver.storage.layers.names import LayerName
from pageserver.storage.layers.persistent import PersistentLayer
from pageserver.storage.settings import StoreSettings
from pageserver.storage.values import Image, encode_value
from proto.errors import InvalidArgument


class ImageLayer(PersistentLayer):
    expected_kind = KIND_IMAGE

    @property
    def lsn(self) -> int:
        return self.name.lsn_start

    def get(self, key: Key) -> bytes | None:
        """The key's image, or None if the key does not exist at this layer's LSN."""
        versions, _ = self.collect(key, self.lsn, -1)
        if not versions:
            return None
        value = versions[0][1]
        if not isinstance(value, Image):
            raise LayerCorrupt(
                self.path, f"image layer holds a non-image value for {describe(key)}"
            )
        return value.data


class ImageLayerWriter:
    """Builds one image layer; keys must be added in order and belong to `key_range`."""

    def __init__(
        self, directory: Path, key_range: KeyRange, lsn: int, settings: StoreSettings
    ) -> None:
        self._dir = directory
        self.name = LayerName.image(key_range, lsn)
        self._writer = LayerFileWriter(
            directory,
            KIND_IMAGE,
            lsn,
            lsn + 1,
            block_size=settings.block_size,
            zstd_level=settings.zstd_level,
        )
        self._last: Key | None = None

    def add(self, key: Key, data: bytes) -> None:
        if key not in self.name.key_range or (self._last is not None and key <= self._last):
            self._writer.abort()
            raise InvalidArgument(
                f"image layer keys must be unique, sorted and inside {self.name.key_range}"
            )
        self._last = key
        self._writer.add(key, self.name.lsn_start, encode_value(Image(data)))

    def finish(self, cache: BlockCache) -> ImageLayer:
        self._writer.finish(self.name.key_range, self.name.file_name)
        return ImageLayer(self._dir, self.name, cache)

    def abort(self) -> None:
        self._writer.abort()
