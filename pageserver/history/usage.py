"""What each snapshot and PITR area of a storage keeps, in bytes: `storage show`'s breakdown
by retainer (the console draws it as a bar).

Two numbers per retainer, since layers are shared and no single one is "the" size:

- **referenced**: a snapshot's = the layer files a read at it needs, on its timeline and the
  ancestors it reads through (`StorageHistory.bytes_needed`, as `snapshot list` SIZE). A PITR
  area's = the layer files GC would keep if the area were the only retainer (its node's
  timeline; the ancestors' below the branch point) plus the archived WAL from the record
  boundary extractions in its window decode from.
  Shared bytes count in every retainer that references them: these do not add up.
- **exclusive**: the bytes the next `neon pitr gc` would free if this retainer alone were
  destroyed: layer files GC's rule (`storage.gc.removable_layers`) removes under the GC plan
  without it but not under the plan with it, both as GC on request runs them (image layers
  written at the horizon whenever that frees anything; those new images' own size is not
  subtracted), plus, for an area, the archived WAL segments only its window keeps
  (`storage.gc.prunable_segments`). Exclusive bytes of different retainers do add up to at
  most what destroying all of them frees (together they may free more: history two of them
  both keep is exclusive to neither).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pageserver.history.node_store import NodeStore, StorageHistory
from pageserver.history.pitr import PitrArea
from pageserver.history.pitr_extract import node_tip
from pageserver.history.snapshots import Snapshot
from pageserver.storage.gc import gc_horizon, prunable_segments, removable_layers
from pageserver.storage.gc_policy import NodeTip, TimelineFacts, plan_gc
from pageserver.storage.keys import FULL_KEYSPACE
from pageserver.storage.retention import Retention
from pageserver.storage.timeline import Timeline
from pg15.lsn import segment_start
from walreceiver.archive import WalArchive


@dataclass(frozen=True, slots=True)
class Retained:
    kind: str
    """snapshot or pitr area"""
    name: str
    referenced_bytes: int
    exclusive_bytes: int
    """Layer and WAL bytes together."""
    exclusive_wal_bytes: int = 0


@dataclass(slots=True)
class _Plans:
    """The GC plan of one storage with every retainer, and the removals each plan implies."""

    history: StorageHistory
    timelines: dict[str, Timeline]
    facts: list[TimelineFacts]
    tips: list[NodeTip]
    stores: dict[str, NodeStore]
    """Node ID -> its store, for the nodes writing into this history."""
    now: datetime

    def plan(
        self, snapshots: Sequence[Snapshot], areas: Sequence[PitrArea]
    ) -> dict[str, Retention]:
        return plan_gc(self.facts, snapshots, areas, self.tips, self.now)

    def removable(self, timeline_id: str, points: Retention) -> dict[str, int]:
        """Layer file name -> bytes that GC on request removes from the timeline."""
        timeline = self.timelines[timeline_id]
        layer_map = timeline.layer_map()
        found = removable_layers(layer_map, points)
        horizon = gc_horizon(timeline, points.window_start)
        if horizon > 0:  # GC on request writes images at the horizon when that frees more
            would = removable_layers(layer_map, points, [(FULL_KEYSPACE, horizon)])
            if sum(x.file_size for x in would) > sum(x.file_size for x in found):
                found = would
        return {str(layer.name): layer.file_size for layer in found}

    def wal_prunable(self, node_id: str, window_start: int | None) -> dict[str, int]:
        """Archived segment path -> bytes GC would delete from the node's WAL archive."""
        store = self.stores[node_id]
        state = store.state
        if state is None:
            return {}
        keep = store.timeline.disk_consistent_lsn
        if window_start is not None:
            keep = min(keep, store.index.wal_needed_from(window_start))
        doomed = prunable_segments(store.wal_dir, state.wal_segment_size, keep)
        return {str(s.path): _file_size(s.path) for s in doomed}


def storage_usage(
    history: StorageHistory, node_stores: Sequence[NodeStore], now: datetime
) -> list[Retained]:
    """Referenced and exclusive bytes of every snapshot and PITR area of `history`
    (`node_stores`: the nodes writing into it)."""
    stores = {s.node_id: s for s in node_stores if s.state is not None and s.history is history}
    timelines = {t: history.timelines.get(t) for t in history.timelines.list_timelines()}
    plans = _Plans(
        history,
        timelines,
        [TimelineFacts.of(t) for t in timelines.values()],
        [node_tip(s) for s in stores.values()],
        stores,
        now,
    )
    snapshots, areas = history.snapshots.all(), history.pitr.all()
    base = plans.plan(snapshots, areas)
    base_removable: dict[str, dict[str, int]] = {}

    def removable(timeline_id: str) -> dict[str, int]:
        if timeline_id not in base_removable:
            base_removable[timeline_id] = plans.removable(timeline_id, base[timeline_id])
        return base_removable[timeline_id]

    def freed_layers(without: dict[str, Retention]) -> int:
        total = 0
        for timeline_id, points in without.items():
            if _effective(points) == _effective(base[timeline_id]):
                continue  # the same reads are kept: nothing more goes
            kept = removable(timeline_id)
            more = plans.removable(timeline_id, points)
            total += sum(size for name, size in more.items() if name not in kept)
        return total

    out = []
    for snap in snapshots:
        if snap.timeline_id not in timelines:
            continue  # its history is gone already
        others = [s for s in snapshots if s.name != snap.name]
        layers = freed_layers(plans.plan(others, areas))
        referenced = history.bytes_needed(snap.timeline_id, snap.lsn)
        out.append(Retained("snapshot", snap.name, referenced, layers))
    for area in areas:
        store = stores.get(area.node_id)
        if store is None or store.state is None:
            continue
        timeline_id = store.state.timeline_id
        others_areas = [a for a in areas if a.name != area.name]
        without = plans.plan(snapshots, others_areas)
        layers = freed_layers(without)
        wal_kept = plans.wal_prunable(area.node_id, base[timeline_id].window_start)
        wal_without = plans.wal_prunable(area.node_id, without[timeline_id].window_start)
        wal = sum(size for path, size in wal_without.items() if path not in wal_kept)
        referenced = _window_bytes(plans, store, area)
        out.append(Retained("pitr area", area.name, referenced, layers + wal, wal))
    return out


def _effective(points: Retention) -> Retention:
    """The same reads without the retained LSNs inside the window (kept by it anyway): a
    snapshot there frees nothing when destroyed, and is not weighed layer by layer."""
    start = points.window_start
    if start is None:
        return points
    return Retention(tuple(x for x in points.retain_lsns if x < start), start, points.tip)


def _window_bytes(plans: _Plans, store: NodeStore, area: PitrArea) -> int:
    """The layer files GC keeps for the area alone (of its node's timeline, and what the
    ancestors hold below the branch point), and the archived WAL from the record boundary
    extractions in its window decode from."""
    state = store.state
    assert state is not None
    alone = plans.plan([], [area])[state.timeline_id]
    timeline = plans.timelines[state.timeline_id]
    gone = plans.removable(state.timeline_id, alone)
    layers = sum(x.file_size for x in timeline.layer_map().layers() if str(x.name) not in gone)
    ancestor = timeline.ancestor
    if ancestor is not None:
        layers += plans.history.bytes_needed(ancestor.timeline_id, timeline.ancestor_lsn)
    start = alone.window_start if alone.window_start is not None else alone.tip
    needed_from = store.index.wal_needed_from(start)
    size = state.wal_segment_size
    wal = sum(
        _file_size(seg.path)
        for seg in WalArchive(store.wal_dir, size).segments()
        if segment_start(seg.segno + 1, size) > needed_from
    )
    return layers + wal


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # pruned meanwhile
        return 0
