"""Image layers' value blocks are cut at image_blocks (eight pages by default), delta layers'
at block_size: a scattered page read decompresses only its image block."""

from __future__ import annotations

import random
from pathlib import Path

from pageserver.storage import keys as K
from pageserver.storage.layers.blocks import BlockCache
from pageserver.storage.layers.delta import DeltaLayerWriter
from pageserver.storage.layers.image import ImageLayerWriter
from pageserver.storage.settings import StoreSettings
from pageserver.storage.values import Image, encode_value
from pg15.constants import BLCKSZ

RANGE = K.fork_blocks_range(1663, 5, 16384, 0)


def pages(n: int) -> dict[K.Key, bytes]:
    rng = random.Random(n)
    return {
        K.rel_block_key(1663, 5, 16384, 0, b): rng.randbytes(64) * (BLCKSZ // 64) for b in range(n)
    }


def test_image_blocks_hold_eight_pages_and_delta_blocks_keep_block_size(tmp_path: Path) -> None:
    settings = StoreSettings()
    assert settings.image_blocks == 8 * (BLCKSZ + 1) < settings.block_size
    written = pages(40)
    cache = BlockCache(1 << 20)
    (tmp_path / "image").mkdir()
    image = ImageLayerWriter(tmp_path / "image", RANGE, 7, settings)
    for key, page in written.items():
        image.add(key, page)
    layer = image.finish(cache)
    raw = [len(layer.file.read_block(b)) for b in range(layer.file.header.n_blocks)]
    assert raw == [8 * (BLCKSZ + 1)] * 5
    assert {key: layer.get(key) for key in written} == written
    (tmp_path / "delta").mkdir()
    delta = DeltaLayerWriter(tmp_path / "delta", 7, 9, settings)
    for key, page in written.items():
        delta.add(key, 8, encode_value(Image(page)))
    delta_file = delta.finish(RANGE, cache).file
    assert delta_file.header.n_blocks == 3  # 15 pages in each 128 KiB block


def test_a_smaller_block_size_bounds_image_blocks_too() -> None:
    assert StoreSettings(block_size=2 * (BLCKSZ + 1)).image_blocks == 2 * (BLCKSZ + 1)
    assert StoreSettings(image_block_size=BLCKSZ + 1).image_blocks == BLCKSZ + 1
