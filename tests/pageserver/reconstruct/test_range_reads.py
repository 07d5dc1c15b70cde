"""Bulk page reads (`range_reads.rel_pages`, `Timeline.plan_range_read`) equal GetPage
(`materialize`) block by block, on real WAL: after an import (image layers only), with WAL
ingested above them (L0 deltas, open layer), after compaction wrote newer images, and on a
branch with versions of its own; a range only partly under image layers is read key by key."""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from pageserver.ingest.import_datadir import import_datadir
from pageserver.ingest.walingest import WalIngest
from pageserver.reconstruct import range_reads
from pageserver.reconstruct.apply_delta import reconstruct
from pageserver.reconstruct.range_reads import image_tiles, rel_pages
from pageserver.reconstruct.range_rebuild import rebuild_keys
from pageserver.reconstruct.reads import get_rel_size, list_dbs, list_rels, materialize
from pageserver.redo.native import redo as native_redo
from pageserver.storage.compaction import create_image_layers
from pageserver.storage.keys import (
    Key,
    KeyRange,
    database_range,
    key_successor,
    parse_rel_block_key,
    rel_block_key,
)
from pageserver.storage.layers import blocks
from pageserver.storage.layers.blocks import LayerFile
from pageserver.storage.layers.image import ImageLayerWriter
from pageserver.storage.settings import StoreSettings
from pageserver.storage.timeline import Timeline
from pageserver.storage.timeline_store import TimelineStore
from pageserver.storage.values import Image
from pg15.lsn import parse_lsn
from tests.native_ext import require_c_extension
from tests.pageserver.basebackup.test_basebackup_datadir import ingest_wal_until, run_workload
from tests.pgtest import PgTestCluster

SETTINGS = StoreSettings(
    checkpoint_distance=256 * 1024,  # several L0 layers and an open one
    image_layer_target_size=512 * 1024,  # many image layers per database
    compaction_threshold=1000,
)


def check_equal(timeline: Timeline, lsn: int) -> int:
    """Every block of every fork of every database: bulk read == materialize. Returns the
    number of pages compared."""
    compared = 0
    for spc, db in list_dbs(timeline, lsn):
        plan = timeline.plan_range_read(database_range(spc, db), lsn)
        assert plan is not None
        for rel, fork in list_rels(timeline, spc, db, lsn):
            nblocks = get_rel_size(timeline, spc, db, rel, fork, lsn) or 0
            for first, count in ((0, nblocks), (nblocks // 3, nblocks - nblocks // 3)):
                got = list(rel_pages(timeline, plan, spc, db, rel, fork, first, count, lsn))
                want = [
                    materialize(timeline, rel_block_key(spc, db, rel, fork, b), lsn)
                    for b in range(first, first + count)
                ]
                assert got == want, (spc, db, rel, fork, first)
                compared += count
    return compared


@pytest.fixture(scope="module")
def history(
    pg_cluster_module: PgTestCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TimelineStore, Timeline, int, int]]:
    """An initdb'd cluster imported, then the workload's WAL ingested: (store, timeline,
    import LSN, end LSN)."""
    server = pg_cluster_module.create(
        {"wal_keep_size": "1GB", "checkpoint_timeout": "1h", "autovacuum": "off"}, start=False
    )
    store = TimelineStore(tmp_path_factory.mktemp("range") / "store", SETTINGS)
    timeline = store.create_timeline()
    lsn0 = import_datadir(timeline, server.datadir)
    timeline.freeze_and_flush()
    server.start()
    run_workload(server)
    checkpoint = parse_lsn(server.psql("SELECT checkpoint_lsn FROM pg_control_checkpoint()"))
    ingest = WalIngest(timeline)
    end = ingest_wal_until(ingest, server.wal_dir, lsn0, checkpoint)
    server.stop()
    yield store, timeline, lsn0, end
    store.close()


def test_after_import_every_page_comes_from_the_images(
    history: tuple[TimelineStore, Timeline, int, int],
) -> None:
    _store, timeline, lsn0, _end = history
    plan = timeline.plan_range_read(database_range(1663, 5), lsn0)
    assert plan is not None and not plan.slow and len(plan.images) > 1
    assert check_equal(timeline, lsn0) > 100


def test_with_wal_above_the_images_and_after_compaction(
    history: tuple[TimelineStore, Timeline, int, int],
) -> None:
    _store, timeline, _lsn0, end = history
    plan = timeline.plan_range_read(database_range(1663, 5), end)
    assert plan is not None and plan.slow  # the workload's pages
    assert check_equal(timeline, end) > 100
    timeline.freeze_and_flush()
    assert create_image_layers(timeline, reconstruct, force=True) > 0
    after = timeline.plan_range_read(database_range(1663, 5), end)
    assert after is not None and len(after.slow) < len(plan.slow)
    assert check_equal(timeline, end) > 100


def test_on_a_branch_with_versions_of_its_own(
    history: tuple[TimelineStore, Timeline, int, int],
) -> None:
    store, timeline, _lsn0, end = history
    child = store.branch(timeline.timeline_id, at_lsn=end)
    page = bytes([7]) * 8192
    key = rel_block_key(1663, 5, 1259, 0, 0)  # pg_class's first page, replaced
    child.put(key, end + 8, Image(page))
    child.advance_last_record_lsn(end + 8, end)
    plan = child.plan_range_read(database_range(1663, 5), end + 8)
    assert plan is not None and key in plan.slow
    assert check_equal(child, end + 8) > 100
    assert next(rel_pages(child, plan, 1663, 5, 1259, 0, 0, 1, end + 8)) == page


def test_a_range_partly_under_images_is_read_key_by_key(
    history: tuple[TimelineStore, Timeline, int, int], tmp_path: Path
) -> None:
    store, timeline, _lsn0, end = history
    child = store.branch(timeline.timeline_id, at_lsn=end)
    half = KeyRange(database_range(1663, 5).start, rel_block_key(1663, 5, 1259, 0, 0))
    writer = ImageLayerWriter(child.directory, half, end, child.settings)
    child.replace_layers(add=[writer.finish(child.cache)], remove=[])
    assert child.plan_range_read(database_range(1663, 5), end) is None
    assert child.plan_range_read(half, end) is not None


def test_tiles_take_the_newest_image_for_each_piece(
    history: tuple[TimelineStore, Timeline, int, int],
) -> None:
    _store, timeline, _lsn0, end = history
    plan = timeline.plan_range_read(database_range(1663, 5), end)
    assert plan is not None
    whole = database_range(1663, 5)
    tiles = image_tiles(whole, plan.images)
    assert tiles[0][0].start == whole.start and tiles[-1][0].end == whole.end
    for (piece, _), (after, _) in itertools.pairwise(tiles):
        assert piece.end == after.start
    for piece, image in tiles:  # no newer layer holds any key of the piece
        assert image is next(i for i in plan.images if i.key_range.overlaps(piece))
        assert image.key_range.covers(piece)


def test_keys_under_a_newer_image_than_the_oldest_are_neither_slow_nor_redone(
    history: tuple[TimelineStore, Timeline, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images of several LSNs over one database (compaction writes them partition by
    partition): a key is slow only if it has versions above the image holding it, and its
    bulk rebuild reads no delta layer lying wholly below that image."""
    _store, timeline, lsn0, end = history
    whole = database_range(1663, 5)
    at = (lsn0 + end) // 2
    before = timeline.plan_range_read(whole, at)
    assert before is not None and len(before.slow) > 10
    slow = sorted(before.slow)
    part = KeyRange(slow[0], slow[len(slow) // 2])
    writer = ImageLayerWriter(timeline.directory, part, at, timeline.settings)
    for key in timeline.get_keys(part, at):
        writer.add(key, materialize(timeline, key, at))
    timeline.replace_layers(add=[writer.finish(timeline.cache)], remove=[])

    after = timeline.plan_range_read(whole, at)
    assert after is not None
    assert after.slow == {key for key in before.slow if key not in part}
    assert check_equal(timeline, at) > 100

    # A rebuild spanning the part and keys under the import's image reads, of the layers
    # wholly below the part's image, only what the keys outside the part need.
    below = {
        d.path for d in timeline.layer_map().deltas_overlapping(part, -1, at) if d.lsn_end <= at
    }
    assert below  # L0 layers holding versions of the part's keys under the new image
    read: list[tuple[Path, int]] = []
    real = LayerFile.read_block

    def counting(self: LayerFile, b: int) -> bytes:
        read.append((self.path, b))
        return real(self, b)

    def rebuilt(keys: list[Key]) -> set[tuple[Path, int]]:
        read.clear()
        view = timeline.persistent_view(KeyRange(keys[0], key_successor(keys[-1])), at)
        keys = [k for k in keys if k not in view.in_memory]
        assert list(rebuild_keys(timeline, at, view, keys)) == [
            materialize(timeline, k, at) for k in keys
        ]
        return {(path, b) for path, b in read if path in below}

    monkeypatch.setattr(LayerFile, "read_block", counting)
    outside = [k for k in slow if k >= part.end]
    inside = timeline.get_keys(part, at)
    assert len(inside) > 10 and outside
    assert rebuilt(inside + outside) == rebuilt(outside)


def test_a_bulk_read_decompresses_each_image_block_once(
    history: tuple[TimelineStore, Timeline, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of blocks with slow keys is rebuilt whole (the keys only images hold too): the
    images' blocks are decompressed by the rebuild alone (the C chain redo's bulk path),
    not by a scan beside it."""
    require_c_extension(native_redo, "pageserver.redo._redo")
    _store, timeline, lsn0, end = history
    timeline.freeze_and_flush()  # every key in the files: the rebuild reads them all
    whole = database_range(1663, 5)
    # An image of the whole database early in the workload, read later: the pages the
    # workload changed in between are both slow and held by that image.
    imaged, at = lsn0 + (end - lsn0) // 8, lsn0 + (end - lsn0) * 3 // 8
    writer = ImageLayerWriter(timeline.directory, whole, imaged, timeline.settings)
    for key in timeline.get_keys(whole, imaged):
        writer.add(key, materialize(timeline, key, imaged))
    timeline.replace_layers(add=[writer.finish(timeline.cache)], remove=[])
    plan = timeline.plan_range_read(whole, at)
    assert plan is not None and plan.slow
    images = {image.path for image in plan.images}
    reads: list[tuple[Path, int]] = []
    real = LayerFile._block

    def counting(self: LayerFile, b: int, *, use_cache: bool = True, release: bool = True) -> bytes:
        if self.path in images:
            reads.append((self.path, b))
        return real(self, b, use_cache=use_cache, release=release)

    slow_values = partial(rebuild_keys, timeline, at, timeline.persistent_view(whole, at))
    # The fork with the most slow keys that images hold too.
    held = {key for piece, image in image_tiles(whole, plan.images) for key, _ in image.scan(piece)}
    counts = Counter(key[:-4] for key in plan.slow & held if parse_rel_block_key(key))
    prefix, n = counts.most_common(1)[0]
    assert n > 3
    rel, fork = next(
        (r, f) for r, f in list_rels(timeline, 1663, 5, at)
        if rel_block_key(1663, 5, r, f, 0)[:-4] == prefix
    )  # fmt: skip
    nblocks = get_rel_size(timeline, 1663, 5, rel, fork, at) or 0
    monkeypatch.setattr(LayerFile, "_block", counting)
    got = list(rel_pages(timeline, plan, 1663, 5, rel, fork, 0, nblocks, at, slow_values))
    monkeypatch.undo()
    assert got == [
        materialize(timeline, rel_block_key(1663, 5, rel, fork, b), at) for b in range(nblocks)
    ]
    assert reads and len(reads) == len(set(reads))


def test_a_bulk_read_has_its_image_blocks_decompressed_ahead_and_leaves_none(
    history: tuple[TimelineStore, Timeline, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image blocks of a run are decompressed on the pool's threads (`LayerFile.prefetch`)
    and read from there; a reader stopping early leaves none decompressed for nobody."""
    _store, timeline, lsn0, _end = history
    plan = timeline.plan_range_read(database_range(1663, 5), lsn0)
    assert plan is not None and not plan.slow
    images = {image.path for image in plan.images}
    on: list[str] = []
    real = LayerFile._block

    def where(self: LayerFile, b: int, *, use_cache: bool = True, release: bool = True) -> bytes:
        if self.path in images:
            on.append(threading.current_thread().name)
        return real(self, b, use_cache=use_cache, release=release)

    sizes = {
        (rel, fork): get_rel_size(timeline, 1663, 5, rel, fork, lsn0) or 0
        for rel, fork in list_rels(timeline, 1663, 5, lsn0)
    }
    (rel, fork), nblocks = max(sizes.items(), key=lambda item: item[1])
    assert nblocks > 20
    monkeypatch.setattr(LayerFile, "_block", where)
    got = list(rel_pages(timeline, plan, 1663, 5, rel, fork, 0, nblocks, lsn0, read_ahead=True))
    assert on and {name.startswith("layer-unzstd") for name in on} == {True}
    assert got == [
        materialize(timeline, rel_block_key(1663, 5, rel, fork, b), lsn0) for b in range(nblocks)
    ]
    pages = rel_pages(timeline, plan, 1663, 5, rel, fork, 0, nblocks, lsn0, read_ahead=True)
    next(pages)
    assert any(image.file._ahead for image in plan.images)
    pages.close()  # type: ignore[attr-defined]
    assert not any(image.file._ahead for image in plan.images)


def test_a_bulk_rebuild_has_its_delta_blocks_decompressed_ahead(
    history: tuple[TimelineStore, Timeline, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the view the rebuild reads, the delta blocks of the layers above each image are
    decompressed on the pool too (`LayerFile.version_blocks_of`), the pages unchanged, and
    none is left decompressed after the read."""
    require_c_extension(native_redo, "pageserver.redo._redo")
    _store, timeline, lsn0, end = history
    timeline.freeze_and_flush()  # every version in layer files: the rebuild reads them
    # Below the images other tests have written at `end`: the workload's pages are slow.
    end = lsn0 + (end - lsn0) * 3 // 8
    whole = database_range(1663, 5)
    plan = timeline.plan_range_read(whole, end)
    assert plan is not None and plan.slow
    view = timeline.persistent_view(whole, end)
    deltas = {d.path for d in view.layer_map.deltas_overlapping(whole, -1, end)}
    on: list[str] = []
    real = LayerFile._block

    def where(self: LayerFile, b: int, *, use_cache: bool = True, release: bool = True) -> bytes:
        if self.path in deltas and not use_cache:
            on.append(threading.current_thread().name)
        return real(self, b, use_cache=use_cache, release=release)

    slow_values = partial(rebuild_keys, timeline, end, view)
    counts = Counter(key[:-4] for key in plan.slow if parse_rel_block_key(key))
    prefix, _n = counts.most_common(1)[0]
    rel, fork = next(
        (r, f) for r, f in list_rels(timeline, 1663, 5, end)
        if rel_block_key(1663, 5, r, f, 0)[:-4] == prefix
    )  # fmt: skip
    nblocks = get_rel_size(timeline, 1663, 5, rel, fork, end) or 0
    monkeypatch.setattr(LayerFile, "_block", where)
    got = list(
        rel_pages(
            timeline, plan, 1663, 5, rel, fork, 0, nblocks, end, slow_values, view, read_ahead=True
        )
    )
    monkeypatch.undo()
    pooled = sum(name.startswith("layer-unzstd") for name in on)
    assert on and pooled >= len(on) * 3 // 4, (pooled, len(on))
    assert got == [
        materialize(timeline, rel_block_key(1663, 5, rel, fork, b), end) for b in range(nblocks)
    ]
    layers = [*plan.images, *view.layer_map.deltas_overlapping(whole, -1, end)]
    assert not any(layer.file._ahead for layer in layers)


def test_without_read_ahead_every_block_is_read_in_line(
    history: tuple[TimelineStore, Timeline, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a busy machine (no spare core) nothing is decompressed ahead: the pool's thread
    hand-offs only cost CPU there."""
    _store, timeline, lsn0, _end = history
    plan = timeline.plan_range_read(database_range(1663, 5), lsn0)
    assert plan is not None
    on: list[str] = []
    real = LayerFile._block

    def where(self: LayerFile, b: int, *, use_cache: bool = True, release: bool = True) -> bytes:
        on.append(threading.current_thread().name)
        return real(self, b, use_cache=use_cache, release=release)

    (rel, fork), nblocks = max(
        (((r, f), get_rel_size(timeline, 1663, 5, r, f, lsn0) or 0)
         for r, f in list_rels(timeline, 1663, 5, lsn0)),
        key=lambda item: item[1],
    )  # fmt: skip
    monkeypatch.setattr(LayerFile, "_block", where)
    # None kept from one read to the next (the relation may span no more blocks than a
    # thread keeps: its pages begin a block of their own after the previous one's size)
    monkeypatch.setattr(blocks, "RECENT_BLOCKS", 0)
    monkeypatch.setattr(range_reads.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    assert not range_reads.spare_core()
    got = list(rel_pages(timeline, plan, 1663, 5, rel, fork, 0, nblocks, lsn0))
    assert on and set(on) == {threading.current_thread().name}
    monkeypatch.setattr(range_reads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(range_reads.os, "cpu_count", lambda: 2)
    assert range_reads.spare_core()
    on.clear()
    assert list(rel_pages(timeline, plan, 1663, 5, rel, fork, 0, nblocks, lsn0)) == got
    assert {name.startswith("layer-unzstd") for name in on} == {True}
