"""Waiting for a node's page history to reach an LSN, with progress.

Snapshots and PITR extractions name states the page store holds. Right after a heavy load the
server has written WAL that ingest has not stored yet; a fixed timeout made `snapshot create`
fail on a busy node although ingest was getting there. So the wait goes on as long as ingest
moves, a bar on a terminal shows what is left and the rate, and it ends with one line when
ingest stops on an error (at once) or has not moved for STALL_SECONDS.
"""

from __future__ import annotations

import time

from cli.context import App
from cli.pageserver_control import local_api
from cli.progress import Progress
from pageserver_api.models import NodeWaitDecodedRequest
from pg15.lsn import format_lsn
from proto.errors import NotFound, Unavailable

STALL_SECONDS = 60.0
"""Give up when the ingested position has not moved for this long."""
POLL_SECONDS = 0.5


def wait_for_ingest(app: App, node_id: str, lsn: int, *, show_progress: bool) -> None:
    """Return once node `node_id`'s page history holds the WAL up to `lsn`."""
    api = local_api(app)
    progress = Progress(show_progress, f"Ingesting {node_id}'s WAL")
    first: int | None = None
    last, moved = -1, time.monotonic()
    try:
        while True:
            # Raises at once (with the error) when the node's ingest stopped on one.
            request = NodeWaitDecodedRequest(node_id, max(lsn - 1, 0), wait_timeout=POLL_SECONDS)
            try:
                result = api.node_wait_decoded(request)
            except NotFound:
                return  # not followed: the command's own request says what is missing
            if result.reached:
                progress.update(lsn - (first if first is not None else lsn), None)
                return
            at = result.node.ingested_lsn_int or 0
            if first is None:
                first = at
            if at != last:
                last, moved = at, time.monotonic()
            elif time.monotonic() - moved >= STALL_SECONDS:
                raise Unavailable(
                    f"node {node_id}: the page history has not moved for {STALL_SECONDS:.0f} s "
                    f"at {format_lsn(at)}, {lsn - at} bytes short of {format_lsn(lsn)}; see "
                    f"`neon pg show {node_id}` and the pageserver log"
                )
            progress.update(max(0, at - first), lsn - first)
    finally:
        progress.close()


def refuse_if_ingest_stopped(app: App, node_id: str, lsn: int) -> None:
    """Raise at once, with its error, when node `node_id`'s ingest has stopped on one short of
    `lsn` (a full disk, corrupt WAL); return when it moves or is not followed here."""
    request = NodeWaitDecodedRequest(node_id, max(lsn - 1, 0), wait_timeout=0)
    try:
        local_api(app).node_wait_decoded(request)
    except NotFound:
        return
