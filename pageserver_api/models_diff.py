"""The models of `snapshot diff`.

Imported on first use through pageserver_api.models (its module docstring says why).
"""

from __future__ import annotations

from dataclasses import dataclass

from pageserver_api.models import (
    ApiRequest,
    ApiResponse,
    method,
)


@dataclass(frozen=True, slots=True)
class ForkDiff(ApiResponse):
    fork: str
    pages_before: int | None
    """Blocks of the fork at the first snapshot (None: it does not exist there)."""
    pages_after: int | None
    pages_changed: int
    """Blocks that differ (written, added or removed)."""


@dataclass(frozen=True, slots=True)
class RelationDiff(ApiResponse):
    """One relation whose pages differ between the two snapshots."""

    database: str
    schema: str | None
    """None: no catalog row names the relation (e.g. made by a transaction not committed)."""
    name: str | None
    kind: str
    """table, index, toast table, sequence, materialized view, ... (pg_class.relkind)."""
    table: str | None
    """schema.name of the table the relation belongs to (itself for a table)."""
    change: str
    """created, dropped, truncated or modified."""
    spc: int
    db: int
    relfilenode: int
    oid: int | None
    pages_before: int
    pages_after: int
    pages_changed: int
    bytes_changed: int
    forks: list[ForkDiff]


@dataclass(frozen=True, slots=True)
class SnapshotDiffResponse(ApiResponse):
    from_snapshot: str
    to_snapshot: str
    from_lsn: int
    to_lsn: int
    common_lsn: int
    """Where the two histories meet (the older LSN, on one timeline)."""
    pages_changed: int
    bytes_changed: int
    relations: list[RelationDiff]


@method("snapshot.diff", SnapshotDiffResponse)
@dataclass(frozen=True, slots=True)
class SnapshotDiffRequest(ApiRequest):
    """The pages that differ from snapshot `from_snapshot` to `to_snapshot` (one history),
    per relation, from the page store."""

    from_snapshot: str
    to_snapshot: str
