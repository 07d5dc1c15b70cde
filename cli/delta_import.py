"""A delta `.neon` file whose parent this home holds, imported on a branch of that parent.

Whoever gets a delta (a `neon snapshot recv` or `serve`, a pull of a delta file) and already
has the snapshot it applies to need not rebuild the whole data directory: the delta's tar is
extracted as it is (relation forks stay `neon-delta/` members) and the pageserver puts it on
a branch of the parent (pageserver/ingest/import_delta.py), writing about the delta's size.

Which snapshot here is the parent: one received or pulled as it (its origin manifest has the
parent's identity), or one of this home's own node snapshots of that name, LSN and system (a
delta pulled back where its parent was made).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from cli.snapshot_file_source import check_control, expect_manifest, verified_tar
from cli.snapshot_import import origin_of
from cli.untar import extract_stream
from pageserver_api.client import SyncPageserverClient
from pageserver_api.models import BasebackupPlanRequest, SnapshotImportDeltaRequest
from proto.errors import CorruptData
from snapfile.delta import SnapshotIdentity
from snapfile.manifest import Manifest, decode_manifest


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


async def unpack_delta(
    chunks: AsyncIterator[bytes], label: str, directory: Path, head: Manifest
) -> None:
    """Extract the delta arriving as `chunks` (its manifest `head`, read before) as it is
    into `directory`, once the whole file checked out."""
    await extract_stream(verified_tar(chunks, label, expect_manifest(label, head)), directory)
    check_control(directory, head, label)


def delta_import_request(
    name: str, directory: Path, parent: str, head: Manifest
) -> SnapshotImportDeltaRequest:
    """Import the delta unpacked at `directory` as snapshot `name` on a branch of `parent`."""
    return SnapshotImportDeltaRequest(name, str(directory), parent, origin_of(head))
