"""One GC pass over a storage's history: plan what every timeline must keep readable
(`storage.gc_policy.plan_gc`), remove the layers nothing needs (`storage.gc.gc_timeline`) and
the archived WAL no window or unflushed layer needs (`storage.gc.prune_wal_archive`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from pageserver.history.node_store import NodeStore, StorageHistory
from pageserver.history.pitr_extract import node_tip
from pageserver.reconstruct.range_rebuild import rebuild_range
from pageserver.storage.gc import DEFAULT_GC_SETTINGS, GcSettings, gc_timeline, prune_wal_archive
from pageserver.storage.gc_policy import TimelineFacts, plan_gc


@dataclass(frozen=True, slots=True)
class GcSummary:
    removed_layers: int
    removed_bytes: int


ON_REQUEST = GcSettings(min_gain_bytes=1, image_cost_ratio=0)
"""GC asked for by hand (`neon pitr gc`): the space back now, images at the horizon whenever
anything would go; background GC weighs the cost of writing them (DEFAULT_GC_SETTINGS)."""


def collect_garbage(
    history: StorageHistory,
    node_stores: Iterable[NodeStore],
    now: datetime,
    settings: GcSettings = DEFAULT_GC_SETTINGS,
) -> GcSummary:
    """GC of `history`; `node_stores` are the nodes writing into it (their tips and WAL)."""
    current = {
        store.state.timeline_id: store
        for store in node_stores
        if store.state is not None and store.history is history
    }
    timelines = [history.timelines.get(t) for t in history.timelines.list_timelines()]
    plan = plan_gc(
        [TimelineFacts.of(t) for t in timelines],
        history.snapshots.all(),
        history.pitr.all(),
        [node_tip(store) for store in current.values()],
        now,
    )
    removed = removed_bytes = 0
    for timeline in timelines:
        keep_reads = plan[timeline.timeline_id]
        window = keep_reads.window_start
        result = gc_timeline(
            timeline, keep_reads.retain_lsns, window, materialize_range=rebuild_range,
            settings=settings,
        )  # fmt: skip
        removed += len(result.removed_layers)
        removed_bytes += result.removed_bytes
        store = current.get(timeline.timeline_id)
        if store is not None and store.state is not None:
            keep = timeline.disk_consistent_lsn
            if window is not None:
                keep = min(keep, store.index.wal_needed_from(window))
            prune_wal_archive(store.wal_dir, store.state.wal_segment_size, keep)
    return GcSummary(removed, removed_bytes)
