"""A layer file is memory-mapped, and a read copies what it needs out of the map: pages of the
map the process touched would otherwise stay counted in the pageserver's RSS while the file is
open (hundreds of MiB after a 1 GiB load: bench.checkout's pageserver went past 512 MiB).
Reads of blocks, whole scans and the index checks at open unmap what they touched; the bytes
read stay right (the pages come back from the page cache when read again)."""

from __future__ import annotations

import random
from pathlib import Path

from pageserver.storage import keys as K
from pageserver.storage.layers.blocks import BlockCache
from pageserver.storage.layers.image import ImageLayer, ImageLayerWriter
from pageserver.storage.settings import StoreSettings
from tests.pageserver.storage.layers.test_layers import rel_key

PAGES = 600  # of 8 KiB, random: blocks compress to about their size (~5 MiB of file)
MAPPED_KIB = 2 * 64 + 8  # a touched page maps up to 64 KiB around it (fault_around_bytes)


def mapped_kib(path: Path) -> int:
    """Rss of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's first line
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


def image_layer(tmp_path: Path) -> tuple[ImageLayer, dict[int, bytes]]:
    rng = random.Random(11)
    pages = {blk: rng.randbytes(8192) for blk in range(PAGES)}
    settings = StoreSettings(block_size=64 * 1024)
    writer = ImageLayerWriter(tmp_path, K.FULL_KEYSPACE, 500, settings)
    for blk, page in pages.items():
        writer.add(rel_key(blk), page)
    return writer.finish(BlockCache(0)), pages


def test_reads_leave_no_mapped_pages_behind(tmp_path: Path) -> None:
    layer, pages = image_layer(tmp_path)
    size_kib = layer.file_size // 1024
    assert size_kib > 4000
    assert mapped_kib(layer.path) <= MAPPED_KIB  # the open's index check unmapped what it read
    got = list(layer.scan(K.FULL_KEYSPACE))  # every block read
    assert got == [(rel_key(b), p) for b, p in pages.items()]
    assert mapped_kib(layer.path) <= MAPPED_KIB, "block reads left their pages mapped"
    for blk in random.Random(2).sample(range(PAGES), 50):  # cached-path reads, again right
        assert layer.file.read_block(blk * 8192 // (64 * 1024)) is not None
    assert [p for _, p in layer.scan(K.KeyRange(rel_key(7), rel_key(8)))] == [pages[7]]
    assert mapped_kib(layer.path) <= MAPPED_KIB
