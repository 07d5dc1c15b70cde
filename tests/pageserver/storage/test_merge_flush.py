"""A catch-up's merged flush (frozen in-memory layers written straight as L1 layers,
compaction.merge_frozen) against the L0 path it replaces, on real WAL.

The workload of tests/pageserver/ingest/test_native_ingest.py (pgbench, updates, deletes,
VACUUM, index builds, full-page images) is ingested into stores with small in-memory layers.
The merged flush must write the files the L0 flushes of the same layers merged by the L0
merge write (byte for byte, same names), in C and through the Python reference; pages read
at many LSNs must equal the L0 path's; a store killed at any point of a merged flush must
reopen naming whole files only, at the LSN of the last manifest, and re-ingest from there to
the same pages.
"""

from __future__ import annotations

import errno
import hashlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pageserver.history import node_store as node_store_module
from pageserver.history.node_store import NodeStore, StorageHistory
from pageserver.storage import compaction
from pageserver.storage import timeline as timeline_module
from pageserver.storage.keys import KEY_MIN, Key
from pageserver.storage.layers import blocks, native
from pageserver.storage.layers.inmemory import ArenaLayer
from pageserver.storage.manifest import TimelineManifest
from pageserver.storage.settings import StoreSettings
from pageserver.storage.timeline import Timeline
from tests.native_ext import require_c_extension
from tests.pageserver.history.test_compaction_stop import check_directory, read_all
from tests.pageserver.ingest.test_native_ingest import Workload, workload  # noqa: F401

KiB = 1024
SETTINGS = StoreSettings(
    checkpoint_distance=512 * KiB,
    compaction_threshold=1000,
    compaction_target_size=384 * KiB,
    image_creation_threshold=1000,
    image_creation_delta_percent=1_000_000,
    block_size=8 * KiB,
)
"""Many small in-memory layers, none merged nor imaged by compaction unless asked; small L1
targets and blocks, so a merge cuts many layers and blocks."""


def ingest(store: NodeStore, workload: Workload, upto: int | None = None) -> None:  # noqa: F811
    """The workload's records (those ending at or below `upto`) ingested 500 at a time,
    nothing flushed: the frozen layers stay in memory."""
    records = [r for r in workload.records if upto is None or r.end_lsn <= upto]
    raws = workload.raws[: len(records)]
    for i in range(0, len(records), 500):
        store.ingest_batch(records[i : i + 500], [r.data for r in raws[i : i + 500]])


def fresh(root: Path, workload: Workload) -> NodeStore:  # noqa: F811
    store = NodeStore(StorageHistory(root, SETTINGS), "n")
    store.import_datadir(workload.base)
    return store


Pages = dict[Key, bytes | None]
"""Each key's page at an LSN as its SHA-256 (None: no page): the reference's pages are kept
for every sampled LSN, whole pages would be ~40 MB an LSN."""


def pages(timeline: Timeline, lsn: int) -> Pages:
    return {
        key: None if page is None else hashlib.sha256(page).digest()
        for key, page in read_all(timeline, lsn).items()
    }


@pytest.fixture(scope="module")
def l0_path(
    workload: Workload,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[[int], Pages]]:
    """The reference every test compares with: the workload ingested by the daemon's
    flushing with L0 flushes only (maybe_flush per batch), then a full L0 merge; its pages
    at an LSN, read once for the module (each test built and read its own). Closed and
    reopened, so that nothing of it runs in the background while a test injects failures
    into the module functions flushes call."""
    root = tmp_path_factory.mktemp("l0") / "s"
    store = fresh(root, workload)
    store.merge_flushes = False
    records, raws = workload.records, workload.raws
    for i in range(0, len(records), 500):
        store.ingest_batch(records[i : i + 500], [r.data for r in raws[i : i + 500]])
        store.maybe_flush()
    store.make_durable()
    assert compaction.compact_level0(store.timeline, force=True)[0] > 0
    store.close()
    store.history.close()
    store = NodeStore(StorageHistory(root, SETTINGS), "n")
    read: dict[int, Pages] = {}

    def at(lsn: int) -> Pages:
        if lsn not in read:
            read[lsn] = pages(store.timeline, lsn)
        return read[lsn]

    yield at
    store.close()
    store.history.close()


def files(layers: list[object]) -> dict[str, bytes]:
    return {x.path.name: x.path.read_bytes() for x in layers}  # type: ignore[attr-defined]


def l1_files(timeline: Timeline, since: int) -> dict[str, bytes]:
    return files([x for x in timeline.layer_map().deltas if x.lsn_start >= since])


@pytest.mark.parametrize("path", ["c", "c-step-1", "c-whole", "python-merge", "python-layers"])
def test_merged_flush_writes_the_files_of_the_l0_merge(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    """L0 flushes then the L0 merge (the reference) against the merged flush of the same
    frozen layers: the same L1 files. c: arenas merged in C, each piece packed in steps
    whose blocks compress as the next are packed (c-step-1: a block a step); c-whole: each
    piece packed whole, then compressed; python-merge: arenas merged by the reference loop;
    python-layers: the reference in-memory layers."""
    if path != "python-layers":  # python-merge merges arenas too, by the reference loop
        require_c_extension(native.inmem, "pageserver.storage.layers._inmem")
    if path == "python-layers":
        monkeypatch.setattr(native, "inmem", None)
    monkeypatch.setattr(compaction, "STREAM_PIECES", path != "c-whole")
    if path == "c-step-1":
        monkeypatch.setattr(blocks, "PACK_STEP_BLOCKS", 1)
    streamed: list[int] = []
    add_stream = blocks.LayerFileWriter.add_packed_stream

    def counted(writer: blocks.LayerFileWriter, source: blocks.StreamSource) -> None:
        streamed.append(1)
        add_stream(writer, source)

    monkeypatch.setattr(blocks.LayerFileWriter, "add_packed_stream", counted)
    reference, merged = fresh(tmp_path / "l0", workload), fresh(tmp_path / "merged", workload)
    try:
        since = reference.timeline.last_record_lsn + 1
        for store in (reference, merged):
            ingest(store, workload)
            store.timeline.freeze()
        frozen = merged.timeline._frozen
        assert len(frozen) > 10
        assert all(isinstance(m, ArenaLayer) for m in frozen) == (path != "python-layers")
        if path == "python-merge":
            monkeypatch.setattr(native, "inmem", None)

        reference.timeline.flush_frozen_layers()
        level0 = [x for x in reference.timeline.layer_map().level0() if x.lsn_start >= since]
        merge = compaction._merge_level0_python if path != "c" else compaction._merge_level0_native
        expected = files(merge(reference.timeline, level0, None))  # type: ignore[operator]

        merged.timeline.flush_frozen_layers(merge=compaction.merge_frozen)
        got = l1_files(merged.timeline, since)
        assert len(expected) > 5  # cut at several keys
        assert len(streamed) == (len(got) if path in ("c", "c-step-1") else 0)
        assert sorted(got) == sorted(expected)  # the same key and LSN ranges
        for name, data in expected.items():
            assert got[name] == data, name
        assert not merged.timeline.needs_flush
        assert merged.timeline.disk_consistent_lsn == merged.timeline.last_record_lsn
        check_directory(merged.timeline.directory)
    finally:
        for store in (reference, merged):
            store.history.close()


def sample_lsns(workload: Workload, n: int) -> list[int]:  # noqa: F811
    ends = [r.end_lsn for r in workload.records]
    return [ends[i] for i in range(0, len(ends), max(1, len(ends) // n))] + [ends[-1]]


def test_pages_read_through_merged_flushes_equal_the_l0_paths(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
    l0_path: Callable[[int], Pages],
) -> None:
    """The daemon's flushing (maybe_flush per batch) with the store held catching up, so
    waiting frozen layers are merged, against the same ingest with L0 flushes only and then
    a full compaction (l0_path): every page equal at LSNs across the WAL, also after the
    merged store's own L0 merge (the L0 runs the merged flushes interrupt) and after a
    reopen."""
    merged = fresh(tmp_path / "merged", workload)
    try:
        writes: list[int] = []
        original = merged.timeline.flush_frozen_layers

        def counting(upto: int | None = None, merge: object = None, **kwargs: Any) -> None:
            writes.append(merge is not None)
            original(upto, merge, **kwargs)  # type: ignore[arg-type]

        merged.timeline.flush_frozen_layers = counting  # type: ignore[method-assign]
        records, raws = workload.records, workload.raws
        for i in range(0, len(records), 500):
            merged.catching_up.hold_for(3600)
            merged.ingest_batch(records[i : i + 500], [r.data for r in raws[i : i + 500]])
            merged.maybe_flush()
        merged.make_durable()
        assert any(writes), "no merged flush ran"
        l1 = [x for x in merged.timeline.layer_map().deltas if not x.name.is_l0]
        assert len({(x.lsn_start, x.lsn_end) for x in l1}) >= 2  # several merged flushes
        merged.catching_up.release()
        lsns = sample_lsns(workload, 12)
        for lsn in lsns:
            assert pages(merged.timeline, lsn) == l0_path(lsn), lsn
        while compaction.compact_level0(merged.timeline, force=True)[0]:
            pass
        left = merged.timeline.layer_map().level0()  # a lone last flush's, forced needs 2
        assert len(left) <= 1 and all(x.lsn_end == lsns[-1] + 1 for x in left)
        for lsn in lsns:
            assert pages(merged.timeline, lsn) == l0_path(lsn), lsn
        merged.close()
        merged.history.close()
        reopened = NodeStore(StorageHistory(tmp_path / "merged", SETTINGS), "n")
        merged = reopened
        for lsn in lsns[::3]:
            assert pages(reopened.timeline, lsn) == l0_path(lsn), lsn
    finally:
        merged.history.close()


def test_an_l0_run_before_a_merged_flush_is_merged_alone(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
) -> None:
    """L0 layers, then a merged flush, then L0 layers again: the L0 merge takes only the
    run below the merged layers (closed: merged whatever its length), then the run above,
    so no L1 layer overlaps another's LSNs; pages unchanged."""
    store = fresh(tmp_path / "s", workload)
    try:
        timeline = store.timeline
        ends = [r.end_lsn for r in workload.records]
        third, two_thirds = ends[len(ends) // 3], ends[2 * len(ends) // 3]
        ingest(store, workload, third)
        timeline.freeze_and_flush()
        below = [x for x in timeline.layer_map().level0() if x.lsn_start > 0]
        ingest(store, workload, two_thirds)
        timeline.freeze_and_flush(merge=compaction.merge_frozen)
        ingest(store, workload)
        timeline.freeze_and_flush()
        lsns = sample_lsns(workload, 6)
        before = {lsn: read_all(timeline, lsn) for lsn in lsns}
        run, closed = compaction.level0_run(timeline.layer_map())
        assert closed and run == timeline.layer_map().level0()[: len(run)]
        assert run[-1].lsn_end <= third + 1 and set(below) <= set(run)
        merged, _ = compaction.compact_level0(timeline)  # below the threshold, but closed
        assert merged == len(run)
        run, closed = compaction.level0_run(timeline.layer_map())
        assert not closed and run and run[0].lsn_start > two_thirds
        assert compaction.compact_level0(timeline)[0] == 0  # open, below the threshold
        assert compaction.compact_level0(timeline, force=True)[0] == len(run)
        deltas = [x for x in timeline.layer_map().deltas]
        for a in deltas:
            for b in deltas:
                if a is not b and a.key_range.overlaps(b.key_range):
                    assert a.lsn_end <= b.lsn_start or b.lsn_end <= a.lsn_start, (a, b)
        for lsn in lsns:
            assert read_all(timeline, lsn) == before[lsn], lsn
    finally:
        store.history.close()


KILLED_FLUSH = """
import sys, threading, time
from pathlib import Path
from pageserver.history.node_store import NodeStore, StorageHistory
from pageserver.storage import compaction, timeline as timeline_module
from pageserver.storage.layers.delta import DeltaLayerWriter
from tests.pageserver.storage.test_merge_flush import SETTINGS
from tests.pageserver.ingest.test_native_ingest import Workload

root, where, upto = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
import pickle
workload = pickle.loads(Path(sys.argv[4]).read_bytes())

def stop(*args, **kwargs):
    print("stopped", flush=True)
    time.sleep(600)

if where == "publishing":  # some L1 files published, the next one being written
    publish, calls = DeltaLayerWriter.publish, [0]
    def publishing(self, *args):
        calls[0] += 1
        if calls[0] == 3:
            stop()
        return publish(self, *args)
    DeltaLayerWriter.publish = publishing
elif where == "manifest":  # every L1 file published, the manifest not written yet
    write_manifest = timeline_module.write_manifest
    def writing(directory, manifest):
        if any(not e.name.is_l0 and not e.name.is_image for e in manifest.layers):
            stop()
        return write_manifest(directory, manifest)
    timeline_module.write_manifest = writing
elif where == "queued":  # the first group's manifest waits while the next group is packed
    packed, merge_frozen, merges = threading.Event(), compaction.merge_frozen, [0]
    def merging(*args):
        outputs = merge_frozen(*args)
        merges[0] += 1
        if merges[0] == 2:
            packed.set()
        return outputs
    compaction.merge_frozen = merging
    write_manifest = timeline_module.write_manifest
    def writing(directory, manifest):
        if any(not e.name.is_l0 and not e.name.is_image for e in manifest.layers):
            assert packed.wait(60), "the next group was not packed meanwhile"
            stop()
        return write_manifest(directory, manifest)
    timeline_module.write_manifest = writing

store = NodeStore(StorageHistory(root, SETTINGS), "n")
records = [r for r in workload.records if r.end_lsn <= upto]
raws = workload.raws[: len(records)]
half = len(records) // 2
for i in range(0, len(records), 500):
    if where == "queued" and i <= half < i + 500:
        store.timeline.freeze()
        first = store.timeline.frozen_upto
    store.ingest_batch(records[i : i + 500], [r.data for r in raws[i : i + 500]])
print("durable", store.timeline.disk_consistent_lsn, flush=True)
if where == "queued":  # as the flusher does while a job waits: publications left queued
    store.timeline.freeze()
    for group_end in (first, None):
        store.timeline.flush_frozen_layers(
            group_end, merge=compaction.merge_frozen, wait=lambda: False
        )
    time.sleep(600)
store.timeline.freeze_and_flush(merge=compaction.merge_frozen)
print("done", flush=True)
time.sleep(600)
"""


@pytest.fixture(scope="module")
def pickled(workload: Workload, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    import pickle

    path = tmp_path_factory.mktemp("wl") / "workload.pickle"
    path.write_bytes(pickle.dumps(workload))
    return path


@pytest.mark.parametrize("where", ["publishing", "manifest", "queued", "after"])
def test_a_store_killed_in_a_merged_flush_reopens_and_reingests(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
    pickled: Path,
    l0_path: Callable[[int], Pages],
    where: str,
) -> None:
    """SIGKILL while a merged flush publishes its files, after they are all published but
    before the manifest names them (`queued`: that manifest waits on the publisher thread
    while the next group is packed and its files queued behind it), or after it: the store
    reopens naming whole files only,
    at the last manifest's disk_consistent_lsn (the import's, or the flush's end), and the
    records above it ingested again give the pages of a store that never crashed."""
    ends = [r.end_lsn for r in workload.records]
    upto = ends[len(ends) // 2]
    root = tmp_path / "killed"
    fresh(root, workload).history.close()
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_FLUSH, str(root), where, str(upto), str(pickled)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[3],  # the repository: `tests` imports
    )
    try:
        assert child.stdout is not None
        first = child.stdout.readline().split()
        assert first[0] == "durable"
        imported = int(first[1])
        assert child.stdout.readline() == ("done\n" if where == "after" else "stopped\n")
    finally:
        child.kill()
        child.wait()

    store = NodeStore(StorageHistory(root, SETTINGS), "n")
    try:
        timeline = store.timeline
        check_directory(timeline.directory)
        durable = timeline.disk_consistent_lsn
        assert durable == (upto if where == "after" else imported)
        assert timeline.last_record_lsn == durable
        ingest(store, workload)  # records the history holds are skipped
        store.make_durable()
        for lsn in sample_lsns(workload, 12)[::2]:
            assert pages(timeline, lsn) == l0_path(lsn), lsn
    finally:
        store.history.close()


@pytest.mark.parametrize("failing", ["publish", "manifest", "publish-then-discard"])
def test_a_failed_publication_drops_the_groups_queued_behind_it(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    l0_path: Callable[[int], Pages],
    failing: str,
) -> None:
    """The first group's file publication (fsync) or manifest fails on the publisher thread
    while the next group is queued behind it: disk_consistent_lsn stays, the next group's
    files are deleted and its layers stay frozen, every page stays readable, the next flush
    raises the error and the one after writes everything (whole files, all named, pages
    equal to the L0 path's). publish-then-discard: the next group's discard of its files
    raises too (after deleting them): its layers are still counted out of the ones being
    published (counted in, the flush after took the wrong layers: 'flushed twice')."""
    store = fresh(tmp_path / "s", workload)
    timeline = store.timeline
    gate, failed = threading.Event(), []
    discarded: list[int] = []

    def fail() -> None:
        if not failed:
            failed.append(True)
            assert gate.wait(60)
            raise OSError(errno.EIO, "injected I/O error")

    def inject() -> None:
        if failing == "publish-then-discard":
            discard = timeline_module.discard_layers

            def discarding(layers: list[Any]) -> None:
                discard(layers)
                discarded.append(len(layers))
                raise OSError(errno.EIO, "injected discard error")

            monkeypatch.setattr(timeline_module, "discard_layers", discarding)
        if failing.startswith("publish"):
            publish = blocks.LayerFileWriter.publish

            def publishing(self: blocks.LayerFileWriter, file_name: str) -> Path:
                try:
                    fail()  # as publish's fsync failing: the temp file removed
                except OSError:
                    self.abort()
                    raise
                return publish(self, file_name)

            monkeypatch.setattr(blocks.LayerFileWriter, "publish", publishing)
        else:
            write_manifest = timeline_module.write_manifest

            def writing(directory: Path, manifest: TimelineManifest) -> None:
                if any(not e.name.is_l0 and not e.name.is_image for e in manifest.layers):
                    fail()
                write_manifest(directory, manifest)

            monkeypatch.setattr(timeline_module, "write_manifest", writing)

    try:
        ends = iter(r.end_lsn for r in workload.records[::20])
        while not timeline.frozen_count:  # the first group one layer, the next many
            ingest(store, workload, next(ends))
        first = timeline.frozen_upto
        ingest(store, workload)
        timeline.freeze()
        durable, last = timeline.disk_consistent_lsn, timeline.last_record_lsn
        inject()
        for upto in (first, None):  # as the flusher while a job waits: both groups queued
            timeline.flush_frozen_layers(upto, merge=compaction.merge_frozen, wait=lambda: False)
        gate.set()
        with pytest.raises(OSError, match="injected"):
            timeline.flush_frozen_layers(merge=compaction.merge_frozen)
        assert timeline.disk_consistent_lsn == durable
        assert bool(discarded) == (failing == "publish-then-discard")
        assert timeline.frozen_count > 0  # the next group's layers at least
        assert pages(timeline, last) == l0_path(last)
        timeline.flush_frozen_layers(merge=compaction.merge_frozen)
        assert timeline.disk_consistent_lsn == last and timeline.frozen_count == 0
        # merged, every layer: none left counted as being published (and so skipped)
        assert not [x for x in timeline.layer_map().level0() if x.lsn_start > durable]
        check_directory(timeline.directory)
        for lsn in sample_lsns(workload, 12)[::3]:
            assert pages(timeline, lsn) == l0_path(lsn), lsn
    finally:
        store.close()
        store.history.close()


def frozen_feeder(store: NodeStore, workload: Workload) -> Callable[[int], None]:  # noqa: F811
    """A function ingesting the workload's next records, 20 at a time, until `count` layers
    are frozen, then asking (catching up) for their flush as the decode thread does."""
    timeline = store.timeline
    records, raws = workload.records, workload.raws
    at = 0

    def ingest_until_frozen(count: int) -> None:
        nonlocal at
        while timeline.frozen_count < count:
            assert at < len(records), "the workload never froze enough layers"
            store.ingest_batch(records[at : at + 20], [r.data for r in raws[at : at + 20]])
            at += 20
        store.catching_up.hold_for(60)
        store.maybe_flush()

    return ingest_until_frozen


def test_a_lone_frozen_layer_is_written_at_once_as_l1_layers(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Catching up, one frozen layer is flushed at once, merged alone into L1 layers (no L0
    file): it waited for the next one to merge with until session 19 (up to the linger,
    here 60 s), the flusher idle while the decode thread filled it. Twice, so each is its
    own group; pages read as after L0 flushes."""
    monkeypatch.setattr(node_store_module, "CATCHING_UP_LINGER", 60.0)
    store = fresh(tmp_path / "s", workload)
    reference = fresh(tmp_path / "reference", workload)
    timeline = store.timeline
    ingest_until_frozen = frozen_feeder(store, workload)
    try:
        level0 = len(timeline.layer_map().level0())  # the import's
        for _ in range(2):
            durable = timeline.disk_consistent_lsn
            ingest_until_frozen(1)
            deadline = time.monotonic() + 10  # not the 60 s linger
            while timeline.frozen_count and time.monotonic() < deadline:
                time.sleep(0.01)
            assert timeline.frozen_count == 0, "the lone layer waits for the next"
            store.flusher.wait_idle()
            assert timeline.disk_consistent_lsn > durable
            assert len(timeline.layer_map().level0()) == level0  # no L0 written
            assert any(x.lsn_start == durable + 1 for x in timeline.layer_map().deltas)
        reference.merge_flushes = False
        ingest(reference, workload, timeline.disk_consistent_lsn)
        reference.make_durable()
        lsn = timeline.disk_consistent_lsn
        assert reference.timeline.disk_consistent_lsn == lsn
        assert read_all(timeline, lsn) == read_all(reference.timeline, lsn)
    finally:
        for s in (store, reference):
            s.close()
            s.history.close()


@pytest.mark.parametrize("step", [1, 7, 10_000])
def test_a_merge_packer_fills_what_pack_merged_packs(
    workload: Workload,  # noqa: F811
    tmp_path: Path,
    step: int,
) -> None:
    """`_inmem.merge_packer` filled `step` blocks at a time (each step exactly that many,
    ending inside a key if need be: whole keys a step packed a hot page's versions, many
    blocks, while the zstd pool waited): the blocks it reports, its data
    and its tables are pack_merged's for every piece; an LSN outside the range raises
    pack_merged's error; a packer dropped half filled releases its arenas (a pack after)."""
    require_c_extension(native.inmem, "pageserver.storage.layers._inmem")
    inmem = native.inmem
    assert inmem is not None
    store = fresh(tmp_path / "s", workload)
    try:
        ingest(store, workload)
        store.timeline.freeze()
        frozen = store.timeline._frozen
        arenas = [m.arena for m in frozen if isinstance(m, ArenaLayer)]
        assert len(arenas) == len(frozen) > 3
        lo, hi = frozen[0].lsn_start, compaction._lsn_end(frozen[-1])
        cuts = [Key(c) for c in inmem.merge_cuts(arenas, 384 * KiB)]
        assert len(cuts) > 3
        for start, end in zip([KEY_MIN, *cuts], [*cuts, None], strict=True):
            whole = inmem.pack_merged(arenas, start, end, 8 * KiB, lo, hi)
            packer = inmem.merge_packer(arenas, start, end, 8 * KiB, lo, hi)
            data, ends, done, steps = packer.data(), b"", False, 0
            while not done:
                more, done = packer.fill(step)  # also inside a hot key's versions
                assert len(more) == 8 * step or done
                ends += more
                steps += 1
            result = packer.result()
            assert ends == whole[1] == result[1]
            assert bytes(memoryview(data)) == bytes(memoryview(whole[0]))
            assert result[2:] == whole[2:]
            assert steps >= 2 or len(ends) // 8 <= step  # the last block ends at the end
        with pytest.raises(ValueError, match="outside the layer's LSN range"):
            packer = inmem.merge_packer(arenas, KEY_MIN, None, 8 * KiB, lo, lo + 1)
            while not packer.fill(step)[1]:
                pass
        half = inmem.merge_packer(arenas, KEY_MIN, None, 8 * KiB, lo, hi)
        half.fill(1)
        del half
        assert inmem.pack_merged(arenas, KEY_MIN, None, 8 * KiB, lo, hi)[4] > 0
    finally:
        store.history.close()
