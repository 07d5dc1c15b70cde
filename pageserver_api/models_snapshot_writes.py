"""The models that change snapshots and nodes' histories: create, destroy and import a
snapshot, branch a node (`pg checkout`).

Apart from pageserver_api/models_snapshots.py (the reads: show, list, basebackups) so that
`neon snapshot push` and `pull`, which only read, do not create these classes at their start
(~0.6 ms each). Imported on first use through pageserver_api.models (its module docstring
says why).
"""

from __future__ import annotations

from dataclasses import dataclass

from pageserver_api.models import (
    DEFAULT_WAIT_SECONDS,
    ApiRequest,
    ApiResponse,
    _check_lsn,
    _check_positive,
    _check_wait,
    method,
)
from pageserver_api.models_snapshots import SnapshotInfo


@method("snapshot.create", SnapshotInfo)
@dataclass(frozen=True, slots=True)
class SnapshotCreateRequest(ApiRequest):
    """Name the node's current record boundary, once ingest reached `lsn` if given."""

    node_id: str
    name: str
    lsn: int | None = None
    wait_timeout: float = DEFAULT_WAIT_SECONDS
    at_server_lsn: bool = False
    """Wait for what the server has flushed now (the pageserver asks it: IDENTIFY_SYSTEM), for
    a CLI that cannot reach the server itself (`--pageserver`)."""

    def __post_init__(self) -> None:
        _check_lsn("lsn", self.lsn)
        _check_wait(self.wait_timeout)


@method("snapshot.destroy", SnapshotInfo)
@dataclass(frozen=True, slots=True)
class SnapshotDestroyRequest(ApiRequest):
    name: str


@method("snapshot.import", SnapshotInfo)
@dataclass(frozen=True, slots=True)
class SnapshotImportRequest(ApiRequest):
    """Import a cleanly shut-down data directory as snapshot `name` (a bare name) on a new
    root timeline of the storage whose page history is at `store_dir`."""

    name: str
    datadir: str
    store_dir: str
    origin: str | None = None
    """The manifest (JSON) of the `.neon` file the directory came from, if it did."""
    neon_file: str | None = None
    """A whole `.neon` file to import (pageserver/ingest/import_neon.py), read by the
    pageserver: `datadir` (absent or empty) then gets its small files; `origin` must be its."""
    label: str | None = None
    """How errors name `neon_file` (its URL)."""
    fetching: bool = False
    """`neon_file` is still being written by the caller (a fetch): read as it grows, until
    `<neon_file>.done` (or `.failed`: the import fails) appears beside it."""


@method("snapshot.import_delta", SnapshotInfo)
@dataclass(frozen=True, slots=True)
class SnapshotImportDeltaRequest(ApiRequest):
    """Import a delta `.neon` file's tar, extracted as it is at `datadir`, as snapshot `name`
    on a branch of snapshot `parent` (in its storage): only what changed is written."""

    name: str
    datadir: str
    parent: str
    origin: str
    """The manifest (JSON) of the snapshot the delta makes, as a whole snapshot's."""
    neon_file: str | None = None
    """The delta `.neon` file itself, read by the pageserver (pageserver/ingest/
    import_delta.py `import_delta_file`): `datadir` (absent or empty) then gets its small
    files; `origin` must be its manifest's."""
    label: str | None = None
    """How errors name `neon_file` (its URL)."""
    fetching: bool = False
    """`neon_file` is still being written by the caller: read as it grows, until
    `<neon_file>.done` (or `.failed`: the import fails) appears beside it."""
    work_store: str | None = None
    """With `neon_file`: the page history of the native storage whose work directory
    `datadir` is in (the caller's, which need not be the parent's)."""


@dataclass(frozen=True, slots=True)
class BranchResponse(ApiResponse):
    """The node's new state; its WAL decoding starts at `decode_from`."""

    timeline_id: str
    start_lsn: int
    wal_segment_size: int
    pg_timeline: int
    checkouts: int
    lsn: int
    """The snapshot's LSN the timeline branched at."""
    decode_from: int | None = None
    parent: str | None = None


@method("node.branch", BranchResponse)
@dataclass(frozen=True, slots=True)
class NodeBranchRequest(ApiRequest):
    """Point a node at a new timeline branched from a snapshot."""

    node_id: str
    snapshot: str
    pg_timeline: int | None = None
    """PostgreSQL timeline of the new branch (default: the node's current one + 1)."""
    checkout: bool = False

    def __post_init__(self) -> None:
        _check_positive("pg_timeline", self.pg_timeline)
