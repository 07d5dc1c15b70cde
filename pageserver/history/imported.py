"""Imported snapshots: a data directory imported as a snapshot with a root timeline of its own.

Their storages are remembered in the pageserver's workdir (`imported_histories.json`), so
they are found when no node uses that storage.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from durable_files import write_file_durably
from pageserver.history.node_store import StorageHistory
from pageserver.history.snapshots import IMPORTED_NODE_ID, Snapshot, new_snapshot
from proto.errors import NotFound


class ImportedRoots:
    """The storages that hold imported snapshots, in one durable JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def all(self) -> list[Path]:
        try:
            roots = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        return [Path(r) for r in roots if Path(r).is_dir()]

    def remember(self, root: Path) -> None:
        roots = {str(r) for r in self.all()} | {str(root)}
        write_file_durably(self.path, json.dumps(sorted(roots)).encode())


def name_imported_snapshot(
    history: StorageHistory, name: str, timeline_id: str, lsn: int, origin: str | None = None
) -> Snapshot:
    snap = new_snapshot(name, IMPORTED_NODE_ID, timeline_id, lsn, origin=origin)
    return history.snapshots.add(snap)


def forget_imported_snapshot(history: StorageHistory, snap: Snapshot) -> None:
    """After its name is gone: delete an imported snapshot's root timeline when nothing else
    (another snapshot, a branch) uses it."""
    if snap.node_id != IMPORTED_NODE_ID:
        return
    in_use = any(s.timeline_id == snap.timeline_id for s in history.snapshots.all())
    if not in_use and not history.timelines.children(snap.timeline_id):
        with contextlib.suppress(NotFound):
            history.timelines.delete_timeline(snap.timeline_id)
