"""Image layers' value blocks are cut at image_blocks (eight pages by default), delta layers'
at block_size: a scattered page read decompresses only its image block; a relation's size
is a block of its own."""

from __future__ import annotations

import random
from pathlib import Path

from pageserver.storage import keys as K
from pageserver.storage.layers.blocks import BlockCache
from pageserver.storage.layers.delta import DeltaLayerWriter
from pageserver.storage.layers.image import ImageLayer, ImageLayerWriter
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


def fork(rel: int, n: int) -> list[tuple[K.Key, bytes]]:
    """A relation's n pages and then its size, as image creation adds them (key order)."""
    rng = random.Random(rel)
    written = [
        (K.rel_block_key(1663, 5, rel, 0, b), rng.randbytes(64) * (BLCKSZ // 64)) for b in range(n)
    ]
    return [*written, (K.rel_size_key(1663, 5, rel, 0), n.to_bytes(4, "little"))]


def block_of(layer: ImageLayer, key: K.Key) -> int:
    f = layer.file
    (v,) = f.versions_of(f.lower_bound(key))
    return f.version_tuple(v)[2]


def test_a_relations_size_is_a_block_of_its_own_after_the_first(tmp_path: Path) -> None:
    """A relation's size (and any value that is not a page) goes into a value block of its
    own, so its read decompresses a few bytes, not the block of the relation's last pages;
    the first block fills as before (it is the others' dictionary). The same values read
    back whether added one by one or in runs, in C or in Python."""
    added = [*fork(16384, 3), *fork(16385, 10), *fork(16386, 2), *fork(16387, 9)]
    whole = K.KeyRange(added[0][0], K.rel_size_key(1663, 5, 16388, 0))
    for how in ("one by one", "in runs"):
        cache = BlockCache(1 << 20)  # one per layer: the two have the same name
        (tmp_path / how).mkdir()
        image = ImageLayerWriter(tmp_path / how, whole, 7, StoreSettings())
        if how == "one by one":
            for key, value in added:
                image.add(key, value)
        else:
            keys, values = zip(*added, strict=True)
            image.add_values(list(keys), [*values[:5], None, *values[6:]])
            image.add_values([], [])
        layer = image.finish(cache)
        if how == "in runs":  # a None is a key left out
            assert layer.get(added[5][0]) is None
            added_here = added[:5] + added[6:]
        else:
            added_here = added
        assert {key: layer.get(key) for key, _ in added_here} == dict(added_here)
        sizes = [key for key, value in added_here if len(value) != BLCKSZ]
        # the first block: 3 pages, the size, 4 pages (full at 8); then blocks of one kind
        assert block_of(layer, sizes[0]) == 0
        for size in sizes[1:]:
            b = block_of(layer, size)
            assert len(layer.file.read_block(b)) == 5  # the tag and the four bytes
