"""Which snapshot of this home a delta `.neon` file applies to, so that it is imported on a
branch of it.

Whoever gets a delta (a `neon snapshot recv` or `serve`, a pull of a delta file) and already
has the snapshot it applies to need not rebuild the whole data directory: the pageserver puts
the delta on a branch of the parent (pageserver/ingest/import_delta.py), writing about the
delta's size, reading the file itself as it arrives (a receiver) or its tar extracted as it
is (a pull: relation forks stay `neon-delta/` members, snapshot_file_source's `unpack_delta`).

Which snapshot here is the parent: one received or pulled as it (its origin manifest has the
parent's identity), or one of this home's own node snapshots of that name, LSN and system (a
delta pulled back where its parent was made).
"""

from __future__ import annotations

import asyncio
import contextlib

from pageserver_api.client import SyncPageserverClient
from pageserver_api.models import BasebackupPlanRequest
from proto.errors import CorruptData
from snapfile.delta import SnapshotIdentity
from snapfile.manifest import decode_manifest


async def parent_here(api: SyncPageserverClient, parent: SnapshotIdentity) -> str | None:
    """The snapshot of this home that is `parent`, if any."""
    snaps = await asyncio.to_thread(api.snapshot_list)
    for snap in snaps:
        if snap.origin is not None:
            with contextlib.suppress(CorruptData):
                if SnapshotIdentity.of(decode_manifest(snap.origin.encode())) == parent:
                    return snap.name
    for snap in snaps:
        if snap.origin is None and (snap.name, snap.lsn) == (parent.name, parent.lsn):
            plan = await asyncio.to_thread(
                api.basebackup_plan, BasebackupPlanRequest(snapshot=snap.name)
            )
            if plan.system_identifier == parent.system_identifier:
                return snap.name
    return None
