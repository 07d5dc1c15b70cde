"""Garbage collection: remove layer files that no retained read needs; prune archived WAL.

The reads to preserve on a timeline (pageserver.storage.retention): at every retained LSN
(snapshots, child branch points), at every LSN of the PITR window [window_start, tip], and
at the tip and above (ingest goes on). For a layer, only the *smallest* such read point at or
above its start matters (`R`): any later read sees at least the images that read sees.

- A delta layer [s, e) is needed unless image layers with LSNs in [e - 1, R] cover its whole
  key range: every read at or above R then finds an image at or above e - 1 first and stops
  there, and reads below s do not see its versions (the versions of a delta ending at e are
  at LSNs <= e - 1, which an image at e - 1 supersedes).
- An image layer at i is needed unless newer image layers with LSNs in (i, R] cover it.
Whole files only (Neon's rule); a delta that spans a retained LSN stays until that LSN is
released. The newest covering image inside each [.., R] is never removed itself, so what
justifies a removal is kept.

Image policy: history below the GC horizon H (the PITR window start, or the tip without a
window; at most disk_consistent_lsn, at least the branch point) can only go once image
layers exist at H. GC writes them (compaction's image writer, forced, at H) when the layer
bytes that would then become removable reach `GcSettings`' threshold: at least
`min_gain_bytes` and at least `image_cost_ratio` times an estimate of the image (keys at H
times a page). Images are not written at snapshot LSNs: history below the oldest snapshot
stays until it is destroyed, as in Neon.

Order of operations (crash safety): new image files are durable and named by a manifest
before anything is removed; removed files are deleted only after a manifest that no longer
names them is durable (Timeline.replace_layers). A crash in between leaves unnamed files
that the timeline's reopen deletes.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from durable_files import fsync_dir
from pageserver.reconstruct.apply_delta import reconstruct
from pageserver.storage.compaction import (
    PAGE_SIZE_ESTIMATE,
    Materialize,
    MaterializeRange,
    create_image_layers_at,
)
from pageserver.storage.keys import FULL_KEYSPACE, KeyRange, ranges_cover
from pageserver.storage.layers.layer_map import LayerMap
from pageserver.storage.layers.names import LayerName
from pageserver.storage.layers.persistent import PersistentLayer
from pageserver.storage.retention import Retention
from pageserver.storage.timeline import Timeline
from pg15.lsn import segment_start
from proto.errors import InvalidArgument
from walreceiver.archive import ArchivedSegment, WalArchive

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class GcSettings:
    min_gain_bytes: int = 1 * MiB
    """Write images at the horizon only if at least this many layer bytes would go."""
    image_cost_ratio: float = 0.5
    """... and at least this times keys x 8 KiB (images compress about 2x)."""


DEFAULT_GC_SETTINGS = GcSettings()


@dataclass(frozen=True, slots=True)
class GcResult:
    removed_layers: tuple[LayerName, ...]
    removed_bytes: int
    kept: int
    """Layer files left on the timeline."""
    images_written: int = 0
    horizon: int | None = None
    """The LSN GC considered for new image layers."""


ImageSpan = tuple[KeyRange, int]
"""An image layer's (key range, LSN), real or hypothetical."""


def removable_layers(
    layer_map: LayerMap, points: Retention, extra_images: Iterable[ImageSpan] = ()
) -> list[PersistentLayer]:
    """The layers of `layer_map` that no read at `points` needs (see the module docstring).

    `extra_images` are hypothetical image layers (to weigh writing them); they justify
    removals as if they existed."""
    images: list[ImageSpan] = [(i.key_range, i.lsn) for i in layer_map.images]
    images.extend(extra_images)
    out: list[PersistentLayer] = []
    for delta in layer_map.deltas:
        low, high = delta.lsn_end - 1, points.first_at_or_above(delta.lsn_start)
        if high >= low and ranges_cover(
            delta.key_range, (r for r, lsn in images if low <= lsn <= high)
        ):
            out.append(delta)
    for image in layer_map.images:
        high = points.first_at_or_above(image.lsn)
        if ranges_cover(image.key_range, (r for r, lsn in images if image.lsn < lsn <= high)):
            out.append(image)
    return out


def gc_horizon(timeline: Timeline, window_start: int | None) -> int:
    """Where GC writes image layers: the window start (or tip), within what is on disk."""
    wanted = timeline.last_record_lsn if window_start is None else window_start
    return max(timeline.ancestor_lsn, min(wanted, timeline.disk_consistent_lsn))


def gc_timeline(
    timeline: Timeline,
    retain_lsns: Iterable[int],
    window_start: int | None,
    *,
    materialize: Materialize = reconstruct,
    materialize_range: MaterializeRange | None = None,
    settings: GcSettings = DEFAULT_GC_SETTINGS,
) -> GcResult:
    """Remove the layer files of `timeline` that no read at a retained LSN, in
    [window_start, tip] or at the tip needs; write images at the horizon when worth it.

    Only this timeline's own layers are touched: its ancestors keep what its branch point
    needs because the caller passes that point among *their* retain_lsns. Blocking I/O and
    CPU: run it in a worker thread.
    """
    retained = tuple(sorted(set(retain_lsns)))
    if any(lsn < 0 for lsn in retained) or (window_start is not None and window_start < 0):
        raise InvalidArgument("GC retain points must be valid LSNs")
    with timeline.compaction_lock:
        points = Retention(retained, window_start, timeline.last_record_lsn)
        layer_map = timeline.layer_map()
        removable = removable_layers(layer_map, points)
        horizon = gc_horizon(timeline, window_start)
        images_written = 0
        if horizon > 0 and _images_pay_off(
            timeline, layer_map, points, removable, horizon, settings
        ):
            images_written = create_image_layers_at(
                timeline, materialize, horizon, force=True, materialize_range=materialize_range
            )
            layer_map = timeline.layer_map()
            removable = removable_layers(layer_map, points)
        if removable:
            timeline.replace_layers(add=(), remove=removable)
        kept = len(timeline.layer_map().layers())
    return GcResult(
        tuple(layer.name for layer in removable),
        sum(layer.file_size for layer in removable),
        kept,
        images_written,
        horizon,
    )


def _images_pay_off(
    timeline: Timeline,
    layer_map: LayerMap,
    points: Retention,
    removable: list[PersistentLayer],
    horizon: int,
    settings: GcSettings,
) -> bool:
    already = {id(layer) for layer in removable}
    would = removable_layers(layer_map, points, [(FULL_KEYSPACE, horizon)])
    gain = sum(layer.file_size for layer in would if id(layer) not in already)
    if gain <= 0 or gain < settings.min_gain_bytes:
        return False
    if settings.image_cost_ratio <= 0:
        return True
    return gain >= settings.image_cost_ratio * keys_at(timeline, horizon) * PAGE_SIZE_ESTIMATE


def keys_at(timeline: Timeline, horizon: int) -> int:
    """How many keys have a value at `horizon` (at most disk_consistent_lsn: the layer files
    hold every version at or below it), remembered per timeline while the layer files that
    can hold such versions (its own and its ancestors' starting at or below the LSN each is
    read at) stay the same: a GC pass every few minutes on an idle node otherwise walked the
    whole keyspace again to reach the same answer (~2.5 s of CPU on a 1 GiB database)."""
    signature = _layers_below(timeline, horizon)
    known = _KEYS_AT.get(timeline)
    if known is not None and known[0] == signature:
        return known[1]
    count = len(timeline.get_keys(FULL_KEYSPACE, horizon))
    _KEYS_AT[timeline] = (signature, count)
    return count


def _layers_below(timeline: Timeline, lsn: int) -> tuple[object, ...]:
    """What `Timeline.get_keys(..., lsn)` reads, for a lsn at most disk_consistent_lsn: the
    names of the layers starting at or below it, of the timeline and of its ancestors at
    their branch points, with the LSN."""
    out: list[object] = [lsn]
    at: Timeline | None = timeline
    while at is not None:
        names = sorted(
            layer.name.file_name for layer in at.layer_map().layers() if layer.lsn_start <= lsn
        )
        out.append((at.timeline_id, tuple(names)))
        lsn = min(lsn, at.ancestor_lsn)
        at = at.ancestor
    return tuple(out)


_KEYS_AT: weakref.WeakKeyDictionary[Timeline, tuple[tuple[object, ...], int]] = (
    weakref.WeakKeyDictionary()
)
"""Per timeline, the last keys_at answer and the layers it was computed from."""


def prunable_segments(
    archive_dir: Path, segment_size: int, keep_from_lsn: int
) -> list[ArchivedSegment]:
    """The complete archived segments that end at or below keep_from_lsn; never a partial one
    nor the newest (the archive resumes streaming from it)."""
    segments = WalArchive(archive_dir, segment_size).segments()
    if not segments:
        return []
    newest_segno = max(s.segno for s in segments)
    protected = {segments[-1].path, *(s.path for s in segments if s.segno == newest_segno)}
    return [
        seg
        for seg in segments
        if not seg.partial
        and seg.path not in protected
        and segment_start(seg.segno + 1, segment_size) <= keep_from_lsn
    ]


def prune_wal_archive(archive_dir: Path, segment_size: int, keep_from_lsn: int) -> int:
    """Delete the prunable_segments; returns the count."""
    doomed = prunable_segments(archive_dir, segment_size, keep_from_lsn)
    for seg in doomed:
        seg.path.unlink(missing_ok=True)
    if doomed:
        fsync_dir(archive_dir)
    return len(doomed)
