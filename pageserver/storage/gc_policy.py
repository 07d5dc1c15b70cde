"""The GC policy: which reads each timeline of one storage must keep readable.

A pure function of what names history and of the clock, so it can be tested without a
daemon: snapshots (a retained LSN on their timeline), child timelines (their branch point is
retained on the parent), PITR areas (a window [start, tip] on their node's current timeline)
and the tips (always readable). GC (`pageserver.storage.gc`) then removes whatever no read
at those points needs.

Several PITR areas may follow one node: each has its own window, and the timeline keeps the
union of them, i.e. the window of the area that reaches furthest back. (Keeping only one area
per node once let a `--ttl 1s` area's GC delete the history an `inf` area still advertised.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from pageserver.storage.retention import Retention, RetentionPolicy, size_window_start
from pageserver.storage.timeline import Timeline


class CommitClock(Protocol):
    """Maps a wall-clock time to an LSN (pageserver.ingest.lsn_index.LsnIndex)."""

    def lsn_for_time(self, t: datetime, /) -> int | None: ...


class RetainedPoint(Protocol):
    """A name for one (timeline, LSN), e.g. a snapshot."""

    @property
    def timeline_id(self) -> str: ...

    @property
    def lsn(self) -> int: ...


class RetainingArea(Protocol):
    """A PITR area: a retention policy over one node's history."""

    @property
    def node_id(self) -> str: ...

    def policy(self) -> RetentionPolicy: ...


@dataclass(frozen=True, slots=True)
class TimelineFacts:
    """What the policy needs to know about one timeline."""

    timeline_id: str
    ancestor_id: str | None
    ancestor_lsn: int
    tip: int
    """The last ingested record's end (last_record_lsn)."""
    delta_sizes: tuple[tuple[int, int], ...] = ()
    """(lsn_end, file bytes) of each delta layer: what a size limit weighs."""

    @staticmethod
    def of(timeline: Timeline) -> TimelineFacts:
        ancestor = timeline.ancestor
        return TimelineFacts(
            timeline.timeline_id,
            None if ancestor is None else ancestor.timeline_id,
            timeline.ancestor_lsn,
            timeline.last_record_lsn,
            tuple((d.lsn_end, d.file_size) for d in timeline.layer_map().deltas),
        )


@dataclass(frozen=True, slots=True)
class NodeTip:
    """A node writing into the storage: its current timeline and where its history starts."""

    node_id: str
    timeline_id: str
    history_start: int
    """The import or branch LSN: nothing below it was ever this node's history."""
    commits: CommitClock


def area_window(
    policy: RetentionPolicy, timeline: TimelineFacts, node: NodeTip, now: datetime
) -> int:
    """The start of a PITR area's window on its node's current timeline (it ends at the tip).

    TTL: `lsn_for_time(now - ttl)`, the LSN a `recovery_target_time` of now - ttl gives, so
    every time inside the TTL maps to an LSN inside the window; with no commit that old, the
    whole history. Size limit: raised until the delta layers above it weigh at most the
    limit. Both: the higher start wins (a disk quota overrides a TTL)."""
    floor = max(timeline.ancestor_lsn, node.history_start)
    start = floor
    cutoff = policy.ttl_cutoff(now)
    if cutoff is not None:
        at = node.commits.lsn_for_time(cutoff)
        if at is not None:
            start = max(start, at)
    if policy.size_limit is not None:
        start = max(start, size_window_start(timeline.delta_sizes, policy.size_limit, floor))
    return min(start, timeline.tip)


def plan_gc(
    timelines: Sequence[TimelineFacts],
    snapshots: Iterable[RetainedPoint],
    areas: Iterable[RetainingArea],
    nodes: Iterable[NodeTip],
    now: datetime,
) -> dict[str, Retention]:
    """The reads GC must keep on every timeline of one storage, by timeline ID.

    Snapshots and areas naming a timeline or node that is not given retain nothing (their
    history is gone already, or they belong to another storage)."""
    by_id = {t.timeline_id: t for t in timelines}
    retained: dict[str, set[int]] = {tid: set() for tid in by_id}
    for snap in snapshots:
        if snap.timeline_id in retained:
            retained[snap.timeline_id].add(snap.lsn)
    for child in timelines:
        if child.ancestor_id is not None and child.ancestor_id in retained:
            retained[child.ancestor_id].add(child.ancestor_lsn)
    tips = {n.node_id: n for n in nodes if n.timeline_id in by_id}
    windows: dict[str, int] = {}
    for area in areas:
        node = tips.get(area.node_id)
        if node is None:
            continue
        start = area_window(area.policy(), by_id[node.timeline_id], node, now)
        windows[node.timeline_id] = min(start, windows.get(node.timeline_id, start))
    return {
        tid: Retention(tuple(sorted(retained[tid])), windows.get(tid), t.tip)
        for tid, t in by_id.items()
    }
