"""Named snapshots: `PGDATA@TAG` -> (timeline, LSN), persisted per storage.

A snapshot costs nothing to create: it is a name for a record boundary of a timeline, and it
pins what reading that state needs against GC.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from pageserver.history.named_records import NamedRecords
from proto.errors import InvalidArgument

_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")
NAME_RULE = "1 to 63 letters, digits, '.', '_' or '-', starting with a letter or digit"
"""What a snapshot tag and a PITR area name may be (they become file names)."""
_HEAD = re.compile(r"^HEAD\{(\d+)\}\Z")
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
    origin: str | None = None
    """For a snapshot imported from a `.neon` file: that file's manifest (JSON, as a whole
    snapshot's), which says which snapshot this one is wherever it was made; a pusher
    sends deltas on it (snapfile/delta.py's SnapshotIdentity)."""


def split_snapshot_name(name: str) -> tuple[str, str]:
    """`pgdata1@snap1` -> ("pgdata1", "snap1"), with clear errors."""
    pgdata, sep, tag = name.partition("@")
    if not sep or not pgdata or not tag:
        raise InvalidArgument(f"invalid snapshot {name!r}: expected PGDATA@TAG, e.g. pgdata1@snap1")
    return pgdata, tag


def is_valid_name(name: str) -> bool:
    """Whether `name` follows NAME_RULE."""
    return _TAG.match(name) is not None


def _names_node_state(tag: str) -> bool:
    """Whether `tag` is one a checkout names node states with (CURRENT, HEAD{i})."""
    return tag in RESERVED_TAGS or _HEAD.match(tag) is not None


def is_user_snapshot(name: str) -> bool:
    """Whether `name` (PGDATA@TAG) is a snapshot a user named, not a node state (HEAD{i},
    CURRENT) a checkout names."""
    return not _names_node_state(name.partition("@")[2])


def check_user_tag(tag: str) -> str:
    if _names_node_state(tag):
        raise InvalidArgument(f"tag {tag!r} is reserved (CURRENT and HEAD{{i}} name node states)")
    if not _TAG.match(tag):
        raise InvalidArgument(
            f"invalid tag {tag!r}: use letters, digits, '.', '_' or '-' (at most 63 characters)"
        )
    return tag


IMPORTED_NODE_ID = ""
"""The node_id of an imported snapshot: no node made it, it has a root timeline of its own."""


def check_import_name(name: str) -> str:
    """An imported snapshot's bare name (node snapshots are PGDATA@TAG)."""
    if "@" in name:
        raise InvalidArgument(
            f"invalid snapshot name {name!r}: imported snapshots have bare names without '@' "
            "(PGDATA@TAG names a node's snapshot)"
        )
    if not _TAG.match(name):
        raise InvalidArgument(f"invalid snapshot name {name!r}: use {NAME_RULE}")
    return name


def import_name_from(text: str) -> str | None:
    """A bare snapshot name made from `text` (a file's name without its suffix): what a name
    cannot hold (the '@' of a node snapshot's file) made '-'; None when nothing is left."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", text).lstrip("._-")[:63]
    return name if name and _TAG.match(name) else None


def head_tag(i: int) -> str:
    return f"HEAD{{{i}}}"


def snapshot_registry(path: Path) -> NamedRecords[Snapshot]:
    return NamedRecords(path, Snapshot, "snapshot", "`neon snapshot list`")


def new_snapshot(
    name: str, node_id: str, timeline_id: str, lsn: int, parent: str | None = None,
    origin: str | None = None,
) -> Snapshot:  # fmt: skip
    return Snapshot(name, node_id, timeline_id, lsn, time.time(), parent, origin)
