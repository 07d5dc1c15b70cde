"""Timelines and the store: write rules, branching, crash consistency, manifests, compaction,
concurrent reads."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

import pageserver.storage.timeline as timeline_module
from pageserver.storage import keys as K
from pageserver.storage.compaction import compact, compact_level0, create_image_layers
from pageserver.storage.layers.blocks import LayerCorrupt
from pageserver.storage.manifest import MANIFEST_NAME, ManifestCorrupt, read_manifest
from pageserver.storage.settings import StoreSettings
from pageserver.storage.timeline import FutureLsn, Timeline
from pageserver.storage.timeline_store import TimelineStore
from pageserver.storage.values import TOMBSTONE, Image, ReconstructData, Value, WalDelta
from proto.errors import AlreadyExists, Conflict, CorruptData, InvalidArgument, NotFound
from tests.e2e.test_disk_full import take_the_rest

SMALL = StoreSettings(
    checkpoint_distance=4096,
    compaction_threshold=3,
    compaction_target_size=512,
    image_creation_threshold=2,
    image_layer_target_size=8 * 8192,
    block_size=1024,
)


def page(db: int, blk: int, rel: int = 16384) -> K.Key:
    return K.rel_block_key(1663, db, rel, 0, blk)


def record(tl: Timeline, lsn: int, *puts: tuple[K.Key, Value]) -> None:
    tl.put_batch([(key, lsn, value) for key, value in puts])
    tl.advance_last_record_lsn(lsn, tl.last_record_lsn)


@pytest.fixture
def store(tmp_path: Path) -> TimelineStore:
    return TimelineStore(tmp_path / "store", SMALL)


def test_write_rules(store: TimelineStore) -> None:
    tl = store.create_timeline("aa")
    record(tl, 10, (page(5, 0), Image(b"a")), (page(5, 1), Image(b"b")))
    with pytest.raises(InvalidArgument, match="not above the last record LSN"):
        tl.put(page(5, 0), 10, WalDelta(b"x"))
    with pytest.raises(InvalidArgument, match="cannot move back"):
        tl.advance_last_record_lsn(9, None)
    with pytest.raises(InvalidArgument):
        tl.put(K.Key(b"\xff" * 18), 11, Image(b""))
    with pytest.raises(FutureLsn):
        tl.get_reconstruct_data(page(5, 0), 11)
    # Puts above last_record_lsn are invisible until advanced.
    tl.put(page(5, 0), 12, WalDelta(b"d"))
    assert tl.last_record_lsn == 10 and tl.prev_record_lsn == 0
    tl.advance_last_record_lsn(12, 10)
    assert tl.get_reconstruct_data(page(5, 0), 12) == ReconstructData(
        (10, b"a"), ((12, WalDelta(b"d")),)
    )
    assert tl.prev_record_lsn == 10


def test_freeze_cuts_at_last_record_lsn_and_keeps_a_record_in_progress(
    store: TimelineStore,
) -> None:
    tl = store.create_timeline("aa")
    record(tl, 10, (page(5, 0), Image(b"a")))
    tl.put(page(5, 1), 20, Image(b"in progress"))
    tl.freeze_and_flush()
    assert tl.disk_consistent_lsn == 10
    tl.advance_last_record_lsn(20, 10)
    assert tl.get_reconstruct_data(page(5, 1), 20).image == (20, b"in progress")
    tl.freeze_and_flush()
    assert tl.disk_consistent_lsn == 20
    store.close()
    reopened = TimelineStore(store.root, SMALL).get("aa")
    assert reopened.last_record_lsn == 20 and reopened.prev_record_lsn == 10
    assert reopened.get_keys(K.FULL_KEYSPACE, 20) == [page(5, 0), page(5, 1)]


def test_auto_freeze_at_checkpoint_distance(store: TimelineStore) -> None:
    tl = store.create_timeline("aa")
    for i in range(1, 10):
        record(tl, i, (page(5, i), Image(bytes(1000))))
    assert tl.needs_flush
    tl.flush_frozen_layers()
    assert 0 < tl.disk_consistent_lsn < 9 and not tl.needs_flush
    assert len(tl.layer_map().level0()) >= 1


def test_branch_reads_ancestor_at_branch_point_and_copies_nothing(store: TimelineStore) -> None:
    parent = store.create_timeline("aa")
    record(parent, 10, (page(5, 0), Image(b"v10")), (page(5, 1), Image(b"other")))
    record(parent, 20, (page(5, 0), WalDelta(b"p20")))
    child = store.branch("aa", 15, "bb")
    assert child.ancestor is parent and child.ancestor_lsn == 15 and child.last_record_lsn == 15
    assert parent.disk_consistent_lsn >= 15  # the child's data is durable in the parent
    assert list(child.directory.iterdir()) == [child.directory / MANIFEST_NAME]
    record(parent, 30, (page(5, 0), WalDelta(b"p30")))
    record(child, 25, (page(5, 0), WalDelta(b"c25")), (page(5, 2), Image(b"new")))
    assert child.get_reconstruct_data(page(5, 0), 25) == ReconstructData(
        (10, b"v10"), ((25, WalDelta(b"c25")),)
    )
    assert child.get_reconstruct_data(page(5, 0), 12) == ReconstructData((10, b"v10"), ())
    assert parent.get_reconstruct_data(page(5, 0), 30).deltas == (
        (20, WalDelta(b"p20")),
        (30, WalDelta(b"p30")),
    )
    assert child.get_keys(K.database_range(1663, 5), 25) == [page(5, 0), page(5, 1), page(5, 2)]
    assert parent.get_keys(K.database_range(1663, 5), 30) == [page(5, 0), page(5, 1)]
    # A tombstone on the child hides the ancestor's value, also once an image layer exists.
    record(child, 26, (page(5, 1), TOMBSTONE))
    assert child.get_reconstruct_data(page(5, 1), 26).is_empty
    child.freeze_and_flush()
    images = create_image_layers(child, lambda k, lsn, rd: b"M", force=True)
    assert images >= 1
    assert child.get_reconstruct_data(page(5, 1), 26).is_empty
    assert child.get_reconstruct_data(page(5, 0), 26) == ReconstructData((26, b"M"), ())
    assert child.get_keys(K.database_range(1663, 5), 26) == [page(5, 0), page(5, 2)]
    # Grandchild through two ancestors.
    grandchild = store.branch("bb", 25, "cc")
    assert grandchild.get_reconstruct_data(page(5, 1), 25).image == (10, b"other")


def test_branch_validation(store: TimelineStore) -> None:
    parent = store.create_timeline("aa")
    record(parent, 10, (page(5, 0), Image(b"a")))
    with pytest.raises(InvalidArgument, match="only ingested up to"):
        store.branch("aa", 11)
    child = store.branch("aa", 10, "bb")
    with pytest.raises(InvalidArgument, match="branch its ancestor"):
        store.branch("bb", 5)
    with pytest.raises(AlreadyExists):
        store.branch("aa", 10, "bb")
    with pytest.raises(NotFound):
        store.branch("ff", 10)
    with pytest.raises(InvalidArgument, match="invalid timeline id"):
        store.create_timeline("Not-Hex")
    assert child.prev_record_lsn == parent.prev_record_lsn


def test_store_list_reopen_delete(store: TimelineStore) -> None:
    tl = store.create_timeline()
    assert len(tl.timeline_id) == 32
    record(tl, 10, (page(5, 0), Image(b"a")))
    store.branch(tl.timeline_id, 10, "bb")
    assert store.list_timelines() == sorted([tl.timeline_id, "bb"])
    assert store.children(tl.timeline_id) == ["bb"]
    with pytest.raises(Conflict, match="child timelines"):
        store.delete_timeline(tl.timeline_id)
    store.delete_timeline("bb")
    store.delete_timeline(tl.timeline_id)
    assert store.list_timelines() == []
    with pytest.raises(NotFound):
        store.get("bb")
    with pytest.raises(NotFound):
        store.delete_timeline("bb")
    with pytest.raises(Conflict, match="closed"):
        tl.get_reconstruct_data(page(5, 0), 10)


def test_crash_before_flush_loses_only_unflushed_records(store: TimelineStore) -> None:
    tl = store.create_timeline("aa")
    record(tl, 10, (page(5, 0), Image(b"a")))
    tl.freeze_and_flush()
    record(tl, 20, (page(5, 0), WalDelta(b"lost")))
    tl.freeze()  # frozen but never flushed
    # A crash: drop the store without flushing.
    reopened = TimelineStore(store.root, SMALL).get("aa")
    assert reopened.last_record_lsn == reopened.disk_consistent_lsn == 10
    assert reopened.get_reconstruct_data(page(5, 0), 10) == ReconstructData((10, b"a"), ())
    # Ingest resumes from disk_consistent_lsn.
    record(reopened, 20, (page(5, 0), WalDelta(b"again")))
    assert reopened.get_reconstruct_data(page(5, 0), 20).deltas == ((20, WalDelta(b"again")),)


def test_disk_consistent_lsn_advances_only_after_the_manifest(
    store: TimelineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    tl = store.create_timeline("aa")
    record(tl, 10, (page(5, 0), Image(b"a")))
    tl.freeze_and_flush()
    record(tl, 20, (page(5, 0), WalDelta(b"b")))

    def failing_manifest(directory: Path, manifest: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(timeline_module, "write_manifest", failing_manifest)
    with pytest.raises(OSError, match="disk full"):
        tl.freeze_and_flush()
    assert tl.disk_consistent_lsn == 10
    # The layer file was written and fsynced, but no manifest names it: a crash here...
    on_disk = read_manifest(tl.directory)
    assert on_disk.disk_consistent_lsn == 10 and len(on_disk.layers) == 1
    layer_files = [p for p in tl.directory.iterdir() if p.name != MANIFEST_NAME]
    assert len(layer_files) == 2
    monkeypatch.undo()
    # ...and a reopen deletes the leftover and resumes at 10.
    (tl.directory / "something.___temp").write_bytes(b"half")
    (tl.directory / "notes.txt").write_text("not ours, kept")
    reopened = TimelineStore(store.root, SMALL).get("aa")
    assert reopened.disk_consistent_lsn == 10
    names = sorted(p.name for p in reopened.directory.iterdir())
    assert names == sorted([MANIFEST_NAME, "notes.txt", on_disk.layers[0].name.file_name])


def test_corrupt_manifest_and_missing_or_damaged_layers(tmp_path: Path) -> None:
    store = TimelineStore(tmp_path, SMALL)
    tl = store.create_timeline("aa")
    record(tl, 10, (page(5, 0), Image(b"a" * 100)))
    tl.freeze_and_flush()
    store.close()
    manifest_path = tl.directory / MANIFEST_NAME
    good = manifest_path.read_bytes()
    layer_path = tl.directory / read_manifest(tl.directory).layers[0].name.file_name

    manifest_path.write_bytes(good.replace(b'"0/0000000A"', b'"0/0000000B"'))
    with pytest.raises(ManifestCorrupt, match="checksum mismatch"):
        TimelineStore(tmp_path, SMALL).get("aa")
    manifest_path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CorruptData, match="manifest"):
        TimelineStore(tmp_path, SMALL).get("aa")
    manifest_path.write_bytes(good)

    raw = layer_path.read_bytes()
    layer_path.write_bytes(raw[:-1])
    with pytest.raises(LayerCorrupt, match=str(layer_path)):
        TimelineStore(tmp_path, SMALL).get("aa")
    damaged = bytearray(raw)
    damaged[-3] ^= 0xFF  # in the index
    layer_path.write_bytes(bytes(damaged))
    with pytest.raises(LayerCorrupt, match="index checksum"):
        TimelineStore(tmp_path, SMALL).get("aa")
    layer_path.unlink()
    with pytest.raises(LayerCorrupt, match="missing"):
        TimelineStore(tmp_path, SMALL).get("aa")


def _fill(tl: Timeline, start_lsn: int, n_records: int, pages: int) -> int:
    lsn = start_lsn
    for i in range(n_records):
        lsn += 8
        blk = i % pages
        value = Image(bytes([i % 256]) * 200) if i < pages else WalDelta(b"r%d" % i)
        record(tl, lsn, (page(5, blk), value))
        if i % 10 == 9:
            tl.freeze_and_flush()
    tl.freeze_and_flush()
    return lsn


def _redo(key: K.Key, lsn: int, rd: ReconstructData) -> bytes:
    assert rd.image is not None
    return rd.image[1] + b"".join(d.record for _, d in rd.deltas)


def test_compaction_merges_l0_and_writes_images(store: TimelineStore) -> None:
    tl = store.create_timeline("aa")
    last = _fill(tl, 0, 60, pages=8)
    expected = {
        key: _redo(key, last, tl.get_reconstruct_data(key, last))
        for key in tl.get_keys(K.FULL_KEYSPACE, last)
    }
    l0_before = tl.layer_map().level0()
    assert len(l0_before) >= SMALL.compaction_threshold
    merged, written = compact_level0(tl)
    assert merged == len(l0_before) and written >= 2
    assert tl.layer_map().level0() == []
    assert not any(layer.path.exists() for layer in l0_before)
    ranges = [d.key_range for d in tl.layer_map().deltas]
    assert all(not a.overlaps(b) for i, a in enumerate(ranges) for b in ranges[i + 1 :])
    result = compact(tl, _redo)
    assert result.images_written >= 1
    for key, value in expected.items():
        rd = tl.get_reconstruct_data(key, last)
        assert rd == ReconstructData((last, value), ()), K.describe(key)
    # Reads below the image LSN still walk the deltas.
    assert tl.get_reconstruct_data(page(5, 0), 8).image == (8, bytes([0]) * 200)
    store.close()
    reopened = TimelineStore(store.root, SMALL).get("aa")
    for key, value in expected.items():
        assert reopened.get_reconstruct_data(key, last).image == (last, value)
    assert {p.name for p in reopened.directory.iterdir()} == {MANIFEST_NAME} | {
        layer.name.file_name for layer in reopened.layer_map().layers()
    }


def test_reads_are_safe_during_ingest_flush_and_compaction(store: TimelineStore) -> None:
    tl = store.create_timeline("aa")
    record(tl, 1, *((page(5, b), Image(b"base%d" % b)) for b in range(16)))
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                lsn = tl.last_record_lsn
                for b in range(16):
                    rd = tl.get_reconstruct_data(page(5, b), lsn)
                    assert rd.image is not None and rd.image[1].startswith(b"base")
                    assert all(d_lsn <= lsn for d_lsn, _ in rd.deltas)
                    deltas = [d_lsn for d_lsn, _ in rd.deltas]
                    assert deltas == sorted(deltas)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    lsn = 1
    for i in range(300):
        lsn += 1
        record(tl, lsn, (page(5, i % 16), WalDelta(b"%d" % i)))
        if i % 25 == 0:
            tl.freeze_and_flush()
        if i % 100 == 99:
            compact_level0(tl, force=True)
    stop.set()
    for t in threads:
        t.join()
    assert errors == []


def test_bulk_ingest_is_fast_enough(tmp_path: Path) -> None:
    """100k puts and a flush: per-key appends and one sort, no per-put I/O."""
    tl = TimelineStore(tmp_path).create_timeline("aa")
    started = time.monotonic()
    lsn = 0
    values = [WalDelta(b"x" * 40) for _ in range(8)]
    for i in range(20_000):
        lsn += 1
        tl.put_batch([(page(5, (i * 7 + j) % 5000), lsn, values[j]) for j in range(5)])
        tl.advance_last_record_lsn(lsn, lsn - 1)
    tl.freeze_and_flush()
    elapsed = time.monotonic() - started
    assert elapsed < 10, elapsed
    assert tl.disk_consistent_lsn == lsn
    assert len(tl.get_reconstruct_data(page(5, 3), lsn).deltas) == 20


def test_an_import_cut_short_is_removed_when_the_store_opens(tmp_path: Path) -> None:
    """A pageserver killed during an import leaves an `importing` timeline: the next open of
    the store removes it with its layers; a completed import stays."""
    store = TimelineStore(tmp_path / "s")
    cut = store.create_timeline(importing=True)
    done = store.create_timeline(importing=True)
    for timeline in (cut, done):
        timeline.put(K.rel_block_key(1663, 5, 1000, 0, 0), 0x100, Image(b"x" * 8192))
        timeline.advance_last_record_lsn(0x100, None)
        timeline.freeze_and_flush()
    store.complete_import(done.timeline_id)
    assert sorted(store.list_timelines()) == sorted([cut.timeline_id, done.timeline_id])
    store.close()  # as a SIGKILL would leave it: nothing else runs at exit
    reopened = TimelineStore(tmp_path / "s")
    try:
        assert reopened.list_timelines() == [done.timeline_id]
        assert not (tmp_path / "s" / "timelines" / cut.timeline_id).exists()
        assert reopened.get(done.timeline_id).last_record_lsn == 0x100
    finally:
        reopened.close()


def test_a_timeline_made_on_a_full_disk_leaves_nothing(tmp_path: Path) -> None:
    """A full disk while an import's timeline is made (its manifest cannot be written): the
    error, and no directory left behind (one was, holding neither a manifest to list it by
    nor the `importing` marker that has it swept); once there is room the same id is made."""
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)], check=True)
    try:
        store = TimelineStore(where / "s", SMALL)
        try:
            take_the_rest(where / "filler")
            with pytest.raises(OSError) as failed:
                store.create_timeline("aa", importing=True)
            assert failed.value.errno == errno.ENOSPC
            assert os.listdir(where / "s" / "timelines") == []
            (where / "filler").unlink()
            made = store.create_timeline("aa", importing=True)
            assert store.list_timelines() == ["aa"] and (made.directory / "importing").exists()
        finally:
            store.close()
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_directory_made_by_another_is_refused_and_left_alone(
    store: TimelineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review L4 (session 25): another process makes the timeline's directory after the store
    looked for it and before its own mkdir. The timeline is refused (AlreadyExists) and the
    other's directory kept whole: it was removed with what the failed creation "made"."""
    real_path = store._path

    class Raced(type(Path())):  # type: ignore[misc]
        def mkdir(self, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
            Path(self).mkdir(parents=True)  # the other process's, just before ours
            (Path(self) / "theirs").write_bytes(b"not the store's")
            super().mkdir(mode, parents, exist_ok)

    monkeypatch.setattr(store, "_path", lambda timeline_id: Raced(real_path(timeline_id)))
    with pytest.raises(AlreadyExists, match="timeline bb already exists"):
        store.create_timeline("bb")
    monkeypatch.undo()
    assert (real_path("bb") / "theirs").read_bytes() == b"not the store's"
    assert store.list_timelines() == []
