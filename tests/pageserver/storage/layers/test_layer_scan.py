"""LayerFile.iter_newest (the bulk scan image layers use for basebackups) against the general
iter_key_groups: the newest version of each key, its tag and payload, over any key range."""

from __future__ import annotations

import random
from pathlib import Path

from pageserver.storage import keys as K
from pageserver.storage.layers.blocks import BlockCache
from pageserver.storage.layers.image import ImageLayerWriter
from tests.pageserver.storage.layers.test_layers import (
    SETTINGS,
    rel_key,
    sample_versions,
    write_delta,
)


def test_iter_newest_is_the_last_version_of_each_key(tmp_path: Path) -> None:
    cache = BlockCache(1 << 20)
    layer = write_delta(tmp_path, sample_versions(seed=7, n_keys=60), cache)
    rng = random.Random(3)
    ranges = [K.FULL_KEYSPACE, K.KeyRange(rel_key(0), rel_key(60))]
    for _ in range(20):
        a, b = sorted(rng.sample(range(70), 2))
        ranges.append(K.KeyRange(rel_key(a), rel_key(b)))
    for key_range in ranges:
        want = [
            (key, group[-1][1][0], group[-1][1][1:])
            for key, group in layer.file.iter_key_groups(key_range)
        ]
        assert list(layer.file.iter_newest(key_range)) == want
        assert want or key_range.start >= rel_key(60)


def test_image_scan_yields_the_pages(tmp_path: Path) -> None:
    rng = random.Random(5)
    pages = {blk: rng.randbytes(rng.randint(0, 700)) for blk in range(0, 300, 3)}
    writer = ImageLayerWriter(tmp_path, K.FULL_KEYSPACE, 500, SETTINGS)
    for blk, page in pages.items():
        writer.add(rel_key(blk), page)
    layer = writer.finish(BlockCache(1 << 20))
    got = list(layer.scan(K.KeyRange(rel_key(10), rel_key(200))))
    assert got == [(rel_key(b), p) for b, p in pages.items() if 10 <= b < 200]
