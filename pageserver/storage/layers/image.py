"""Image layers: every key of a key range, as a whole value, at one LSN.

A key of the range that is absent from the layer does not exist at that LSN: readers stop at
an image layer covering their key whether or not it holds the key.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from pageserver.storage.keys import FULL_KEYSPACE, U32_MAX, Key, KeyRange, describe
from pageserver.storage.layers import native as _native
from pageserver.storage.layers.blocks import (
    KIND_IMAGE,
    BlockCache,
    Buffer,
    LayerCorrupt,
    LayerFileWriter,
)
from pageserver.storage.layers.names import LayerName
from pageserver.storage.layers.persistent import PersistentLayer
from pageserver.storage.settings import StoreSettings
from pageserver.storage.values import TAG_IMAGE, Image, encode_value
from pg15.constants import BLCKSZ
from proto.errors import InvalidArgument

_ZERO = bytes(BLCKSZ)


def nonzero_pages_python(data: Buffer) -> list[int]:
    """The offsets of `data`'s BLCKSZ pages that are not all zero: the reference of
    `_blockpack.nonzero_pages` (which takes any buffer without a copy)."""
    raw = data if isinstance(data, bytes) else bytes(data)
    return [o for o in range(0, len(raw), BLCKSZ) if not raw.startswith(_ZERO, o)]


def nonzero_pages(data: Buffer) -> list[int]:
    if _native.blockpack is not None:
        found: list[int] = _native.blockpack.nonzero_pages(data, BLCKSZ)
        return found
    return nonzero_pages_python(data)


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

    def scan(self, key_range: KeyRange) -> Iterator[tuple[Key, bytes]]:
        """(key, image) of every key of key_range the layer holds, in key order: blocks are
        read in file order once each, bypassing the cache (a bulk read such as a
        basebackup must not evict the blocks GetPage readers use)."""
        for key, tag, data in self.file.iter_newest(key_range):
            if tag != TAG_IMAGE:
                raise LayerCorrupt(
                    self.path, f"image layer holds a non-image value for {describe(key)}"
                )
            yield key, data


def _runs_by_size(values: list[bytes | None]) -> Iterator[tuple[int, int, bool | None]]:
    """(start, end, pages) of the runs of `values` that are all pages (BLCKSZ bytes) or all
    something else (a relation's size, a directory...), the Nones inside the run they lie in
    (pages None: a run of Nones only)."""
    start: int = 0
    pages: bool | None = None
    for i, value in enumerate(values):
        if value is None:
            continue
        page = len(value) == BLCKSZ
        if pages is None:
            pages = page
        elif page != pages:
            yield start, i, pages
            start, pages = i, page
    yield start, len(values), pages


class ImageLayerWriter:
    """Builds one image layer; keys must be added in order and belong to `key_range`.

    A run of values that are not pages (a relation's size after its pages, a directory)
    goes into a value block of its own, after the first block: a read of a relation's size
    decompressed the block of its last pages (64 KiB with 8-page blocks), and a delta push
    or a checkout reads the size of every relation (helper-138: a quarter of an incremental
    push's tar thread, ~730 forks). The first block stays as it fills (the dictionary)."""

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
            block_size=settings.image_blocks,
            zstd_level=settings.zstd_level,
            dictionary=settings.image_blocks < settings.block_size,
        )
        self._last: Key | None = None
        self._pages: bool | None = None
        """Whether the values added last were pages (None: none yet)."""

    def _begin_run(self, pages: bool | None) -> None:
        """A value block of its own for a run of pages or of other values (see the class);
        None: nothing is added."""
        if pages is None:
            return
        if self._pages is not None and pages != self._pages:
            self._writer.cut_block()
        self._pages = pages

    def add(self, key: Key, data: bytes) -> None:
        if key not in self.name.key_range or (self._last is not None and key <= self._last):
            self._writer.abort()
            raise InvalidArgument(
                f"image layer keys must be unique, sorted and inside {self.name.key_range}"
            )
        self._last = key
        self._begin_run(len(data) == BLCKSZ)
        self._writer.add(key, self.name.lsn_start, encode_value(Image(data)))

    def add_values(self, keys: list[Key], values: list[bytes | None]) -> None:
        """`add` of each key whose value is not None, in one call (keys ascending):
        `LayerFileWriter.add_values`, the loop in C."""
        if not keys:
            return
        r = self.name.key_range
        if (
            keys[0] not in r
            or keys[-1] not in r
            or (self._last is not None and keys[0] <= self._last)
        ):
            self._writer.abort()
            raise InvalidArgument(
                f"image layer keys must be unique, sorted and inside {self.name.key_range}"
            )
        try:
            for start, end, pages in _runs_by_size(values):
                self._begin_run(pages)
                last = self._writer.add_values(
                    keys[start:end], values[start:end], self.name.lsn_start, TAG_IMAGE
                )
                if last is not None:
                    self._last = last
        except InvalidArgument:
            self._writer.abort()
            raise

    def add_pages(self, prefix: bytes, first: int, data: Buffer, offsets: list[int]) -> None:
        """Images of `data`'s pages at `offsets` (ImageRunWriter.add_pages), as `add` of each
        would write them."""
        lo = Key(prefix + (first + offsets[0] // BLCKSZ).to_bytes(4))
        hi = Key(prefix + (first + offsets[-1] // BLCKSZ).to_bytes(4))
        if (
            lo not in self.name.key_range
            or hi not in self.name.key_range
            or (self._last is not None and lo <= self._last)
        ):
            self._writer.abort()
            raise InvalidArgument(
                f"image layer keys must be unique, sorted and inside {self.name.key_range}"
            )
        self._begin_run(True)
        self._writer.add_images(prefix, first, data, offsets, self.name.lsn_start, BLCKSZ)
        self._last = hi

    def finish(self, cache: BlockCache, end: Key | None = None) -> ImageLayer:
        """Publish the layer; `end` narrows its key range to [start, end) (a writer that
        learns where a layer stops only when the next key arrives, as ImageRunWriter)."""
        self.seal(end)
        self.publish()
        return self.opened(cache)

    def seal(self, end: Key | None = None) -> None:
        """Complete the file (see `finish` for `end`); `publish` makes it durable and visible."""
        if end is not None:
            self.name = LayerName.image(
                KeyRange(self.name.key_range.start, end), self.name.lsn_start
            )
        self._writer.seal(self.name.key_range)

    def publish(self) -> None:
        self._writer.publish(self.name.file_name)

    @property
    def path(self) -> Path:
        """Where the layer is once published."""
        return self._dir / self.name.file_name

    def opened(self, cache: BlockCache) -> ImageLayer:
        """The published layer."""
        return ImageLayer(self._dir, self.name, cache)

    def abort(self) -> None:
        self._writer.abort()


class ImageRunWriter:
    """Keys added in ascending order become a run of adjacent image layers at one LSN that
    together cover the whole keyspace [KEY_MIN, KEY_MAX): the complete state at that LSN (a key
    absent from the run does not exist). A layer is cut once it holds about
    `image_layer_target_size` bytes, so memory is one layer's index and one block, whatever
    the number of keys (an import of any size).

    A cut layer is made durable (fsync, rename, directory fsync) on a thread of its own while
    the next one is written: the disk's write-back overlaps the compression instead of
    following it (an import spent a third of its time in fsync). At most PUBLISHING layers
    wait for it; `finish` returns once every layer is published."""

    PUBLISHING = 2

    def __init__(
        self, directory: Path, lsn: int, settings: StoreSettings, cache: BlockCache,
        key_range: KeyRange = FULL_KEYSPACE,
    ) -> None:  # fmt: skip
        """`key_range`: the run covers that part of the keyspace only (its keys must be in
        it); runs over adjacent ranges at one LSN together are one run's layers (an import
        written by several threads, pageserver/ingest/import_datadir.py)."""
        self._dir, self._lsn, self._settings, self._cache = directory, lsn, settings, cache
        self._writer: ImageLayerWriter | None = None
        self._range = key_range
        self._start = key_range.start
        self._bytes = 0
        self._last: Key | None = None
        self._sealed: list[tuple[ImageLayerWriter, Future[None]]] = []
        self._publisher: ThreadPoolExecutor | None = None
        self.layers: list[ImageLayer] = []

    def add(self, key: Key, data: bytes) -> None:
        if self._last is not None and key <= self._last:
            self.abort()
            raise InvalidArgument(f"image run keys must be unique and sorted: {describe(key)}")
        if not self._range.start <= key < self._range.end:
            self.abort()
            raise InvalidArgument(f"key {describe(key)} is outside the image run's key range")
        self._last = key
        self._writer_at(key).add(key, data)
        self._bytes += len(data)

    def _writer_at(self, key: Key) -> ImageLayerWriter:
        """The layer the image at `key` goes to: the open one, cut at `key` once it holds
        the target size, then a new one from `key`."""
        writer = self._writer
        if writer is not None and self._bytes >= self._settings.image_layer_target_size:
            self._cut(writer, key)
            self._start, writer = key, None
        if writer is None:
            writer = self._writer = ImageLayerWriter(
                self._dir, KeyRange(self._start, self._range.end), self._lsn, self._settings
            )
            self._bytes = 0
        return writer

    def add_pages(self, key: Key, data: Buffer) -> None:
        """Images of the not-all-zero pages of `data` (whole BLCKSZ pages of one relation
        file), the first at `key` (a relation block key), each next one at the next block:
        what `add` of each page would write, with one Python call per chunk instead of
        several per page (they were most of an import's CPU). All-zero pages are skipped,
        as import_datadir skips them (they read as zeros below the relation size). `data`
        may be a view of a decompressed frame: its pages are copied once, into the blocks."""
        if len(data) % BLCKSZ:
            raise InvalidArgument(f"{len(data)} bytes are not whole pages")
        prefix, first = key[:-4], int.from_bytes(key[-4:])
        offsets = nonzero_pages(data)
        if not offsets:
            return
        last = first + offsets[-1] // BLCKSZ
        if last >= U32_MAX:  # the size marker (keys.rel_size_key) is no block
            raise InvalidArgument(f"block {last} of {describe(key)} is past the last block")
        lo, hi = (
            Key(prefix + (first + offsets[0] // BLCKSZ).to_bytes(4)),
            Key(prefix + last.to_bytes(4)),
        )
        if self._last is not None and lo <= self._last:
            self.abort()
            raise InvalidArgument(f"image run keys must be unique and sorted: {describe(lo)}")
        if not (self._range.start <= lo and hi < self._range.end):
            self.abort()
            raise InvalidArgument(f"key {describe(hi)} is outside the image run's key range")
        target, i = self._settings.image_layer_target_size, 0
        while i < len(offsets):
            writer = self._writer_at(Key(prefix + (first + offsets[i] // BLCKSZ).to_bytes(4)))
            take = offsets[i : i + max(1, -(-(target - self._bytes) // BLCKSZ))]
            writer.add_pages(prefix, first, data, take)
            self._bytes += len(take) * BLCKSZ
            self._last = Key(prefix + (first + take[-1] // BLCKSZ).to_bytes(4))
            i += len(take)

    @property
    def layers_cut(self) -> int:
        """Layers completed so far (published or being published)."""
        return len(self.layers) + len(self._sealed)

    def _cut(self, writer: ImageLayerWriter, end: Key | None) -> None:
        """Seal `writer`'s layer here and publish it in the background."""
        writer.seal(end)
        if self._publisher is None:
            self._publisher = ThreadPoolExecutor(1, thread_name_prefix="image-run-publish")
        self._sealed.append((writer, self._publisher.submit(writer.publish)))
        self._writer = None
        while len([f for _w, f in self._sealed if not f.done()]) > self.PUBLISHING:
            self._open_published(wait_for_one=True)

    def _open_published(self, *, wait_for_one: bool = False) -> None:
        """Open the layers published so far, in order (raising a failed publish's error)."""
        while self._sealed:
            writer, future = self._sealed[0]
            if not future.done() and not wait_for_one:
                return
            future.result()
            self._sealed.pop(0)
            self.layers.append(writer.opened(self._cache))
            wait_for_one = False

    def finish(self) -> list[ImageLayer]:
        """Publish the last layer (up to the run's end, KEY_MAX by default); every layer of
        the run, in key order."""
        writer = self._writer
        if writer is None:
            writer = ImageLayerWriter(
                self._dir, KeyRange(self._start, self._range.end), self._lsn, self._settings
            )
        try:
            self._cut(writer, None)
            while self._sealed:
                self._open_published(wait_for_one=True)
        finally:
            self._stop_publisher()
        return self.layers

    def _stop_publisher(self) -> None:
        if self._publisher is not None:
            self._publisher.shutdown(wait=True)
            self._publisher = None

    def abort(self) -> None:
        """Remove what was written (the finished layers are not in any layer map yet)."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        self._stop_publisher()  # every publish has ended (a failed one removed its file)
        for writer, future in self._sealed:
            if future.exception() is None:
                writer.path.unlink(missing_ok=True)
        self._sealed = []
        for layer in self.layers:
            layer.close()
            layer.path.unlink(missing_ok=True)
        self.layers = []
