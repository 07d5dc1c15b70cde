"""Page history in one storage, and the state of each node that writes into it.

One storage's history lives under `<storage>/pagestore`::

    timelines/<id>/...           the versioned store, shared by every node of the storage, so
                                 a node created from another node's snapshot is a branch
    nodes/<node id>.json         which timeline a node writes, where its WAL decoding starts,
                                 its PostgreSQL timeline ID and how often it was checked out
    wal/<node id>/<timeline id>  the WAL archive of that node on that timeline
    lsn_index/<timeline id>/     record boundaries and commit times of a node's timeline
                                 (pageserver/ingest/lsn_index.py)
    snapshots.json               named (timeline, LSN) pairs (see pageserver/history/snapshots.py)
    pitr.json                    PITR areas: a retention policy over one node's history
                                 (pageserver/history/pitr.py)

Durability: layers are flushed when the open layer is big (checkpoint_distance) or every
checkpoint_timeout seconds of ingest (StoreSettings); after a crash ingest resumes from the
timeline's disk_consistent_lsn by replaying the archived WAL from there (see NodeFollower).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from durable_files import write_file_durably
from pageserver.history.flusher import FOREGROUND, BackgroundWorker, Foreground
from pageserver.history.pitr import pitr_registry
from pageserver.history.snapshots import is_user_snapshot, snapshot_registry
from pageserver.ingest import native as _ingest_native
from pageserver.ingest.import_datadir import import_datadir
from pageserver.ingest.lsn_index import LsnIndex
from pageserver.ingest.walingest import WalIngest
from pageserver.reconstruct.apply_delta import reconstruct
from pageserver.reconstruct.range_rebuild import rebuild_range
from pageserver.storage.compaction import (
    CompactionCancelled,
    CompactionTotals,
    compact,
    merge_frozen,
)
from pageserver.storage.layers import native as _layers_native
from pageserver.storage.settings import DEFAULT_SETTINGS, StoreSettings
from pageserver.storage.timeline import MergeFrozen, Timeline
from pageserver.storage.timeline_store import TimelineStore
from pg15.lsn import format_lsn
from pg15.pg_control import read_control_file
from pg15.records import DecodedRecord, decode_record, decode_records
from pg15.xlog_reader import RawRecord
from proto.errors import Conflict, NeonError, NotFound

log = logging.getLogger(__name__)

MAX_FROZEN_LAYERS = 2
"""Frozen layers (checkpoint_distance of values each) that may wait for the background
flusher before ingest waits for it."""
CATCHING_UP_FROZEN = 2
"""Frozen layers waiting for the flusher that mean ingest outruns it (a catch-up: a backlog
after a restart or a burst of WAL): compaction then stands aside (NodeStore.catching_up).
Live ingest of a busy node (~10 MiB/s of WAL) freezes a layer every few seconds, written in
a fraction of a second: it never has two waiting, so compaction runs beside it as before.
A pass stands aside MAX_PAUSE (flusher.py) in all at most, so a long catch-up cannot starve
it (its L0 layers make reads slower)."""
MAX_IMAGE_POINTS = 4
"""Snapshot LSNs of a timeline waiting for their image pass (`NodeStore.images_at`); a
script naming snapshots faster than passes run keeps its newest."""
CATCHING_UP_LINGER = 1.0
"""Seconds compaction stays paused after ingest last had CATCHING_UP_FROZEN layers waiting
(or a backlog, see NodeStore.maybe_flush)."""


@dataclass(frozen=True, slots=True)
class NodeState:
    timeline_id: str
    start_lsn: int
    """Where this timeline's own history starts (the import or branch LSN)."""
    wal_segment_size: int
    pg_timeline: int = 1
    checkouts: int = 0
    decode_from: int | None = None
    """First WAL record to decode on this timeline (a branch's checkpoint record); None:
    from wherever the stream starts (records the history holds are skipped)."""
    parent: str | None = None
    """The snapshot this timeline was branched from, if any."""


class StorageHistory:
    """The timelines and snapshots of one storage; thread-safe."""

    def __init__(self, root: Path, settings: StoreSettings = DEFAULT_SETTINGS) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        if root.stat().st_mode & 0o077:
            os.chmod(root, 0o700)  # a history written before umask 077 was world-readable
        self.timelines = TimelineStore(root, settings)
        self.snapshots = snapshot_registry(root / "snapshots.json")
        self.pitr = pitr_registry(root / "pitr.json")

    def close(self) -> None:
        self.timelines.close()

    def bytes_needed(self, timeline_id: str, lsn: int) -> int:
        """Bytes of layer files reading (timeline, lsn) needs (its timeline and ancestors)."""
        total = 0
        try:
            timeline: Timeline | None = self.timelines.get(timeline_id)
        except NotFound:
            return 0
        while timeline is not None:
            for layer in timeline.layer_map().layers():
                if layer.name.lsn_start <= lsn:
                    total += layer.file_size
            lsn, timeline = timeline.ancestor_lsn, timeline.ancestor
        return total

    def with_ancestors(self, timeline_ids: Iterable[str]) -> set[str]:
        """The timelines given (those that exist) and every ancestor they read through."""
        found: set[str] = set()
        for timeline_id in timeline_ids:
            if not self.timelines.exists(timeline_id):
                continue
            timeline: Timeline | None = self.timelines.get(timeline_id)
            while timeline is not None and timeline.timeline_id not in found:
                found.add(timeline.timeline_id)
                timeline = timeline.ancestor
        return found

    def drop_node(self, node_id: str, current: str | None, others: Iterable[str]) -> None:
        """Forget a destroyed node's snapshots and delete its timelines (and ancestors) that
        no other node's timeline (`others`) or snapshot reads through; children go before
        parents."""
        mine = [s for s in self.snapshots.all() if s.node_id == node_id]
        for snap in mine:
            self.snapshots.remove(snap.name)
        candidates = self.with_ancestors(
            [s.timeline_id for s in mine] + ([current] if current else [])
        )
        needed = self.with_ancestors([*others, *(s.timeline_id for s in self.snapshots.all())])
        doomed = candidates - needed
        while doomed:
            leaves = {t for t in doomed if not self.timelines.children(t)}
            if not leaves:
                break  # a child we do not know of (being created): leave the rest
            for timeline_id in leaves:
                self.timelines.delete_timeline(timeline_id)
            doomed -= leaves


class NodeStore:
    """Thread-safety: ingest runs on the node's decode thread, flushes on its background
    flusher and compaction on its compactor (pageserver.history.flusher); reads from
    anywhere. `close` before dropping the store (the daemon's shutdown)."""

    def __init__(self, history: StorageHistory, node_id: str) -> None:
        self.history = history
        self.node_id = node_id
        self._state_path = history.root / "nodes" / f"{node_id}.json"
        self._state = self._load_state()
        self._ingest: WalIngest | None = None
        self._index: LsnIndex | None = None
        self._index_timeline: str | None = None
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._ingest_lock = threading.RLock()
        """Held while a batch is ingested and while another thread freezes (`_freeze_rest`):
        the LSN index observes a batch's records just after the timeline takes them, so a
        layer frozen under it holds only records the index has seen."""
        self.flusher = BackgroundWorker(f"flush-{node_id}")
        self.compactor = BackgroundWorker(f"compact-{node_id}")
        self.compaction_totals = CompactionTotals()
        self.catching_up = Foreground()
        """Held while ingest outruns the flusher (CATCHING_UP_FROZEN): compaction pauses so
        the cores write the WAL's layers first, as a request someone waits for does."""
        self.merge_flushes = True
        """Whether a catch-up's waiting frozen layers are written straight as L1 layers
        (`_merge`); tests that need the L0 layers of the daemon's flushes turn it off."""
        self._flush_failed = False
        self._requested: dict[str, int] = {}
        """Per timeline: the LSN up to which a background flush was last requested."""
        self._image_points: dict[str, set[int]] = {}
        """Per timeline: the LSNs of snapshots named since, not yet passed by an image pass
        (`images_at`), MAX_IMAGE_POINTS at most."""
        self._points_recalled: set[str] = set()
        """The timelines whose snapshots named before this store opened were looked at for
        image points (`recall_image_points`), once each."""

    @property
    def timelines(self) -> TimelineStore:
        return self.history.timelines

    @property
    def wal_dir(self) -> Path:
        sub = self._state.timeline_id if self._state is not None else "unimported"
        return self.history.root / "wal" / self.node_id / sub

    def _load_state(self) -> NodeState | None:
        if not self._state_path.exists():
            return None
        return NodeState(**json.loads(self._state_path.read_text()))

    def _save_state(self, state: NodeState) -> None:
        self._state_path.parent.mkdir(parents=True, exist_ok=True)
        write_file_durably(self._state_path, json.dumps(asdict(state)).encode())
        self._state = state
        self._ingest = None

    @property
    def state(self) -> NodeState | None:
        return self._state

    @property
    def index(self) -> LsnIndex:
        """Record boundaries and commit times of the current timeline."""
        state = self._state
        if state is None:
            raise NotFound(f"node {self.node_id} has no page history yet (never imported)")
        if self._index is None or self._index_timeline != state.timeline_id:
            self._index = LsnIndex(
                self.history.root / "lsn_index" / state.timeline_id, state.wal_segment_size
            )
            self._index_timeline = state.timeline_id
            if self._index.last_lsn < state.start_lsn:
                self._index.add_boundary(state.start_lsn)
        return self._index

    @property
    def timeline(self) -> Timeline:
        if self._state is None:
            raise NotFound(f"node {self.node_id} has no page history yet (never imported)")
        return self.timelines.get(self._state.timeline_id)

    def import_datadir(self, datadir: Path, at_lsn: int | None = None) -> int:
        """Import the node's cleanly shut-down data directory as its first timeline (at
        `at_lsn`, the end of a base backup of a server this pageserver follows, for an
        attached server: decoding starts there, see `import_datadir`)."""
        with self._lock:
            if self._state is not None:
                raise Conflict(
                    f"node {self.node_id}'s page history already starts at "
                    f"{format_lsn(self._state.start_lsn)}; it is imported once"
                )
            timeline = self.timelines.create_timeline(importing=True)
            lsn = import_datadir(timeline, datadir, at_lsn)
            timeline.freeze_and_flush()
            self.timelines.complete_import(timeline.timeline_id)
            control = read_control_file(datadir)
            self._save_state(
                NodeState(
                    timeline.timeline_id,
                    lsn,
                    control.wal_segment_size,
                    pg_timeline=control.checkpoint.this_timeline,
                    decode_from=at_lsn,
                )
            )
            log.info(
                "imported %s at %s into timeline %s", datadir, format_lsn(lsn), timeline.timeline_id
            )
            return lsn

    def switch_to_branch(
        self,
        timeline: Timeline,
        *,
        decode_from: int,
        pg_timeline: int,
        segment_size: int,
        parent: str | None,
        checkout: bool,
    ) -> NodeState:
        """Make a freshly branched timeline this node's current one (checkout, or a node
        created from a snapshot). Waits for the frozen layers being written (a pending flush of
        the old timeline runs anyway: its own request), not for a compaction. What the node
        ingested on the timeline it leaves is then written too: nothing re-ingests a timeline
        the node has left, and its HEAD{i} snapshot is named at that timeline's end."""
        self.wait_flushed()
        self._flush_durable()
        with self._lock:
            old = self._state
            state = NodeState(
                timeline.timeline_id,
                timeline.ancestor_lsn,
                segment_size,
                pg_timeline=pg_timeline,
                checkouts=(old.checkouts if old else 0) + (1 if checkout else 0),
                decode_from=decode_from,
                parent=parent,
            )
            self._save_state(state)
            return state

    def branch(self, timeline_id: str, at_lsn: int) -> Timeline:
        """A child of `timeline_id` (of this node's storage) at `at_lsn`. When that is the
        timeline this node ingests and its layers do not reach `at_lsn` yet, everything
        ingested is written first, the LSN index before the layers (as `_flush_frozen`): the
        records the layers then hold are never re-ingested, so index entries (record
        boundaries, commit times) not durable by then would be lost to a crash.
        `TimelineStore.branch` alone would flush the layers only."""
        state = self._state
        if (
            state is not None
            and state.timeline_id == timeline_id
            and self.timeline.disk_consistent_lsn < at_lsn
        ):
            self.make_durable()
        return self.timelines.branch(timeline_id, at_lsn)

    def forget(self) -> None:
        """Delete this node's state and WAL archives (its timelines stay for snapshots); its
        compaction stops (the caller may delete timelines next)."""
        self.compactor.stop()
        self.wait_flushed()
        with self._lock:
            self._state_path.unlink(missing_ok=True)
            shutil.rmtree(self.history.root / "wal" / self.node_id, ignore_errors=True)
            self._state = None

    # ingest (decode thread)

    def _walingest(self) -> WalIngest:
        """The record-to-key ingester of the timeline, made on first use (call under
        `_ingest_lock`)."""
        if self._ingest is None:
            self._ingest = WalIngest(self.timeline)
        return self._ingest

    def ingest(self, record: DecodedRecord, raw: bytes | None = None) -> None:
        """Ingest one record (records the history already holds are skipped)."""
        if self._state is None:
            return
        with self._ingest_lock:
            if self._walingest().ingest_record(record, raw):
                self.index.observe(record)

    def ingest_batch(self, records: list[DecodedRecord], raws: list[bytes | None]) -> None:
        """Ingest records in WAL order, runs of them at once through the C fast path where it
        takes them (each other record one by one): the same result as `ingest` on each."""
        if self._state is None:
            return
        with self._ingest_lock:
            ingest, index, i = self._walingest(), self.index, 0
            while i < len(records):
                j = ingest.ingest_native(records, raws, i)
                index.observe_all(records, i, j)
                if j == len(records):
                    return
                if ingest.ingest_record(records[j], raws[j]):
                    index.observe(records[j])
                i = j + 1

    def ingest_raw_batch(self, batch: list[RawRecord]) -> list[DecodedRecord]:
        """Ingest the reader's records, not decoded yet, in WAL order: the same result as
        `ingest_batch(decode_records(batch), raws)`, but the fused C path (decode, keys and
        arena in one call, pageserver/ingest/_walingest.c) takes runs of page and commit
        records without a Python object per record; each record it leaves is decoded here
        and ingested by the reference. Returns the records decoded here (the caller's
        checks of rmgrs see every record the C path does not take: Heap, Heap2, Btree and
        plain commits, which all have redo). A bad record raises its decoder error after
        the records before it are ingested (as decoding them one by one would)."""
        if self._state is None:
            return []
        if _ingest_native.walingest is None or _layers_native.inmem is None:
            try:
                records = decode_records(batch)
            except NeonError:
                records = []  # a bad record: those before it are ingested, then it raises
                try:
                    for raw in batch:
                        records.append(decode_record(raw))
                finally:
                    self.ingest_batch(records, [raw.data for raw in batch[: len(records)]])
                return records
            self.ingest_batch(records, [raw.data for raw in batch])
            return records
        with self._ingest_lock:
            ingest, index, i = self._walingest(), self.index, 0
            decoded: list[DecodedRecord] = []
            while i < len(batch):
                j = ingest.ingest_native_raw(batch, i)
                index.observe_raw(batch, i, j)
                if j == len(batch):
                    break
                record = decode_record(batch[j])
                decoded.append(record)
                if ingest.ingest_record(record, batch[j].data):
                    index.observe(record)
                i = j + 1
            return decoded

    def maybe_flush(self, backlog: int = 0) -> None:
        """Have the frozen layers flushed (the open one is frozen when large, or periodically
        so the durable LSN advances) by the background flusher, then compacted by the
        compactor; wait only when MAX_FROZEN_LAYERS are already waiting for the flusher.
        Call after `ingest_batch`, on the decode thread. After a failed background flush,
        flush here until one succeeds (raising meanwhile: the follower treats a full disk as
        a stall); a failed compaction is logged and tried again after the next flush.

        `backlog`: bytes of WAL at hand not decoded yet (the follower's archived WAL past its
        read position). A layer's worth (checkpoint_distance) or more is a catch-up even
        with one frozen layer: the first layer of a catch-up is then written as L1 layers
        (`_merge`); written as an L0 layer, the next compaction read it back and merged it
        (bench.ingest). A fast live node whose WAL the decoder keeps up with has none (a
        rule on how fast layers fill made pgbench -i's ingest wait on merged flushes:
        bench.checkout's snapshot after the load took twice as long)."""
        if self._state is None:
            return
        timeline = self.timeline
        if self._flush_failed or self.flusher.take_error() is not None:
            self._flush_failed = True
            self._flush_durable()
            self._flush_failed = False
            return
        if backlog >= timeline.settings.checkpoint_distance:
            self.catching_up.hold_for(CATCHING_UP_LINGER)
        if time.monotonic() - self._last_flush >= timeline.settings.checkpoint_timeout:
            self._last_flush = time.monotonic()
            timeline.freeze()
        upto = timeline.frozen_upto
        requested = self._requested.get(timeline.timeline_id, -1)
        if upto is not None and upto > requested:
            self._requested[timeline.timeline_id] = upto
            # Every record up to `upto` was observed by the index (ingest_batch returned).
            index = self.index
            self.flusher.request(
                timeline.timeline_id, self._flush_job(timeline, index, upto, compact=True)
            )
        if timeline.frozen_count >= CATCHING_UP_FROZEN:
            self.catching_up.hold_for(CATCHING_UP_LINGER)
        if self.catching_up.busy():
            timeline.prefault_open_layer()  # its pages mapped in off the decode thread
        try:
            self.flusher.wait(lambda: timeline.frozen_count <= MAX_FROZEN_LAYERS)
        except BaseException:
            self._flush_failed = True
            raise

    def _flush_frozen(self, timeline: Timeline, index: LsnIndex, upto: int) -> None:
        merge = self._merge()
        if merge is not None:
            # every layer asked for so far, in one merged flush (their records observed by
            # the index, see maybe_flush): an earlier job's group may have taken this job's
            upto = max(upto, self._requested.get(timeline.timeline_id, -1))
        # A merged group's publication (fsync, rename, manifest) is left to the timeline's
        # publisher while a job waits to take the next group (the flusher packs it
        # meanwhile); the last job waits for it, so an idle flusher has everything durable.
        # The index before each manifest: it only holds entries of WAL already durable in
        # the archive, while records the layers hold are never re-ingested (their index
        # entries would be lost); flushed there, its fsync is off the flusher's path.
        timeline.flush_frozen_layers(
            upto,
            merge=merge,
            wait=lambda: not self.flusher.queued,
            published=self.flusher.notify,
            before_manifest=index.flush,
        )

    def _merge(self) -> MergeFrozen | None:
        """While catching up, the frozen layers waiting are written straight as L1 layers
        (compaction.merge_frozen), a lone one too: the L0 files a catch-up wrote were read
        back by the L0 merge soon after, their zstd and decompression a third of its CPU
        (bench.ingest, bench/README). A lone layer waited for the next one to merge with
        until session 19: the flusher idled meanwhile, and the decode thread then waited for
        the pair. Live ingest keeps its small L0 flushes, merged by compaction."""
        return merge_frozen if self.merge_flushes and self.catching_up.busy() else None

    def images_at(self, lsn: int) -> None:
        """A snapshot named at `lsn` (ingested) on the current timeline: image layers at it
        where due (compaction.compact's `image_lsns`), by the next compaction pass, for
        which what is ingested is handed to the flusher now (or, with nothing to flush, a
        pass requested): an idle node flushed nothing more, and the change a checkout back
        to the snapshot undoes came first. Cheap: call it where the snapshot is named."""
        with self._lock:
            if self._state is None:
                return
            timeline = self.timeline
            self._add_image_points(timeline.timeline_id, {lsn})
        if self._hand_rest(compact=True) is None:
            self._request_compaction(timeline)

    def _request_compaction(self, timeline: Timeline) -> None:
        def job() -> None:
            try:
                self._compact(
                    timeline,
                    cancelled=FOREGROUND.yielding(self.compactor.cancelled, self.catching_up),
                    defer_images=self.catching_up.busy,
                )
            except CompactionCancelled as exc:
                log.info("%s", exc)

        self.compactor.request(timeline.timeline_id, job)

    def _compact(
        self,
        timeline: Timeline,
        cancelled: Callable[[], bool] | None = None,
        defer_images: Callable[[], bool] | None = None,
    ) -> None:

        def points() -> set[int]:
            with self._lock:
                return set(self._image_points.get(timeline.timeline_id, ()))

        result = compact(timeline, reconstruct, rebuild_range, cancelled, defer_images, points)
        with self._lock:  # a pass stopped early left its points for the next one
            self._image_points.get(timeline.timeline_id, set()).difference_update(result.imaged_at)
        self.compaction_totals.add(result)
        log.debug(
            "flushed %s to %s (%s)",
            timeline.timeline_id,
            format_lsn(timeline.disk_consistent_lsn),
            result,
        )

    def recall_image_points(self) -> None:
        """At a follower's start: a pass at the current timeline's snapshots named before
        this store opened and not imaged yet (`_recalled_points`), if there are any (an idle
        node flushes nothing that would run one)."""
        with self._lock:
            if self._state is None:
                return
            timeline = self.timeline
        recalled = self._recalled_points(timeline)
        if recalled:
            with self._lock:
                self._add_image_points(timeline.timeline_id, recalled)
            self._request_compaction(timeline)

    def _add_image_points(self, timeline_id: str, lsns: set[int]) -> None:
        """Points for the timeline's next image pass, MAX_IMAGE_POINTS newest kept (the
        caller holds the lock)."""
        points = self._image_points.setdefault(timeline_id, set())
        points.update(lsns)
        while len(points) > MAX_IMAGE_POINTS:
            points.discard(min(points))

    def _recalled_points(self, timeline: Timeline) -> set[int]:
        """Once per timeline and store: the LSNs of its user snapshots above its newest
        image layer, named before the store opened (a daemon restarted between a `snapshot
        create` and its pass forgot them: bench.exchange restarts it before each push, and
        the delta push of a snapshot read its pages through their WAL); else none. A pass at
        a point writes images where due, or none (cheap: the indexes, a key scan)."""
        with self._lock:
            if timeline.timeline_id in self._points_recalled:
                return set()
            self._points_recalled.add(timeline.timeline_id)
        images = timeline.layer_map().images  # newest first
        newest = images[0].lsn if images else -1
        named = (
            snap.lsn
            for snap in self.history.snapshots.all()
            if snap.timeline_id == timeline.timeline_id and is_user_snapshot(snap.name)
        )
        return {lsn for lsn in named if lsn > newest}  # _add_image_points keeps the newest

    def flush(self) -> None:
        """Make everything ingested durable and compacted now, on this thread (after any
        background flush; a background compaction of the timeline finishes first)."""
        if self._state is None:
            return
        self.catching_up.release()  # the caller ingests no more: a paused pass goes on now
        self._compact(self._write_layers())

    def _flush_durable(self) -> None:
        """Everything ingested written to layer files now (after any background flush); a
        compaction is requested, not waited for."""
        if self._state is not None:
            self._request_compaction(self._write_layers())

    def make_durable(self) -> None:
        """Everything ingested written to layer files now, after the frozen layers the
        background flusher has; no compaction is asked for (benchmarks: the time until
        ingested WAL is durable in layers, apart from compaction; tests that compact by hand
        after it), unless a flush job of ingest was waiting, which it replaces.

        The rest goes to the flusher as the job after its own: merged on this thread, it
        waited until the flusher's last group was published too (its files' fsync and its
        manifest, which a job queued behind lets the flusher leave to the publisher);
        queued, it is packed while that publication runs, or joins the group if the flusher
        has not taken it yet. What a failed job left is written here."""
        if self._state is not None:
            self._hand_rest(compact=self.flusher.queued)
            self.wait_flushed()
            self._write_layers()

    def _hand_rest(self, *, compact: bool) -> int | None:
        """What is ingested frozen now and a flusher job requested for it (`compact`: the job
        asks for a compaction after it, as ingest's flush jobs do). Returns the last LSN
        the frozen layers hold (None: nothing waits to be written)."""
        with self._lock:  # one state's pair: a switch_to_branch (under it) never between
            if self._state is None:
                return None
            timeline, index = self.timeline, self.index
        upto = self._freeze_rest(timeline)  # every record it froze was observed by the index
        if upto is not None:
            self.flusher.request(
                timeline.timeline_id, self._flush_job(timeline, index, upto, compact=compact)
            )
        return upto

    def _flush_job(
        self, timeline: Timeline, index: LsnIndex, upto: int, *, compact: bool
    ) -> Callable[[], None]:
        """The flusher's job for the frozen layers up to `upto` (`compact`: a compaction is
        requested after it, as after ingest's flushes)."""

        def job() -> None:
            self._flush_frozen(timeline, index, upto)
            if compact:
                self._request_compaction(timeline)

        return job

    def flush_ahead(self) -> None:
        """What is ingested frozen now and handed to the background flusher, as a periodic
        flush would (a checkout begins: its branch writes the timeline the node leaves to
        layer files before it returns, and after a change that is most of the branch's
        time; begun while the node stops, only the shutdown checkpoint's records are left
        for the branch to write)."""
        self._hand_rest(compact=True)

    def _write_layers(self) -> Timeline:
        """Everything ingested so far written, the LSN index first (`_flush_frozen` flushes it
        before each manifest), up to the cut `_freeze_rest` makes: on a thread other than the
        decode thread, records ingested after it may not be observed by the index yet, and
        stay in memory."""
        timeline = self.timeline
        upto = self._freeze_rest(timeline)
        with self.flusher.mutex:
            self.index.flush()
            timeline.flush_frozen_layers(-1 if upto is None else upto, merge=self._merge())
            self._last_flush = time.monotonic()
        return timeline

    def _freeze_rest(self, timeline: Timeline) -> int | None:
        """Freeze what is ingested, between two batches (`_ingest_lock`: the index has seen
        every record frozen), and tell the flusher how far, as maybe_flush does: a flush
        job starting after this takes the last layer with the others waiting. Returns the
        last LSN the frozen layers hold (None: none wait)."""
        with self._ingest_lock:
            timeline.freeze()
            upto = timeline.frozen_upto
        if upto is not None:
            key = timeline.timeline_id
            self._requested[key] = max(self._requested.get(key, -1), upto)
        return upto

    def wait_flushed(self) -> None:
        """Until the background flusher is idle: the frozen layers requested so far are
        written (before switching timelines); compaction may go on."""
        self.flusher.wait_idle()

    def wait_compacted(self) -> None:
        """Until the flusher and then the compactor are idle (tests, benchmarks)."""
        self.flusher.wait_idle()
        self.compactor.wait_idle()

    def close(self) -> None:
        """Shutdown: cancel a running compaction (what it has not published is deleted, see
        pageserver.storage.compaction) and wait for it to end, then make everything ingested
        durable (the frozen layers of a timeline the node left too) and stop the flusher. The
        store is not used afterwards."""
        self.compactor.stop()
        self.wait_flushed()
        self._flush_durable()
        self.flusher.stop()
