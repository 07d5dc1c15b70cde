"""A layer file is memory-mapped, and a read copies what it needs out of the map: pages of the
map the process touched would otherwise stay counted in the pageserver's RSS while the file is
open (hundreds of MiB after a 1 GiB load: bench.checkout's pageserver went past 512 MiB).
Reads of blocks, whole scans and the index checks at open unmap what they touched; the bytes
read stay right (the pages come back from the page cache when read again)."""

from __future__ import annotations

import gc
import random
import weakref
from pathlib import Path

import pytest

from pageserver.storage import keys as K
from pageserver.storage.layers import blocks as B
from pageserver.storage.layers.blocks import BlockCache
from pageserver.storage.layers.image import ImageLayer, ImageLayerWriter
from pageserver.storage.settings import StoreSettings
from pageserver.storage.values import TAG_IMAGE
from tests.pageserver.storage.layers.test_layers import rel_key

PAGES = 600  # of 8 KiB, random: blocks compress to about their size (~5 MiB of file)
MAPPED_KIB = 2 * 64 + 8  # a touched page maps up to 64 KiB around it (fault_around_bytes)
HELD_KIB = MAPPED_KIB + B.RELEASE_SPAN // 1024  # and a bulk reader's span not unmapped yet


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


def image_layer(tmp_path: Path, seed: int = 11) -> tuple[ImageLayer, dict[int, bytes]]:
    rng = random.Random(seed)
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
    assert mapped_kib(layer.path) <= HELD_KIB, "block reads left their pages mapped"
    B._bulk_releases.flush()
    assert mapped_kib(layer.path) <= MAPPED_KIB
    for blk in random.Random(2).sample(range(PAGES), 50):  # cached-path reads, again right
        assert layer.file.read_block(blk * 8192 // (64 * 1024)) is not None
    assert [p for _, p in layer.scan(K.KeyRange(rel_key(7), rel_key(8)))] == [pages[7]]
    assert mapped_kib(layer.path) <= MAPPED_KIB


def test_blocks_read_in_order_are_unmapped_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bulk reader's blocks are unmapped a RELEASE_SPAN at a time, not one madvise each
    (6% of a 1 GiB extraction's tar maker); a block elsewhere in the file ends the span."""
    layer, pages = image_layer(tmp_path)
    B._bulk_releases.flush()
    calls: list[tuple[int, int]] = []
    unmap = B.LayerFile._release

    def counted(self: B.LayerFile, start: int, end: int) -> None:
        calls.append((start, end))
        unmap(self, start, end)

    monkeypatch.setattr(B.LayerFile, "_release", counted)
    n = layer.file.header.n_blocks
    blocks = [layer.file.read_block(b) for b in range(n)]
    values = b"".join(bytes((TAG_IMAGE,)) + page for page in pages.values())
    assert b"".join(blocks) == values  # an image layer's values: tag and page, in key order
    assert len(calls) <= layer.file_size // B.RELEASE_SPAN + 1 < n // 4
    assert mapped_kib(layer.path) <= HELD_KIB
    calls.clear()
    layer.file.read_block(0)  # back to the start: the held span is unmapped at once
    assert len(calls) == 1 and calls[0][1] > B.RELEASE_SPAN // 2
    B._bulk_releases.flush()
    assert mapped_kib(layer.path) <= MAPPED_KIB


def test_spans_held_are_bounded_by_files(tmp_path: Path) -> None:
    """At most RELEASE_FILES files keep a span mapped: reading one block of each of more
    leaves the first ones unmapped."""
    B._bulk_releases.flush()
    layers = []
    for i in range(B.RELEASE_FILES + 2):
        (tmp_path / str(i)).mkdir()
        layer, _ = image_layer(tmp_path / str(i), seed=i)
        layer.file.read_block(1)
        layers.append(layer)
    held = [mapped_kib(layer.path) for layer in layers]
    assert held[0] <= MAPPED_KIB and held[1] <= MAPPED_KIB  # the two oldest: unmapped
    assert all(kib > 0 for kib in held[2:]), held  # the newest RELEASE_FILES: still held
    B._bulk_releases.flush()
    assert all(mapped_kib(layer.path) <= MAPPED_KIB for layer in layers)


def test_a_held_span_does_not_keep_its_file_alive(tmp_path: Path) -> None:
    """A span waiting to be unmapped holds its file weakly: a layer compaction or gc removed
    is unmapped, its disk space freed, once its users drop it (a strong reference kept up to
    RELEASE_FILES deleted files mapped on an idle daemon); the span then unmaps nothing."""
    B._bulk_releases.flush()
    layer, _ = image_layer(tmp_path)
    layer.file.read_block(1)
    assert mapped_kib(layer.path) > 0  # its span is held
    path, file = layer.path, weakref.ref(layer.file)
    path.unlink()  # as gc removes it
    del layer
    gc.collect()
    assert file() is None, "the held span kept the removed layer's file open"
    assert f" {path} (deleted)" not in Path("/proc/self/maps").read_text()
    B._bulk_releases.flush()  # the dead file's span: nothing to unmap, no error
