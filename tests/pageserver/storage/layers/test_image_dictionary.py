"""Image layers in format versions 3/4: every value block after the first is compressed with
the first block's content as its zstd dictionary. The pages read back as written, from any
thread; each block is the frame the dictionary makes (the file does not depend on the thread
that compressed it); a damaged first block fails every read that needs it, naming the file."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import zstandard

from pageserver.storage import keys as K
from pageserver.storage.layers import blocks as blocks_module
from pageserver.storage.layers.blocks import (
    _BLOCK_ENTRY,
    FORMAT_NARROW_DICT,
    BlockCache,
    LayerCorrupt,
    LayerFile,
    raw_content_dictionary,
)
from pageserver.storage.layers.image import ImageLayer, ImageLayerWriter
from pageserver.storage.settings import StoreSettings
from pg15.constants import BLCKSZ

SETTINGS = StoreSettings()
RANGE = K.fork_blocks_range(1663, 5, 16384, 0)


def heap_like(n: int, seed: int) -> dict[K.Key, bytes]:
    """Pages alike but for a few bytes each (as a table's pages are): what a dictionary of
    the first pages compresses better than each small block alone."""
    rng = random.Random(seed)
    template = bytearray(rng.randbytes(BLCKSZ // 4) * 4)
    out = {}
    for b in range(n):
        page = bytearray(template)
        for _ in range(64):
            page[rng.randrange(BLCKSZ)] = rng.randrange(256)
        out[K.rel_block_key(1663, 5, 16384, 0, b)] = bytes(page)
    return out


def written(
    path: Path, pages: dict[K.Key, bytes], settings: StoreSettings = SETTINGS
) -> ImageLayer:
    path.mkdir()
    writer = ImageLayerWriter(path, RANGE, 7, settings)
    for key, page in pages.items():
        writer.add(key, page)
    return writer.finish(BlockCache(1 << 20))


def frames(f: LayerFile) -> list[tuple[bytes, int]]:
    out = []
    for b in range(f.header.n_blocks):
        off, clen, ulen, _ = _BLOCK_ENTRY.unpack_from(f._map, f._blocks_at + b * _BLOCK_ENTRY.size)
        out.append((bytes(f._map[off : off + clen]), ulen))
    return out


def test_blocks_after_the_first_are_compressed_with_its_content(tmp_path: Path) -> None:
    pages = heap_like(41, 1)
    layer = written(tmp_path / "dict", pages)
    f = layer.file
    assert f.header.version == FORMAT_NARROW_DICT and f.dictionary
    assert f.header.n_blocks == 6
    assert {key: layer.get(key) for key in pages} == pages
    assert [(k, p) for k, _, p in f.iter_newest(K.FULL_KEYSPACE)] == list(pages.items())
    first = f.read_block(0)
    level = SETTINGS.zstd_level
    plain = zstandard.ZstdCompressor(level=level)
    dictionary = raw_content_dictionary(first)
    dictionary.precompute_compress(level=level)  # as the writer does
    with_first = zstandard.ZstdCompressor(level=level, dict_data=dictionary)
    blocks = [f.read_block(b) for b in range(f.header.n_blocks)]
    compressed = [data for data, _ in frames(f)]
    assert compressed[0] == plain.compress(blocks[0])
    assert compressed[1:] == [with_first.compress(raw) for raw in blocks[1:]]
    # not decodable alone
    with pytest.raises(zstandard.ZstdError):
        zstandard.ZstdDecompressor().decompress(compressed[5], max_output_size=1 << 20)
    # smaller than the same blocks without it
    no_dict = written(tmp_path / "plain", pages, StoreSettings(block_size=SETTINGS.image_blocks))
    assert not no_dict.file.dictionary and no_dict.file.header.n_blocks == 6
    assert f.header.file_size < 0.8 * no_dict.file.header.file_size


def test_threads_read_the_same_pages(tmp_path: Path) -> None:
    pages = heap_like(80, 2)
    layer = written(tmp_path / "d", pages)
    f = layer.file
    want = [f._block(b, use_cache=False) for b in range(f.header.n_blocks)]
    again = LayerFile(f.path, BlockCache(0))  # its dictionary not read yet: threads race to it
    barrier = threading.Barrier(4)

    def read(b: int) -> bytes:
        if b < 4:
            barrier.wait()
        return again._block(b, use_cache=False)

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(read, range(f.header.n_blocks))) == want


def test_a_thread_keeps_few_decompressors(tmp_path: Path) -> None:
    layers = [written(tmp_path / str(i), heap_like(17, i)) for i in range(12)]
    for layer in layers:
        layer.file.read_block(1)
    assert len(blocks_module._tls.zstd_dict) == blocks_module.DICT_DECOMPRESSORS


def test_a_damaged_first_block_fails_the_reads_that_need_it(tmp_path: Path) -> None:
    pages = heap_like(20, 3)
    layer = written(tmp_path / "d", pages)
    path = layer.path
    off, clen, _, _ = _BLOCK_ENTRY.unpack_from(layer.file._map, layer.file._blocks_at)
    layer.close()
    data = bytearray(path.read_bytes())
    data[off + clen // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    damaged = LayerFile(path, BlockCache(1 << 20))
    with pytest.raises(LayerCorrupt, match="checksum mismatch in value block 0") as info:
        damaged.read_block(2)
    assert str(path) in str(info.value)


def test_level_zero_writes_dictionary_layers(tmp_path: Path) -> None:
    """zstd's level 0 (its default) is a valid zstd_level; precompute_compress refuses 0."""
    pages = heap_like(20, 4)
    layer = written(tmp_path / "d", pages, StoreSettings(zstd_level=0))
    assert layer.file.dictionary
    assert {key: layer.get(key) for key in pages} == pages


def test_a_wide_index_with_a_dictionary_is_version_3(tmp_path: Path) -> None:
    """An image layer whose version entries do not fit the narrow index (an LSN above
    2^64 - 2^32) keeps its dictionary in version 3."""
    pages = heap_like(20, 5)
    (tmp_path / "d").mkdir()
    lsn = (1 << 64) - (1 << 31)
    writer = ImageLayerWriter(tmp_path / "d", RANGE, lsn, SETTINGS)
    for key, page in pages.items():
        writer.add(key, page)
    layer = writer.finish(BlockCache(1 << 20))
    assert layer.file.header.version == blocks_module.FORMAT_DICT
    assert layer.file.dictionary and not layer.file.narrow
    assert {key: layer.get(key) for key in pages} == pages
