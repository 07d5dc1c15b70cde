"""A timeline: one branch of history, its layers, its LSNs and its ancestor.

Write rules (what ingest must do):

- ``put(key, lsn, value)`` requires ``lsn > last_record_lsn``: the values of a WAL record are
  put at the record's end LSN, then ``advance_last_record_lsn(lsn, prev)`` publishes them.
  One record may put many keys at one LSN; per key, LSNs never decrease and several puts of
  one key at one LSN are kept in put order.
- Reads (``get_reconstruct_data``, ``get_keys``) are at ``lsn <= last_record_lsn``; above it
  they raise FutureLsn (the caller may wait for ingest).
- After a crash, the timeline reopens with ``last_record_lsn = disk_consistent_lsn``; ingest
  re-puts every record whose end LSN is above it.

Durability: ``freeze()`` cuts the open in-memory layer at last_record_lsn (no I/O);
``flush_frozen_layers()`` writes each frozen layer as an L0 delta file (fsynced), then the
manifest naming it, and only then advances ``disk_consistent_lsn``.

Threads: ingest (puts, advance, freeze) may run on the event loop while reads, flushes and
compaction run in worker threads. One lock guards the mutable state (open layer, frozen list,
layer map reference, LSNs) and is held only for in-memory work; file I/O happens outside it
against immutable layers. Manifest writes are serialized by a second lock, flushes by a third;
compaction takes ``compaction_lock``. A merged flush's files are published and its manifest
written on the timeline's publisher thread, one group after another, while the flusher may
pack the next group.
"""

from __future__ import annotations

import itertools
import threading
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from durable_files import TEMP_SUFFIX
from pageserver.storage.keys import FULL_KEYSPACE, Key, KeyRange, check_key
from pageserver.storage.layers.blocks import BlockCache, LayerCorrupt
from pageserver.storage.layers.delta import DeltaLayer, DeltaLayerWriter
from pageserver.storage.layers.evicted import EVICTED_SUFFIX, evicted_layer
from pageserver.storage.layers.image import ImageLayer
from pageserver.storage.layers.inmemory import InMemoryLayer, new_layer
from pageserver.storage.layers.layer_map import ChainEnd, LayerMap, VersionSource, image_tiles
from pageserver.storage.layers.names import LayerName, parse_layer_name
from pageserver.storage.layers.persistent import PersistentLayer
from pageserver.storage.manifest import (
    MANIFEST_NAME,
    EmptySpan,
    LayerEntry,
    ManifestCorrupt,
    TimelineManifest,
    read_manifest,
    write_manifest,
)
from pageserver.storage.settings import StoreSettings
from pageserver.storage.values import (
    EMPTY_RECONSTRUCT,
    Image,
    ReconstructData,
    Tombstone,
    Value,
    WalDelta,
)
from pg15.lsn import format_lsn
from proto.errors import Conflict, InvalidArgument

_read_epochs = itertools.count(1)


AppendRecords = Callable[[Any, int, int], tuple[int, int, int | None, int | None]]
"""See Timeline.put_records."""

MergeFrozen = Callable[["Timeline", list[InMemoryLayer], Executor], list[Future[DeltaLayer]]]
"""Frozen layers (oldest first) to L1 files over their LSN range, each published (durable) by
the executor, not yet in the manifest (pageserver.storage.compaction.merge_frozen)."""


class FutureLsn(InvalidArgument):
    """A read at an LSN the timeline has not ingested yet."""


MAX_EMPTY_SPANS = 128
"""The manifest keeps the newest this many `EmptySpan`s (two a merge; ~110 bytes each in a
manifest written at every flush): an older window than they reach reads its image layers'
keys as before (`keys_written`'s `imaged`: compared at both ends), nothing worse."""


def merge_gaps(outputs: Iterable[DeltaLayer]) -> tuple[EmptySpan, ...]:
    """The key ranges the L1 files of one merge of full-keyspace layers (an L0 merge, a
    merged flush: they tile [first key, last key] over one LSN range) leave out, over that LSN
    range: no WAL version lies there (`EmptySpan`). None when the outputs do not share one
    LSN range (not one merge's: nothing is claimed)."""
    layers = sorted(outputs, key=lambda layer: layer.key_range.start)
    if not layers or len({(x.lsn_start, x.lsn_end) for x in layers}) != 1:
        return ()
    lsn_start, lsn_end = layers[0].lsn_start, layers[0].lsn_end
    gaps: list[EmptySpan] = []
    at = FULL_KEYSPACE.start
    for layer in layers:
        if at < layer.key_range.start:
            gaps.append(EmptySpan(KeyRange(at, layer.key_range.start), lsn_start, lsn_end))
        at = max(at, layer.key_range.end)
    if at < FULL_KEYSPACE.end:
        gaps.append(EmptySpan(KeyRange(at, FULL_KEYSPACE.end), lsn_start, lsn_end))
    return tuple(gaps)


def open_layer(directory: Path, name: LayerName, cache: BlockCache) -> PersistentLayer:
    cls = ImageLayer if name.is_image else DeltaLayer
    return cls(directory, name, cache)


class Timeline:
    """Use TimelineStore to create, branch and open timelines; this class reads and writes."""

    def __init__(
        self,
        directory: Path,
        manifest: TimelineManifest,
        ancestor: Timeline | None,
        layers: Iterable[PersistentLayer],
        settings: StoreSettings,
        cache: BlockCache,
    ) -> None:
        if (ancestor is None) != (manifest.ancestor_id is None) or (
            ancestor is not None and ancestor.timeline_id != manifest.ancestor_id
        ):
            raise InvalidArgument(f"timeline {manifest.timeline_id}: wrong ancestor given")
        self.timeline_id: str = manifest.timeline_id
        self.directory = directory
        self.ancestor = ancestor
        self.ancestor_lsn = manifest.ancestor_lsn
        self.settings = settings
        self.cache = cache
        self._lock = threading.Lock()
        self._manifest_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self.compaction_lock = threading.Lock()
        self._map = LayerMap.build(layers)
        self._open: InMemoryLayer | None = None
        self._frozen: list[InMemoryLayer] = []
        """Oldest first."""
        self._disk_consistent_lsn = manifest.disk_consistent_lsn
        self._disk_prev_record_lsn = manifest.prev_record_lsn
        self._empty_spans = manifest.empty_spans
        """Oldest first: kept with the layer map (under the lock), written in every manifest."""
        self._last_record_lsn = manifest.disk_consistent_lsn
        self._prev_record_lsn = manifest.prev_record_lsn
        self._next_layer_start = manifest.disk_consistent_lsn + 1
        self._in_flight = 0
        """The oldest frozen layers whose merged files are being published (still readable)."""
        self._publisher: ThreadPoolExecutor | None = None
        self._publication: Future[None] | None = None
        """The last publication queued (flush_frozen_layers)."""
        self._publish_error: BaseException | None = None
        self._closed = False
        self._read_epoch = next(_read_epochs)
        """Names this object's readable history for caches; renewed whenever layers are
        removed (GC may make LSNs unreadable), never reused."""

    # --- creation and reopening ------------------------------------------------------------

    @classmethod
    def create(
        cls,
        directory: Path,
        timeline_id: str,
        ancestor: Timeline | None,
        ancestor_lsn: int,
        prev_record_lsn: int | None,
        settings: StoreSettings,
        cache: BlockCache,
    ) -> Timeline:
        """A new empty timeline; with an ancestor, it starts at ancestor_lsn (nothing copied).
        `directory` may exist (empty, or holding the store's `importing` marker)."""
        directory.mkdir(parents=True, exist_ok=True)
        manifest = TimelineManifest(
            timeline_id=timeline_id,
            ancestor_id=None if ancestor is None else ancestor.timeline_id,
            ancestor_lsn=ancestor_lsn,
            disk_consistent_lsn=ancestor_lsn,
            prev_record_lsn=prev_record_lsn,
            layers=(),
        )
        write_manifest(directory, manifest)
        return cls(directory, manifest, ancestor, (), settings, cache)

    @classmethod
    def open(
        cls,
        directory: Path,
        ancestor: Timeline | None,
        settings: StoreSettings,
        cache: BlockCache,
        manifest: TimelineManifest | None = None,
    ) -> Timeline:
        """Reopen from the manifest; delete layer and temp files it does not name (crash
        leftovers). The in-memory state is gone: ingest resumes at disk_consistent_lsn."""
        if manifest is None:
            manifest = read_manifest(directory)
        if manifest.timeline_id != directory.name:
            raise ManifestCorrupt(f"manifest in {directory} is for timeline {manifest.timeline_id}")
        named = {entry.name.file_name: entry for entry in manifest.layers}
        for path in directory.iterdir():
            if path.name == MANIFEST_NAME or path.name in named or not path.is_file():
                continue
            if path.name.endswith(TEMP_SUFFIX) or parse_layer_name(path.name) is not None:
                path.unlink()
        layers: list[PersistentLayer] = []
        try:
            for entry in manifest.layers:
                path = directory / entry.name.file_name
                if not path.exists():
                    if (directory / (entry.name.file_name + EVICTED_SUFFIX)).exists():
                        layers.append(evicted_layer(directory, entry.name, cache, entry.size))
                        continue  # kept remotely: fetched when first read (layers/evicted.py)
                    raise LayerCorrupt(path, "the manifest names it but it is missing")
                if path.stat().st_size != entry.size:
                    raise LayerCorrupt(path, f"the manifest says {entry.size} bytes")
                layers.append(open_layer(directory, entry.name, cache))
        except BaseException:
            for layer in layers:
                layer.close()
            raise
        return cls(directory, manifest, ancestor, layers, settings, cache)

    # --- LSNs ------------------------------------------------------------------------------

    @property
    def last_record_lsn(self) -> int:
        return self._last_record_lsn

    @property
    def prev_record_lsn(self) -> int | None:
        return self._prev_record_lsn

    @property
    def disk_consistent_lsn(self) -> int:
        return self._disk_consistent_lsn

    @property
    def open_layer_bytes(self) -> int:
        open_ = self._open
        return 0 if open_ is None else open_.size

    @property
    def needs_flush(self) -> bool:
        """True when frozen layers wait for flush_frozen_layers()."""
        return bool(self._frozen)

    # --- writes ----------------------------------------------------------------------------

    def _new_layer(self) -> InMemoryLayer:
        return new_layer(self._next_layer_start, self.settings.checkpoint_distance)

    def put(self, key: Key, lsn: int, value: Value) -> None:
        self.put_batch(((key, lsn, value),))

    def put_batch(self, items: Iterable[tuple[Key, int, Value]]) -> None:
        """Several puts under one lock acquisition (the values of one record, typically)."""
        with self._lock:
            self._check_open()
            for key, lsn, value in items:
                if lsn <= self._last_record_lsn:
                    raise InvalidArgument(
                        f"timeline {self.timeline_id}: put at LSN {format_lsn(lsn)} is not "
                        f"above the last record LSN {format_lsn(self._last_record_lsn)}"
                    )
                if not isinstance(value, Image | WalDelta | Tombstone):
                    raise InvalidArgument(f"not a storable value: {type(value).__name__}")
                if self._open is None:
                    self._open = self._new_layer()
                self._open.put(check_key(key), lsn, value)

    def put_records(self, append: AppendRecords) -> int:
        """Let `append` put whole records straight into the open layer, under the lock, and
        publish them (the C ingest path: one call for many records, no per-put objects).

        `append(versions, last_record_lsn, budget)` appends ``(end LSN, value)`` to the
        per-key lists of records ending above last_record_lsn, in LSN order, stops once
        `budget` bytes are added, and returns (bytes, versions added, last end LSN, its
        record's start LSN), the LSNs None if it took no record. Freezes at
        checkpoint_distance like advance_last_record_lsn. Returns the bytes added.
        """
        with self._lock:
            self._check_open()
            if self._open is None:
                self._open = self._new_layer()
            layer = self._open
            budget = self.settings.checkpoint_distance - layer.size
            size, count, end, prev = append(
                layer.versions_for_append(), self._last_record_lsn, budget
            )
            if end is None:
                return 0
            if end <= self._last_record_lsn:
                raise InvalidArgument(
                    f"timeline {self.timeline_id}: records appended up to {format_lsn(end)}, "
                    f"not above the last record LSN {format_lsn(self._last_record_lsn)}"
                )
            layer.account(size, count, end)
            self._last_record_lsn = end
            self._prev_record_lsn = prev
            if layer.size >= self.settings.checkpoint_distance:
                self._freeze_locked()
            return size

    def advance_last_record_lsn(self, lsn: int, prev_record_lsn: int | None) -> None:
        """Publish the puts up to `lsn` (a record's end); freezes at checkpoint_distance."""
        with self._lock:
            if lsn < self._last_record_lsn:
                raise InvalidArgument(
                    f"timeline {self.timeline_id}: last record LSN cannot move back from "
                    f"{format_lsn(self._last_record_lsn)} to {format_lsn(lsn)}"
                )
            self._last_record_lsn = lsn
            self._prev_record_lsn = prev_record_lsn
            if self._open is not None and self._open.size >= self.settings.checkpoint_distance:
                self._freeze_locked()

    def prefault_open_layer(self) -> bool:
        """The open layer's value memory mapped in ahead of its writer, off this thread
        (InMemoryLayer.prefault; NodeStore.maybe_flush asks while catching up, when the layer
        fills at once: a slow live node's layer maps only the pages its values take)."""
        with self._lock:
            return self._open is not None and self._open.prefault()

    def freeze(self) -> bool:
        """Cut the open layer at last_record_lsn; False if nothing new since the last cut."""
        with self._lock:
            return self._freeze_locked()

    def _freeze_locked(self) -> bool:
        cut = self._last_record_lsn
        if cut < self._next_layer_start:
            return False
        layer = self._open if self._open is not None else self._new_layer()
        self._open = layer.split_above(cut)
        layer.freeze(cut + 1, self._prev_record_lsn)
        self._frozen.append(layer)
        self._next_layer_start = cut + 1
        return True

    @property
    def frozen_count(self) -> int:
        """Frozen layers waiting for flush_frozen_layers (each holds up to a
        checkpoint_distance of values in memory)."""
        return len(self._frozen)

    @property
    def frozen_upto(self) -> int | None:
        """The last LSN the frozen layers hold (None if there are none)."""
        with self._lock:
            if not self._frozen:
                return None
            end = self._frozen[-1].lsn_end
            assert end is not None
            return end - 1

    def flush_frozen_layers(
        self,
        upto: int | None = None,
        merge: MergeFrozen | None = None,
        wait: Callable[[], bool] | None = None,
        published: Callable[[], None] | None = None,
        before_manifest: Callable[[], None] | None = None,
    ) -> None:
        """Write every frozen layer (only those ending at or below `upto`, if given) as an L0
        delta file, then the manifest, then advance disk_consistent_lsn. Blocking I/O: run
        it in a worker thread.

        With `merge` (a catch-up), the frozen layers are written at once by it, as L1 layers
        over their LSN range, published by one manifest (the L0 files and their read-back by
        compaction saved), a lone one too: waiting for a second to merge with left the flusher
        idle while the decode thread filled it (bench/README `ingest`, session 19). Their
        publication (the last files' fsync and rename, the manifest) is queued on the
        timeline's publisher thread, in order; unless `wait()` says False once it is queued,
        this returns when it is done (`published` is called after each manifest, failed or
        not: the decode thread's bound counts the group's frozen layers until then).

        `before_manifest` runs before each manifest is written (on the publisher thread for a
        merged group), and its failure fails that manifest: the node's LSN index flush, whose
        entries must be durable before the layers holding their records are (those records
        are never re-ingested). Flushed ahead of the merge, its fsync waited on the flusher's
        path, 13-30 ms a group on a busy disk (bench/README `ingest`, session 22)."""
        with self._flush_lock:
            if self._publish_error is not None:
                self._wait_published()  # raises it, once the queue is drained
            if merge is not None:
                with self._lock:
                    waiting = self._frozen[self._in_flight :]
                    group = [m for m in waiting if upto is None or _end(m) - 1 <= upto]
                    self._in_flight += len(group)
                if group:
                    self._queue_merged(group, merge, published, before_manifest)
                if wait is not None and not wait():
                    return  # a group took every layer up to `upto`
            self._wait_published()
            while True:
                with self._lock:
                    if not self._frozen:
                        return
                    layer = self._frozen[0]
                    assert layer.lsn_end is not None
                    if upto is not None and layer.lsn_end - 1 > upto:
                        return
                delta = self._write_l0(layer) if layer.n_versions else None
                assert layer.lsn_end is not None
                if before_manifest is not None:
                    try:
                        before_manifest()
                    except BaseException:
                        if delta is not None:
                            discard_layers([delta])
                        raise
                with self._manifest_lock:
                    with self._lock:
                        self._frozen.pop(0)
                        if delta is not None:
                            self._map = self._map.replace(add=[delta])
                        manifest = self._manifest_locked(layer.lsn_end - 1, layer.prev_record_lsn)
                    write_manifest(self.directory, manifest)
                    with self._lock:
                        self._disk_consistent_lsn = manifest.disk_consistent_lsn
                        self._disk_prev_record_lsn = manifest.prev_record_lsn

    def _queue_merged(
        self,
        group: list[InMemoryLayer],
        merge: MergeFrozen,
        published: Callable[[], None] | None,
        before_manifest: Callable[[], None] | None = None,
    ) -> None:
        """`group` (the oldest frozen layers not being published) written by `merge`, then one
        manifest naming its files with disk_consistent_lsn at the group's end: durable all at
        once, as the L0 flushes of each would have been one after another. The files are
        published and the manifest written on the publisher thread, after every group queued
        before (a file durable before the manifest naming it, manifests in LSN order); the
        frozen layers stay readable until the files replace them (under the lock, with the
        manifest's map)."""
        if self._publisher is None:
            self._publisher = ThreadPoolExecutor(1, thread_name_prefix="layer-publish")
        with_versions = [m for m in group if m.n_versions]
        try:
            outputs = merge(self, with_versions, self._publisher) if with_versions else []
        except BaseException:
            with self._lock:
                self._in_flight -= len(group)
            raise

        def publish() -> None:
            try:
                self._publish_merged(group, outputs, before_manifest)
            except BaseException as exc:
                with self._lock:
                    if self._publish_error is None:
                        self._publish_error = exc
            finally:
                if published is not None:
                    published()

        self._publication = self._publisher.submit(publish)

    def _publish_merged(
        self,
        group: list[InMemoryLayer],
        outputs: list[Future[DeltaLayer]],
        before_manifest: Callable[[], None] | None = None,
    ) -> None:
        """On the publisher thread: the group's files once published, then its manifest. After
        a failed publication the groups queued behind it are dropped (files deleted, layers
        left frozen): the next flush writes them again after the failed one. The group is
        counted out of `_in_flight` exactly once, whatever raises (the futures, the discard):
        counted too high, the next merged flush would skip frozen layers no one writes."""
        counted = False
        try:
            done = [f.result() for f in outputs if f.exception() is None]
            if self._publish_error is not None or len(done) < len(outputs):
                discard_layers(done)
                if self._publish_error is not None:
                    raise self._publish_error
                for future in outputs:
                    future.result()  # raises the failed one's error
            if before_manifest is not None:
                try:
                    before_manifest()
                except BaseException:
                    discard_layers(done)
                    raise
            last = group[-1]
            with self._manifest_lock:
                with self._lock:
                    self._in_flight -= len(group)  # off the frozen layers or left to flush
                    counted = True
                    if self._frozen[: len(group)] != group:
                        raise InvalidArgument("frozen layers were flushed twice at once")
                    del self._frozen[: len(group)]
                    self._map = self._map.replace(add=done)
                    self._add_empty_spans_locked(merge_gaps(done))
                    manifest = self._manifest_locked(_end(last) - 1, last.prev_record_lsn)
                write_manifest(self.directory, manifest)
                with self._lock:
                    self._disk_consistent_lsn = manifest.disk_consistent_lsn
                    self._disk_prev_record_lsn = manifest.prev_record_lsn
        finally:
            if not counted:
                with self._lock:
                    self._in_flight -= len(group)

    def _wait_published(self) -> None:
        """Until every queued publication is done (the publisher's queue is in order); raise
        the first that failed since the last call."""
        if self._publication is not None:
            self._publication.result()
        with self._lock:
            error, self._publish_error = self._publish_error, None
        if error is not None:
            raise error

    def freeze_and_flush(self, merge: MergeFrozen | None = None) -> None:
        """Make everything up to last_record_lsn durable (`merge`: see flush_frozen_layers)."""
        self.freeze()
        self.flush_frozen_layers(merge=merge)

    def _write_l0(self, layer: InMemoryLayer) -> DeltaLayer:
        assert layer.lsn_end is not None
        settings = replace(self.settings, zstd_level=self.settings.l0_zstd_level)
        writer = DeltaLayerWriter(
            self.directory, layer.lsn_start, layer.lsn_end, settings, level0=True
        )
        try:
            layer.write_to(writer)
        except BaseException:
            writer.abort()
            raise
        return writer.finish(FULL_KEYSPACE, self.cache)

    def _manifest_locked(self, disk_consistent_lsn: int, prev: int | None) -> TimelineManifest:
        return TimelineManifest(
            timeline_id=self.timeline_id,
            ancestor_id=None if self.ancestor is None else self.ancestor.timeline_id,
            ancestor_lsn=self.ancestor_lsn,
            disk_consistent_lsn=disk_consistent_lsn,
            prev_record_lsn=prev,
            layers=tuple(LayerEntry(x.name, x.file_size) for x in self._map.layers()),
            empty_spans=self._empty_spans,
        )

    def _add_empty_spans_locked(self, spans: Iterable[EmptySpan]) -> None:
        """Keep `spans` (a merge's `merge_gaps`), the newest MAX_EMPTY_SPANS in all."""
        added = tuple(spans)
        if added:
            self._empty_spans = (*self._empty_spans, *added)[-MAX_EMPTY_SPANS:]

    def layer_map(self) -> LayerMap:
        """The current snapshot of layer files (immutable)."""
        with self._lock:
            return self._map

    def replace_layers(
        self,
        add: Iterable[PersistentLayer],
        remove: Iterable[PersistentLayer],
        empty: Iterable[EmptySpan] = (),
    ) -> None:
        """Swap layer files atomically (compaction, GC): the new files must be durable
        already; the manifest is rewritten, then the removed files are deleted. `empty`: an
        L0 merge's `merge_gaps`, kept with its files."""
        add, remove = list(add), list(remove)
        with self._manifest_lock:
            with self._lock:
                current = {id(x) for x in self._map.layers()}
                if any(id(x) not in current for x in remove):
                    raise InvalidArgument("cannot remove a layer that is not in the layer map")
                self._map = self._map.replace(add=add, remove=remove)
                self._add_empty_spans_locked(empty)
                if remove:
                    self._read_epoch = next(_read_epochs)
                manifest = self._manifest_locked(
                    self._disk_consistent_lsn, self._disk_prev_record_lsn
                )
            write_manifest(self.directory, manifest)
        # Readers holding an older map keep their mappings valid after unlink.
        for layer in remove:
            layer.path.unlink(missing_ok=True)

    # --- reads -----------------------------------------------------------------------------

    def _check_read_lsn(self, lsn: int) -> None:
        if lsn > self._last_record_lsn:
            raise FutureLsn(
                f"timeline {self.timeline_id} has ingested up to "
                f"{format_lsn(self._last_record_lsn)}, not yet {format_lsn(lsn)}"
            )

    def get_reconstruct_data(self, key: Key, lsn: int) -> ReconstructData:
        """The newest image at or below lsn and the deltas above it, through ancestors."""
        self._check_read_lsn(lsn)
        versions: list[tuple[int, Value]] = []
        timeline: Timeline = self
        at = lsn
        while True:
            found, end = timeline._read_own(key, at)
            versions.extend(found)
            if end is not ChainEnd.OPEN or timeline.ancestor is None:
                break
            at = min(at, timeline.ancestor_lsn)
            timeline = timeline.ancestor
        return _reconstruct_data(versions)

    def _read_own(self, key: Key, lsn: int) -> tuple[list[tuple[int, Value]], ChainEnd]:
        with self._lock:
            self._check_open()
            layer_map = self._map
            frozen = self._frozen[::-1]
            open_ = self._open
            image = layer_map.newest_image(key, lsn)
            floor = image.lsn if image is not None else -1
            if open_ is not None and open_.lsn_start <= lsn:
                head, ended = open_.collect(key, lsn, floor)
            else:
                head, ended = [], False
        return layer_map.read_chain(key, lsn, image, frozen, head, ended)

    def persistent_map(self, lsn: int) -> LayerMap | None:
        """The layer map, when the layer files alone hold every version of this timeline at
        or below lsn (no in-memory layer does): a bulk reader may then scan the files
        (`pageserver.reconstruct.range_rebuild`); None otherwise."""
        self._check_read_lsn(lsn)
        with self._lock:
            self._check_open()
            if self._open is not None and self._open.lsn_start <= lsn:
                return None
            if any(layer.lsn_start <= lsn for layer in self._frozen):
                return None
            return self._map

    def persistent_view(self, key_range: KeyRange, lsn: int) -> PersistentView:
        """The layer map, with the keys of key_range that have versions at or below lsn in an
        in-memory layer (open or frozen): every other key of the range has all its versions
        of this timeline at or below lsn in the map's files, which a bulk reader may scan
        (`pageserver.reconstruct.range_rebuild`) while a live node keeps ingesting."""
        self._check_read_lsn(lsn)
        with self._lock:
            self._check_open()
            layers: list[InMemoryLayer] = [m for m in self._frozen if m.lsn_start <= lsn]
            if self._open is not None and self._open.lsn_start <= lsn:
                layers.append(self._open)
            held = frozenset(
                key for layer in layers for key, _, _ in layer.newest_versions(key_range, lsn)
            )
            return PersistentView(self._map, held)

    def version_ident(self, key: Key, lsn: int) -> tuple[int, Key, int] | None:
        """A cheap name for the value of `key` at `lsn`: (read epoch of the timeline holding
        the newest version at or below lsn, key, that version's LSN), from layer indexes
        alone (nothing decompressed). Equal names mean equal values, so a cache of rebuilt
        pages can be keyed by it. None when the key has no version (or is hidden by an
        image layer that does not hold it).
        """
        self._check_read_lsn(lsn)
        timeline: Timeline = self
        at = lsn
        while True:
            found, is_open = timeline._newest_own(key, at)
            if found is not None:
                return (timeline._read_epoch, key, found)
            if not is_open or timeline.ancestor is None:
                return None
            at = min(at, timeline.ancestor_lsn)
            timeline = timeline.ancestor

    def _newest_own(self, key: Key, lsn: int) -> tuple[int | None, bool]:
        """(LSN of the newest version of key <= lsn on this timeline, whether the ancestor
        may still hold it)."""
        with self._lock:
            self._check_open()
            layer_map = self._map
            frozen = self._frozen[::-1]
            open_ = self._open
            head = (
                open_.newest_lsn(key, lsn) if open_ is not None and open_.lsn_start <= lsn else None
            )
        image = layer_map.newest_image(key, lsn)
        floor = image.lsn if image is not None else -1
        if head is None:
            for layer in frozen:
                if layer.lsn_start <= lsn:
                    head = layer.newest_lsn(key, lsn)
                    if head is not None:
                        break
        if head is None:
            for delta in layer_map.deltas_for(key, lsn, floor):
                head = delta.newest_lsn(key, lsn)
                if head is not None:
                    break
        if head is not None and head > floor:
            return head, False
        if image is None:
            return None, True
        if image.file.find_key(key) is None:
            return None, False
        return image.lsn, False

    def get_keys(self, key_range: KeyRange, lsn: int) -> list[Key]:
        """Sorted keys of key_range that have a value at lsn (ancestors included; keys whose
        newest version is a tombstone, or hidden by an image layer, excluded)."""
        self._check_read_lsn(lsn)
        result: dict[Key, bool] = {}
        covered: list[KeyRange] = []
        timeline: Timeline | None = self
        at = lsn
        while timeline is not None:
            decided, own_covered = timeline._scan_own(key_range, at)
            if not result and not covered:  # this timeline's (an ancestor's come after)
                result = decided
            else:
                for key, exists in decided.items():
                    if key not in result and not any(key in r for r in covered):
                        result[key] = exists
            covered.extend(own_covered)
            at = min(at, timeline.ancestor_lsn)
            timeline = timeline.ancestor
        return sorted(key for key, exists in result.items() if exists)

    def _scan_own(self, key_range: KeyRange, lsn: int) -> tuple[dict[Key, bool], list[KeyRange]]:
        layer_map, frozen, head = self._range_view(key_range, lsn)
        return layer_map.scan_keys(key_range, lsn, frozen, head)

    def _range_view(
        self, key_range: KeyRange, lsn: int
    ) -> tuple[LayerMap, list[InMemoryLayer], list[tuple[Key, int, int]]]:
        """One consistent view for a range read: the layer map, the frozen layers (newest
        first) and the open layer's newest versions of the range, taken under the lock."""
        with self._lock:
            return self._range_view_locked(key_range, lsn)

    def _range_view_locked(
        self, key_range: KeyRange, lsn: int
    ) -> tuple[LayerMap, list[InMemoryLayer], list[tuple[Key, int, int]]]:
        self._check_open()
        open_ = self._open
        head = (
            list(open_.newest_versions(key_range, lsn))
            if open_ is not None and open_.lsn_start <= lsn
            else []
        )
        return self._map, self._frozen[::-1], head

    def keys_written(self, key_range: KeyRange, above: int, upto: int) -> WrittenKeys:
        """Keys of key_range with a version in (above, upto] in this timeline's own layers
        (not the ancestor's), from indexes alone: a key in neither set has the same value at
        both LSNs here unless an image layer in the window covers it without holding it (it
        no longer exists). Image layers are read only where the WAL versions' spans do not
        cover the window (`WrittenKeys.imaged`)."""
        # One lock for the view and the open layer's start: taken apart, a freeze in between
        # left the frozen layer out of both (in no span), and every key of an image layer
        # in the window then counted as possibly changed (a delta .neon as big as the whole).
        with self._lock:
            layer_map, frozen, head = self._range_view_locked(key_range, upto)
            open_start = self._open.lsn_start if self._open is not None else None
            empty = self._empty_spans
        logged = {key for key, lsn, _tag in head if lsn > above}
        imaged: set[Key] = set()
        spans: list[tuple[KeyRange, int, int]] = []
        if open_start is not None:
            spans.append((FULL_KEYSPACE, open_start, upto + 1))
        sources: list[VersionSource] = [s for s in frozen if s.lsn_start <= upto]
        for in_memory in frozen:
            if in_memory.lsn_end is not None:
                spans.append((FULL_KEYSPACE, in_memory.lsn_start, in_memory.lsn_end))
        for file in layer_map.layers():
            if (
                file.lsn_end - 1 > above
                and file.lsn_start <= upto
                and file.key_range.overlaps(key_range)
            ):
                sources.append(file)
                if not file.name.is_image:
                    spans.append((file.key_range, file.lsn_start, file.lsn_end))
        # Where a merge's L1 files hold no key, the full-keyspace layers it merged said no
        # WAL version lies: a span too (else an image layer written in the window made every
        # key of other databases' catalogs a candidate to read at both ends: ~40 ms of a 1%
        # delta push's pageserver, bench/README `exchange`).
        spans.extend(
            (s.key_range, s.lsn_start, s.lsn_end)
            for s in empty
            if s.lsn_end - 1 > above and s.lsn_start <= upto and s.key_range.overlaps(key_range)
        )
        written = WrittenKeys(logged, imaged, tuple(spans))
        # An image layer's keys count only where the spans leave LSNs of the window out: a
        # layer written in it holds every key of its range (58k keys of a 456 MiB database
        # after pgbench, read and set one by one: a fifth of a checkout's delta, py-spy).
        unsure = written.unsure_ranges(key_range, above, upto)
        for source in sources:
            if isinstance(source, ImageLayer):
                for part in unsure:
                    imaged.update(source.newer_keys(part, above, upto))
            else:
                logged.update(source.newer_keys(key_range, above, upto))
        imaged -= logged
        return written

    def plan_range_read(self, key_range: KeyRange, lsn: int) -> RangeRead | None:
        """How to read every key of key_range at lsn in bulk (a basebackup): the image layers
        that hold the keys' values, and the keys with versions above them, which need the
        per-key read path (`get_reconstruct_data`). None when image layers cover the range
        only in part on some timeline: read key by key then.

        Walks the ancestors like a read: a timeline with no image layer over the range adds
        the keys it has versions of to the slow ones and defers the rest to its ancestor at
        the branch point; the first timeline whose image layers cover the range decides every
        other key (held by the newest image layer holding it, else absent). A root timeline
        with no image layer over the range: the keys without versions do not exist.
        """
        self._check_read_lsn(lsn)
        slow: set[Key] = set()
        timeline: Timeline = self
        at = lsn
        while True:
            layer_map, frozen, head = timeline._range_view(key_range, at)
            images, covered = layer_map.images_over(key_range, at)
            if images and not covered:
                return None
            floor = images[-1].lsn if covered else -1  # the oldest image needed
            sources = layer_map.newest_versions_above(key_range, at, floor, frozen, head)
            if covered:
                slow.update(_above_their_images(key_range, images, sources, floor))
            else:
                for source in sources:
                    slow.update(key for key, version_lsn, _tag in source if version_lsn > floor)
            if covered or timeline.ancestor is None:
                return RangeRead(tuple(images), frozenset(slow))
            at = min(at, timeline.ancestor_lsn)
            timeline = timeline.ancestor

    def _check_open(self) -> None:
        if self._closed:
            raise Conflict(f"timeline {self.timeline_id} is closed")

    def close(self) -> None:
        """Release the mappings (the caller guarantees no reads are in flight); unflushed
        in-memory data is dropped, as in a crash (a queued publication ends first)."""
        if self._publisher is not None:
            self._publisher.shutdown(wait=True)
        with self._lock:
            self._closed = True
            layers = self._map.layers()
            self._map = LayerMap()
        for layer in layers:
            layer.close()

    def __repr__(self) -> str:
        return f"Timeline({self.timeline_id})"


@dataclass(frozen=True, slots=True)
class WrittenKeys:
    """What `Timeline.keys_written` found in a window (above, upto]."""

    logged: set[Key]
    """Keys with a WAL version (open, frozen or delta layers) in the window."""
    imaged: set[Key]
    """The other keys held by image layers written in the window (compaction), in the key
    ranges the spans do not log over the whole window (`unsure_ranges`; elsewhere such a key
    did not change): unchanged unless the WAL versions below their image are gone (GC)."""
    spans: tuple[tuple[KeyRange, int, int], ...]
    """(key range, first LSN, end LSN exclusive) of the layers holding WAL versions, and of
    the `EmptySpan`s (no version there at all)."""

    def fully_logged(self, key: Key, above: int, upto: int) -> bool:
        """Whether the layers holding WAL versions cover every LSN of (above, upto] for
        `key`: then a key without a WAL version there did not change."""
        at = above + 1
        for start, end in sorted((s, e) for r, s, e in self.spans if key in r):
            if start > at:
                return False
            at = max(at, end)
            if at > upto:
                return True
        return at > upto

    def unsure_ranges(self, key_range: KeyRange, above: int, upto: int) -> list[KeyRange]:
        """The parts of key_range (sorted, disjoint, merged) whose keys `fully_logged` says
        no to, decided once per stretch of keys between two consecutive bounds of the spans'
        key ranges (the same spans hold every key of a stretch): asked per key (130k keys,
        the spans sorted each time) it was half of a checkout's delta (py-spy)."""
        bounds = sorted({bound for r, _s, _e in self.spans for bound in (r.start, r.end)})
        # Stretch 0 is below every span (no span holds its keys: fully_logged says `above >=
        # upto` then); stretch i > 0 starts at bounds[i - 1], a key of it.
        unsure = [above < upto] + [not self.fully_logged(b, above, upto) for b in bounds]
        ranges: list[KeyRange] = []
        for i, flag in enumerate(unsure):
            start = max(bounds[i - 1], key_range.start) if i else key_range.start
            end = min(bounds[i], key_range.end) if i < len(bounds) else key_range.end
            if not flag or start >= end:
                continue
            if ranges and ranges[-1].end == start:
                start = ranges.pop().start
            ranges.append(KeyRange(start, end))
        return ranges


@dataclass(frozen=True, slots=True)
class PersistentView:
    """What `Timeline.persistent_view` names: a layer map and the keys it does not hold whole."""

    layer_map: LayerMap
    in_memory: frozenset[Key]
    """Keys with versions in in-memory layers: read them through the per-key path."""


@dataclass(frozen=True, slots=True)
class RangeRead:
    """A plan to read a key range in bulk (`Timeline.plan_range_read`)."""

    images: tuple[ImageLayer, ...]
    """Newest first: a key not in `slow` has the value of the first layer whose key range
    holds it, if that layer holds the key; otherwise the key does not exist."""
    slow: frozenset[Key]
    """Keys whose value needs the per-key read path."""


def _above_their_images(
    key_range: KeyRange,
    images: list[ImageLayer],
    sources: list[Iterable[tuple[Key, int, int]]],
    floor: int,
) -> Iterator[Key]:
    """The keys with a version above the image layer that holds their range (`image_tiles`:
    the newest covering each piece). Compaction writes images partition by partition, so
    a database is covered by images of many LSNs; measured against the oldest (`floor`),
    every key an older partition's image shadowed was slow, and a basebackup redid from
    the import's image pages that a newer image held whole."""
    tiles = image_tiles(key_range, tuple(images))
    starts = [piece.start for piece, _ in tiles]
    for source in sources:
        for key, version_lsn, _tag in source:
            if version_lsn > floor and version_lsn > tiles[bisect_right(starts, key) - 1][1].lsn:
                yield key


def discard_layers(layers: Iterable[PersistentLayer]) -> None:
    """Delete layer files no manifest names yet (a failed or cancelled merge or flush)."""
    for layer in layers:
        layer.close()
        layer.path.unlink(missing_ok=True)


def _end(layer: InMemoryLayer) -> int:
    end = layer.lsn_end
    assert end is not None, "a frozen layer has an end"
    return end


def _reconstruct_data(versions: list[tuple[int, Value]]) -> ReconstructData:
    """From versions newest first (ending at the chain base, if any) to ReconstructData."""
    if not versions:
        return EMPTY_RECONSTRUCT
    image: tuple[int, bytes] | None = None
    deltas: list[tuple[int, WalDelta]] = []
    for lsn, value in reversed(versions):
        if isinstance(value, Image):
            image, deltas = (lsn, value.data), []
        elif isinstance(value, WalDelta):
            deltas.append((lsn, value))
        else:
            image, deltas = None, []
    return ReconstructData(image, tuple(deltas))
