"""A compaction in progress: the store's shutdown cancels it (no lost or half-visible layer,
reads after a restart equal those before), and a timeline switch (checkout) does not wait
for it. The compaction is real; a gate holds it at one point (in the L0 merge, or in image
creation at a partition begun after the first was written) until the test lets it go on."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pageserver.history import flusher as flusher_module
from pageserver.history import node_store as node_store_module
from pageserver.history.flusher import FOREGROUND
from pageserver.history.node_store import NodeStore, StorageHistory
from pageserver.reconstruct.apply_delta import reconstruct
from pageserver.storage import compaction as compaction_module
from pageserver.storage.keys import FULL_KEYSPACE, Key
from pageserver.storage.layers import blocks as blocks_module
from pageserver.storage.layers import native as layers_native
from pageserver.storage.layers.delta import DeltaLayerWriter
from pageserver.storage.layers.names import parse_layer_name
from pageserver.storage.manifest import MANIFEST_NAME, read_manifest
from pageserver.storage.settings import StoreSettings
from pageserver.storage.timeline import Timeline
from tests.native_ext import require_c_extension
from tests.pageserver.history.test_node_store import check_out
from tests.pageserver.ingest.test_native_ingest import Workload, workload  # noqa: F401

KiB = 1024
MERGING = StoreSettings(checkpoint_distance=512 * KiB)
"""Many L0 layers (one per 512 KiB of values): the pass merges them (compaction_threshold)."""
IMAGING = StoreSettings(
    checkpoint_distance=512 * KiB, compaction_threshold=1000, image_layer_target_size=256 * KiB
)
"""No L0 merge; image creation due in many small partitions."""


class Gate:
    """Holds the compactor at its first arrival until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.held: object = None  # what the held call was for (an image partition's range)

    def hold(self) -> None:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(120), "the test never released the compaction"


def gate_compaction(monkeypatch: pytest.MonkeyPatch, phase: str) -> Gate:
    gate = Gate()
    if phase == "l0":

        def merging(n: int) -> None:
            if n == 100:
                gate.hold()

        on_merged_key(monkeypatch, merging)
    else:
        rebuild = node_store_module.rebuild_range
        calls = itertools.count(1)
        workers = compaction_module.IMAGE_WORKERS
        monkeypatch.setattr(compaction_module, "image_workers", lambda: workers)

        def rebuilding(*args: object, **kwargs: object) -> object:
            # the first partition's layer is written (IMAGE_WORKERS are rebuilt at once: the
            # next one begins when the first is done), and this one begins
            if next(calls) == workers + 1:
                gate.held = args[1]  # rebuild_range(timeline, key_range, ...)
                gate.hold()
            return rebuild(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(node_store_module, "rebuild_range", rebuilding)
    return gate


def ingested(
    tmp_path: Path, w: Workload, settings: StoreSettings, monkeypatch: pytest.MonkeyPatch,
    phase: str,
) -> tuple[NodeStore, Gate, dict[Key, bytes | None]]:  # fmt: skip
    """The workload ingested through the background flusher with compaction held back (its
    requests wait): many frozen layers written, none compacted; every page read at the last
    LSN; then the compaction the flushes requested starts, and stops at the gate."""
    store = NodeStore(StorageHistory(tmp_path / "history", settings), "n")
    store.merge_flushes = False  # L0 layers for the compaction to merge, not merged flushes
    store.import_datadir(w.base)
    with store.compactor.mutex:
        for i in range(0, len(w.records), 50):
            store.ingest_batch(w.records[i : i + 50], [r.data for r in w.raws[i : i + 50]])
            store.maybe_flush()
        store.wait_flushed()
        timeline = store.timeline
        before = read_all(timeline, timeline.last_record_lsn)
        gate = gate_compaction(monkeypatch, phase)
    assert gate.entered.wait(120), "the compaction never reached the gate"
    return store, gate, before


def read_all(timeline: Timeline, lsn: int) -> dict[Key, bytes | None]:
    return {
        key: reconstruct(key, lsn, timeline.get_reconstruct_data(key, lsn))
        for key in timeline.get_keys(FULL_KEYSPACE, lsn)
    }


def check_directory(timeline_dir: Path) -> None:
    """Every layer file on disk is named by the manifest and every named one is whole."""
    manifest = read_manifest(timeline_dir)
    named = {entry.name.file_name: entry.size for entry in manifest.layers}
    on_disk = {p.name: p.stat().st_size for p in timeline_dir.iterdir() if p.name != MANIFEST_NAME}
    stray = {n for n in on_disk if n not in named}
    assert not stray, f"files the manifest does not name (half-visible): {sorted(stray)}"
    assert all(parse_layer_name(n) is not None for n in on_disk)
    assert on_disk == named


def on_merged_key(monkeypatch: pytest.MonkeyPatch, hook: Callable[[int], None]) -> None:
    """hook(n) as an L0 merge takes its n-th key (from 0), on whichever merge runs: the
    Python loop (NEON_PURE_PYTHON=1), or the C one made to come back to Python (and check
    whether it is cancelled) after every key instead of every MERGE_MAX_KEYS."""
    n = itertools.count()
    if layers_native.blockpack is None:
        merge = compaction_module._merge_same_keys

        def merging(groups: Iterable[tuple[Key, int, list[tuple[int, bytes]]]]) -> Iterator:  # type: ignore[type-arg]
            for item in merge(groups):
                hook(next(n))
                yield item

        monkeypatch.setattr(compaction_module, "_merge_same_keys", merging)
        return
    monkeypatch.setattr(blocks_module, "MERGE_MAX_KEYS", 1)
    add_merged = DeltaLayerWriter.add_merged

    def adding(self: DeltaLayerWriter, *args: Any) -> int:
        hook(next(n))
        return add_merged(self, *args)

    monkeypatch.setattr(DeltaLayerWriter, "add_merged", adding)


def count_merged_keys(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A one-item list counting the keys L0 merges have written so far."""
    merged = [0]

    def counting(_n: int) -> None:
        merged[0] += 1

    on_merged_key(monkeypatch, counting)
    return merged


def run_in_thread(fn: Callable[[], object]) -> threading.Thread:
    thread = threading.Thread(target=fn)
    thread.start()
    return thread


@pytest.mark.parametrize("phase", ["l0", "images"])
def test_close_cancels_a_running_compaction(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    phase: str,
) -> None:
    caplog.set_level(logging.INFO, logger=node_store_module.__name__)
    settings = MERGING if phase == "l0" else IMAGING
    store, gate, before = ingested(tmp_path, workload, settings, monkeypatch, phase)
    timeline = store.timeline
    lsn, durable = timeline.last_record_lsn, timeline.disk_consistent_lsn
    layers = timeline.layer_map()
    level0, images = layers.level0(), layers.images
    assert len(level0) >= (settings.compaction_threshold if phase == "l0" else 3)

    closing = run_in_thread(store.close)
    assert store.compactor.cancelled.wait(10)
    # close waits for the compaction to end: it is held at the gate.
    closing.join(1.0)
    assert closing.is_alive()
    gate.release.set()
    closing.join(120)
    assert not closing.is_alive()
    assert "cancelled" in caplog.text
    assert store.compaction_totals.passes == 0  # the pass did not finish
    after = timeline.layer_map()
    if phase == "l0":
        # The merge was not published: every L0 layer is still there, no L1 layer is new.
        old_l1 = [x for x in layers.layers() if not x.name.is_image and x not in level0]
        assert all(x in after.level0() for x in level0)
        assert [x for x in after.layers() if not x.name.is_image and x not in after.level0()] == (
            old_l1
        )
    else:
        # The first partition, written before the cancel, was published whole; the held one
        # was deleted (the other worker's partitions ended before the cancel or were
        # deleted too).
        new = [x for x in after.images if x not in images]
        assert new and all(x.lsn == durable for x in new)  # the pass's LSN
        assert gate.held is not None and all(x.key_range != gate.held for x in new)
    timeline_dir = timeline.directory
    store.history.close()

    check_directory(timeline_dir)
    reopened = NodeStore(StorageHistory(tmp_path / "history", settings), "n")
    again = reopened.timeline
    assert again.disk_consistent_lsn == lsn  # close flushed everything ingested
    assert read_all(again, lsn) == before
    reopened.close()
    reopened.history.close()


def test_switch_to_a_branch_does_not_wait_for_a_compaction(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A checkout (or pg create --snapshot) during a long compaction: the switch waits for the
    frozen layers, not for the compaction, which goes on over the old timeline."""
    store, gate, before = ingested(tmp_path, workload, MERGING, monkeypatch, "l0")
    parent = store.timeline
    lsn = parent.last_record_lsn
    level0 = parent.layer_map().level0()

    child = store.history.timelines.branch(parent.timeline_id, lsn)
    switched: list[object] = []
    switching = run_in_thread(lambda: switched.append(check_out(store, child, lsn)))
    switching.join(30)
    assert not switching.is_alive() and switched, "the switch waited for the compaction"
    assert store.compactor.busy and not gate.release.is_set()
    assert store.timeline is child
    assert read_all(child, lsn) == before

    gate.release.set()
    store.wait_compacted()
    assert store.compaction_totals.passes >= 1
    # The merge went on and was published.
    assert not [x for x in parent.layer_map().level0() if x in level0]
    assert read_all(parent, lsn) == before
    assert read_all(child, lsn) == before
    store.close()
    store.history.close()
    reopened = NodeStore(StorageHistory(tmp_path / "history", MERGING), "n")
    assert reopened.timeline.timeline_id == child.timeline_id
    assert read_all(reopened.timeline, lsn) == before
    reopened.history.close()


def test_compaction_pauses_while_a_foreground_request_runs(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While a request someone waits for runs (and LINGER after), a compaction pass stands at
    its next check; it goes on afterwards, and a shutdown meanwhile ends it at once."""
    monkeypatch.setattr(flusher_module, "LINGER", 0.5)
    merged = count_merged_keys(monkeypatch)
    store = NodeStore(StorageHistory(tmp_path / "history", MERGING), "n")
    store.merge_flushes = False  # L0 layers for the compaction to merge, not merged flushes
    store.import_datadir(workload.base)
    foreground = FOREGROUND.held()
    with store.compactor.mutex:
        for i in range(0, len(workload.records), 50):
            records, raws = workload.records[i : i + 50], workload.raws[i : i + 50]
            store.ingest_batch(records, [r.data for r in raws])
            store.maybe_flush()
        store.wait_flushed()
        foreground.__enter__()
    try:
        time.sleep(2.0)
        assert merged[0] <= 1 and store.compactor.busy  # held at the first key of the merge
    finally:
        foreground.__exit__(None, None, None)
    store.wait_compacted()
    assert merged[0] > 1000 and store.compaction_totals.passes >= 1

    # Paused again (a pass with nothing due stands before its key scan), then shut
    # down: the pause does not hold the shutdown up (it would for MAX_PAUSE).
    with FOREGROUND.held():
        store._request_compaction(store.timeline)
        time.sleep(0.5)
        assert store.compactor.busy
        t0 = time.monotonic()
        store.close()
        assert time.monotonic() - t0 < 10
    store.history.close()


@pytest.mark.parametrize("waker", ["release", "stop"])
def test_a_paused_pass_is_woken_at_once(monkeypatch: pytest.MonkeyPatch, waker: str) -> None:
    """A check paused for foreground work is woken at once, not at its next look
    (PAUSE_POLL, made a minute here), by `release` (the final image pass of a catch-up
    began up to 50 ms late; it goes on) and by its worker's `stop` (a store's close; it says
    cancelled)."""
    monkeypatch.setattr(flusher_module, "PAUSE_POLL", 60.0)
    worker = flusher_module.BackgroundWorker("test-compactor")
    catching_up = flusher_module.Foreground()
    catching_up.hold_for(3600)
    check = flusher_module.Foreground().yielding(worker.cancelled, catching_up)
    said: list[bool] = []
    paused = run_in_thread(lambda: said.append(check()))
    paused.join(0.3)
    assert paused.is_alive()  # paused
    t0 = time.monotonic()
    if waker == "release":
        catching_up.release()
    else:
        worker.stop()
    paused.join(30)
    assert not paused.is_alive() and said == [waker == "stop"]
    assert time.monotonic() - t0 < 20


def test_compaction_stands_aside_while_ingest_outruns_the_flusher(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ingest with CATCHING_UP_FROZEN layers waiting for the flusher (a catch-up) holds
    compaction back: a pass stands at its first check for CATCHING_UP_LINGER after; the final
    flush (the caller ingests no more) lets it go on at once."""
    monkeypatch.setattr(node_store_module, "CATCHING_UP_LINGER", 60.0)
    merged = count_merged_keys(monkeypatch)
    store = NodeStore(StorageHistory(tmp_path / "history", MERGING), "n")
    store.merge_flushes = False  # L0 layers for the compaction to merge, not merged flushes
    store.import_datadir(workload.base)
    records, raws = workload.records, workload.raws
    half = len(records) // 2
    with store.compactor.mutex:
        for i in range(0, half, 50):
            part = slice(i, min(i + 50, half))
            store.ingest_batch(records[part], [r.data for r in raws[part]])
            store.maybe_flush()
        store.wait_flushed()  # L0 layers written; their compaction waits for the mutex
        store.catching_up.release()  # whatever the first half saw
        assert not store.catching_up.busy()
        with store.flusher.mutex:  # the flusher cannot write: frozen layers pile up
            i = half
            while store.timeline.frozen_count < node_store_module.CATCHING_UP_FROZEN:
                assert i < len(records), "the workload never froze two layers"
                store.ingest_batch(records[i : i + 1], [raws[i].data])
                i += 1
                if store.timeline.frozen_count == 1:
                    store.maybe_flush()  # one waiting: no catch-up yet
                    assert not store.catching_up.busy()
            store.maybe_flush()
            assert store.catching_up.busy()
    time.sleep(2.0)
    assert merged[0] <= 1 and store.compactor.busy  # the pass stands at its first key
    t0 = time.monotonic()
    store.flush()
    assert time.monotonic() - t0 < 30  # not the 60 s linger
    assert merged[0] > 100 and store.compaction_totals.passes >= 1
    store.close()
    store.history.close()


def test_a_backlog_is_a_catch_up_and_its_layers_are_all_merged(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backlog of a layer's worth of WAL not decoded yet (maybe_flush's `backlog`, from the
    follower's archive) is a catch-up from the first chunk: every frozen layer, the first
    and make_durable's tail too, is written as L1 layers, alone or merged with those
    waiting beside it, never as an L0 file (the tail after the last merged group was one
    until session 19). Every page reads the same afterwards."""
    monkeypatch.setattr(node_store_module, "CATCHING_UP_LINGER", 60.0)
    store = NodeStore(StorageHistory(tmp_path / "history", MERGING), "n")
    store.import_datadir(workload.base)
    records, raws = workload.records, workload.raws
    backlog = MERGING.checkpoint_distance  # as if that much more WAL were archived
    with store.compactor.mutex:  # no compaction: the layers are the flushes' own
        store.maybe_flush(backlog - 1)
        assert not store.catching_up.busy()  # less than a layer behind: not a catch-up
        store.maybe_flush(backlog)
        assert store.catching_up.busy()
        t0 = time.monotonic()
        for j in range(0, len(records), 50):
            store.ingest_batch(records[j : j + 50], [r.data for r in raws[j : j + 50]])
            store.maybe_flush(backlog)
        store.make_durable()
        assert time.monotonic() - t0 < 30  # not the 60 s lingers
        timeline = store.timeline
        assert timeline.disk_consistent_lsn == timeline.last_record_lsn
        layers = timeline.layer_map()
        assert not layers.level0(), [d.name.file_name for d in layers.level0()]
        assert len(layers.deltas) >= 2
        after = read_all(timeline, timeline.last_record_lsn)
    reference = NodeStore(StorageHistory(tmp_path / "reference", MERGING), "n")
    reference.merge_flushes = False
    reference.import_datadir(workload.base)
    reference.ingest_batch(records, [r.data for r in raws])
    reference.make_durable()
    assert after == read_all(reference.timeline, reference.timeline.last_record_lsn)
    for s in (store, reference):
        s.close()
        s.history.close()


def test_a_catch_up_maps_the_open_layer_in_ahead_and_live_ingest_does_not(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
) -> None:
    """While catching up, maybe_flush has a thread map the open layer's fresh value buffer in
    (Timeline.prefault_open_layer: the decode thread faulted the first arenas of a catch-up
    in page by page); live ingest leaves a layer to map only the pages its values take (a
    slow node's layer would hold its whole buffer resident). Pages read the same after."""
    require_c_extension(layers_native.inmem, "pageserver.storage.layers._inmem")
    inmem = layers_native.inmem
    settings = StoreSettings(checkpoint_distance=6 * 1024 * KiB)  # a buffer above SPARE_MIN
    store = NodeStore(StorageHistory(tmp_path / "history", settings), "n")
    store.import_datadir(workload.base)
    taken = [inmem.Arena(settings.checkpoint_distance) for _ in range(2)]  # the spares left
    records, raws = workload.records, workload.raws
    before = inmem.prefaults()
    store.ingest_batch(records[:50], [r.data for r in raws[:50]])
    store.maybe_flush()  # live: nothing mapped ahead
    assert inmem.prefaults() == before
    store.maybe_flush(settings.checkpoint_distance)  # a layer's worth archived: a catch-up
    assert inmem.prefaults() == before + 1
    store.maybe_flush(settings.checkpoint_distance)  # that layer's buffer once
    assert inmem.prefaults() == before + 1
    store.ingest_batch(records[50:], [r.data for r in raws[50:]])
    store.make_durable()
    timeline = store.timeline
    after = read_all(timeline, timeline.last_record_lsn)
    reference = NodeStore(StorageHistory(tmp_path / "reference", settings), "n")
    reference.import_datadir(workload.base)
    reference.ingest_batch(records, [r.data for r in raws])
    reference.make_durable()
    assert after == read_all(reference.timeline, reference.timeline.last_record_lsn)
    del taken
    for s in (store, reference):
        s.close()
        s.history.close()


def test_images_are_made_at_the_lsn_after_a_pause_and_deferred_while_catching_up(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A compaction pass paused at its first check (a catch-up) writes its images at the
    durable LSN after the pause, not at the one of its start (those images were rewritten
    by the next pass over the layers flushed meanwhile); with defer_images() true, no image
    is written and the pass ends as cancelled."""
    store = NodeStore(StorageHistory(tmp_path / "history", IMAGING), "n")
    store.import_datadir(workload.base)
    records, raws = workload.records, workload.raws
    half = len(records) // 2
    store.ingest_batch(records[:half], [r.data for r in raws[:half]])
    store.make_durable()
    timeline = store.timeline
    start = timeline.disk_consistent_lsn

    with pytest.raises(compaction_module.CompactionCancelled):
        compaction_module.compact(timeline, reconstruct, defer_images=lambda: True)
    assert not timeline.layer_map().images or all(
        image.lsn < start for image in timeline.layer_map().images
    )

    def paused() -> bool:  # the pause: the rest is ingested and flushed meanwhile
        if timeline.last_record_lsn == start:
            store.ingest_batch(records[half:], [r.data for r in raws[half:]])
            store.make_durable()
        return False

    result = compaction_module.compact(timeline, reconstruct, cancelled=paused)
    end = timeline.disk_consistent_lsn
    assert end > start and result.images_written > 0
    new = [image for image in timeline.layer_map().images if image.lsn > start]
    assert len(new) == result.images_written and all(image.lsn == end for image in new)
    store.close()
    store.history.close()
