"""Compaction: bound read cost by merging L0 layers and writing image layers.

- L0 -> L1: once a timeline has `compaction_threshold` L0 delta layers (each a flush spanning
  the whole keyspace, so every read visits all of them), merge-sort them into L1 delta layers
  of about `compaction_target_size` that split the keyspace by key. All versions are kept.
- Image layers: the keyspace at disk_consistent_lsn is partitioned into runs of about
  `image_layer_target_size`; a partition with `image_creation_threshold` or more delta layers
  above its newest image, or whose versions above its images outweigh what the images hold
  of it (`image_creation_delta_percent`), gets a new image layer at that LSN. Pages with
  deltas are rebuilt by the caller's `materialize` (redo lives elsewhere); whole images are
  copied as they are.
- Image layers at named points: the caller may ask for images at LSNs below that one too
  (`compact`'s `image_lsns`: a snapshot's), under the same rule, before the pass's own.

Both write their files first and then swap them in with one manifest update
(Timeline.replace_layers). Blocking I/O and CPU: run in a worker thread. A pass may be
cancelled (`cancelled`, checked per key while merging, between pieces of image creation's key
scan, per CHECK_EVERY pages of an image partition): an L0 merge then deletes its unpublished
L1 files and raises CompactionCancelled, image creation deletes the partitions it was writing
(up to IMAGE_WORKERS at once), publishes the complete image layers it has and stops; either
way the manifest names only whole files, as after a kill (Timeline.open deletes the files it
does not name).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Protocol

from pageserver.storage.keys import FULL_KEYSPACE, KEY_MAX, KEY_MIN, Key, KeyRange, key_successor
from pageserver.storage.layers import native as _native
from pageserver.storage.layers.blocks import BlockCache, Packed, PackStream, VersionList
from pageserver.storage.layers.delta import DeltaLayer, DeltaLayerWriter
from pageserver.storage.layers.image import ImageLayer, ImageLayerWriter
from pageserver.storage.layers.inmemory import ArenaLayer, InMemoryLayer
from pageserver.storage.layers.layer_map import LayerMap
from pageserver.storage.settings import StoreSettings
from pageserver.storage.timeline import Timeline, discard_layers, merge_gaps
from pageserver.storage.values import ReconstructData

Materialize = Callable[[Key, int, ReconstructData], bytes | None]
"""Rebuild `key` at `lsn` from its reconstruct data (which has deltas); None: the key does not
exist at that LSN and is left out of the image layer."""

MaterializeRange = Callable[
    [Timeline, KeyRange, list[Key], int, Callable[[Key], "bytes | None"]],
    Iterable[tuple[Key, "bytes | None"]],
]
"""(timeline, key range, its keys, lsn, per-key path) -> (key, value or None) for each key, in
order, equal to the per-key path for every key, which it may call for any of them: the bulk
rebuild of image creation (pageserver.reconstruct.range_rebuild.rebuild_range)."""

PAGE_SIZE_ESTIMATE = 8192

Cancelled = Callable[[], bool]
"""Whether the running compaction pass should end now (the store is shutting down); it may
block first (pause: pageserver.history.flusher.Foreground)."""
CHECK_EVERY = 256
"""Pages of an image partition between two checks (a partition is seconds on a busy box)."""


class KeyGroups(Protocol):
    """What a merge reads: an L0 layer, or a frozen in-memory layer (merge_frozen)."""

    @property
    def lsn_start(self) -> int: ...

    @property
    def lsn_end(self) -> int | None: ...

    def iter_key_groups(self) -> Iterator[tuple[Key, list[tuple[int, bytes]]]]: ...


class CompactionCancelled(Exception):
    """A compaction pass ended early on request; what it had not published is deleted."""


@dataclass(frozen=True, slots=True)
class CompactionResult:
    l0_merged: int = 0
    l1_written: int = 0
    images_written: int = 0
    l0_seconds: float = 0.0
    """Wall time of the L0 -> L1 merge (its check included)."""
    image_seconds: float = 0.0
    """Wall time of image creation (its checks included)."""
    imaged_at: tuple[int, ...] = ()
    """The LSNs the pass wrote image layers at where due, its own last: the `image_lsns`
    at or below it (those above are left to a later pass)."""


@dataclass(slots=True)
class CompactionTotals:
    """Running sums of a store's compaction passes (for benchmarks and metrics)."""

    passes: int = 0
    images_written: int = 0
    l0_seconds: float = 0.0
    image_seconds: float = 0.0

    def add(self, result: CompactionResult) -> None:
        self.passes += 1
        self.images_written += result.images_written
        self.l0_seconds += result.l0_seconds
        self.image_seconds += result.image_seconds


def compact(
    timeline: Timeline,
    materialize: Materialize,
    materialize_range: MaterializeRange | None = None,
    cancelled: Cancelled | None = None,
    defer_images: Callable[[], bool] | None = None,
    image_lsns: Callable[[], Iterable[int]] = tuple,
) -> CompactionResult:
    """One compaction pass: L0 -> L1 if due, then image layers where due. Raises
    CompactionCancelled when `cancelled()` turns true before the pass is done.

    `image_lsns()` (a node's snapshots named since its last pass, asked after the L0 merge:
    a pass paused while a snapshot was named takes it): image layers at each of them at or
    below the pass's LSN too, where due there (with `_due`'s snapshot rule: reads at a
    snapshot are what its delta push, a checkout back to it and its extraction do), oldest
    first, before the pass's own. A
    snapshot named right after a bulk load (pgbench -i: its index build) lies below the
    first pass after it, whose images serve no read at the snapshot: a 1% checkout
    back to it rebuilt its index pages from the build's page images in 128 KiB delta
    blocks (bench.checkout's prepare: 150-185 ms for 1364 pages, 87-112 ms with images at
    the snapshot; those 8 layers, 27 MiB, took 1.2 s). A partition imaged there is not due
    again at the pass's LSN unless it changed since (the layers straddling the snapshot
    count whole: one or two, under image_creation_threshold).

    The pass starts with a check of `cancelled`, which may pause it (a catch-up:
    pageserver.history.node_store), and takes the image LSN (disk_consistent_lsn) after the
    L0 merge: images at the LSN of the pass's start, written after a pause, were rewritten
    by the next pass over the layers flushed meanwhile, and an L0 run closed during the
    pause was left to that pass too. `defer_images()` true (ingest behind its WAL again) stops image
    creation like `cancelled` (whole layers kept): the next pass, once caught up, writes them
    at its own LSN."""
    with timeline.compaction_lock:
        if cancelled is not None and cancelled():
            raise CompactionCancelled(f"compaction of {timeline.timeline_id} cancelled")
        t0 = time.perf_counter()
        merged, written = _compact_level0(timeline, cancelled=cancelled)
        t1 = time.perf_counter()
        lsn = timeline.disk_consistent_lsn
        snapshots = {point for point in image_lsns() if 0 < point <= lsn}
        points = sorted(snapshots | {lsn})
        images = 0
        for point in points:
            images += create_image_layers_at(
                timeline, materialize, point, materialize_range=materialize_range,
                cancelled=_either(defer_images, cancelled), at_snapshot=point in snapshots,
            )  # fmt: skip
        t2 = time.perf_counter()
        for layer in timeline.layer_map().layers():  # what the pass read of their indexes
            layer.release_index()
    return CompactionResult(merged, written, images, t1 - t0, t2 - t1, tuple(points))


def _either(first: Callable[[], bool] | None, then: Cancelled | None) -> Cancelled | None:
    """`first()` or `then()`, asked in that order (`then` may pause: it goes last)."""
    if first is None:
        return then
    if then is None:
        return first
    return lambda: first() or then()


def compact_level0(timeline: Timeline, *, force: bool = False) -> tuple[int, int]:
    """Merge the L0 layers if there are compaction_threshold of them (or 2+ if forced).

    Returns (L0 layers merged, L1 layers written)."""
    with timeline.compaction_lock:
        return _compact_level0(timeline, force=force)


def create_image_layers(
    timeline: Timeline,
    materialize: Materialize,
    *,
    force: bool = False,
    materialize_range: MaterializeRange | None = None,
) -> int:
    """Write image layers at disk_consistent_lsn where due (everywhere if forced).

    Returns the number of image layers written."""
    with timeline.compaction_lock:
        return create_image_layers_at(
            timeline, materialize, timeline.disk_consistent_lsn, force=force,
            materialize_range=materialize_range,
        )  # fmt: skip


def _compact_level0(
    timeline: Timeline, *, force: bool = False, cancelled: Cancelled | None = None
) -> tuple[int, int]:
    level0, closed = level0_run(timeline.layer_map())
    if not level0 or (
        not closed and len(level0) < (2 if force else timeline.settings.compaction_threshold)
    ):
        return 0, 0
    if cancelled is not None and cancelled():
        raise CompactionCancelled(f"L0 merge of {timeline.timeline_id} cancelled")
    # the C merge reads format version 1, which L0 layers are written in (blocks.py)
    native = _native.blockpack is not None and not any(layer.file.narrow for layer in level0)
    merge_l0 = _merge_level0_native if native else _merge_level0_python
    outputs = merge_l0(timeline, level0, cancelled)
    # The L0 layers spanned every key: where the L1 files hold none, no WAL version lies.
    timeline.replace_layers(add=outputs, remove=level0, empty=merge_gaps(outputs))
    return len(level0), len(outputs)


def level0_run(layer_map: LayerMap) -> tuple[list[DeltaLayer], bool]:
    """The oldest run of L0 layers that no other delta layer interrupts (oldest first), and
    whether it is closed: a delta layer of a catch-up's merged flush (merge_frozen) lies
    above it. An L0 merge takes one run, so its L1 layers never overlap the LSNs of that
    flush's (the layer map's invariant); a closed run never grows, so it is merged whatever
    its length (else an L0 layer or two left before a catch-up would stay L0 for ever)."""
    level0 = layer_map.level0()
    others = [d.lsn_start for d in layer_map.deltas if not d.name.is_l0]
    for i, layer in enumerate(level0):
        above = level0[i + 1].lsn_start if i + 1 < len(level0) else None
        if any(layer.lsn_end <= s and (above is None or s < above) for s in others):
            return level0[: i + 1], True
    return level0, False


STREAM_PIECES = True
"""Whether merge_frozen's pieces are packed in steps whose blocks compress as the next are
packed (`_MergedPiece.stream`), rather than whole and then compressed (`pack`, the same
file: tests compare the two). Whole, the zstd pool idled while the flusher packed a piece
(bench/README `ingest`, session 18)."""


def merge_frozen(
    timeline: Timeline, frozen: Sequence[InMemoryLayer], publisher: Executor
) -> list[Future[DeltaLayer]]:
    """Frozen in-memory layers (oldest first, LSN-contiguous) written straight as L1 layers
    over their LSN range, split by key at compaction_target_size: the same files as their L0
    flushes merged by compact_level0 (`_merge_level0_python`, the reference), without writing
    and reading back the L0 files (a catch-up's flush, pageserver.history.node_store). Files
    only, each sealed here and published (fsync, rename, directory fsync) by `publisher`:
    the caller names them in its manifest once the futures are done (Timeline queues that on
    the same thread, so the flusher packs the next group meanwhile). The keys go through C
    (`_inmem`'s merge_cuts and pack_merged: each layer's values copied once, into the
    blocks) when every layer is an arena."""
    inmem = _native.inmem
    if inmem is None or not all(isinstance(layer, ArenaLayer) for layer in frozen):
        return [_done(x) for x in _merge_level0_python(timeline, frozen, None)]
    arenas = [layer.arena for layer in frozen if isinstance(layer, ArenaLayer)]
    lsn_start, lsn_end = frozen[0].lsn_start, _lsn_end(frozen[-1])
    cuts = [Key(cut) for cut in inmem.merge_cuts(arenas, timeline.settings.compaction_target_size)]
    starts = [KEY_MIN, *cuts]
    ends: list[Key | None] = [*cuts, None]

    def keys() -> Iterator[tuple[Key, Callable[[DeltaLayerWriter], object]]]:
        for start, end in zip(starts, ends, strict=True):
            yield start, functools.partial(_add_piece, _MergedPiece(arenas, start, end))

    return _queue_l1(timeline, lsn_start, lsn_end, None, keys(), publisher)


def _done(layer: DeltaLayer) -> Future[DeltaLayer]:
    future: Future[DeltaLayer] = Future()
    future.set_result(layer)
    return future


@dataclass(frozen=True, slots=True)
class _MergedPiece:
    """The keys [start, end) of a merge of arenas, as `DeltaLayerWriter.add_packed` takes
    an arena (its `pack`)."""

    arenas: list[object]
    start: Key
    end: Key | None

    def pack(self, block_size: int, lsn_lo: int, lsn_hi: int) -> Packed:
        inmem = _native.inmem
        assert inmem is not None
        packed: Packed = inmem.pack_merged(
            self.arenas, self.start, self.end, block_size, lsn_lo, lsn_hi
        )
        return packed

    def stream(self, block_size: int, lsn_lo: int, lsn_hi: int) -> PackStream:
        """`pack` in steps (`_inmem.MergePacker`): the writer compresses each step's blocks
        while the next are packed."""
        inmem = _native.inmem
        assert inmem is not None
        stream: PackStream = inmem.merge_packer(
            self.arenas, self.start, self.end, block_size, lsn_lo, lsn_hi
        )
        return stream


def _add_piece(piece: _MergedPiece, writer: DeltaLayerWriter) -> None:
    if STREAM_PIECES:
        writer.add_packed_stream(piece)
    else:
        writer.add_packed(piece)


def _merge_level0_python(
    timeline: Timeline, level0: Sequence[KeyGroups], cancelled: Cancelled | None
) -> list[DeltaLayer]:
    """The L1 layers of the L0 merge: the reference of `_merge_level0_native` and of
    `merge_frozen` (frozen in-memory layers merge as the L0 layers they would be written as)."""
    # L0 layers are LSN-disjoint and sorted oldest first, so merging whole per-key groups by
    # (key, layer number) yields every key's versions in LSN order; values are copied as
    # they are encoded, never decoded.
    merged = heapq.merge(*(_numbered_groups(n, layer) for n, layer in enumerate(level0)))

    def keys() -> Iterator[tuple[Key, Callable[[DeltaLayerWriter], object]]]:
        for key, versions in _merge_same_keys(merged):
            yield key, functools.partial(_add_key, key, versions)

    return _write_l1(timeline, level0[0].lsn_start, _lsn_end(level0[-1]), cancelled, keys())


def _lsn_end(layer: KeyGroups) -> int:
    end = layer.lsn_end
    assert end is not None, "frozen layers and files have an end"
    return end


def _add_key(key: Key, versions: VersionList, writer: DeltaLayerWriter) -> None:
    writer.add_key(key, versions)


def _merge_level0_native(
    timeline: Timeline, level0: list[DeltaLayer], cancelled: Cancelled | None
) -> list[DeltaLayer]:
    """The L1 layers of the L0 merge, the per-version loop in C (`_blockpack.Merge`): the
    same files as `_merge_level0_python` (the Python loop was most of an L0 merge's CPU).
    The cancellation check runs every MERGE_MAX_KEYS keys instead of every key."""
    assert _native.blockpack is not None
    target = timeline.settings.compaction_target_size
    paths = [layer.path for layer in level0]
    merge = _native.blockpack.Merge([layer.file.merge_input() for layer in level0])

    def add(writer: DeltaLayerWriter) -> int:
        return writer.add_merged(merge, target, paths)

    def keys() -> Iterator[tuple[Key, Callable[[DeltaLayerWriter], object]]]:
        while (key := merge.next_key()) is not None:
            yield Key(key), add

    try:
        return _write_l1(timeline, level0[0].lsn_start, level0[-1].lsn_end, cancelled, keys())
    finally:
        merge.close()  # the inputs' maps may close once they are replaced
        for layer in level0:  # the merge walked their whole version tables
            layer.file.release_index()


def _write_l1(
    timeline: Timeline,
    lsn_start: int,
    lsn_end: int,
    cancelled: Cancelled | None,
    keys: Iterator[tuple[Key, Callable[[DeltaLayerWriter], object]]],
) -> list[DeltaLayer]:
    """The L1 layers of a merge over [lsn_start, lsn_end) (`_queue_l1`), every output
    published when this returns (before the manifest naming them is written); outputs are
    deleted on any error."""
    with ThreadPoolExecutor(1, thread_name_prefix="l1-publish") as publisher:
        return published(_queue_l1(timeline, lsn_start, lsn_end, cancelled, keys, publisher))


def _queue_l1(
    timeline: Timeline,
    lsn_start: int,
    lsn_end: int,
    cancelled: Cancelled | None,
    keys: Iterator[tuple[Key, Callable[[DeltaLayerWriter], object]]],
    publisher: Executor,
) -> list[Future[DeltaLayer]]:
    """The L1 layers of a merge over [lsn_start, lsn_end): each (key, add) of `keys` calls
    `add` with the writer of the layer `key` goes to (a new one once the open one reaches the
    target size; `add` may add the keys after it too).

    A full layer is sealed here and published (fsync, rename, directory fsync: 2-3 disk
    flushes) by `publisher` while the merge goes on, so the flushes of a dozen outputs leave
    the merge's critical path; the futures of the publications are returned (`published`
    waits for them). On an error here, the outputs queued are deleted once published."""
    target = timeline.settings.compaction_target_size
    publishing: list[Future[DeltaLayer]] = []
    writer: DeltaLayerWriter | None = None

    def finish(writer: DeltaLayerWriter, end: Key) -> None:
        first = writer.first_key
        assert first is not None
        writer.seal(KeyRange(first, end))
        publishing.append(publisher.submit(writer.publish, timeline.cache))

    try:
        for key, add in keys:
            if cancelled is not None and cancelled():
                raise CompactionCancelled(f"L0 merge of {timeline.timeline_id} cancelled")
            if writer is not None and writer.uncompressed_bytes >= target:
                finish(writer, key)
                writer = None
            if writer is None:
                writer = DeltaLayerWriter(timeline.directory, lsn_start, lsn_end, timeline.settings)
            add(writer)
        if writer is not None:
            last = writer.last_key
            assert last is not None
            finish(writer, key_successor(last))
            writer = None
        return publishing
    except BaseException:
        if writer is not None:
            writer.abort()
        discard_layers([f.result() for f in publishing if f.exception() is None])
        raise


def published(publishing: list[Future[DeltaLayer]]) -> list[DeltaLayer]:
    """The layers of `_queue_l1`'s publications once all are done; if one failed, the others
    are deleted and its error raised."""
    try:
        return [future.result() for future in publishing]
    except BaseException:
        discard_layers([f.result() for f in publishing if f.exception() is None])
        raise


Group = list[tuple[int, bytes]]


def _numbered_groups(n: int, layer: KeyGroups) -> Iterator[tuple[Key, int, Group]]:
    for key, versions in layer.iter_key_groups():
        yield key, n, versions


def _merge_same_keys(merged: Iterable[tuple[Key, int, Group]]) -> Iterator[tuple[Key, Group]]:
    """Join the consecutive groups of one key (from several layers, oldest first)."""
    current: Key | None = None
    pending: Group = []
    for key, _, versions in merged:
        if key == current:
            pending.extend(versions)
            continue
        if current is not None:
            yield current, pending
        current, pending = key, versions
    if current is not None:
        yield current, pending


def _partitions(keys: list[Key], keys_per_partition: int) -> list[tuple[KeyRange, list[Key]]]:
    """Split the whole keyspace into ranges holding about keys_per_partition existing keys."""
    if not keys:
        return [(FULL_KEYSPACE, [])]
    count = -(-len(keys) // keys_per_partition)
    return [_partition(keys, i, keys_per_partition) for i in range(count)]


def _partition(keys: list[Key], i: int, keys_per_partition: int) -> tuple[KeyRange, list[Key]]:
    """Partition i of `_partitions(keys, keys_per_partition)`: settled once `keys` holds the
    first key of the next one (its end) or is the whole scan."""
    lo, hi = i * keys_per_partition, (i + 1) * keys_per_partition
    start = KEY_MIN if i == 0 else keys[lo]
    end = keys[hi] if hi < len(keys) else KEY_MAX
    return KeyRange(start, end), keys[lo:hi]


def _scanned_partitions(
    timeline: Timeline,
    layer_map: LayerMap,
    lsn: int,
    cancelled: Cancelled | None,
    keys_per_partition: int,
) -> Iterator[list[tuple[KeyRange, list[Key]]]]:
    """`_partitions` of the key scan, a piece of the scan (`_scan_pieces`) at a time: after
    each piece the partitions it settled, so the first ones are rebuilt while the rest of
    the key space is scanned (the scan, 0.1 s after a 600 MiB catch-up, ran alone before
    the final pass's partitions, one core idle)."""
    keys: list[Key] = []
    settled = 0
    for piece in _scan_pieces(timeline, layer_map, lsn, cancelled):
        keys += piece
        ready = max(0, (len(keys) - 1) // keys_per_partition)
        yield [_partition(keys, i, keys_per_partition) for i in range(settled, ready)]
        settled = max(settled, ready)
    yield _partitions(keys, keys_per_partition)[settled:]


def create_image_layers_at(
    timeline: Timeline,
    materialize: Materialize,
    lsn: int,
    *,
    force: bool = False,
    materialize_range: MaterializeRange | None = None,
    cancelled: Cancelled | None = None,
    at_snapshot: bool = False,
) -> int:
    """Write image layers at `lsn` for the key partitions where they are due: with
    image_creation_threshold deltas above their newest image, or (forced) with any delta;
    `at_snapshot` (`lsn` is a named snapshot's): also where `_due`'s snapshot rule says
    (the key scan then always runs: that rule weighs each partition's keys).
    Their pages come from `materialize_range` when given, else key by key; up to
    IMAGE_WORKERS partitions are rebuilt at once (`image_workers`), the first ones while the
    key scan goes on (`_scanned_partitions`). Once `cancelled()`, the layers written whole
    so far are published and CompactionCancelled raised.

    The caller holds `timeline.compaction_lock`: compaction writes them at
    disk_consistent_lsn, GC at its horizon inside its own critical section (so the images
    it weighed are the ones it removes layers against). Returns the number written."""
    if lsn <= 0:
        return 0
    if cancelled is not None and cancelled():  # before the key scan (a second on 1 GiB)
        raise CompactionCancelled(f"image creation of {timeline.timeline_id} cancelled")
    layer_map = timeline.layer_map()
    # At a snapshot's LSN the key scan runs (the snapshot rule weighs a partition's keys).
    bounds = None if force or at_snapshot else _LAST_BOUNDS.get(timeline)
    if bounds is not None and not any(_due(timeline, layer_map, r, lsn, False) for r in bounds):
        return 0
    per_partition = max(1, timeline.settings.image_layer_target_size // PAGE_SIZE_ESTIMATE)
    # Each layer is published (fsync, rename, directory fsync) on a thread of its own while
    # the next partitions are rebuilt, as the L1 layers of the L0 merge are.
    failed = threading.Event()
    check = _one_at_a_time(cancelled, failed)
    scan = _scanned_partitions(timeline, layer_map, lsn, check, per_partition)
    scanning = True
    ranges: list[KeyRange] = []  # of the partitions scanned so far
    settled: deque[tuple[int, tuple[KeyRange, list[Key]]]] = deque()
    publishing: list[tuple[int, Future[ImageLayer]]] = []  # (partition number, publication)
    making: dict[Future[ImageLayerWriter], int] = {}
    stopped = False
    workers = image_workers()

    def make(key_range: KeyRange, part_keys: list[Key]) -> ImageLayerWriter:
        return _write_image(
            timeline, materialize, materialize_range, key_range, part_keys, lsn, check
        )

    with (
        ThreadPoolExecutor(1, thread_name_prefix="image-publish") as publisher,
        ThreadPoolExecutor(workers, thread_name_prefix="image-make") as maker,
    ):
        try:
            while True:
                if scanning and not stopped:  # the next piece of the scan
                    try:
                        more = next(scan)
                    except StopIteration:
                        scanning = False
                        # (a pass stopped before its scan's end leaves the last bounds)
                        _LAST_BOUNDS[timeline] = tuple(ranges)
                    except CompactionCancelled:
                        stopped = True  # the whole layers made so far are kept
                    else:
                        settled.extend(enumerate(more, len(ranges)))
                        ranges += (key_range for key_range, _ in more)
                while not stopped and len(making) < workers and settled:
                    if check():
                        stopped = True
                        break
                    while settled:
                        number, due = settled.popleft()
                        snapshot_keys = len(due[1]) if at_snapshot else 0
                        if _due(timeline, layer_map, due[0], lsn, force, snapshot_keys):
                            making[maker.submit(make, *due)] = number
                            break
                if scanning and not stopped:  # scan on; take what is done meanwhile
                    done = {made for made in making if made.done()}
                elif making:
                    # The first partition done, not the oldest: a worker whose partition
                    # ended first takes the next one while a longer one goes on.
                    done, _ = wait(making, return_when=FIRST_COMPLETED)
                else:  # nothing in the making: stopped, or `settled` emptied by the loop above
                    break
                for made in sorted(done, key=making.__getitem__):
                    number = making.pop(made)
                    try:
                        sealed = made.result()
                    except CompactionCancelled:
                        stopped = True  # its file is deleted, the whole ones are kept
                        continue
                    publication = publisher.submit(_publish_image, sealed, timeline.cache)
                    publishing.append((number, publication))
            publishing.sort(key=lambda p: p[0])  # the layers in partition order, as made
            written = [future.result() for _, future in publishing]
        except BaseException:
            failed.set()  # the partitions still being rebuilt stop at their next check
            for made in making:  # sealed ones not published; a failed one deleted its file
                if not made.cancel() and made.exception() is None:
                    made.result().abort()
            for _, published in publishing:
                if published.exception() is None:
                    layer = published.result()
                    layer.close()
                    layer.path.unlink(missing_ok=True)
            raise
    if written:
        timeline.replace_layers(add=written, remove=())
    if stopped:
        raise CompactionCancelled(
            f"image creation of {timeline.timeline_id} cancelled after {len(written)} layers"
        )
    return len(written)


IMAGE_WORKERS = 2
"""Partitions of an image pass rebuilt at once, each on a thread of its own, when a core is
free for them (`image_workers`): the C walk redoes a run of pages without the GIL and zstd
decompresses and compresses without it, so two partitions keep both cores busy (the final
pass of a catch-up ran on one core while the other idled: bench.ingest's headline waits for
it)."""


IMAGE_WORKER_LOOKS = 3
"""Readings `image_workers` takes, IMAGE_WORKER_GAP apart, to settle by their majority."""

IMAGE_WORKER_GAP = 0.001
"""Seconds between two of them: a task runnable for a moment (the journal's commit after the
last layer's fsync, a pool thread of this process still counted runnable system-wide when its
own state is read) passes in less."""


def image_workers() -> int:
    """IMAGE_WORKERS while other processes leave a core free (the tasks runnable by
    /proc/loadavg, less this process's running threads: its pools finish the last flush as the
    pass begins, then wait), else 1: on a busy box the threads got no second core and
    contended for the GIL (the final pass of bench.ingest replayed at load 5: 0.45-0.67 s on
    two threads against 0.36-0.43 s on one; at load 1.4-2.8 two: 0.25-0.28 against 0.31-0.44
    s). By the majority of IMAGE_WORKER_LOOKS readings: one reading is an instant, and a
    task passing through it, or a gap between two, decided for the whole pass."""
    free = busy = 0
    try:
        while max(free, busy) <= IMAGE_WORKER_LOOKS // 2:
            if free or busy:
                time.sleep(IMAGE_WORKER_GAP)
            if _others_runnable() < len(os.sched_getaffinity(0)):
                free += 1
            else:
                busy += 1
    except (OSError, ValueError, IndexError):  # not Linux
        return IMAGE_WORKERS
    return IMAGE_WORKERS if free > busy else 1


def _others_runnable() -> int:
    """Tasks runnable on the box now (/proc/loadavg) less this process's running threads."""
    with open("/proc/loadavg") as f:
        runnable = int(f.read().split()[3].split("/")[0])
    ours = 0
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/stat") as f:
            ours += f.read().rsplit(")", 1)[1].split()[0] == "R"
    return runnable - ours


def _one_at_a_time(cancelled: Cancelled | None, failed: threading.Event) -> Cancelled:
    """`cancelled` for several threads of one pass: one of them asks (and pauses) while the
    others wait for it, so a pause is counted once against the pass's budget; and True once
    `failed` is set (a partition beside failed: the others stop rather than run to their
    end while the pass holds the compaction lock)."""
    lock = threading.Lock()

    def check() -> bool:
        if failed.is_set():
            return True
        if cancelled is None:
            return False
        with lock:
            return cancelled()

    return check


SCAN_PIECES = 16
"""Pieces of the key space image creation scans for its keys, with a check between two."""


def _scan_pieces(
    timeline: Timeline, layer_map: LayerMap, lsn: int, cancelled: Cancelled | None
) -> Iterator[list[Key]]:
    """The keys of `timeline.get_keys(FULL_KEYSPACE, lsn)`, a piece of the key space at a
    time with `cancelled()` between pieces: in one call the scan (up to a second on 1 GiB)
    could neither stop nor pause for foreground work (py-spy: ~0.24 s of its CPU overlapped
    a 1% checkout's delta, in the same process, under the same GIL). The pieces end at layer
    boundaries (L1 and image layers split the key space by key), SCAN_PIECES of them at
    most; keys of a piece are those of the whole scan inside it, in order."""
    starts = sorted({layer.key_range.start for layer in layer_map.layers()} - {FULL_KEYSPACE.start})
    starts = [key for key in starts if key < FULL_KEYSPACE.end]
    step = -(-len(starts) // (SCAN_PIECES - 1))  # ceiling: at most SCAN_PIECES - 1 bounds
    bounds = [*starts[step - 1 :: step], FULL_KEYSPACE.end] if starts else [FULL_KEYSPACE.end]
    start = FULL_KEYSPACE.start
    for end in bounds:
        if start != FULL_KEYSPACE.start and cancelled is not None and cancelled():
            raise CompactionCancelled(f"image creation of {timeline.timeline_id} cancelled")
        yield timeline.get_keys(KeyRange(start, end), lsn)
        start = end


_LAST_BOUNDS: weakref.WeakKeyDictionary[Timeline, tuple[KeyRange, ...]] = (
    weakref.WeakKeyDictionary()
)
"""Per timeline, the partitions of its last image pass. A pass first asks whether any of
them is due (cheap: the layer indexes) and scans the keys (0.3-1 s on a 500 MiB database,
a third of a core while ingest flushed every few seconds) only when one is; the layers are
then written over fresh partitions, since an image layer must hold every key of its range."""


def _due(
    timeline: Timeline,
    layer_map: LayerMap,
    key_range: KeyRange,
    lsn: int,
    force: bool,
    snapshot_keys: int = 0,
) -> bool:
    """Whether key_range needs an image layer at lsn: image_creation_threshold delta layers
    holding keys of it above its image floor, or (forced) any delta above its newest image,
    or versions above its images that outweigh them (`_deltas_outweigh_images`); at a
    snapshot's LSN (`snapshot_keys`: the partition's key count there), also where
    snapshot_image_pages_percent of those keys were written since its images
    (`_keys_written`)."""
    if force:
        image = layer_map.newest_image_covering(key_range, lsn)
        image_lsn = image.lsn if image is not None else -1
    else:
        image_lsn = _image_floor(layer_map, key_range, lsn)
    if image_lsn == lsn:
        return False
    # Only layers that hold keys of the partition cost its reads anything (an L0 layer spans
    # the whole keyspace whether or not it holds any of them). Forced (GC) images are written
    # wherever any delta overlaps, as before.
    deltas = layer_map.deltas_overlapping(key_range, image_lsn, lsn)
    if force:
        return bool(deltas)
    settings = timeline.settings
    if sum(1 for d in deltas if d.has_keys_in(key_range)) >= settings.image_creation_threshold:
        return True
    if _deltas_outweigh_images(layer_map, key_range, image_lsn, lsn, deltas, settings):
        return True
    if not snapshot_keys or image_lsn < 0:
        return False
    written = _keys_written(deltas, key_range, image_lsn, lsn)
    return written * 100 >= settings.snapshot_image_pages_percent * snapshot_keys


def _keys_written(deltas: list[DeltaLayer], key_range: KeyRange, floor: int, lsn: int) -> int:
    """How many keys of key_range have a version in (floor, lsn] (the layers' indexes, in C).

    Exact where the bytes of `_deltas_outweigh_images` are a share: an L1 layer merged
    across a snapshot holds the versions of both sides, and its LSN share above the floor
    said 1.9 MB of the 9 MB the pages written after it held (bench.exchange's change)."""
    written: set[Key] = set()
    for d in deltas:
        f = d.file
        start = f.lower_bound(key_range.start)
        written.update(key for key, _, _ in f.newest_of_keys(start, key_range.end, lsn, floor))
    return len(written)


def _deltas_outweigh_images(
    layer_map: LayerMap,
    key_range: KeyRange,
    image_lsn: int,
    lsn: int,
    deltas: list[DeltaLayer],
    settings: StoreSettings,
) -> bool:
    """Whether a read of key_range decompresses more versions above its images than the
    images hold of it (image_creation_delta_percent of it, and a quarter of a layer at least),
    from the layers' indexes: after a bulk load the loaded keys sit in one L1 layer over
    images written before them (holding none of them), and a basebackup rebuilt every one
    of their pages from its WAL (bench.extract: 1.2 GiB of deltas for a 1 GiB database).

    A layer whose LSN range straddles the image floor counts for its share of LSNs above
    it (its versions below are in the images): counted whole, an L1 layer merged across
    an image's LSN would make its partition due again at every pass."""
    above = 0
    for d in deltas:
        start = max(d.lsn_start, image_lsn + 1)
        share = (d.lsn_end - start) / (d.lsn_end - d.lsn_start)
        above += int(d.raw_bytes_in(key_range) * share)
    if above < settings.image_layer_target_size // 4:
        return False
    images, _ = layer_map.images_over(key_range, lsn)
    held = sum(image.raw_bytes_in(key_range) for image in images)
    return above * 100 >= settings.image_creation_delta_percent * held


def _image_floor(layer_map: LayerMap, key_range: KeyRange, lsn: int) -> int:
    """The oldest of the newest images (at or below lsn) of the keys of key_range: every key
    of the range has an image at or above it (-1 if some key has none).

    Partition bounds move as keys come and go, so a partition is often covered by the
    images of neighbouring older partitions rather than by one image; asking for a single
    image covering it all would fall back to an old one and rewrite fresh images.
    """
    uncovered = [key_range]
    floor = -1
    for image in layer_map.images:  # newest first
        if image.lsn > lsn:
            continue
        rest: list[KeyRange] = []
        for part in uncovered:
            inter = part.intersection(image.key_range)
            if inter is None:
                rest.append(part)
                continue
            floor = image.lsn
            if part.start < inter.start:
                rest.append(KeyRange(part.start, inter.start))
            if inter.end < part.end:
                rest.append(KeyRange(inter.end, part.end))
        uncovered = rest
        if not uncovered:
            return floor
    return -1


def _write_image(
    timeline: Timeline,
    materialize: Materialize,
    materialize_range: MaterializeRange | None,
    key_range: KeyRange,
    keys: list[Key],
    lsn: int,
    cancelled: Cancelled | None = None,
) -> ImageLayerWriter:
    """The image layer of one partition, sealed: the caller publishes it."""

    def one(key: Key) -> bytes | None:
        data = timeline.get_reconstruct_data(key, lsn)
        if data.deltas:
            return materialize(key, lsn, data)
        return data.image[1] if data.image is not None else None

    writer = ImageLayerWriter(timeline.directory, key_range, lsn, timeline.settings)
    try:
        values: Iterable[tuple[Key, bytes | None]] = (
            ((key, one(key)) for key in keys)
            if materialize_range is None
            else materialize_range(timeline, key_range, keys, lsn, one)
        )
        pending = iter(values)
        # CHECK_EVERY keys at a time: their pages go into the layer in one call
        while run := list(itertools.islice(pending, CHECK_EVERY)):
            if cancelled is not None and cancelled():
                raise CompactionCancelled(f"image layer of {timeline.timeline_id} cancelled")
            run_keys, run_values = zip(*run, strict=True)
            writer.add_values(list(run_keys), list(run_values))
        writer.seal()
    except BaseException:
        writer.abort()
        raise
    return writer


def _publish_image(writer: ImageLayerWriter, cache: BlockCache) -> ImageLayer:
    """A sealed image layer made durable and visible, opened (an unpublished file is
    deleted if this fails)."""
    writer.publish()
    return writer.opened(cache)
