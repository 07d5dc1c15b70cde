"""NodeStore: ingest goes on while the background flusher writes layers and compacts, up to
MAX_FROZEN_LAYERS waiting; a failed background flush is retried (and raised) on the caller."""

from __future__ import annotations

import errno
import threading
from pathlib import Path

import pytest

from pageserver.history import node_store as node_store_module
from pageserver.history.node_store import MAX_FROZEN_LAYERS, NodeState, NodeStore, StorageHistory
from pageserver.history.snapshots import head_tag, new_snapshot
from pageserver.ingest.lsn_index import LsnIndex
from pageserver.reconstruct.apply_delta import reconstruct
from pageserver.storage.compaction import create_image_layers
from pageserver.storage.keys import KEY_MIN, Key, KeyRange
from pageserver.storage.layers.delta import DeltaLayer
from pageserver.storage.layers.inmemory import InMemoryLayer
from pageserver.storage.settings import StoreSettings
from pageserver.storage.timeline import Timeline
from pg15.constants import RM_XACT_ID
from pg15.records import DecodedRecord
from pg15.rmgr.xact import XLOG_XACT_COMMIT, XLOG_XACT_OPMASK
from tests.pageserver.ingest.test_native_ingest import Workload, workload  # noqa: F401

SMALL = StoreSettings(checkpoint_distance=512 * 1024)
EAGER = StoreSettings(checkpoint_distance=512 * 1024, image_creation_threshold=1)
"""Images for a partition with any delta above its image."""


def imported(tmp_path: Path, base: Path, settings: StoreSettings = SMALL) -> NodeStore:
    store = NodeStore(StorageHistory(tmp_path / "history", settings), "n")
    store.import_datadir(base)
    return store


def batches(w: Workload, size: int = 50) -> list[tuple[list, list]]:  # type: ignore[type-arg]
    return [
        (w.records[i : i + size], [r.data for r in w.raws[i : i + size]])
        for i in range(0, len(w.records), size)
    ]


def half_ingested(
    tmp_path: Path, w: Workload, settings: StoreSettings = SMALL
) -> tuple[NodeStore, list[tuple[list, list]]]:  # type: ignore[type-arg]
    """A store imported from `w`'s base with the first half of its batches ingested, and
    the other half."""
    store = imported(tmp_path, w.base, settings)
    todo = batches(w)
    for records, raws in todo[: len(todo) // 2]:
        store.ingest_batch(records, raws)
    return store, todo[len(todo) // 2 :]


def check_out(store: NodeStore, child: Timeline, lsn: int) -> NodeState:
    """Switch the node to `child`, branched at `lsn`, as a checkout to snapshot n@snap does."""
    state = store.state
    assert state is not None
    return store.switch_to_branch(
        child,
        decode_from=lsn,
        pg_timeline=state.pg_timeline + 1,
        segment_size=state.wal_segment_size,
        parent="n@snap",
        checkout=True,
    )


def test_ingest_goes_on_while_a_flush_runs(workload: Workload, tmp_path: Path) -> None:  # noqa: F811
    store = imported(tmp_path, workload.base)
    timeline = store.timeline
    todo = batches(workload)
    store.flusher.mutex.acquire()  # a long flush (compaction) is running
    blocked = threading.Event()
    done = threading.Event()

    def decode_thread() -> None:
        for records, raws in todo:
            store.ingest_batch(records, raws)
            if timeline.frozen_count >= MAX_FROZEN_LAYERS:
                blocked.set()
            store.maybe_flush()
        done.set()

    thread = threading.Thread(target=decode_thread)
    thread.start()
    try:
        assert blocked.wait(60), "ingest never got MAX_FROZEN_LAYERS ahead of the flusher"
        # Ingest went on past the first freeze without any flush; now it waits (memory bound).
        assert timeline.disk_consistent_lsn < timeline.last_record_lsn
        assert not done.wait(1.0)
        # A batch (50 records, under checkpoint_distance) freezes at most once more.
        assert timeline.frozen_count <= MAX_FROZEN_LAYERS + 1
    finally:
        store.flusher.mutex.release()
    thread.join(120)
    assert done.is_set()
    store.flush()
    assert timeline.disk_consistent_lsn == timeline.last_record_lsn
    store.history.close()


def test_failed_background_flush_is_retried_and_raised_on_the_caller(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = imported(tmp_path, workload.base)
    store.merge_flushes = False  # L0 layers for the compaction to merge, not merged flushes
    full = OSError(errno.ENOSPC, "No space left on device")
    original = Timeline._write_l0
    failing = True

    def write_l0(self: Timeline, layer: InMemoryLayer) -> DeltaLayer:
        if failing:
            raise full
        return original(self, layer)

    monkeypatch.setattr(Timeline, "_write_l0", write_l0)
    raised = 0
    for records, raws in batches(workload):
        store.ingest_batch(records, raws)
        try:
            store.maybe_flush()
        except OSError as exc:
            assert exc is full
            raised += 1
            break
        store.wait_flushed()
    assert raised == 1
    with pytest.raises(OSError):
        store.maybe_flush()  # still failing: retried here, on the caller
    failing = False
    store.maybe_flush()  # the disk has room again: flushed here, and back to the background
    assert store.timeline.disk_consistent_lsn == store.timeline.last_record_lsn
    store.history.close()


def test_failed_background_compaction_is_logged_and_ingest_goes_on(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A compaction is no durability step: its failure (a full disk) neither stops ingest nor
    fails a flush; the next flush's pass compacts."""
    store = imported(tmp_path, workload.base)
    store.merge_flushes = False  # L0 layers for the compaction to merge, not merged flushes
    full = OSError(errno.ENOSPC, "No space left on device")
    original = node_store_module.compact
    failing = True

    def compact(*args: object, **kwargs: object) -> object:
        if failing:
            raise full
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(node_store_module, "compact", compact)
    images_before = len(store.timeline.layer_map().images)
    for records, raws in batches(workload):
        store.ingest_batch(records, raws)
        store.maybe_flush()
    store.wait_compacted()
    timeline = store.timeline
    assert "No space left on device" in caplog.text
    assert store.compaction_totals.passes == 0
    assert len(timeline.layer_map().images) == images_before
    assert len(timeline.layer_map().level0()) >= SMALL.compaction_threshold  # due, not done
    failing = False
    store.flush()
    assert timeline.disk_consistent_lsn == timeline.last_record_lsn
    assert store.compaction_totals.passes >= 1
    assert len(timeline.layer_map().level0()) < SMALL.compaction_threshold
    store.history.close()


def test_an_image_pass_scans_the_keys_only_when_a_partition_is_due(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pass after every flush: with no partition due (the last pass's partitions, judged by
    the layer indexes) it does not scan the keyspace; GC's forced images always do."""
    store = imported(tmp_path, workload.base)
    for records, raws in batches(workload):
        store.ingest_batch(records, raws)
        store.maybe_flush()
    store.flush()  # durable and compacted: nothing due any more
    store.wait_compacted()  # and no pass the background compactor was asked for still runs
    timeline = store.timeline
    passes = store.compaction_totals.passes
    scans = 0
    get_keys = Timeline.get_keys

    def counting(self: Timeline, key_range: KeyRange, lsn: int) -> list[Key]:
        nonlocal scans
        scans += key_range.start == KEY_MIN  # a scan's first piece (compaction._scan_pieces)
        return get_keys(self, key_range, lsn)

    monkeypatch.setattr(Timeline, "get_keys", counting)
    store.flush()
    assert store.compaction_totals.passes == passes + 1
    assert scans == 0
    create_image_layers(timeline, reconstruct, force=True)
    assert scans == 1
    store.history.close()


def test_a_switch_makes_the_old_timelines_tail_durable(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A checkout leaves its old timeline complete: what the node ingested there, up to the
    HEAD{i} snapshot named at its end, is durable after the switch (nothing re-ingests a
    timeline the node has left)."""
    store = imported(tmp_path, workload.base)
    old = store.timeline
    todo = batches(workload)
    half = len(todo) // 2
    for records, raws in todo[:half]:
        store.ingest_batch(records, raws)
    store.flush()
    branch_at = old.last_record_lsn  # durable: the branch itself flushes nothing
    for records, raws in todo[half:]:
        store.ingest_batch(records, raws)
    end = old.last_record_lsn  # where HEAD{i} is named
    assert old.disk_consistent_lsn < end
    child = store.history.timelines.branch(old.timeline_id, branch_at)
    check_out(store, child, branch_at)
    store.close()
    store.history.close()
    history = StorageHistory(tmp_path / "history", SMALL)
    try:
        reopened = history.timelines.get(old.timeline_id)
        assert reopened.last_record_lsn == end
        assert reopened.disk_consistent_lsn == end
    finally:
        history.close()


def test_a_branch_at_the_ingested_end_writes_the_lsn_index_before_the_layers(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A branch where the node's layers do not reach yet (a checkout to a snapshot named a
    moment ago) makes the layers durable; the LSN index must be durable as far first: the
    records the layers hold are never re-ingested, so a crash right after would lose their
    boundaries and commit times for good. Read back from disk without closing the store (a
    close writes the index anyway)."""
    store = imported(tmp_path, workload.base)
    for records, raws in batches(workload):
        store.ingest_batch(records, raws)
    store.wait_flushed()
    timeline = store.timeline
    at = timeline.last_record_lsn
    assert timeline.disk_consistent_lsn < at  # the tail is in memory: the branch writes it
    index = store.index  # in memory: every record ingested observed (sparse entries)
    assert LsnIndex(index.directory, index.segment_size).last_lsn < index.last_lsn
    store.branch(timeline.timeline_id, at)
    assert timeline.disk_consistent_lsn >= at
    assert LsnIndex(index.directory, index.segment_size).last_lsn == index.last_lsn
    store.close()


def test_a_branch_while_a_batch_is_ingested_keeps_the_index_ahead_of_the_layers(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The node still ingests (pg create --snapshot of a running node): a branch from the API
    thread lands while a batch is in the timeline but not yet observed by the LSN index. Its
    flush must not write those records' layers before their index entries (the flush cut
    between batches); read back without closing, every commit the durable layers hold has
    its durable index entry. The batch is held between the two steps until the branch has
    ended, or for 5 s when the branch waits for the batch (as it must). Held where the index
    is told of records already in the timeline, on both ingest paths: `observe_all` after a
    C run, `observe` after a commit the Python reference ingested (the only path under
    NEON_PURE_PYTHON=1, where the C runs take nothing; the records before it are observed
    and need no entry)."""
    store = imported(tmp_path, workload.base)
    todo = batches(workload)
    half = len(todo) // 2
    for records, raws in todo[:half]:
        store.ingest_batch(records, raws)
    timeline = store.timeline
    at = timeline.last_record_lsn
    index = store.index
    held, go = threading.Event(), threading.Event()
    observe_all, observe = index.observe_all, index.observe

    def hold() -> None:  # records in the timeline, not yet in the index
        if not held.is_set():
            assert timeline.last_record_lsn > at
            held.set()
            go.wait(30)

    def held_observe_all(records: list, i: int, j: int) -> None:  # type: ignore[type-arg]
        if j > i:
            hold()
        observe_all(records, i, j)

    def held_observe(record: DecodedRecord) -> None:
        if record.rmgr_id == RM_XACT_ID and record.info & XLOG_XACT_OPMASK == XLOG_XACT_COMMIT:
            hold()  # a record the index keeps an entry for
        observe(record)

    index.observe_all = held_observe_all  # type: ignore[method-assign]
    index.observe = held_observe  # type: ignore[method-assign]

    def ingest_rest() -> None:  # in one batch: its first run of records is long
        records = [r for batch, _ in todo[half:] for r in batch]
        store.ingest_batch(records, [raw for _, raws in todo[half:] for raw in raws])

    ingesting = threading.Thread(target=ingest_rest)
    ingesting.start()
    assert held.wait(30)
    branching = threading.Thread(target=store.branch, args=(timeline.timeline_id, at))
    branching.start()
    branching.join(5)
    go.set()
    ingesting.join(60)
    branching.join(60)
    index.observe_all, index.observe = observe_all, observe  # type: ignore[method-assign]
    durable = timeline.disk_consistent_lsn
    assert durable >= at
    expected = [b for b in index.boundaries() if b <= durable]  # what the index observed
    assert durable > at and any(lsn > at for lsn in expected), "the held batch is not durable"
    on_disk = LsnIndex(index.directory, index.segment_size).boundaries()
    assert on_disk == expected
    store.close()


def test_flush_ahead_writes_what_is_ingested_in_the_background(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A checkout's first request hands what the node ingested to the flusher
    (`flush_ahead`), so its branch later finds the timeline it leaves durable up to there:
    the layers and the LSN index (written first, as every flush does) reach the ingested end
    without the caller writing anything; records ingested after it stay in memory."""
    store, rest = half_ingested(tmp_path, workload)
    store.wait_flushed()
    timeline = store.timeline
    at = timeline.last_record_lsn
    assert timeline.disk_consistent_lsn < at  # the tail is in memory
    index = store.index
    store.flush_ahead()
    store.wait_flushed()
    assert timeline.disk_consistent_lsn == at
    assert LsnIndex(index.directory, index.segment_size).last_lsn == index.last_lsn
    for records, raws in rest:
        store.ingest_batch(records, raws)
    store.wait_flushed()
    assert timeline.disk_consistent_lsn == at < timeline.last_record_lsn
    store.close()


def test_a_snapshots_lsn_gets_images_from_the_next_pass(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
) -> None:
    """`images_at` (a snapshot named at the ingested end): what is ingested goes to the
    flusher, and the pass after it writes image layers at that LSN where due, though ingest
    went on past it meanwhile."""
    store, todo = half_ingested(tmp_path, workload, EAGER)
    store.wait_compacted()
    timeline = store.timeline
    at = timeline.last_record_lsn
    assert at not in {image.lsn for image in timeline.layer_map().images}
    store.images_at(at)
    for records, raws in todo:
        store.ingest_batch(records, raws)
    store.wait_compacted()
    assert timeline.last_record_lsn > at
    assert at in {image.lsn for image in timeline.layer_map().images}
    written = store.compaction_totals.images_written
    store.flush()
    images = {image.lsn for image in timeline.layer_map().images}
    assert at in images and timeline.disk_consistent_lsn in images  # the flush's own pass
    assert store.compaction_totals.images_written > written
    store.close()


def test_a_snapshot_named_before_a_restart_gets_its_images_after_it(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A daemon stopped between a `snapshot create` and its image pass forgot the point; the
    store opened again takes it from the snapshots named on the timeline above its newest
    image layer, when its follower starts (a HEAD{i} of a checkout is no such point)."""
    store, todo = half_ingested(tmp_path, workload, EAGER)
    store.wait_compacted()
    history = store.history
    timeline = store.timeline
    at = timeline.last_record_lsn
    tid = timeline.timeline_id
    history.snapshots.add(new_snapshot("n@s1", "n", tid, at))  # no images_at: "stopped"
    history.snapshots.add(new_snapshot(f"n@{head_tag(1)}", "n", tid, at - 8))
    store.close()
    assert at not in {image.lsn for image in history.timelines.get(tid).layer_map().images}
    store = NodeStore(history, "n")
    store.recall_image_points()  # a follower's start: the pass runs though nothing is ingested
    store.wait_compacted()
    images = {image.lsn for image in store.timeline.layer_map().images}
    assert at in images and at - 8 not in images
    store.recall_image_points()  # once a store
    for records, raws in todo:
        store.ingest_batch(records, raws)
    store.flush()
    assert store.timeline.disk_consistent_lsn in {i.lsn for i in store.timeline.layer_map().images}
    store.close()


def test_flush_ahead_pairs_the_timeline_with_its_own_index(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`flush_ahead` takes the timeline and its LSN index from one state: a checkout's
    switch_to_branch between the two (here while it freezes) had the timeline the node
    left flushed with the new timeline's index (its entries written to the wrong file,
    the old one's never made durable first)."""
    store, rest = half_ingested(tmp_path, workload)
    left = store.timeline
    child = store.branch(left.timeline_id, left.last_record_lsn)  # writes what is ingested
    for records, raws in rest:  # in memory for flush_ahead to hand over
        store.ingest_batch(records, raws)
    store.wait_flushed()
    freeze = store._freeze_rest

    switching: list[bool] = []

    def switched_meanwhile(timeline: Timeline) -> int | None:
        upto = freeze(timeline)
        if not switching:  # once: the switch's own flush of the timeline it leaves freezes
            switching.append(True)
            check_out(store, child, child.ancestor_lsn)
        return upto

    flushed: list[tuple[str, str]] = []

    def recorded(timeline: Timeline, index: LsnIndex, upto: int) -> None:
        flushed.append((timeline.timeline_id, index.directory.name))

    monkeypatch.setattr(store, "_freeze_rest", switched_meanwhile)
    monkeypatch.setattr(store, "_flush_frozen", recorded)
    store.flush_ahead()
    store.wait_flushed()
    assert flushed == [(left.timeline_id, left.timeline_id)]
    store.close()


def test_a_small_layer_is_flushed_once_checkpoint_timeout_passed(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The open layer, far below checkpoint_distance, stays in memory until
    checkpoint_timeout seconds passed since the last flush; the next maybe_flush then
    freezes it and the flusher writes it. (The time passed is the store's clock of its last
    flush moved back, not a sleep: a loaded box cannot make the first part flush.)"""
    settings = StoreSettings(checkpoint_timeout=3600)
    store = NodeStore(StorageHistory(tmp_path / "history", settings), "n")
    store.import_datadir(workload.base)
    timeline = store.timeline
    first, second = batches(workload)[:2]
    store.ingest_batch(*first)
    store.maybe_flush()
    store.wait_flushed()
    assert timeline.disk_consistent_lsn < timeline.last_record_lsn  # in memory
    store._last_flush -= settings.checkpoint_timeout - 600  # not yet: ten minutes short
    store.ingest_batch(*second)
    store.maybe_flush()
    store.wait_flushed()
    assert timeline.disk_consistent_lsn < timeline.last_record_lsn
    store._last_flush -= 600
    store.maybe_flush()
    store.wait_flushed()
    assert timeline.disk_consistent_lsn == timeline.last_record_lsn
    store.close()
