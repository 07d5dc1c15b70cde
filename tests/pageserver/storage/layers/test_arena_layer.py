"""The C in-memory layer (`ArenaLayer`, `_inmem.c`) against the reference `InMemoryLayer`.

The same random puts go into both; every read (collect, newest_lsn, newest_versions, key
groups) must answer the same at every LSN, after a split at a random cut too, and the L0
files written from them must be identical byte for byte.
"""

from __future__ import annotations

import random
import resource
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


def page_puts(seed: int, n: int) -> list[tuple[K.Key, int, Value]]:
    """n page images of 8 KiB, one a key, in LSN order (n / 128 MiB of values)."""
    rng = random.Random(seed)
    return [
        (K.rel_block_key(1663, 5, 16384, 0, blk), 1000 + 8 * i, Image(rng.randbytes(8192)))
        for i, blk in enumerate(rng.sample(range(100_000), n))
    ]


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


def test_arena_refuses_hostile_arguments() -> None:
    """The C arena's argument checks (safety review): an LSN outside [0, 2**64) is an
    OverflowError (the "K" format took it modulo 2**64: put(key, -1) stored LSN 2**64-1), a
    block size that does not fit the version table's u32 offsets a ValueError, and the
    out-of-range message names the LSN in hex as the reference does (it printed "%llX")."""
    inmem = layers_native.inmem
    assert inmem is not None
    arena = inmem.Arena()
    key = bytes(K.rel_block_key(1663, 5, 16384, 0, 1))
    calls = (
        lambda bad: arena.put(key, bad, b"\x01"),
        lambda bad: arena.collect(key, bad, -1),
        lambda bad: arena.newest_lsn(key, bad),
        lambda bad: arena.newest_versions(key, key, bad),
        lambda bad: arena.split_above(bad),
        lambda bad: arena.pack(700, bad, 10),
        lambda bad: arena.pack(700, 0, bad),
    )
    for bad in (-1, 2**64):
        for call in calls:
            with pytest.raises(OverflowError):
                call(bad)
    assert arena.key_groups() == []
    with pytest.raises(ValueError, match="18 bytes"):
        arena.put(key[:-1], 5, b"\x01")
    with pytest.raises(ValueError, match="tag byte"):
        arena.put(key, 5, b"")
    assert arena.put(key, 0xAB, b"\x04") is None
    for size in (0, -1, 2**32):
        with pytest.raises(ValueError, match="block size"):
            arena.pack(size, 0, 0x100)
    with pytest.raises(ValueError, match="LSN AB outside the layer's LSN range"):
        arena.pack(700, 0xAC, 0x100)
    data, _, _, _, n_keys, n_versions, added, last = arena.pack(1, 0, 0x100)
    assert (data, n_keys, n_versions, added, last) == (b"\x04", 1, 1, 1, 0xAB)
    # an empty arena: every read answers empty, a split moves nothing
    empty = inmem.Arena(1 << 16)
    assert empty.collect(key, 2**64 - 1, -1) == ([], False)
    assert empty.newest_lsn(key, 2**64 - 1) is None
    assert empty.newest_versions(key, key, 5) == []
    assert empty.split_above(0) == (None, 0, 0, -1)
    assert empty.pack(700, 0, 1) == (b"", b"", b"", b"", 0, 0, 0, 0)
    # LSNs past 2**63 compare as the unsigned values they are (they were cast to signed)
    high = inmem.Arena()
    for lsn in (2**63 - 1, 2**63, 2**64 - 2):
        high.put(key, lsn, b"\x02d")
    assert [lsn for lsn, _ in high.collect(key, 2**64 - 1, 2**63 - 1)[0]] == [2**64 - 2, 2**63]
    assert high.split_above(2**63)[1:] == (1, 2, 2**63)


def test_a_split_arena_keeps_what_it_holds_and_pack_runs_beside_readers() -> None:
    """split_above copies the moved versions before it cuts; readers on other threads run
    while pack copies without the GIL (they only read; writers are refused meanwhile)."""
    import threading

    inmem = layers_native.inmem
    assert inmem is not None
    arena = inmem.Arena()
    keys = [bytes(K.rel_block_key(1663, 5, 16384, 0, b)) for b in range(2000)]
    for lsn in range(1, 41):
        for key in keys:
            arena.put(key, lsn, b"\x02" + bytes(300))
    rest, moved, moved_bytes, max_lsn = arena.split_above(30)
    assert (moved, moved_bytes, max_lsn) == (10 * len(keys), 10 * 301 * len(keys), 30)
    assert rest.newest_lsn(keys[0], 100) == 40 and arena.newest_lsn(keys[0], 100) == 30
    seen: list[int | None] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(arena.newest_lsn(keys[-1], 100))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(5):
            packed = arena.pack(8192, 0, 31)
            assert packed[5] == 30 * len(keys)
    finally:
        stop.set()
        reader.join()
    assert set(seen) <= {30}


def test_an_arena_on_a_dead_arenas_buffers_reads_as_a_new_one(tmp_path: Path) -> None:
    """A layer-sized arena freed leaves its buffers for the next one of its size (their
    pages already mapped: faulting fresh ones was most of the ingest's value copy); that
    arena holds nothing of the old values, and reads and writes as the reference does."""
    inmem = layers_native.inmem
    expect = 12 << 20  # both buffers above SPARE_MIN: kept
    old = ArenaLayer(1000, expect=expect)
    for key, lsn, value in random_puts(4):
        old.put(key, lsn, value)
    before = inmem.recycled()
    del old
    rng = random.Random(5)
    ref, arena = InMemoryLayer(1000), ArenaLayer(1000, expect=expect)
    assert inmem.recycled() == before + 1
    assert list(arena.iter_encoded()) == [] and len(arena) == 0
    for key, lsn, value in random_puts(5, n=500):
        ref.put(key, lsn, value)
        arena.put(key, lsn, value)
    assert_same_reads(ref, arena, rng)
    end = ref.max_lsn + 1
    ref.freeze(end, None)
    arena.freeze(end, None)
    assert l0_bytes(tmp_path, arena, "arena") == l0_bytes(tmp_path, ref, "ref")
    spare = ArenaLayer(1000, expect=expect)  # none is left: its buffers are fresh
    assert inmem.recycled() == before + 1
    del spare  # its buffers are the spares now
    small = ArenaLayer(1000, expect=1 << 20)  # a smaller arena takes no large spare
    assert inmem.recycled() == before + 1
    del small


def test_a_large_pack_reuses_the_memory_of_the_one_before(tmp_path: Path) -> None:
    """A pack of SPARE_MIN bytes or more is a read-only buffer whose memory, once the layer is
    written, holds the next pack of its size (faulting fresh pages in was 45% of the flush
    thread's CPU); the files written from both equal the reference's."""
    inmem = layers_native.inmem
    puts = page_puts(7, 700)  # 5.6 MiB: above SPARE_MIN
    ref = InMemoryLayer(1000)
    for key, lsn, value in sorted(puts, key=lambda p: p[1]):
        ref.put(key, lsn, value)
    end = ref.max_lsn + 1
    ref.freeze(end, None)
    want = l0_bytes(tmp_path, ref, "ref")
    before = inmem.packs_recycled()
    for n in range(3):
        arena = ArenaLayer(1000)
        for key, lsn, value in sorted(puts, key=lambda p: p[1]):
            arena.put(key, lsn, value)
        arena.freeze(end, None)
        packed = arena.arena.pack(8192, 1000, end)
        assert not isinstance(packed[0], bytes)  # the large kind
        with pytest.raises(TypeError):
            memoryview(packed[0])[0:1] = b"x"  # read-only
        del packed
        assert l0_bytes(tmp_path, arena, f"arena{n}") == want
        del arena
    assert inmem.packs_recycled() >= before + 3


@pytest.mark.parametrize("outgrown", [False, True])
def test_a_fresh_arena_is_mapped_in_off_the_writing_thread(tmp_path: Path, outgrown: bool) -> None:
    """ArenaLayer.prefault: a thread maps a fresh arena's value buffer in, so the writer's
    copies fault no page in (the decode thread faulted a catch-up's first arenas in page by
    page: 23% of its faults); once, and not for a dead arena's buffer (mapped already). The
    layer reads and writes as the reference does, also when its values outgrow the buffer
    while the thread may still run (the buffer moves only after the thread is done)."""
    inmem = layers_native.inmem
    expect = (4 if outgrown else 20) << 20  # 20 MiB: unlike any spare left by the tests above
    taken = [ArenaLayer(1000, expect=expect) for _ in range(2)]  # any spare of its size
    puts = page_puts(8, 1500)  # 12 MiB
    before = inmem.prefaults()
    ref, arena = InMemoryLayer(1000), ArenaLayer(1000, expect=expect)
    assert arena.prefault()
    assert not arena.prefault()  # started already
    assert inmem.prefaults() == before + 1
    if not outgrown:
        arena.arena.prefault(True)  # until the thread is done
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for key, lsn, value in puts:
        ref.put(key, lsn, value)
        arena.put(key, lsn, value)
    faults = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - faults
    if not outgrown:
        assert faults < 500, faults  # faulted in here: ~3000 (12 MiB of 4 KiB pages)
    assert_same_reads(ref, arena, random.Random(9))
    end = ref.max_lsn + 1
    ref.freeze(end, None)
    arena.freeze(end, None)
    assert l0_bytes(tmp_path, arena, "arena") == l0_bytes(tmp_path, ref, "ref")
    del taken, arena  # their buffers are the spares now
    spare = ArenaLayer(1000, expect=expect)
    assert not spare.prefault()  # a dead arena's buffer: its pages are mapped
    assert not InMemoryLayer(1000).prefault()  # the reference's values are Python objects
    assert inmem.prefaults() == before + 1
