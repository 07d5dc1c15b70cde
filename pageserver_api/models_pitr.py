"""The models of PITR areas, their commits, storage usage and GC.

Imported on first use through pageserver_api.models (its module docstring says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pageserver_api.errors import InvalidArgument
from pageserver_api.models import (
    ApiRequest,
    ApiResponse,
    ListResponse,
    _check_lsn,
    _check_positive,
    method,
)
from pageserver_api.models_snapshots import SnapshotInfo


@dataclass(frozen=True, slots=True)
class PitrAreaInfo(ApiResponse):
    name: str
    node_id: str
    ttl: str
    size_limit: str
    created_at: float
    from_lsn: int | None = None
    """The window it covers now (listed areas only)."""
    to_lsn: int | None = None
    storage: str | None = None
    """The s3 storage that keeps its history (uploaded there, or attached from it)."""

    _OMIT_WHEN_NONE = frozenset({"from_lsn", "to_lsn", "storage"})


@dataclass(frozen=True, slots=True)
class GcResult(ApiResponse):
    removed_layers: int
    removed_bytes: int


@method("pitr.create", PitrAreaInfo)
@dataclass(frozen=True, slots=True)
class PitrCreateRequest(ApiRequest):
    name: str
    node_id: str
    ttl: str = "inf"
    size_limit: str = "inf"
    remote: dict[str, Any] | None = None
    """An s3 storage's settings (pageserver/remote/settings.py): keep the history there too."""
    takeover: bool = False
    """With `remote`: take the area's lease from another pageserver (it is gone for good)."""


@dataclass(frozen=True, slots=True)
class PitrListResponse(ListResponse):
    items: list[PitrAreaInfo]


@method("pitr.list", PitrListResponse)
@dataclass(frozen=True, slots=True)
class PitrListRequest(ApiRequest):
    pass


@method("pitr.destroy", PitrAreaInfo)
@dataclass(frozen=True, slots=True)
class PitrDestroyRequest(ApiRequest):
    name: str


@method("pitr.extract", SnapshotInfo)
@dataclass(frozen=True, slots=True)
class PitrExtractRequest(ApiRequest):
    """A snapshot at the record boundary at or below `lsn`, or the last commit at or before
    `time`, inside the area (exactly one of them)."""

    name: str
    lsn: int | None = None
    time: datetime | None = None
    tag: str | None = None
    """Snapshot tag (default pitr-<LSN>)."""

    def __post_init__(self) -> None:
        _check_lsn("lsn", self.lsn)
        if (self.lsn is None) == (self.time is None):
            raise InvalidArgument("give exactly one of --lsn and --time")


@dataclass(frozen=True, slots=True)
class XactInfo(ApiResponse):
    """One transaction record: commit, abort, prepare, commit prepared or abort prepared."""

    lsn: int
    end_lsn: int
    """An extraction at this LSN is the state just after the record."""
    xid: int
    kind: str
    time: datetime
    gid: str | None = None
    """A PREPARE's GID (its finisher carries it only at wal_level=logical)."""

    _OMIT_WHEN_NONE = frozenset({"gid"})


@dataclass(frozen=True, slots=True)
class PitrCommitsResponse(ApiResponse):
    node_id: str
    timeline_id: str
    point: int
    """The LSN listed around (a time mapped as extract-snapshot --time maps it)."""
    before: list[XactInfo]
    """The last records ending at or before `point`, oldest first."""
    after: list[XactInfo]
    """The first records ending after `point`, oldest first."""
    scanned_from: int
    """Records before this LSN were not read (WAL no longer archived, or the scan budget)."""
    scanned_to: int


@method("pitr.commits", PitrCommitsResponse)
@dataclass(frozen=True, slots=True)
class PitrCommitsRequest(ApiRequest):
    """The transaction records of a node's current timeline around `lsn` or `time` (at most
    one; default the last ingested record): up to `limit` on each side."""

    node_id: str
    lsn: int | None = None
    time: datetime | None = None
    limit: int = 10

    def __post_init__(self) -> None:
        _check_lsn("lsn", self.lsn)
        _check_positive("limit", self.limit)
        if self.lsn is not None and self.time is not None:
            raise InvalidArgument("give at most one of an LSN and a time")


@dataclass(frozen=True, slots=True)
class RetainedInfo(ApiResponse):
    """What one snapshot or PITR area keeps (pageserver/history/usage.py defines both)."""

    kind: str
    """snapshot or pitr area"""
    name: str
    referenced_bytes: int
    """Bytes it reads through or spans; shared bytes count in each retainer."""
    exclusive_bytes: int
    """Bytes the next `neon pitr gc` would free if it alone were destroyed."""
    exclusive_wal_bytes: int = 0
    """The archived WAL part of exclusive_bytes (PITR areas)."""


@dataclass(frozen=True, slots=True)
class StorageUsageResponse(ListResponse):
    items: list[RetainedInfo]


@method("storage.usage", StorageUsageResponse)
@dataclass(frozen=True, slots=True)
class StorageUsageRequest(ApiRequest):
    """Referenced and exclusive bytes of every snapshot and PITR area in the storage whose
    page history is at `store_dir` (none if it holds none)."""

    store_dir: str


@dataclass(frozen=True, slots=True)
class GcRunResponse(ListResponse):
    items: list[GcResult]
    """One result per storage."""


@method("gc.run", GcRunResponse)
@dataclass(frozen=True, slots=True)
class GcRunRequest(ApiRequest):
    pass
