"""ImageRunWriter.add_pages (a relation file's pages a chunk at a time, as imports add them):
the same layer files, byte for byte, as `add` of each not-all-zero page, wherever chunks,
blocks and layer cuts fall, whether the chunks are bytes or views into a larger buffer (an
import's decompressed frames, not copied) and with the C loop or its Python reference; the
pages read back as written; keys out of order or past the range are refused."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from pageserver.storage.keys import FULL_KEYSPACE, KEY_MAX, Key, KeyRange, make_key, rel_size_key
from pageserver.storage.layers import native
from pageserver.storage.layers.image import ImageRunWriter, nonzero_pages_python
from pageserver.storage.settings import StoreSettings
from pageserver.storage.timeline_store import TimelineStore
from pg15.constants import BLCKSZ
from proto.errors import InvalidArgument
from tests.native_ext import require_c_extension

SETTINGS = StoreSettings(image_layer_target_size=7 * BLCKSZ + 100)  # cuts inside chunks


def key(rel: int, blk: int) -> Key:
    return make_key(0, 1663, 5, rel, 0, blk)


def page(rng: random.Random) -> bytes:
    """About a third all zeros (holes import_datadir does not store); some zero but for
    their first or last byte (stored: the zero test looks at every byte)."""
    pick = rng.random()
    if pick < 0.3:
        return bytes(BLCKSZ)
    if pick < 0.4:
        return bytes(BLCKSZ - 1) + b"\x01" if pick < 0.35 else b"\x01" + bytes(BLCKSZ - 1)
    return rng.randbytes(16) * (BLCKSZ // 16)


def relation(rng: random.Random, n: int) -> bytes:
    return b"".join(page(rng) for _ in range(n))


def written(
    root: Path, chunked: bool, rels: dict[int, bytes], seed: int, views: bool = False,
    settings: StoreSettings = SETTINGS,
) -> dict[str, bytes]:  # fmt: skip
    """The layer files of a run over `rels` (relnode -> pages), each followed by its size
    key; pages added chunk by chunk (random chunk sizes; `views`: memoryview slices of a
    larger buffer, as an import passes a frame's pages) or one by one. The run's pages must
    read back as added."""
    store = TimelineStore(root, settings)
    rng = random.Random(seed)
    expected = {key(1, 0): b"a small value first"}
    try:
        timeline = store.create_timeline()
        run = ImageRunWriter(timeline.directory, 100, timeline.settings, timeline.cache)
        run.add(key(1, 0), b"a small value first")
        for rel, data in sorted(rels.items()):
            n, at = len(data) // BLCKSZ, 0
            framed = memoryview(b"tar header" + data + b"next member")[10 : 10 + len(data)]
            expected.update(
                (key(rel, i), data[i * BLCKSZ : (i + 1) * BLCKSZ])
                for i in range(n)
                if data[i * BLCKSZ : (i + 1) * BLCKSZ] != bytes(BLCKSZ)
            )
            expected[rel_size_key(1663, 5, rel, 0)] = n.to_bytes(4, "little")
            while at < n:
                take = min(n - at, rng.choice([1, 2, 3, 5, 16, 40]))
                chunk = data[at * BLCKSZ : (at + take) * BLCKSZ]
                if chunked:
                    run.add_pages(
                        key(rel, at), framed[at * BLCKSZ : (at + take) * BLCKSZ] if views else chunk
                    )
                else:
                    for i in range(take):
                        page = chunk[i * BLCKSZ : (i + 1) * BLCKSZ]
                        if page != bytes(BLCKSZ):
                            run.add(key(rel, at + i), page)
                at += take
            run.add(rel_size_key(1663, 5, rel, 0), n.to_bytes(4, "little"))
        layers = run.finish()
        assert len(layers) > 5
        read = {k: v for x in layers for k, v in x.scan(FULL_KEYSPACE)}
        assert read == expected
        return {x.path.name: x.path.read_bytes() for x in layers}
    finally:
        store.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_chunks_write_the_files_pages_write(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    rels = {1000 + i: relation(rng, rng.randint(1, 60)) for i in range(4)}
    one_by_one = written(tmp_path / "pages", False, rels, seed)
    assert written(tmp_path / "chunks", True, rels, seed) == one_by_one
    assert written(tmp_path / "views", True, rels, seed, views=True) == one_by_one
    monkeypatch.setattr(native, "blockpack", None)  # the Python references
    assert written(tmp_path / "py-chunks", True, rels, seed) == one_by_one
    assert written(tmp_path / "py-views", True, rels, seed, views=True) == one_by_one


@pytest.mark.parametrize("block_size", [BLCKSZ // 2, BLCKSZ + 1, 3 * BLCKSZ + 10])
def test_block_cuts_in_c_equal_the_python_reference(
    tmp_path: Path, block_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks smaller than a page (one image each), holding exactly one, and three: the C
    loop sizes a block's buffer for the images that fit before it copies them."""
    require_c_extension(native.blockpack, "pageserver.storage.layers._blockpack")
    settings = dataclasses.replace(SETTINGS, block_size=block_size)
    rng = random.Random(block_size)
    rels = {1000 + i: relation(rng, rng.randint(20, 60)) for i in range(3)}
    c = written(tmp_path / "c", True, rels, 4, views=True, settings=settings)
    monkeypatch.setattr(native, "blockpack", None)
    assert written(tmp_path / "py", True, rels, 4, settings=settings) == c
    assert written(tmp_path / "pages", False, rels, 4, settings=settings) == c


def test_bad_offsets_are_refused_in_c(tmp_path: Path) -> None:
    require_c_extension(native.blockpack, "pageserver.storage.layers._blockpack")
    assert native.blockpack is not None
    prefix = key(1000, 0)[:-4]
    data = b"".join(bytes([i + 1]) * BLCKSZ for i in range(8))
    for offsets in ([0, 2 * BLCKSZ, BLCKSZ + 1], [0, 8 * BLCKSZ], [-BLCKSZ]):
        keys: list[bytes] = []
        buf, entries = bytearray(b"open"), bytearray()
        with pytest.raises(ValueError, match="offset is out of range"):
            native.blockpack.pack_images(
                prefix, 0, data, offsets, 0, BLCKSZ, keys, buf, 1 << 20, 0, entries, 0, 100
            )
        # what was appended before the bad offset (its pages too), and nothing of it
        good = offsets[: len(keys)]
        assert buf == b"open" + b"".join(b"\x01" + data[o : o + BLCKSZ] for o in good)
        assert len(entries) == 21 * len(keys) and len(keys) == len(offsets) - 1


def test_nonzero_pages_in_c_equals_the_python_reference() -> None:
    require_c_extension(native.blockpack, "pageserver.storage.layers._blockpack")
    assert native.blockpack is not None
    rng = random.Random(5)
    data = relation(rng, 200)
    found = native.blockpack.nonzero_pages(memoryview(data), BLCKSZ)
    assert found == nonzero_pages_python(data) == nonzero_pages_python(memoryview(data))
    assert 0 < len(found) < 200
    assert native.blockpack.nonzero_pages(memoryview(b"x" + data)[1:], BLCKSZ) == found
    assert native.blockpack.nonzero_pages(b"", BLCKSZ) == []
    with pytest.raises(ValueError, match="whole pages"):
        native.blockpack.nonzero_pages(data[:-1], BLCKSZ)


def test_chunk_of_zero_pages_adds_nothing(tmp_path: Path) -> None:
    store = TimelineStore(tmp_path / "store", SETTINGS)
    try:
        timeline = store.create_timeline()
        run = ImageRunWriter(timeline.directory, 100, timeline.settings, timeline.cache)
        run.add_pages(key(1000, 0), bytes(3 * BLCKSZ))
        run.add(key(1000, 1), b"x")  # nothing was added at blocks 0..2
        [layer] = run.finish()
        assert layer.get(key(1000, 0)) is None
        assert layer.get(key(1000, 1)) == b"x"
    finally:
        store.close()


@pytest.mark.parametrize(
    ("before", "first", "data", "match"),
    [
        (key(1000, 5), key(1000, 5), b"p" * BLCKSZ, "sorted"),  # at the last key
        (key(1000, 5), key(1000, 3), b"p" * 4 * BLCKSZ, "sorted"),  # starts below it
        (None, key(1000, 0), b"p" * 100, "whole pages"),
        (None, key(1000, 0xFFFFFFFE), b"p" * 2 * BLCKSZ, "past the last block"),
    ],
)
def test_bad_chunks_are_refused_and_leave_no_file(
    tmp_path: Path, before: Key | None, first: Key, data: bytes, match: str
) -> None:
    store = TimelineStore(tmp_path / "store", SETTINGS)
    try:
        timeline = store.create_timeline()
        existing = set(timeline.directory.iterdir())
        run = ImageRunWriter(timeline.directory, 100, timeline.settings, timeline.cache)
        if before is not None:
            run.add(before, b"x")
        with pytest.raises(InvalidArgument, match=match):
            run.add_pages(first, data)
        run.abort()
        assert set(timeline.directory.iterdir()) == existing
    finally:
        store.close()


def test_chunk_past_the_run_range_is_refused(tmp_path: Path) -> None:
    store = TimelineStore(tmp_path / "store", SETTINGS)
    try:
        timeline = store.create_timeline()
        existing = set(timeline.directory.iterdir())
        run = ImageRunWriter(
            timeline.directory, 100, timeline.settings, timeline.cache,
            KeyRange(key(1000, 0), key(1000, 4)),
        )  # fmt: skip
        with pytest.raises(InvalidArgument, match="outside the image run's key range"):
            run.add_pages(key(1000, 2), b"p" * 2 * BLCKSZ + b"q" * BLCKSZ)  # block 4
        assert set(timeline.directory.iterdir()) == existing
        run = ImageRunWriter(timeline.directory, 100, timeline.settings, timeline.cache)
        run.add_pages(key(1000, 2), b"p" * 2 * BLCKSZ)
        assert run.finish()[-1].name.key_range.end == KEY_MAX
    finally:
        store.close()
