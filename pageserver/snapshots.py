"""Named snapshots: `PGDATA@TAG` -> (timeline, LSN), persisted per storage.

A snapshot costs nothing to create: it is a name for a record boundary of a timeline, and it
pins what reading that state needs against GC.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from proto.errors import AlreadyExists, InvalidArgument, NotFound

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_HEAD = re.compile(r"^HEAD\{(\d+)\}$")
RESERVED_TAGS = ("CURRENT",)


@dataclass(frozen=True, slots=True)
class Snapshot:
    name: str
    """PGDATA@TAG"""
    node_id: str
    timeline_id: str
    lsn: int
    created_at: float
    parent: str | None = None


def split_snapshot_name(name: str) -> tuple[str, str]:
    """`pgdata1@snap1` -> ("pgdata1", "snap1"), with clear errors."""
    pgdata, sep, tag = name.partition("@")
    if not sep or not pgdata or not tag:
        raise InvalidArgument(f"invalid snapshot {name!r}: expected PGDATA@TAG, e.g. pgdata1@snap1")
    return pgdata, tag


def check_user_tag(tag: str) -> str:
    if tag in RESERVED_TAGS or _HEAD.match(tag):
        raise InvalidArgument(f"tag {tag!r} is reserved (CURRENT and HEAD{{i}} name node states)")
    if not _TAG.match(tag):
        raise InvalidArgument(
            f"invalid tag {tag!r}: use letters, digits, '.', '_' or '-' (at most 63 characters)"
        )
    return tag


def head_tag(i: int) -> str:
    return f"HEAD{{{i}}}"


class SnapshotRegistry:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def _load(self) -> dict[str, Snapshot]:
        if not self.path.exists():
            return {}
        return {s["name"]: Snapshot(**s) for s in json.loads(self.path.read_text())}

    def _save(self, snaps: dict[str, Snapshot]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump([asdict(s) for s in snaps.values()], f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def all(self) -> list[Snapshot]:
        with self._lock:
            return sorted(self._load().values(), key=lambda s: (s.created_at, s.name))

    def find(self, name: str) -> Snapshot | None:
        with self._lock:
            return self._load().get(name)

    def get(self, name: str) -> Snapshot:
        snap = self.find(name)
        if snap is None:
            raise NotFound(f"snapshot {name!r} does not exist; see `neon snapshot list`")
        return snap

    def add(self, snap: Snapshot, *, replace: bool = False) -> Snapshot:
        with self._lock:
            snaps = self._load()
            if snap.name in snaps and not replace:
                raise AlreadyExists(f"snapshot {snap.name!r} already exists")
            snaps[snap.name] = snap
            self._save(snaps)
            return snap

    def remove(self, name: str) -> Snapshot:
        with self._lock:
            snaps = self._load()
            if name not in snaps:
                raise NotFound(f"snapshot {name!r} does not exist; see `neon snapshot list`")
            snap = snaps.pop(name)
            self._save(snaps)
            return snap


def new_snapshot(
    name: str, node_id: str, timeline_id: str, lsn: int, parent: str | None = None
) -> Snapshot:
    return Snapshot(name, node_id, timeline_id, lsn, time.time(), parent)
