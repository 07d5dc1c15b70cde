"""The delta `pg checkout` applies to a node's stopped data directory: from the node's state
before the checkout (its `HEAD{i}` snapshot) to its new branch point (the target snapshot).

It is a delta `.neon` file (snapfile/delta.py, made by delta_tar.DeltaForks) whose parent is
not a basebackup but the live directory PostgreSQL left at HEAD. That directory equals the
page store at HEAD except for what PostgreSQL changes without WAL, which a delta of WAL-written
keys alone would keep although the target does not have it:

* **hints** (`MarkBufferDirtyHint`, src/backend/storage/buffer/bufmgr.c): tuple commit/abort
  bits (heapam_visibility.c SetHintBits), btree/hash/GiST LP_DEAD items (nbtutils.c
  _bt_killitems). They are true at HEAD, not at the target: a row deleted after the target and
  marked dead in an index leaf that no WAL touched would vanish from index scans after the
  checkout. With `wal_log_hints` on (the CLI's nodes run with it: cli/nodes.py), the first hint
  on a page whose LSN is at or below the redo pointer of the current checkpoint is WAL-logged
  as a full-page image (XLogSaveBufferForHint, xloginsert.c), the guarantee pg_rewind relies
  on (src/bin/pg_rewind/pg_rewind.c: it copies every block changed since the last common
  checkpoint). So a hint set after the redo pointer R of the last checkpoint at or before the
  common point C lands a version of its key in the windows, except on a page written between
  R and C and hinted before the next checkpoint: the keys written in (R, C] on the common
  timeline are added. A timeline that began at a checkout began with a shutdown checkpoint at
  its branch point (tar_stream.py), so R is at least that branch point there. Hints set
  before R are history both sides share: true at the target as well. The caller says since
  which LSN its directory's hints are WAL-logged (`hints_logged_from`, cli/checkout_delta.py
  keeps that mark); a delta is refused when R is below it.
* **unlogged relations**: the live main fork holds rows, the target's is a copy of the init
  fork: sent whole (`whole_copies`).
* files outside the page history (FSM, VM unless extracted, pg_internal.init, pg_stat, old WAL,
  temporary relations) are not in the tar, so the applier removes them (cli/delta_apply.py),
  as they are absent from a full extraction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from pageserver.basebackup.delta_tar import DeltaForks
from pageserver.basebackup.snapshot_file import DeltaParent
from pageserver.basebackup.sources import TimelineSource
from pageserver.history.node_store import StorageHistory
from pageserver.history.snapshot_diff import ReadPoint, plan_diff, written_keys
from pageserver.history.snapshots import Snapshot
from pageserver.reconstruct.reads import get_checkpoint, materialize
from pageserver.storage.keys import Key
from pg15.lsn import format_lsn
from proto.errors import InvalidArgument


class HintsNotLogged(InvalidArgument):
    """The directory may hold hints the WAL does not show: only a full rebuild is right."""


def checkout_keys(current: ReadPoint, target: ReadPoint) -> tuple[set[Key], int]:
    """The keys a checkout's delta from the live directory at `current` to `target` carries
    and the checkpoint's redo pointer they start from (see the module); DifferentHistories
    when the two do not meet."""
    plan = plan_diff(current, target)
    assert plan.common is not None
    common, c = plan.common, plan.common_lsn
    checkpoint = get_checkpoint(common, c)
    redo = 0 if checkpoint is None else min(checkpoint.redo, c)
    if common.ancestor is not None:
        redo = max(redo, common.ancestor_lsn)
    # The keys an image layer written in a window of A or B holds outside its WAL spans are
    # kept only where their values at the window's ends differ, as for a push's delta
    # (keys_changed, which reads at the same points): unread, a 1% change's checkout after a
    # compaction carried ~1900 unchanged catalog pages besides its 2692 (bench/README
    # `exchange`, session 18). The hints' window is not read: its start, a checkpoint's redo
    # pointer, is no point a snapshot keeps readable.
    keys = written_keys(plan.windows_a, materialize) | written_keys(plan.windows_b, materialize)
    keys |= written_keys(((common, redo, c),))
    return keys, redo


def checkout_forks(
    source: TimelineSource,
    current: ReadPoint,
    hints_logged_from: int,
    prepared: Mapping[Key, bytes] | None = None,
) -> DeltaForks:
    """The relation forks of the delta from the live directory at `current` to `source`'s
    state; HintsNotLogged (see the module) or DifferentHistories when no delta is right.
    `prepared`: the target's pages rebuilt ahead (prepared_pages.py)."""
    keys, redo = checkout_keys(current, ReadPoint(source.timeline, source.lsn))
    if hints_logged_from > redo:
        raise HintsNotLogged(
            f"hints are WAL-logged from {format_lsn(hints_logged_from)} only, after the "
            f"checkpoint {format_lsn(redo)} the delta would start from"
        )
    return DeltaForks(source, current, keys, whole_copies=True, prepared=prepared)


def checkout_parent(
    find: Callable[[str], tuple[StorageHistory, Snapshot]],
    current: str,
    source: TimelineSource,
    hints_logged_from: int,
    prepared: Mapping[Key, bytes] | None = None,
) -> DeltaParent:
    """The delta of a checkout from snapshot `current` (the node's state before it) to
    `source` (its new branch point), which must be of one history."""
    history, snap = find(current)
    point = ReadPoint(history.timelines.get(snap.timeline_id), snap.lsn)
    forks = checkout_forks(source, point, hints_logged_from, prepared)
    return DeltaParent(snap.name, snap.lsn, forks)
