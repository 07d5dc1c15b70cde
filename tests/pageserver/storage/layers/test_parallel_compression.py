"""Layer blocks compressed on the shared zstd pool: the file is the one a single thread makes.

Resume and dedup compare layer files byte for byte, so the pool must change where zstd runs,
never what it writes: each stored frame is checked against a one-thread recompression of its
block, and files written with different batch sizes and queue depths are compared.
"""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import crc32c
import pytest
import zstandard

from pageserver.storage import keys as K
from pageserver.storage.layers import blocks
from pageserver.storage.layers.blocks import BlockCache, LayerFile
from pageserver.storage.layers.delta import DeltaLayerWriter
from pageserver.storage.layers.image import ImageLayerWriter
from pageserver.storage.settings import StoreSettings
from pageserver.storage.values import WalDelta, encode_value

SETTINGS = StoreSettings(block_size=4096, zstd_level=3)


def page(rng: random.Random) -> bytes:
    """Half random, half zeros: compressible as heap pages are, different per page."""
    return rng.randbytes(4096) + bytes(4096)


def write_image(directory: Path, n_pages: int, seed: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    writer = ImageLayerWriter(directory, K.FULL_KEYSPACE, 0x100, SETTINGS)
    for blk in range(n_pages):
        writer.add(K.rel_block_key(1663, 5, 16384, 0, blk), page(rng))
    writer.finish(BlockCache(0))
    return writer.path


def test_frames_are_what_one_thread_writes(tmp_path: Path) -> None:
    path = write_image(tmp_path / "a", 300, seed=1)
    layer = LayerFile(path, BlockCache(0))
    n_blocks = layer.header.n_blocks
    assert n_blocks > 4 * blocks.COMPRESS_BATCH  # several tasks, several in flight
    one_thread = zstandard.ZstdCompressor(level=SETTINGS.zstd_level)
    raw = path.read_bytes()
    offset = blocks.HEADER_SIZE
    for b in range(n_blocks):
        off, clen, ulen, _crc = blocks._BLOCK_ENTRY.unpack_from(
            raw, layer._blocks_at + b * blocks._BLOCK_ENTRY.size
        )
        assert off == offset  # in block order, back to back
        data = layer.read_block(b)
        assert len(data) == ulen
        assert raw[off : off + clen] == one_thread.compress(data)
        offset += clen
    layer.close()


@pytest.mark.parametrize(("batch", "in_flight"), [(1, 0), (3, 1), (64, 8)])
def test_file_does_not_depend_on_batching(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int, in_flight: int
) -> None:
    reference = write_image(tmp_path / "ref", 200, seed=2).read_bytes()
    monkeypatch.setattr(blocks, "COMPRESS_BATCH", batch)
    monkeypatch.setattr(blocks, "COMPRESS_IN_FLIGHT", in_flight)
    assert write_image(tmp_path / "other", 200, seed=2).read_bytes() == reference


def test_blocks_compress_on_the_pool_threads(tmp_path: Path) -> None:
    seen: set[str] = set()
    real = blocks.compress_blocks

    def spy(
        level: int, raws: list[bytes | memoryview], *dictionary: Any
    ) -> list[blocks.CompressedBlock]:
        seen.add(threading.current_thread().name)
        return real(level, raws, *dictionary)

    blocks.compress_blocks = spy  # type: ignore[assignment]
    try:
        write_image(tmp_path / "a", 100, seed=3)
    finally:
        blocks.compress_blocks = real  # type: ignore[assignment]
    assert seen and all(name.startswith("layer-zstd") for name in seen)


def test_aborted_writer_with_blocks_in_flight_leaves_nothing(tmp_path: Path) -> None:
    rng = random.Random(4)
    writer = DeltaLayerWriter(tmp_path, 100, 200, SETTINGS)
    for blk in range(200):
        key = K.rel_block_key(1663, 5, 16384, 0, blk)
        writer.add(key, 150, encode_value(WalDelta(page(rng), False)))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_batch_is_compressed_as_one_thread_compresses_each_block() -> None:
    """compress_blocks makes a task's frames in one call (one GIL release, not one a block):
    the frames are those `compress` makes of each block, for every kind of block a writer
    cuts (bytes, a bytearray, slices of a pack's memory), and an empty block among them
    (which the batch call refuses) too."""
    rng = random.Random(5)
    pack = bytearray(b"".join(page(rng) for _ in range(4)))
    view = memoryview(pack)
    raws: list[bytes | bytearray | memoryview] = [page(rng), bytearray(page(rng))]
    raws += [view[:5000], view[5000:20000], view[20000:]]
    one_thread = zstandard.ZstdCompressor(level=3)
    for batch in (raws, [*raws[:2], b"", raws[2]]):
        out = blocks.compress_blocks(3, batch)
        assert [comp for comp, _, _ in out] == [one_thread.compress(raw) for raw in batch]
        assert [n for _, n, _ in out] == [len(raw) for raw in batch]
        assert [crc for _, _, crc in out] == [crc32c.crc32c(comp) for comp, _, _ in out]
