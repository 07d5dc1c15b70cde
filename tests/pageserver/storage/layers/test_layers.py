"""Layer files (delta, image), their integrity checks, the block cache and the in-memory layer."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from pageserver.storage import keys as K
from pageserver.storage.layers import native as layers_native
from pageserver.storage.layers.blocks import HEADER_SIZE, BlockCache, LayerCorrupt
from pageserver.storage.layers.delta import DeltaLayer, DeltaLayerWriter
from pageserver.storage.layers.image import ImageLayer, ImageLayerWriter
from pageserver.storage.layers.inmemory import ArenaLayer, InMemoryLayer
from pageserver.storage.layers.names import LayerName
from pageserver.storage.settings import StoreSettings
from pageserver.storage.values import TOMBSTONE, Image, Value, WalDelta, encode_value
from proto.errors import CorruptData, InvalidArgument
from tests.native_ext import require_c_extension

SETTINGS = StoreSettings(block_size=256)


def rel_key(blk: int, rel: int = 16384) -> K.Key:
    return K.rel_block_key(1663, 5, rel, 0, blk)


def sample_versions(seed: int = 1, n_keys: int = 20) -> list[tuple[K.Key, int, Value]]:
    rng = random.Random(seed)
    out: list[tuple[K.Key, int, Value]] = []
    for blk in range(n_keys):
        lsn = 100
        for _ in range(rng.randint(1, 6)):
            lsn += rng.randint(0, 5)
            kind = rng.random()
            value: Value
            if kind < 0.3:
                value = Image(rng.randbytes(rng.randint(0, 300)))
            elif kind < 0.9:
                value = WalDelta(rng.randbytes(rng.randint(1, 60)), rng.random() < 0.2)
            else:
                value = TOMBSTONE
            out.append((rel_key(blk), lsn, value))
    return out


def write_delta(
    directory: Path, versions: list[tuple[K.Key, int, Value]], cache: BlockCache
) -> DeltaLayer:
    writer = DeltaLayerWriter(directory, 100, 200, SETTINGS)
    for key, lsn, value in versions:
        writer.add(key, lsn, encode_value(value))
    return writer.finish(K.FULL_KEYSPACE, cache)


def brute_collect(
    versions: list[tuple[K.Key, int, Value]], key: K.Key, lsn: int, floor: int
) -> tuple[list[tuple[int, Value]], bool]:
    mine = [(v_lsn, v) for k, v_lsn, v in versions if k == key and floor < v_lsn <= lsn]
    out: list[tuple[int, Value]] = []
    for v_lsn, v in reversed(mine):
        out.append((v_lsn, v))
        if not (isinstance(v, WalDelta) and not v.will_init):
            return out, True
    return out, False


def test_delta_layer_round_trip(tmp_path: Path) -> None:
    versions = sample_versions()
    cache = BlockCache(1 << 20)
    layer = write_delta(tmp_path, versions, cache)
    assert layer.file.header.n_blocks > 1
    assert layer.name.is_l0
    reopened = DeltaLayer(tmp_path, layer.name, BlockCache(1 << 20))
    expected = [(k, lsn, encode_value(v)) for k, lsn, v in versions]
    assert list(reopened.iter_encoded()) == expected
    for blk in range(21):
        key = rel_key(blk)
        for lsn in (99, 100, 103, 110, 130, 199):
            for floor in (-1, 101, 108):
                assert reopened.collect(key, lsn, floor) == brute_collect(
                    versions, key, lsn, floor
                ), (blk, lsn, floor)
    newest = list(reopened.newest_versions(K.fork_blocks_range(1663, 5, 16384, 0), 104))
    expect: dict[K.Key, tuple[int, int]] = {}
    for k, v_lsn, v in versions:
        if v_lsn <= 104:
            expect[k] = (v_lsn, encode_value(v)[0])
    assert [(k, v_lsn, tag) for k, (v_lsn, tag) in sorted(expect.items())] == newest
    # Range restriction.
    part = K.KeyRange(rel_key(5), rel_key(8))
    assert {k for k, _, _ in reopened.newest_versions(part, 1000)} == {
        rel_key(5),
        rel_key(6),
        rel_key(7),
    }


def test_empty_delta_and_image_layers(tmp_path: Path) -> None:
    cache = BlockCache(1 << 20)
    image = ImageLayerWriter(tmp_path, K.relation_range(1663, 5, 1), 50, SETTINGS).finish(cache)
    assert image.get(K.rel_block_key(1663, 5, 1, 0, 0)) is None
    assert list(image.iter_encoded()) == []


def test_image_layer_round_trip(tmp_path: Path) -> None:
    cache = BlockCache(1 << 20)
    rng = K.fork_blocks_range(1663, 5, 16384, 0)
    writer = ImageLayerWriter(tmp_path, rng, 0x42, SETTINGS)
    pages = {rel_key(b): bytes([b]) * 8192 for b in range(0, 40, 2)}
    for key, page in pages.items():
        writer.add(key, page)
    layer = writer.finish(cache)
    assert layer.path.name == LayerName.image(rng, 0x42).file_name
    reopened = ImageLayer(tmp_path, layer.name, cache)
    assert reopened.lsn == 0x42
    for b in range(40):
        assert reopened.get(rel_key(b)) == pages.get(rel_key(b))
    assert reopened.collect(rel_key(2), 0x41, -1) == ([], False)
    assert reopened.collect(rel_key(2), 0x42, -1) == ([(0x42, Image(pages[rel_key(2)]))], True)
    assert reopened.collect(rel_key(2), 0x50, 0x42) == ([], False)


def test_writers_reject_out_of_order_input(tmp_path: Path) -> None:
    writer = DeltaLayerWriter(tmp_path, 10, 20, SETTINGS)
    writer.add(rel_key(2), 11, encode_value(TOMBSTONE))
    with pytest.raises(InvalidArgument):
        writer.add(rel_key(1), 12, encode_value(TOMBSTONE))
    with pytest.raises(InvalidArgument):
        writer.add(rel_key(2), 10 - 1, encode_value(TOMBSTONE))
    with pytest.raises(InvalidArgument):
        writer.add(rel_key(3), 20, encode_value(TOMBSTONE))
    with pytest.raises(InvalidArgument):
        writer.finish(K.single_key_range(rel_key(9)), BlockCache(100))
    image = ImageLayerWriter(tmp_path, K.single_key_range(rel_key(1)), 5, SETTINGS)
    with pytest.raises(InvalidArgument):
        image.add(rel_key(2), b"x")
    assert not any(p.name.endswith(".___temp") for p in tmp_path.iterdir())
    assert list(tmp_path.iterdir()) == []


def _expect_detected(path: Path, name: LayerName, reference: list[tuple[K.Key, int, bytes]]) -> str:
    """Open and read everything; the damage must raise LayerCorrupt naming the file."""
    try:
        layer = (ImageLayer if name.is_image else DeltaLayer)(
            path.parent, name, BlockCache(1 << 20)
        )
        got = list(layer.iter_encoded())
        # iter_encoded bypasses the cache; also go through the cached path.
        for key, lsn, _ in reference:
            layer.collect(key, lsn, lsn - 1)
    except LayerCorrupt as exc:
        assert str(path) in str(exc)
        assert isinstance(exc, CorruptData)
        return str(exc)
    pytest.fail(f"corruption went undetected; read {len(got)} versions")


def test_every_flipped_byte_is_detected(tmp_path: Path) -> None:
    versions = sample_versions(seed=7, n_keys=6)
    good = write_delta(tmp_path, versions, BlockCache(1 << 20))
    reference = list(good.iter_encoded())
    raw = good.path.read_bytes()
    index_at = good.file.header.index_offset
    messages: set[str] = set()
    for offset in range(len(raw)):
        damaged = bytearray(raw)
        damaged[offset] ^= 0x01 << (offset % 8)
        good.path.write_bytes(bytes(damaged))
        msg = _expect_detected(good.path, good.name, reference)
        region = "header" if offset < HEADER_SIZE else "block" if offset < index_at else "index"
        messages.add(f"{region}: {msg.split(': ', 1)[1]}")
    assert any("header checksum" in m for m in messages)
    assert any("index checksum" in m for m in messages)
    assert any("checksum mismatch in value block" in m for m in messages)


def test_truncated_and_extended_files_are_detected(tmp_path: Path) -> None:
    versions = sample_versions(seed=3, n_keys=5)
    good = write_delta(tmp_path, versions, BlockCache(1 << 20))
    reference = list(good.iter_encoded())
    raw = good.path.read_bytes()
    for cut in sorted({0, 1, HEADER_SIZE - 1, HEADER_SIZE, len(raw) // 2, len(raw) - 1}):
        good.path.write_bytes(raw[:cut])
        assert "corrupt" in _expect_detected(good.path, good.name, reference)
    good.path.write_bytes(raw + b"\0")
    assert "size is" in _expect_detected(good.path, good.name, reference)
    good.path.unlink()
    assert "missing" in _expect_detected(good.path, good.name, reference)


def test_file_renamed_to_another_range_is_detected(tmp_path: Path) -> None:
    good = write_delta(tmp_path, sample_versions(n_keys=2), BlockCache(1 << 20))
    other = LayerName.delta(K.FULL_KEYSPACE, 100, 300)
    os.rename(good.path, tmp_path / other.file_name)
    with pytest.raises(LayerCorrupt, match="does not match the file name"):
        DeltaLayer(tmp_path, other, BlockCache(100))


def test_image_layer_corruption_detected(tmp_path: Path) -> None:
    rng = K.fork_blocks_range(1663, 5, 16384, 0)
    writer = ImageLayerWriter(tmp_path, rng, 9, SETTINGS)
    for b in range(10):
        writer.add(rel_key(b), random.Random(b).randbytes(100))
    layer = writer.finish(BlockCache(1 << 20))
    reference = list(layer.iter_encoded())
    raw = bytearray(layer.path.read_bytes())
    raw[HEADER_SIZE + 3] ^= 0xFF
    layer.path.write_bytes(bytes(raw))
    assert "value block" in _expect_detected(layer.path, layer.name, reference)


def test_block_cache_is_bounded_lru() -> None:
    cache = BlockCache(100)
    for i in range(5):
        cache.put(1, i, bytes(30))
    assert cache.size <= 100
    assert cache.get(1, 0) is None and cache.get(1, 4) is not None
    cache.get(1, 2)
    cache.put(1, 9, bytes(30))
    assert cache.get(1, 2) is not None and cache.get(1, 3) is None
    cache.put(1, 10, bytes(1000))  # larger than the whole cache: not kept
    assert cache.get(1, 10) is None
    assert cache.hits >= 2 and cache.misses >= 2


def test_reads_fill_and_use_the_cache(tmp_path: Path) -> None:
    cache = BlockCache(1 << 20)
    layer = write_delta(tmp_path, sample_versions(), cache)
    cache.hits = cache.misses = 0
    key = rel_key(3)
    layer.collect(key, 1000, -1)
    misses = cache.misses
    layer.collect(key, 1000, -1)
    assert cache.misses == misses and cache.hits > 0


@pytest.mark.parametrize("kind", ["reference", "arena"])
def test_inmemory_layer_put_rules_and_reads(kind: str) -> None:
    if kind == "arena":
        require_c_extension(layers_native.inmem, "pageserver.storage.layers._inmem")
    layer = InMemoryLayer(10) if kind == "reference" else ArenaLayer(10)
    k1, k2 = rel_key(1), rel_key(2)
    layer.put(k1, 10, Image(b"a"))
    layer.put(k1, 12, WalDelta(b"d"))
    layer.put(k1, 12, WalDelta(b"e"))  # same LSN: kept in put order
    layer.put(k2, 11, WalDelta(b"x", True))
    with pytest.raises(InvalidArgument):
        layer.put(k1, 11, WalDelta(b"late"))
    with pytest.raises(InvalidArgument):
        layer.put(k2, 9, WalDelta(b"before start"))
    assert layer.collect(k1, 12, -1) == (
        [(12, WalDelta(b"e")), (12, WalDelta(b"d")), (10, Image(b"a"))],
        True,
    )
    assert layer.collect(k1, 11, -1) == ([(10, Image(b"a"))], True)
    assert layer.collect(k1, 12, 10) == ([(12, WalDelta(b"e")), (12, WalDelta(b"d"))], False)
    assert layer.collect(rel_key(3), 12, -1) == ([], False)
    assert list(layer.newest_versions(K.FULL_KEYSPACE, 11)) == [(k1, 10, 1), (k2, 11, 3)]
    assert [(k, lsn) for k, lsn, _ in layer.iter_encoded()] == [
        (k1, 10),
        (k1, 12),
        (k1, 12),
        (k2, 11),
    ]
    size = layer.size
    rest = layer.split_above(11)
    assert rest is not None and rest.lsn_start == 12
    assert layer.collect(k1, 20, -1) == ([(10, Image(b"a"))], True)
    assert rest.collect(k1, 20, -1) == ([(12, WalDelta(b"e")), (12, WalDelta(b"d"))], False)
    assert layer.size + rest.size == size and len(layer) + len(rest) == 4
    assert layer.split_above(11) is None
    layer.freeze(12, 10)
    with pytest.raises(InvalidArgument):
        layer.put(k1, 13, Image(b""))
