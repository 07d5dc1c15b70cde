"""LayerFile.iter_newest (the bulk scan image layers use for basebackups) against the general
iter_key_groups: the newest version of each key, its tag and payload, over any key range; the
blocks a range reads (`blocks_of`) decompressed ahead on the pool (`prefetch`)."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import pytest

from pageserver.storage import keys as K
from pageserver.storage.layers import blocks as blocks_module
from pageserver.storage.layers.blocks import (
    HEADER_SIZE,
    BlockCache,
    LayerCorrupt,
    LayerFile,
)
from pageserver.storage.layers.delta import DeltaLayerWriter
from pageserver.storage.layers.image import ImageLayer, ImageLayerWriter
from pageserver.storage.settings import StoreSettings
from pageserver.storage.values import encode_value
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


def _image_layer(path: Path, n: int = 120) -> tuple[ImageLayer, dict[int, bytes]]:
    rng = random.Random(11)
    pages = {blk: rng.randbytes(rng.randint(100, 700)) for blk in range(n)}
    writer = ImageLayerWriter(path, K.FULL_KEYSPACE, 500, SETTINGS)
    for blk, page in pages.items():
        writer.add(rel_key(blk), page)
    return writer.finish(BlockCache(1 << 20)), pages


def _batched(
    monkeypatch: pytest.MonkeyPatch, path: Path, batch: int
) -> tuple[ImageLayer, dict[int, bytes]]:
    """_image_layer with PREFETCH_BYTES set to `batch` of its blocks."""
    (path / "probe").mkdir()
    (path / "batched").mkdir()
    probe = _image_layer(path / "probe")[0].file
    per_task = -(-batch * probe.raw_bytes // probe.header.n_blocks)
    monkeypatch.setattr(blocks_module, "PREFETCH_BYTES", per_task)
    layer, pages = _image_layer(path / "batched")
    assert layer.file.prefetch_batch == batch
    return layer, pages


def test_a_prefetch_task_decompresses_about_prefetch_bytes(tmp_path: Path) -> None:
    """8 blocks of a delta layer's 128 KiB, 15 of an image layer's 8 pages: as many tasks (GIL
    hand-offs) a MiB read, whatever the file's block size."""
    assert blocks_module.PREFETCH_BYTES // StoreSettings().block_size == 8
    assert blocks_module.PREFETCH_BYTES // StoreSettings().image_blocks == 15
    layer, _ = _image_layer(tmp_path)
    f = layer.file
    assert f.prefetch_batch == blocks_module.PREFETCH_BYTES * f.header.n_blocks // f.raw_bytes


def test_blocks_of_names_the_blocks_a_scan_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer, _ = _image_layer(tmp_path)
    f = layer.file
    assert f.header.n_blocks > 20  # small blocks: many of them
    read: list[int] = []
    real = LayerFile._block

    def counting(self: LayerFile, b: int, *, use_cache: bool = True, release: bool = True) -> bytes:
        read.append(b)
        return real(self, b, use_cache=use_cache, release=release)

    monkeypatch.setattr(LayerFile, "_block", counting)
    monkeypatch.setattr(blocks_module, "RECENT_BLOCKS", 0)  # each scan decompresses its own
    for a, b in ((0, 120), (7, 8), (30, 90), (119, 200), (130, 140)):
        key_range = K.KeyRange(rel_key(a), rel_key(b))
        read.clear()
        list(f.iter_newest(key_range))
        assert list(f.blocks_of(key_range)) == sorted(set(read)), (a, b)


def test_bulk_reads_keep_their_threads_last_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block a thread's bulk reads decompressed is read again from that thread's last
    RECENT_BLOCKS (two scans of the keys of one block: one decompression), not from another
    thread's, and not once RECENT_BLOCKS other blocks were read after it."""
    layer, pages = _image_layer(tmp_path)
    f = layer.file
    assert f.header.n_blocks > blocks_module.RECENT_BLOCKS + 1
    read: list[tuple[str, int]] = []
    real = LayerFile._block

    def counting(self: LayerFile, b: int, *, use_cache: bool = True, release: bool = True) -> bytes:
        read.append((threading.current_thread().name, b))
        return real(self, b, use_cache=use_cache, release=release)

    monkeypatch.setattr(LayerFile, "_block", counting)
    one_block = K.KeyRange(rel_key(7), rel_key(8))
    (first,) = f.blocks_of(one_block)
    for _ in range(2):
        assert list(layer.scan(one_block)) == [(rel_key(7), pages[7])]
    assert f.read_block(first) == real(f, first, use_cache=False)
    me = threading.current_thread().name
    assert read == [(me, first)]
    other = threading.Thread(target=f.read_block, args=(first,), name="other-reader")
    other.start()
    other.join()
    assert read == [(me, first), ("other-reader", first)]
    others = [b for b in range(f.header.n_blocks) if b != first][: blocks_module.RECENT_BLOCKS]
    for b in others:
        f.read_block(b)
    read.clear()
    f.read_block(first)
    assert read == [(me, first)]


def test_prefetched_blocks_are_decompressed_on_the_pool_and_read_as_the_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer, pages = _batched(monkeypatch, tmp_path, 8)
    f = layer.file
    want = {b: f._block(b, use_cache=False) for b in range(f.header.n_blocks)}
    on: dict[int, str] = {}
    real = LayerFile._block

    def where(self: LayerFile, b: int, *, use_cache: bool = True, release: bool = True) -> bytes:
        on[b] = threading.current_thread().name
        return real(self, b, use_cache=use_cache, release=release)

    monkeypatch.setattr(LayerFile, "_block", where)
    blocks = f.blocks_of(K.KeyRange(rel_key(20), rel_key(80)))
    assert f.prefetch(blocks) == list(blocks)
    assert f.prefetch(blocks) == []  # already on its way: not twice
    tasks = {id(task) for task, _ in f._ahead.values()}
    assert len(blocks) > 8 and len(tasks) == -(-len(blocks) // 8)
    got = {b: f.read_block(b) for b in blocks}
    assert got == {b: want[b] for b in blocks}
    assert {on[b].startswith("layer-unzstd") for b in blocks} == {True}
    assert f._ahead == {}  # taken by the reads
    # a scan takes them too, and reads the rest itself; the pages are the layer's
    on.clear()
    f.prefetch(blocks)
    scanned = list(layer.scan(K.FULL_KEYSPACE))
    assert scanned == [(rel_key(b), p) for b, p in pages.items()]
    assert {on[b].startswith("layer-unzstd") for b in blocks} == {True}
    assert f._ahead == {}
    # dropped: forgotten, and read again from the file
    started = f.prefetch(range(0, f.header.n_blocks + 5))  # past the end: not started
    assert started == list(range(f.header.n_blocks))
    f.drop_prefetched(started)
    assert f._ahead == {}
    assert f.read_block(3) == want[3]


def test_a_damaged_prefetched_block_is_refused_when_read(tmp_path: Path) -> None:
    """Only the damaged block raises, when it is read: its neighbours decompressed in the
    same task read as they are."""
    layer, _ = _image_layer(tmp_path)
    good = layer.file
    want = [good.read_block(b) for b in range(good.header.n_blocks)]
    off = good._map.size() // 3  # inside the value blocks
    raw = bytearray(layer.path.read_bytes())
    raw[off] ^= 0xFF
    damaged = tmp_path / "damaged"
    damaged.write_bytes(bytes(raw))
    f = LayerFile(damaged, BlockCache(1 << 20))
    assert off < f.header.index_offset
    f.prefetch(range(f.header.n_blocks))
    refused = []
    for b in range(f.header.n_blocks):
        try:
            assert f.read_block(b) == want[b]
        except LayerCorrupt as exc:
            assert "checksum mismatch in value block" in str(exc)
            refused.append(b)
    assert len(refused) == 1


@pytest.mark.parametrize("level0", [True, False], ids=["wide", "narrow"])
def test_version_blocks_of_spans_the_blocks_of_a_window(tmp_path: Path, level0: bool) -> None:
    """The blocks from the first to the last version in (floor, upto] of a range's keys (a
    delta layer's share of a bulk rebuild, prefetched): every block holding such a version
    is in it, and it starts and ends at one; empty when the range has none."""
    writer = DeltaLayerWriter(tmp_path, 100, 200, SETTINGS, level0=level0)
    for key, lsn, value in sample_versions(seed=17, n_keys=50):
        writer.add(key, lsn, encode_value(value))
    f = writer.finish(K.FULL_KEYSPACE, BlockCache(1 << 20)).file
    assert f.narrow is not level0 and f.header.n_blocks > 10
    rng = random.Random(5)
    empty = 0
    for _ in range(300):
        a, b = sorted(rng.sample(range(55), 2))
        floor, upto = sorted(rng.sample(range(95, 140), 2))
        key_range = K.KeyRange(rel_key(a), rel_key(b))
        held = [
            f.version_tuple(v)[2]
            for i in range(f.lower_bound(key_range.start), f.lower_bound(key_range.end))
            for v in f.versions_of(i)
            if floor < f.version_lsn(v) <= upto
        ]
        span = f.version_blocks_of(key_range, floor, upto)
        assert span == (range(min(held), max(held) + 1) if held else range(0))
        empty += not held
    assert 0 < empty < 300


def test_a_prefetch_task_unmaps_its_blocks_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One unmapping (MADV_DONTNEED) per task, over its blocks' compressed bytes, not one per
    block: from the pool's threads each one made the kernel flush the reader's core's TLB."""
    layer, _ = _batched(monkeypatch, tmp_path, 8)
    f = layer.file
    released: list[tuple[int, int]] = []
    real = LayerFile._release

    def counting(self: LayerFile, start: int, end: int) -> None:
        if threading.current_thread().name.startswith("layer-unzstd"):
            released.append((start, end))
        real(self, start, end)

    monkeypatch.setattr(LayerFile, "_release", counting)
    blocks = range(3, 3 + 2 * 8)
    f.prefetch(blocks)
    assert [f.read_block(b) for b in blocks] == [f._block(b, use_cache=False) for b in blocks]
    assert len(released) == 2
    first_off = f.header.index_offset  # the blocks' bytes end where the index starts
    assert all(HEADER_SIZE <= start < end <= first_off for start, end in released)
