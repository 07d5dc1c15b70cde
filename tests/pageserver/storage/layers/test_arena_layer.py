"""The C in-memory layer (`ArenaLayer`, `_inmem.c`) against the reference `InMemoryLayer`.

The same random puts go into both; every read (collect, newest_lsn, newest_versions, key
groups) must answer the same at every LSN, after a split at a random cut too, and the L0
files written from them must be identical byte for byte.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pageserver.storage import keys as K
from pageserver.storage.layers import native as layers_native
from pageserver.storage.layers.blocks import BlockCache
from pageserver.storage.layers.delta import DeltaLayerWriter
from pageserver.storage.layers.inmemory import ArenaLayer, InMemoryLayer, new_layer
from pageserver.storage.settings import StoreSettings
from pageserver.storage.values import TOMBSTONE, Image, Value, WalDelta
from proto.errors import InvalidArgument
from tests.native_ext import require_c_extension

SETTINGS = StoreSettings(block_size=700)
"""Small blocks: many block boundaries, values bigger than a block too."""


@pytest.fixture(autouse=True)
def c_extension() -> None:
    require_c_extension(layers_native.inmem, "pageserver.storage.layers._inmem")


def random_puts(seed: int, n: int = 3000) -> list[tuple[K.Key, int, Value]]:
    """Puts in LSN order over a few relations (some keys written often, at equal LSNs too)."""
    rng = random.Random(seed)
    keys = [K.rel_block_key(1663, 5, rel, fork, blk) for rel in (16384, 16390)
            for fork in (0, 2) for blk in range(40)]  # fmt: skip
    keys += [K.rel_size_key(1663, 5, 16384, 0), K.CHECKPOINT_KEY]
    lsn = 1000
    out: list[tuple[K.Key, int, Value]] = []
    for _ in range(n):
        lsn += rng.choice((0, 0, 8, 24, 100))
        key = rng.choice(keys[:5]) if rng.random() < 0.3 else rng.choice(keys)
        kind = rng.random()
        value: Value
        if kind < 0.2:
            value = Image(rng.randbytes(rng.choice((0, 4, 300, 1500))))
        elif kind < 0.95:
            value = WalDelta(rng.randbytes(rng.randint(1, 200)), rng.random() < 0.1)
        else:
            value = TOMBSTONE
        out.append((key, lsn, value))
    return out


def assert_same_reads(ref: InMemoryLayer, arena: InMemoryLayer, rng: random.Random) -> None:
    assert (len(arena), arena.size, arena.max_lsn) == (len(ref), ref.size, ref.max_lsn)
    assert list(arena.iter_key_groups()) == list(ref.iter_key_groups())
    assert list(arena.iter_encoded()) == list(ref.iter_encoded())
    groups = list(ref.iter_key_groups())
    keys = [k for k, _ in groups] + [K.rel_block_key(1663, 5, 1, 0, 0)]
    lsns = sorted({lsn for _, versions in groups for lsn, _ in versions})
    probes = [0, *rng.sample(lsns, min(30, len(lsns))), 1 << 40] if lsns else [0, 1 << 40]
    for lsn in probes:
        for start, end in ((K.KEY_MIN, K.KEY_MAX), (keys[0], keys[len(keys) // 2])):
            key_range = K.KeyRange(min(start, end), max(start, end))
            assert list(arena.newest_versions(key_range, lsn)) == list(
                ref.newest_versions(key_range, lsn)
            )
        for key in rng.sample(keys, min(12, len(keys))):
            assert arena.newest_lsn(key, lsn) == ref.newest_lsn(key, lsn)
            for floor in (-1, lsn - 50, rng.choice(lsns) if lsns else 0):
                assert arena.collect(key, lsn, floor) == ref.collect(key, lsn, floor)


def l0_bytes(tmp_path: Path, layer: InMemoryLayer, name: str) -> bytes:
    assert layer.lsn_end is not None
    directory = tmp_path / name
    directory.mkdir()
    writer = DeltaLayerWriter(directory, layer.lsn_start, layer.lsn_end, SETTINGS)
    layer.write_to(writer)
    written = writer.finish(K.FULL_KEYSPACE, BlockCache(1 << 20))
    data = written.path.read_bytes()
    written.close()
    return data


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_arena_layer_reads_and_l0_file_equal_the_reference(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    puts = random_puts(seed)
    ref, arena = InMemoryLayer(1000), ArenaLayer(1000)
    for key, lsn, value in puts:
        ref.put(key, lsn, value)
        arena.put(key, lsn, value)
    assert_same_reads(ref, arena, rng)

    cut = rng.choice([lsn for _, lsn, _ in puts[len(puts) // 3 :]])
    ref_rest, arena_rest = ref.split_above(cut), arena.split_above(cut)
    assert ref_rest is not None and arena_rest is not None
    assert isinstance(arena_rest, ArenaLayer) and arena_rest.lsn_start == cut + 1
    assert_same_reads(ref, arena, rng)
    assert_same_reads(ref_rest, arena_rest, rng)
    assert ref.split_above(cut) is None and arena.split_above(cut) is None

    end = puts[-1][1] + 1
    ref.freeze(cut + 1, None)
    arena.freeze(cut + 1, None)
    ref_rest.freeze(end, None)
    arena_rest.freeze(end, None)
    for i, (a, b) in enumerate(((ref, arena), (ref_rest, arena_rest))):
        assert l0_bytes(tmp_path, b, f"arena{i}") == l0_bytes(tmp_path, a, f"ref{i}")


def test_arena_layer_keeps_the_put_rules() -> None:
    layer = ArenaLayer(10)
    key = K.rel_block_key(1663, 5, 16384, 0, 1)
    layer.put(key, 12, WalDelta(b"x"))
    with pytest.raises(InvalidArgument, match="below its previous version"):
        layer.put(key, 11, WalDelta(b"late"))
    with pytest.raises(InvalidArgument, match="below the in-memory layer's start"):
        layer.put(key, 9, WalDelta(b"early"))
    assert len(layer) == 1
    layer.freeze(13, 12)
    with pytest.raises(InvalidArgument, match="frozen"):
        layer.put(key, 13, WalDelta(b"y"))
    with pytest.raises(InvalidArgument, match="frozen"):
        layer.versions_for_append()


def test_new_layer_is_the_arena_when_built() -> None:
    assert isinstance(new_layer(5), ArenaLayer)


def test_an_empty_arena_writes_the_empty_l0_file_of_the_reference(tmp_path: Path) -> None:
    ref, arena = InMemoryLayer(10), ArenaLayer(10)
    ref.freeze(20, None)
    arena.freeze(20, None)
    assert l0_bytes(tmp_path, arena, "arena") == l0_bytes(tmp_path, ref, "ref")
