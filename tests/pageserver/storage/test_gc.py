"""GC: every read at a retained LSN, inside the PITR window and at the tip gives the same bytes
after GC as before (model-checked over random histories), layers really go, a crash between
the manifest write and the file deletion reopens cleanly; retention parsing and windows; WAL
archive pruning."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pageserver.storage import keys as K
from pageserver.storage.compaction import compact_level0, create_image_layers
from pageserver.storage.gc import (
    GcSettings,
    gc_timeline,
    keys_at,
    prune_wal_archive,
    removable_layers,
)
from pageserver.storage.retention import (
    Retention,
    RetentionPolicy,
    parse_duration,
    parse_size,
)
from pageserver.storage.settings import StoreSettings
from pageserver.storage.timeline import Timeline
from pageserver.storage.timeline_store import TimelineStore
from pageserver.storage.values import TOMBSTONE, Image, ReconstructData, Value, WalDelta
from pg15.lsn import segment_file_name
from proto.errors import InvalidArgument
from tests.pageserver.storage.layers.test_layer_map import fold

SMALL = StoreSettings(
    checkpoint_distance=2048,
    compaction_threshold=3,
    compaction_target_size=1024,
    image_creation_threshold=2,
    image_layer_target_size=4 * 8192,
    block_size=512,
    block_cache_bytes=1 << 20,
)
EAGER = GcSettings(min_gain_bytes=1, image_cost_ratio=0)
"""Write images at the horizon whenever that frees anything."""


def fake_redo(key: K.Key, lsn: int, rd: ReconstructData) -> bytes | None:
    return fold(rd)


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Crashes are simulated by dropping state; fsync only costs time here."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


def page(blk: int) -> K.Key:
    return K.rel_block_key(1663, 5, 16384, 0, blk)


def record(tl: Timeline, lsn: int, *puts: tuple[K.Key, Value]) -> None:
    tl.put_batch([(key, lsn, value) for key, value in puts])
    tl.advance_last_record_lsn(lsn, tl.last_record_lsn)


def state(tl: Timeline, lsns: list[int], keys: list[K.Key]) -> dict[int, list[bytes | None]]:
    """Every key's value (through the toy redo) and the key listing, at each LSN."""
    out: dict[int, list[bytes | None]] = {}
    for lsn in lsns:
        values = [fold(tl.get_reconstruct_data(key, lsn)) for key in keys]
        listed = tl.get_keys(K.FULL_KEYSPACE, lsn)
        out[lsn] = [*values, b"|".join(listed)]
    return out


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TimelineStore]:
    s = TimelineStore(tmp_path / "store", SMALL)
    yield s
    s.close()


def history(tl: Timeline, n: int, keys: int = 6, start: int = 0) -> list[int]:
    """n records of whole images, one flush every 4 records; returns their LSNs."""
    lsns = []
    for i in range(n):
        lsn = (start + i + 1) * 8 + tl.ancestor_lsn
        record(tl, lsn, (page(i % keys), Image(f"v{lsn}".encode() * 20)))
        lsns.append(lsn)
        if i % 4 == 3:
            tl.freeze_and_flush()
    tl.freeze_and_flush()
    return lsns


# --- read points and coverage -----------------------------------------------------------------


def test_read_points() -> None:
    points = Retention((100, 300), 500, 900)
    assert points.first_at_or_above(50) == 100
    assert points.first_at_or_above(100) == 100
    assert points.first_at_or_above(101) == 300
    assert points.first_at_or_above(301) == 500
    assert points.first_at_or_above(700) == 700
    assert points.first_at_or_above(950) == 950
    assert Retention((), None, 900).first_at_or_above(10) == 900


def test_gc_without_retention_removes_history_below_the_tip(store: TimelineStore) -> None:
    tl = store.create_timeline("aa")
    history(tl, 24)
    keys = [page(i) for i in range(6)]
    before = state(tl, [tl.last_record_lsn], keys)
    n_before = len(tl.layer_map().layers())
    result = gc_timeline(tl, [], None, materialize=fake_redo, settings=EAGER)
    assert result.images_written >= 1
    assert result.removed_layers and result.removed_bytes > 0
    assert result.kept < n_before + result.images_written
    assert not tl.layer_map().deltas  # everything below the tip is superseded by images
    assert state(tl, [tl.last_record_lsn], keys) == before
    for name in result.removed_layers:
        assert not (tl.directory / name.file_name).exists()
    # A second pass has nothing left to do.
    again = gc_timeline(tl, [], None, materialize=fake_redo, settings=EAGER)
    assert again.removed_layers == () and again.images_written == 0


def test_retained_lsn_keeps_its_layers(store: TimelineStore) -> None:
    tl = store.create_timeline("aa")
    lsns = history(tl, 24)
    keys = [page(i) for i in range(6)]
    snap = lsns[9]
    before = state(tl, [snap, tl.last_record_lsn], keys)
    result = gc_timeline(tl, [snap], None, materialize=fake_redo, settings=EAGER)
    assert result.removed_layers  # the layers between the snapshot and the tip go
    assert all(name.lsn_start > snap for name in result.removed_layers)
    assert state(tl, [snap, tl.last_record_lsn], keys) == before


def test_window_keeps_every_lsn_inside(store: TimelineStore) -> None:
    tl = store.create_timeline("aa")
    lsns = history(tl, 32)
    keys = [page(i) for i in range(6)]
    window = lsns[20]
    inside = list(range(window, tl.last_record_lsn + 1))
    before = state(tl, inside, keys)
    result = gc_timeline(tl, [], window, materialize=fake_redo, settings=EAGER)
    assert result.horizon == window and result.removed_layers
    assert all(name.lsn_end - 1 <= window for name in result.removed_layers)
    assert state(tl, inside, keys) == before


def test_default_settings_do_not_write_images_for_a_small_gain(store: TimelineStore) -> None:
    tl = store.create_timeline("aa")
    history(tl, 12)
    n = len(tl.layer_map().layers())
    result = gc_timeline(tl, [], None, materialize=fake_redo)
    assert result.images_written == 0 and result.removed_layers == () and result.kept == n


def test_unchanged_layers_are_not_rescanned_for_the_image_cost(
    store: TimelineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key count GC weighs images against is remembered while the layers that hold the
    versions at its horizon (the timeline's and its ancestors') stay the same: an idle
    node's GC pass no longer walks the keyspace every time; any layer change recounts."""
    parent = store.create_timeline("aa")
    lsns = history(parent, 12)
    child = store.branch("aa", lsns[-1], "bb")
    history(child, 4)
    scans: list[tuple[str, int]] = []
    real = Timeline.get_keys

    def counted(tl: Timeline, key_range: K.KeyRange, lsn: int) -> list[K.Key]:
        scans.append((tl.timeline_id, lsn))
        return real(tl, key_range, lsn)

    monkeypatch.setattr(Timeline, "get_keys", counted)
    never = GcSettings(min_gain_bytes=1, image_cost_ratio=1e9)  # images never pay off
    for _ in range(3):
        result = gc_timeline(child, [], None, materialize=fake_redo, settings=never)
        assert result.images_written == 0 and result.removed_layers == ()
    assert len(scans) == 1
    horizon = child.disk_consistent_lsn
    assert keys_at(child, horizon) == len(real(child, K.FULL_KEYSPACE, horizon)) == 6
    # the ancestor's layers below the branch point change: counted again
    compact_level0(parent, force=True)
    gc_timeline(child, [], None, materialize=fake_redo, settings=never)
    assert len(scans) == 2
    # new keys in the child: counted again, and the new count is the fresh one
    for blk in (6, 7, 8):
        record(child, child.last_record_lsn + 8, (page(blk), Image(b"new" * 20)))
    child.freeze_and_flush()
    gc_timeline(child, [], None, materialize=fake_redo, settings=never)
    assert len(scans) == 3
    horizon = child.disk_consistent_lsn
    assert keys_at(child, horizon) == len(real(child, K.FULL_KEYSPACE, horizon)) == 9
    assert len(scans) == 3


def test_existing_images_let_gc_go_without_writing(store: TimelineStore) -> None:
    tl = store.create_timeline("aa")
    history(tl, 12)
    create_image_layers(tl, fake_redo, force=True)
    history(tl, 4, start=12)
    result = gc_timeline(tl, [], None, materialize=fake_redo)
    assert result.images_written == 0
    assert result.removed_layers and all(not n.is_image for n in result.removed_layers)


def test_parent_keeps_what_a_child_branch_point_needs(store: TimelineStore) -> None:
    parent = store.create_timeline("aa")
    lsns = history(parent, 16)
    branch = lsns[7]
    child = store.branch("aa", branch, "bb")
    history(child, 8)
    history(parent, 8, start=16)
    keys = [page(i) for i in range(6)]
    child_lsns = list(range(branch, child.last_record_lsn + 1, 4))
    child_before = state(child, child_lsns, keys)
    parent_before = state(parent, [parent.last_record_lsn], keys)
    result = gc_timeline(parent, [branch], None, materialize=fake_redo, settings=EAGER)
    assert result.removed_layers
    child_result = gc_timeline(child, [], None, materialize=fake_redo, settings=EAGER)
    assert child_result.images_written  # the child's images hold the inherited keys too
    assert state(child, [child.last_record_lsn], keys) == {
        child.last_record_lsn: child_before[child.last_record_lsn]
    }
    assert state(parent, [parent.last_record_lsn], keys) == parent_before
    # The child GC never touched the parent's layers; the branch point still reads.
    assert state(parent, [branch], keys)[branch][:-1] == child_before[branch][:-1]


def test_crash_between_manifest_and_deletion_reopens_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = TimelineStore(tmp_path / "store", SMALL)
    tl = store.create_timeline("aa")
    history(tl, 24)
    keys = [page(i) for i in range(6)]
    tip = tl.last_record_lsn
    before = state(tl, [tip], keys)
    real_unlink = pathlib.Path.unlink

    def crash(self: pathlib.Path, missing_ok: bool = False) -> None:
        if self.parent == tl.directory:
            raise KeyboardInterrupt("simulated crash")
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(pathlib.Path, "unlink", crash)
    with pytest.raises(KeyboardInterrupt):
        gc_timeline(tl, [], None, materialize=fake_redo, settings=EAGER)
    monkeypatch.setattr(pathlib.Path, "unlink", real_unlink)
    leftovers = sorted(p.name for p in tl.directory.iterdir())
    store.close()
    reopened = TimelineStore(tmp_path / "store", SMALL)
    tl2 = reopened.get("aa")
    named = {layer.name.file_name for layer in tl2.layer_map().layers()}
    on_disk = {p.name for p in tl2.directory.iterdir()} - {"manifest.json"}
    assert on_disk == named and len(leftovers) > len(named) + 1
    assert not tl2.layer_map().deltas
    assert state(tl2, [tip], keys) == before
    reopened.close()


# --- the model test ---------------------------------------------------------------------------

KEYS = [page(i) for i in range(5)]

op: st.SearchStrategy[tuple[str, list[tuple[int, str]]]] = st.one_of(
    st.tuples(
        st.just("rec"),
        st.lists(
            st.tuples(
                st.integers(0, len(KEYS) - 1),
                st.sampled_from(["image", "delta", "init", "tomb"]),
            ),
            min_size=1,
            max_size=3,
            unique_by=lambda t: t[0],
        ),
    ),
    st.tuples(st.just("flush"), st.just([])),
    st.tuples(st.just("l0"), st.just([])),
    st.tuples(st.just("image"), st.just([])),
)


def run_ops(tl: Timeline, ops: list[tuple[str, list[tuple[int, str]]]], salt: str) -> list[int]:
    lsns = []
    for kind, puts in ops:
        if kind == "rec":
            lsn = tl.last_record_lsn + 8
            values: list[tuple[K.Key, Value]] = []
            for k, v in puts:
                payload = f"{salt}{lsn}:{k}".encode() * 10
                value: Value = (
                    Image(payload)
                    if v == "image"
                    else WalDelta(payload, v == "init")
                    if v in ("delta", "init")
                    else TOMBSTONE
                )
                values.append((KEYS[k], value))
            record(tl, lsn, *values)
            lsns.append(lsn)
        elif kind == "flush":
            tl.freeze_and_flush()
        elif kind == "l0":
            tl.freeze_and_flush()
            compact_level0(tl, force=True)
        else:
            tl.freeze_and_flush()
            create_image_layers(tl, fake_redo, force=True)
    tl.freeze_and_flush()
    return lsns


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    ops=st.lists(op, min_size=4, max_size=40),
    child_ops=st.lists(op, max_size=12),
    picks=st.lists(st.floats(0, 1), max_size=3),
    window=st.one_of(st.none(), st.floats(0, 1)),
    branch_at=st.one_of(st.none(), st.floats(0, 1)),
    eager=st.booleans(),
    data=st.data(),
)
def test_gc_model(
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[tuple[str, list[tuple[int, str]]]],
    child_ops: list[tuple[str, list[tuple[int, str]]]],
    picks: list[float],
    window: float | None,
    branch_at: float | None,
    eager: bool,
    data: st.DataObject,
) -> None:
    root = tmp_path_factory.mktemp("gc")
    store = TimelineStore(root, SMALL)
    try:
        tl = store.create_timeline("aa")
        lsns = run_ops(tl, ops, "p")
        tip = tl.last_record_lsn

        def at(fraction: float) -> int:
            return round(fraction * tip)

        retain = sorted({at(p) for p in picks})
        child = None
        if branch_at is not None and lsns:
            branch = at(branch_at)
            child = store.branch("aa", branch, "bb")
            run_ops(child, child_ops, "c")
            retain = sorted({*retain, branch})
            lsns_child = list(range(branch, child.last_record_lsn + 1))
            child_before = state(child, lsns_child, KEYS)
        window_start = None if window is None else at(window)
        window_reads = range(window_start, tip + 1) if window_start is not None else range(0)
        reads = sorted({*retain, tip, *window_reads})
        before = state(tl, reads, KEYS)
        gc_settings = EAGER if eager else GcSettings(min_gain_bytes=1, image_cost_ratio=1.0)
        gc_timeline(tl, retain, window_start, materialize=fake_redo, settings=gc_settings)
        assert state(tl, reads, KEYS) == before
        if child is not None:
            assert state(child, lsns_child, KEYS) == child_before
            gc_timeline(child, [], data.draw(st.none()), materialize=fake_redo, settings=EAGER)
            assert state(child, [child.last_record_lsn], KEYS) == {
                child.last_record_lsn: child_before[child.last_record_lsn]
            }
        # What GC leaves is a consistent store after a restart.
        store.close()
        store = TimelineStore(root, SMALL)
        assert state(store.get("aa"), reads, KEYS) == before
    finally:
        store.close()


def test_removable_layers_never_removes_what_justifies_a_removal(store: TimelineStore) -> None:
    tl = store.create_timeline("aa")
    history(tl, 8)
    create_image_layers(tl, fake_redo, force=True)
    history(tl, 8, start=8)
    create_image_layers(tl, fake_redo, force=True)
    layer_map = tl.layer_map()
    gone = removable_layers(layer_map, Retention((), None, tl.last_record_lsn))
    newest = max(i.lsn for i in layer_map.images)
    kept = {id(x) for x in layer_map.layers()} - {id(x) for x in gone}
    assert kept == {id(i) for i in layer_map.images if i.lsn == newest}


# --- retention --------------------------------------------------------------------------------


def test_parse_retention() -> None:
    assert parse_duration("30d") == 30 * 86400
    assert parse_duration("12h") == 12 * 3600
    assert parse_duration(" 90M ") == 90 * 60
    assert parse_duration("inf") is None
    assert parse_size("10G") == 10 << 30
    assert parse_size("500M") == 500 << 20
    assert parse_size("1.5KiB") == 1536
    assert parse_size("4096") == 4096
    assert parse_size("INF") is None
    for bad in ("", "30", "-1d", "0h", "3y", "d"):
        with pytest.raises(InvalidArgument, match="duration"):
            parse_duration(bad)
    for bad in ("", "10X", "-5M", "0", "G"):
        with pytest.raises(InvalidArgument, match="size"):
            parse_size(bad)
    assert RetentionPolicy.parse("7d", "inf") == RetentionPolicy(7 * 86400.0, None)
    with pytest.raises(InvalidArgument):
        RetentionPolicy(ttl=0)


# --- WAL archive pruning ----------------------------------------------------------------------


def test_prune_wal_archive(tmp_path: Path) -> None:
    seg = 16 << 20
    names = [segment_file_name(1, n, seg) for n in range(1, 6)]
    names.append(segment_file_name(2, 5, seg))
    names.append(segment_file_name(2, 6, seg) + ".partial")
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert prune_wal_archive(tmp_path, seg, 0) == 0
    # Segments 1..3 end at or below 4*seg; segment 4 ends above 4*seg - 1.
    assert prune_wal_archive(tmp_path, seg, 4 * seg) == 3
    assert prune_wal_archive(tmp_path, seg, 4 * seg) == 0
    # Far ahead: every complete segment goes; the partial (newest) one stays.
    assert prune_wal_archive(tmp_path, seg, 100 * seg) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [segment_file_name(2, 6, seg) + ".partial"]
    # Without a partial file the newest complete segment is the resume point: it stays.
    only_complete = tmp_path / "complete"
    only_complete.mkdir()
    for n in (7, 8):
        (only_complete / segment_file_name(1, n, seg)).write_bytes(b"x")
    assert prune_wal_archive(only_complete, seg, 100 * seg) == 1
    assert [p.name for p in only_complete.iterdir()] == [segment_file_name(1, 8, seg)]
