"""The layer writer's C loop (`_blockpack.c`) against its Python reference (`_pack_versions`).

The same versions, as Value objects and as their encodings, are written through add_key with
the C loop and with the reference: the files must be byte-identical (block boundaries,
entries, index), equal to what per-version `add` writes, and bad input is refused alike.
"""

from __future__ import annotations

import dataclasses
import random
import struct
from pathlib import Path

import crc32c
import pytest

from pageserver.redo.native import redo as redo_native
from pageserver.storage import keys as K
from pageserver.storage.layers import native
from pageserver.storage.layers.blocks import (
    HEADER_SIZE,
    BlockCache,
    LayerCorrupt,
    _parse_header,
    key_table_python,
    lower_bound_python,
)
from pageserver.storage.layers.delta import DeltaLayer, DeltaLayerWriter
from pageserver.storage.layers.image import ImageLayerWriter
from pageserver.storage.layers.inmemory import InMemoryLayer
from pageserver.storage.values import TOMBSTONE, Image, Tombstone, Value, WalDelta, encode_value
from proto.errors import InvalidArgument
from tests.native_ext import require_c_extension
from tests.pageserver.storage.layers.test_layers import (
    SETTINGS,
    rel_key,
    sample_versions,
    write_delta,
)


@pytest.fixture
def c_extension() -> None:
    require_c_extension(native.blockpack, "pageserver.storage.layers._blockpack")


Chains = list[tuple[K.Key, list[tuple[int, Value]]]]


def grouped(versions: list[tuple[K.Key, int, Value]]) -> Chains:
    out: dict[K.Key, list[tuple[int, Value]]] = {}
    for key, lsn, value in versions:
        out.setdefault(key, []).append((lsn, value))
    return sorted(out.items())


def write(directory: Path, groups: Chains, how: str) -> bytes:
    directory.mkdir()
    writer = DeltaLayerWriter(directory, 100, 200, SETTINGS)
    for key, chain in groups:
        if how == "add":
            for lsn, value in chain:
                writer.add(key, lsn, encode_value(value))
        elif how == "encoded":
            writer.add_key(key, [(lsn, encode_value(value)) for lsn, value in chain])
        else:
            writer.add_key(key, chain)
    layer = writer.finish(K.FULL_KEYSPACE, BlockCache(1 << 20))
    layer.close()
    return layer.path.read_bytes()


@pytest.mark.usefixtures("c_extension")
def test_c_loop_writes_the_reference_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    groups = grouped(sample_versions(seed=7, n_keys=200))
    reference = write(tmp_path / "add", groups, "add")
    assert write(tmp_path / "c-values", groups, "values") == reference
    assert write(tmp_path / "c-encoded", groups, "encoded") == reference
    monkeypatch.setattr(native, "blockpack", None)
    assert write(tmp_path / "py-values", groups, "values") == reference
    assert write(tmp_path / "py-encoded", groups, "encoded") == reference


@pytest.mark.parametrize("pure", [False, True])
def test_bad_versions_are_refused_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pure: bool, c_extension: None
) -> None:
    if pure:
        monkeypatch.setattr(native, "blockpack", None)
    writer = DeltaLayerWriter(tmp_path, 100, 200, SETTINGS)
    for chain, what in (
        ([(150, TOMBSTONE), (140, TOMBSTONE)], "must be added in LSN order"),
        ([(99, TOMBSTONE)], "outside the layer's LSN range"),
        ([(-1, TOMBSTONE)], "outside the layer's LSN range"),
        ([(150, TOMBSTONE), (2**64, TOMBSTONE)], "outside the layer's LSN range"),
        ([(200, TOMBSTONE)], "outside the layer's LSN range"),
        ([(150, b"")], "not a storable value"),
        ([(150, "text")], "not a storable value"),
    ):
        with pytest.raises(InvalidArgument, match=what):
            writer.add_key(rel_key(len(what)), chain)  # type: ignore[arg-type]
        writer = DeltaLayerWriter(tmp_path, 100, 200, SETTINGS)


def test_lower_bound_in_c_equals_the_python_reference(c_extension: None) -> None:
    """Random sorted key tables (duplicates of a byte prefix, neighbours differing in the last
    byte) and probes: present keys, absent ones, below and above all, shorter and longer
    than a key (bytes order: a prefix sorts first)."""
    rng = random.Random(11)
    assert native.blockpack is not None
    for n in (0, 1, 2, 7, 100, 1000):

        def key() -> bytes:
            return bytes(rng.choice((0, 1, 255)) for _ in range(K.KEY_SIZE))

        table = sorted({key() for _ in range(n)})
        keys = b"".join(table)
        probes = [*table, b"", b"\x00" * K.KEY_SIZE, b"\xff" * (K.KEY_SIZE + 1)]
        probes += [bytes(rng.choice((0, 1, 255)) for _ in range(rng.randint(1, K.KEY_SIZE + 2)))
                   for _ in range(300)]  # fmt: skip
        for probe in probes:
            expected = lower_bound_python(keys, len(table), probe)
            assert native.blockpack.lower_bound(keys, K.KEY_SIZE, probe) == expected, probe
    with pytest.raises(ValueError, match="whole keys"):
        native.blockpack.lower_bound(b"abc", K.KEY_SIZE, b"a")


def test_key_table_split_in_c_equals_the_python_reference(c_extension: None) -> None:
    """LayerFile._keys' split of the key table: keys, first versions and the first key with
    bad version bounds (decreasing, past n_versions, not starting at 0) found alike."""
    assert native.blockpack is not None
    rng = random.Random(3)
    for case in range(300):
        n = rng.choice((0, 1, 2, 5, 50))
        firsts = sorted(rng.randint(0, 40) for _ in range(n))
        if firsts and case % 2:
            firsts[0] = 0
        n_versions = max(firsts, default=0) + rng.choice((-1, 0, 0, 3))
        if case % 7 == 0 and n > 2:
            firsts[1], firsts[2] = firsts[2] + 1, firsts[1]  # decreasing
        table = b"".join(struct.pack(">18sI", rng.randbytes(18), f) for f in firsts)
        n_versions = max(n_versions, 0)
        assert native.blockpack.key_table(table, n, n_versions) == key_table_python(
            table, n, n_versions
        ), (firsts, n_versions)
    with pytest.raises(ValueError, match="key count"):
        native.blockpack.key_table(b"x" * 21, 1, 0)


def test_newest_of_keys_in_c_equals_the_python_reference(tmp_path: Path, c_extension: None) -> None:
    """LayerFile.newest_of_keys (C) and newest_of_keys_python over a real delta file, from
    every start, up to ends inside, between and past its keys."""
    versions = sample_versions(seed=11, n_keys=60)
    directory = tmp_path / "d"
    directory.mkdir()
    writer = DeltaLayerWriter(directory, 100, 200, SETTINGS)
    for key, group in grouped(versions):
        writer.add_key(key, group)
    layer = writer.finish(K.FULL_KEYSPACE, BlockCache(1 << 20))
    f = layer.file
    ends = [K.KEY_MIN, K.KEY_MAX, rel_key(0), rel_key(17), rel_key(59), rel_key(60)]
    ends.append(rel_key(30)[:-1] + b"\x00\x05")  # between two keys
    for start in range(0, f.n_keys + 1, 7):
        for end in ends:
            assert list(f.newest_of_keys(start, end)) == list(f.newest_of_keys_python(start, end))
    assert len(list(f.newest_of_keys(0, K.KEY_MAX))) == 60
    layer.close()


@pytest.mark.parametrize("level0", [True, False], ids=["wide", "narrow"])
def test_newest_of_keys_at_or_below_an_lsn(tmp_path: Path, c_extension: None, level0: bool) -> None:
    """newest_of_keys with `upto` (a basebackup's plan over a layer spanning its LSN): the
    newest version at or below it of each key that has one, in C as in the Python reference
    and as the per-key walk (versions_of + last_at_or_below) found it."""
    versions = sample_versions(seed=13, n_keys=60)
    directory = tmp_path / "d"
    directory.mkdir()
    writer = DeltaLayerWriter(directory, 100, 200, SETTINGS, level0=level0)
    for key, group in grouped(versions):
        writer.add_key(key, group)
    layer = writer.finish(K.FULL_KEYSPACE, BlockCache(1 << 20))
    f = layer.file
    assert f.narrow is not level0
    lsns = sorted({lsn for _, lsn, _ in versions})
    for upto in (-1, 0, 99, lsns[0], lsns[len(lsns) // 2], lsns[-1] - 1, lsns[-1], 10**6):
        walked = []
        for i in range(f.n_keys):
            v = f.last_at_or_below(f.versions_of(i), upto)
            if v >= f.versions_of(i).start:
                lsn, tag, _, _, _ = f.version_tuple(v)
                walked.append((f.key_at(i), lsn, tag))
        for start in (0, 7, 30):
            want = [entry for entry in walked if entry[0] >= f.key_at(start)]
            assert list(f.newest_of_keys(start, K.KEY_MAX, upto)) == want, upto
            assert list(f.newest_of_keys_python(start, K.KEY_MAX, upto)) == want, upto
        if upto < 100:
            assert walked == []
        if upto == lsns[len(lsns) // 2]:  # some keys' newest versions are above it
            assert walked and walked != list(f.newest_of_keys(0, K.KEY_MAX))
    assert len(list(f.newest_of_keys(0, K.KEY_MAX, 10**6))) == 60
    assert list(f.newest_of_keys(0, K.KEY_MAX, 10**6)) == list(f.newest_of_keys(0, K.KEY_MAX))
    layer.close()


@pytest.mark.parametrize("level0", [True, False], ids=["wide", "narrow"])
def test_newest_of_keys_above_an_lsn(tmp_path: Path, c_extension: None, level0: bool) -> None:
    """newest_of_keys with `above` (a diff's keys written in a window (above, upto]): the keys
    whose newest version at or below upto is above it, in C as in the Python reference and
    as the unfiltered listing filtered; `newer_keys` of the layer and of an in-memory layer
    holding the same versions agree."""
    versions = sample_versions(seed=17, n_keys=60)
    directory = tmp_path / "d"
    directory.mkdir()
    writer = DeltaLayerWriter(directory, 100, 200, SETTINGS, level0=level0)
    in_memory = InMemoryLayer(100)
    for key, group in grouped(versions):
        writer.add_key(key, group)
        for lsn, value in group:
            in_memory.put(key, lsn, value)
    layer = writer.finish(K.FULL_KEYSPACE, BlockCache(1 << 20))
    f = layer.file
    lsns = sorted({lsn for _, lsn, _ in versions})
    middle = lsns[len(lsns) // 2]
    for upto in (None, middle, lsns[-1], 10**6):
        for above in (-1, 0, lsns[0], middle - 1, middle, lsns[-1], 10**6):
            every = list(f.newest_of_keys(0, K.KEY_MAX, upto))
            want = [entry for entry in every if entry[1] > above]
            for start in (0, 7):
                since = [entry for entry in want if entry[0] >= f.key_at(start)]
                assert list(f.newest_of_keys(start, K.KEY_MAX, upto, above)) == since
                assert list(f.newest_of_keys_python(start, K.KEY_MAX, upto, above)) == since
            if upto is not None:
                keys = [key for key, _, _ in want]
                assert layer.newer_keys(K.FULL_KEYSPACE, above, upto) == keys
                assert in_memory.newer_keys(K.FULL_KEYSPACE, above, upto) == keys
            if upto == lsns[-1] and above == middle:  # some keys written above it, not all
                assert 0 < len(want) < len(every)
    layer.close()


def test_hostile_index_arguments_raise_instead_of_reading_out_of_bounds(
    c_extension: None,
) -> None:
    """Safety review of `_blockpack`: a first version far past the file made newest_of_keys
    wrap its offset ((2**61 - 1) * 21 overflows) and read outside the mapping (a crash);
    a key count whose table size overflows, and a negative start of pack_versions (it read
    the list before its first item), are refused. firsts may be an unaligned buffer."""
    assert native.blockpack is not None
    key = rel_key(1)
    for narrow, size, base in ((False, 21, 0), (True, 13, 7)):  # format versions 1 and 2
        file = bytes(size * 4)
        for firsts in ([0, 2**61], [0, 2**64 - 1], [0, 5]):
            packed = struct.pack(f"={len(firsts)}Q", *firsts)
            with pytest.raises(ValueError, match="past the file"):
                native.blockpack.newest_of_keys(key, packed, file, 0, 0, K.KEY_MAX, narrow, base)
        with pytest.raises(ValueError, match="inconsistent index"):
            native.blockpack.newest_of_keys(
                key, struct.pack("=2Q", 0, 1), file, size * 4 + 1, 0, K.KEY_MAX, narrow, base
            )
        unaligned = memoryview(b"\0" + struct.pack("=2Q", 0, 4))[1:]
        found = native.blockpack.newest_of_keys(key, unaligned, file, 0, 0, K.KEY_MAX, narrow, base)
        assert found == [(key, base, 0)]
    for bad in (b"x" * 20, b"x" * 22):
        with pytest.raises(ValueError, match="not whole entries"):
            native.blockpack.narrow_versions(bad, 0)
        with pytest.raises(ValueError, match="not whole entries"):
            native.blockpack.widen_versions(bad, 0)
    for n_keys in (2**62, 2**63 - 1, -1):
        with pytest.raises(ValueError, match="key count"):
            native.blockpack.key_table(b"x" * 22, n_keys, 0)
    for start, limit, block in ((-1, 700, 0), (0, -1, 0), (0, 2**32, 0), (0, 700, 2**32)):
        with pytest.raises(ValueError, match="out of range"):
            native.blockpack.pack_versions(
                [(150, TOMBSTONE)], start, bytearray(), limit, block, bytearray(), 100, 200, 100,
                (Image, WalDelta, Tombstone),
            )  # fmt: skip


def test_a_resigned_damaged_index_raises_layer_corrupt_or_reads(
    tmp_path: Path, c_extension: None
) -> None:
    """A layer file is untrusted on read. Damage the index (key table, version entries) and
    sign it again (index and header CRCs recomputed, as a bug or a hostile writer would):
    opening and every read, through the C key table, newest_of_keys, lower_bound and the C
    chain redo's inputs (`_redo.rebuild_page` over key_versions_raw and its blocks), either
    succeed or raise LayerCorrupt; nothing crashes and no other error escapes."""
    versions = sample_versions(seed=5, n_keys=12)
    good = write_delta(tmp_path, versions, BlockCache(1 << 20))
    raw = good.path.read_bytes()
    header = good.file.header
    keys_at = header.index_offset + header.n_blocks * 20  # _BLOCK_ENTRY: >QIII
    name, path = good.name, good.path
    good.close()
    rng = random.Random(9)
    outcomes: dict[str, int] = {}
    for _ in range(400):
        damaged = bytearray(raw)
        for _ in range(rng.choice((1, 1, 2, 4))):
            at = rng.randrange(keys_at, len(raw))
            damaged[at] = rng.choice((0, 0xFF, rng.randrange(256), damaged[at] ^ 1))
        index = bytes(damaged[header.index_offset :])
        resigned = dataclasses.replace(header, index_crc=crc32c.crc32c(index))
        damaged[:HEADER_SIZE] = resigned.pack()
        assert _parse_header(path, bytes(damaged[:HEADER_SIZE])) == resigned
        path.write_bytes(bytes(damaged))
        try:
            layer = DeltaLayer(tmp_path, name, BlockCache(1 << 20))
            try:
                f = layer.file
                list(layer.iter_encoded())
                list(f.newest_of_keys(0, K.KEY_MAX))
                for key, lsn, _ in versions:
                    f.lower_bound(key)
                    layer.collect(key, lsn, 0)
                for i in range(f.n_keys):
                    entries, first, last = f.key_versions_raw(i)
                    blocks = [f.read_block(b) for b in range(first, last + 1)]
                    if redo_native is not None:
                        part = (entries, first, blocks, 0)
                        redo_native.rebuild_page(bytes(f.key_at(i)), 300, [part], True)
                outcomes["read"] = outcomes.get("read", 0) + 1
            finally:
                layer.close()
        except LayerCorrupt as exc:
            what = str(exc).split(": ", 1)[1].split(" ")[0]
            outcomes[what] = outcomes.get(what, 0) + 1
    assert sum(outcomes.values()) == 400
    assert len(outcomes) > 2, outcomes  # damage of several kinds was found


def _image_layer(directory: Path, pages: list[tuple[K.Key, bytes | None]], how: str) -> bytes:
    """An image layer of `pages` (None: no value) written per key (`add`) or in runs of 37
    keys (`add_values`), its bytes."""
    directory.mkdir()
    writer = ImageLayerWriter(directory, K.FULL_KEYSPACE, 150, SETTINGS)
    if how == "add":
        for key, page in pages:
            if page is not None:
                writer.add(key, page)
    else:
        for at in range(0, len(pages), 37):
            run = pages[at : at + 37]
            writer.add_values([k for k, _ in run], [v for _, v in run])
    layer = writer.finish(BlockCache(1 << 20))
    layer.close()
    return layer.path.read_bytes()


@pytest.mark.usefixtures("c_extension")
def test_add_values_writes_the_bytes_of_add_per_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Image creation's batched add (`_blockpack.pack_values`, `pack_values_python` the
    reference): pages and small values, some keys without one, blocks cut in between: the
    same file as `add` of each, in C and in Python."""
    rng = random.Random(3)
    sizes = [8192, 8192, 8192, 0, 17, 300]
    pages: list[tuple[K.Key, bytes | None]] = [
        (rel_key(blk), None if rng.random() < 0.1 else rng.randbytes(rng.choice(sizes)))
        for blk in range(400)
    ]
    reference = _image_layer(tmp_path / "add", pages, "add")
    assert _image_layer(tmp_path / "c", pages, "values") == reference
    monkeypatch.setattr(native, "blockpack", None)
    assert _image_layer(tmp_path / "py", pages, "values") == reference


@pytest.mark.parametrize("in_c", [True, False])
def test_add_values_refuses_keys_out_of_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, in_c: bool
) -> None:
    if in_c:
        require_c_extension(native.blockpack, "pageserver.storage.layers._blockpack")
    else:
        monkeypatch.setattr(native, "blockpack", None)
    page = bytes(8192)
    for n, keys in enumerate(
        [
            [rel_key(1), rel_key(3), rel_key(2)],  # inside a run
            [rel_key(1), rel_key(1)],  # a repeated key
        ]
    ):
        writer = ImageLayerWriter(tmp_path, K.FULL_KEYSPACE, 150 + n, SETTINGS)
        with pytest.raises(InvalidArgument, match="key order"):
            writer.add_values(keys, [page] * len(keys))
    writer = ImageLayerWriter(tmp_path, K.FULL_KEYSPACE, 160, SETTINGS)
    writer.add_values([rel_key(5)], [page])
    with pytest.raises(InvalidArgument, match="sorted"):  # not above the last run's
        writer.add_values([rel_key(5), rel_key(6)], [page, page])
    assert not list(tmp_path.iterdir())  # every writer aborted: no temp file left
