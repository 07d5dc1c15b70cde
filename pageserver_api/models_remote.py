"""The models of remote storages (s3): pageserver/remote/.

Imported on first use through pageserver_api.models (its module docstring says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pageserver_api.models import (
    ApiRequest,
    ApiResponse,
    method,
)


@dataclass(frozen=True, slots=True)
class RemoteUploadStatus(ApiResponse):
    """One PITR area's uploads (pageserver/remote/uploader.py, UploadStatus)."""

    area: str
    storage: str
    node_id: str
    generation: int
    local_lsn: int
    remote_lsn: int
    lag_bytes: int
    pending_objects: int
    pending_bytes: int
    remote_bytes: int
    uploaded_bytes_total: int
    retries_total: int
    last_error: str | None = None
    last_upload_at: float | None = None
    cache_limit_bytes: int | None = None
    """The storage's local_cache (None: uploaded layers are all kept on disk)."""
    cache_resident_bytes: int = 0
    """Layer files of the area's timelines on disk now."""
    evicted_layers: int = 0
    fetched_bytes_total: int = 0
    """Evicted layers downloaded again for reads."""


@dataclass(frozen=True, slots=True)
class RemoteStorageUsage(ApiResponse):
    storage: str
    used_bytes: int
    """From the indexes this pageserver holds (no LIST of the bucket)."""
    uploading: list[str]
    attached: list[str]


@dataclass(frozen=True, slots=True)
class RemoteStatusResponse(ApiResponse):
    uploads: list[RemoteUploadStatus]
    storages: list[RemoteStorageUsage]


@method("remote.status", RemoteStatusResponse)
@dataclass(frozen=True, slots=True)
class RemoteStatusRequest(ApiRequest):
    pass


@method("remote.attach", RemoteStorageUsage)
@dataclass(frozen=True, slots=True)
class RemoteAttachRequest(ApiRequest):
    """Know an s3 storage and attach the PITR areas in its bucket, read-only."""

    settings: dict[str, Any]


@method("remote.detach", RemoteStorageUsage)
@dataclass(frozen=True, slots=True)
class RemoteDetachRequest(ApiRequest):
    storage: str
