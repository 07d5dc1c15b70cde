"""Where a PITR area's window lies on its node's history, and which LSN an extraction names.

The window is [start, tip] on the node's current timeline (`storage.gc_policy.area_window`); an
extraction snaps a requested LSN down to the last record boundary (or a time to the last
commit at or before it) and refuses a point whose data directory can no longer be built.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from pageserver.history.node_store import NodeStore
from pageserver.history.pitr import PitrArea
from pageserver.ingest.lsn_index import ReadWal, archive_reader
from pageserver.reconstruct.reads import get_checkpoint, get_control_file
from pageserver.storage.gc_policy import NodeTip, TimelineFacts, area_window
from pageserver.storage.retention import Retention
from pageserver.storage.timeline import Timeline
from pg15.lsn import format_lsn
from proto.errors import InvalidArgument, NotFound


def node_tip(store: NodeStore) -> NodeTip:
    """Where a node writes now: the policy keeps it readable."""
    state = store.state
    if state is None:
        raise NotFound(f"node {store.node_id} has no page history yet")
    return NodeTip(store.node_id, state.timeline_id, state.start_lsn, store.index)


def area_retention(store: NodeStore, area: PitrArea, now: datetime) -> Retention:
    """The area's own window [window_start, tip] on its node's current timeline."""
    facts = TimelineFacts.of(store.timeline)
    start = area_window(area.policy(), facts, node_tip(store), now)
    return Retention((), start, facts.tip)


def extraction_lsn(
    store: NodeStore,
    area: PitrArea,
    *,
    lsn: int | None,
    at: datetime | None,
    now: datetime,
    check_ingesting: Callable[[], None] | None = None,
    read_wal: ReadWal | None = None,
) -> int:
    """The record boundary an extraction at `lsn` (or at the time `at`) names inside the area.

    `check_ingesting` raises when the node's ingest stopped on an error: that, not the
    window, is why an LSN past the tip cannot be reached. `read_wal` reads the WAL where it is
    not the node's archive (a history attached from a bucket: pageserver/remote/mirror.py).
    """
    retention = area_retention(store, area, now)
    start = retention.window_start if retention.window_start is not None else retention.tip
    bounds = f"{format_lsn(start)} .. {format_lsn(retention.tip)}"
    if at is not None:
        found = store.index.lsn_for_time(at)
        if found is None:
            raise InvalidArgument(
                f"{at.isoformat()} is before the first commit of PITR area {area.name!r} ({bounds})"
            )
        lsn = found
    if lsn is None:
        raise InvalidArgument("an extraction needs an LSN or a time")
    if lsn > retention.tip and check_ingesting is not None:
        check_ingesting()
    if not start <= lsn <= retention.tip:
        raise InvalidArgument(
            f"LSN {format_lsn(lsn)} is outside PITR area {area.name!r}: it covers {bounds}"
        )
    state = store.state
    assert state is not None
    reader = read_wal or archive_reader(store.wal_dir, state.wal_segment_size)
    snapped = max(store.index.snap(lsn, reader, timeline=state.pg_timeline), start)
    check_materializable(store.timeline, snapped, area.name)
    return snapped


def check_materializable(timeline: Timeline, lsn: int, area: str) -> None:
    """Refuse to name an LSN whose data directory cannot be built (its base image was
    garbage-collected): better now than at `pg create --snapshot`."""
    if get_control_file(timeline, lsn) is None or get_checkpoint(timeline, lsn) is None:
        raise NotFound(
            f"PITR area {area!r} cannot extract {format_lsn(lsn)}: the page history "
            "there was garbage-collected before the area kept it (no pg_control at or "
            "below it); extract a later LSN"
        )
