"""The models of snapshots and basebackups that only read: show, list, a basebackup and its
plan (what `snapshot push` and `pg checkout` ask; the writes are models_snapshot_writes).

Imported on first use through pageserver_api.models (its module docstring says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pageserver_api.errors import InvalidArgument
from pageserver_api.models import (
    ApiRequest,
    ApiResponse,
    ListResponse,
    _check_positive,
    method,
)
from pg15.lsn import format_lsn


@dataclass(frozen=True, slots=True)
class SnapshotInfo(ApiResponse):
    name: str
    """PGDATA@TAG"""
    node_id: str
    timeline_id: str
    lsn: int
    created_at: float
    parent: str | None = None
    size_bytes: int | None = None
    """Bytes of page history the snapshot keeps (listed snapshots only)."""
    origin: str | None = None
    """The manifest (JSON) of the `.neon` file it was imported from, if it was."""
    storage: str | None = None
    """The s3 storage it was attached from (a history read from a bucket), if it was."""

    _OMIT_WHEN_NONE = frozenset({"size_bytes", "origin", "storage"})

    @property
    def lsn_text(self) -> str:
        return format_lsn(self.lsn)


@dataclass(frozen=True, slots=True)
class SnapshotListResponse(ListResponse):
    items: list[SnapshotInfo]


@method("snapshot.list", SnapshotListResponse)
@dataclass(frozen=True, slots=True)
class SnapshotListRequest(ApiRequest):
    pass


@method("snapshot.show", SnapshotInfo)
@dataclass(frozen=True, slots=True)
class SnapshotShowRequest(ApiRequest):
    name: str
    checkout_node: str | None = None
    """The node about to be checked out to this snapshot (`pg checkout`'s first request):
    the pageserver rebuilds the target's pages its delta will want while the node stops
    (pageserver/basebackup/prepared_pages.py). An older pageserver ignores it (unknown
    parameters are), and only shows the snapshot."""


@dataclass(frozen=True, slots=True)
class BasebackupPlan(ApiResponse):
    """Where the archive's WAL is: new WAL of a server started on it begins at `end_lsn`."""

    lsn: int
    checkpoint_lsn: int
    end_lsn: int
    pg_timeline: int
    wal_segment: str
    system_identifier: int
    wal_segment_size: int


@dataclass(frozen=True, slots=True)
class TablespaceLocation(ApiResponse):
    """A non-default tablespace of a basebackup and its location in the page history ("":
    in-place). The archive always has it in place (pageserver/basebackup/tar_stream.py)."""

    oid: int
    location: str


@dataclass(frozen=True, slots=True)
class BasebackupResponse(BasebackupPlan):
    """The plan of a streamed basebackup, known once its tar has been sent."""

    bytes: int
    """Bytes streamed: of the tar, or of the `.neon` file when one was asked for."""
    tablespaces: list[TablespaceLocation] = field(default_factory=list)
    tar_bytes: int = 0
    """Bytes of the tar (inside the `.neon` file when one was asked for)."""
    parent: str | None = None
    """The snapshot a delta `.neon` file applies to (None: a whole one)."""
    parent_lsn: int | None = None
    full_tar_bytes: int = 0
    """Bytes of the whole snapshot's tar: `tar_bytes` for a whole file, what a whole file's
    tar would hold for a delta."""


_TAR_TOTAL = b"\0neon tar total\0"
"""Begins the chunk announcing the tar's size: a `.neon` file begins with a tar header
naming `PaxHeaders/manifest.json`, never with a NUL."""


def tar_total_chunk(total: int) -> bytes:
    """The first chunk of a basebackup asked with `tar_total`."""
    return _TAR_TOTAL + total.to_bytes(8, "big")


def read_tar_total(chunk: bytes) -> int | None:
    """The tar size a basebackup's first chunk announces; None: it is the file's first
    bytes (a daemon that announces nothing)."""
    if len(chunk) != len(_TAR_TOTAL) + 8 or not chunk.startswith(_TAR_TOTAL):
        return None
    return int.from_bytes(chunk[len(_TAR_TOTAL) :], "big")


@method("basebackup", BasebackupResponse, streams=True)
@dataclass(frozen=True, slots=True)
class BasebackupRequest(ApiRequest):
    """A tar of a startable data directory: a snapshot, or a node's branch point."""

    node_id: str | None = None
    snapshot: str | None = None
    pg_timeline: int | None = None
    timeline_history: bytes | None = None
    """The .history file of `pg_timeline` (default: one line naming the branch point)."""
    mtime: int | None = None
    """Unix time written as the members' mtime, pg_control's time and the checkpoint's time
    (default: the daemon's clock). Fixed, the same state always gives the same bytes."""
    snapshot_file: bool | None = None
    """True: stream the tar as a `.neon` snapshot file (snapfile/) instead: the daemon compresses
    the frames on its threads, so a twentieth of the bytes crosses the socket."""
    created_at: int | None = None
    """The `.neon` manifest's creation time, Unix seconds (default: the daemon's clock)."""
    delta_from: list[str] | None = None
    """Snapshots the receiver has: the newest of them that lies on `snapshot`'s history
    (same page history, an ancestor state) becomes the parent of a delta `.neon` file, which
    carries only the pages written since; none does: a whole file. The result names it."""
    checkout_from: str | None = None
    """`pg checkout`: the snapshot of the node's state before it (`HEAD{i}`), whose stopped
    data directory the delta (tar, or `.neon` file) of the node's branch point applies to, in
    place (pageserver/basebackup/checkout_delta.py); refused (InvalidArgument) where only a
    full rebuild is right. With `snapshot` (and `pg_timeline`), not `node_id`: the delta to
    that snapshot, the branch point the node's branch is being made at meanwhile."""
    hints_logged_from: int | None = None
    """With checkout_from: the LSN from which the directory's hint bits are WAL-logged."""
    sparse_wal: bool | None = None
    """With checkout_from, as a tar: the WAL segment is a GNU sparse member (its two pages,
    not 16 MiB of zeros: datadir_files/tar_reader.py reads it). An older daemon sends it
    whole."""
    fork_sizes: bool | None = None
    """With checkout_from, as a tar: the forks of a database directory the delta sends no
    page of are listed in one member (snapfile/delta.py FORK_SIZES), not a member each. An
    older daemon sends a member each."""
    tar_total: bool | None = None
    """With snapshot_file: the stream begins with the tar's exact size (`tar_total_chunk`),
    the tar's members listed before its first byte, so that a push's progress bar (and its
    receiver's) shows a percent and an ETA. An older daemon sends none (`read_tar_total`
    tells its first chunk from a `.neon` file's)."""

    def __post_init__(self) -> None:
        if self.node_id is None and self.snapshot is None:
            raise InvalidArgument("basebackup needs a node_id or a snapshot")
        one_point = (self.node_id is None) != (self.snapshot is None)
        if self.checkout_from is not None and not (
            one_point and (self.snapshot is None or self.pg_timeline is not None)
            and self.delta_from is None and self.hints_logged_from is not None
        ):  # fmt: skip
            raise InvalidArgument(
                "basebackup checkout_from applies to a node's branch point or to the snapshot "
                "it is being branched at (with pg_timeline), with hints_logged_from"
            )
        for name in ("sparse_wal", "fork_sizes"):
            if getattr(self, name) and (self.checkout_from is None or self.snapshot_file):
                raise InvalidArgument(
                    f"basebackup {name} applies to a checkout's tar only (checkout_from, no "
                    "snapshot_file)"
                )
        _check_positive("pg_timeline", self.pg_timeline)
        if self.tar_total and not self.snapshot_file:
            raise InvalidArgument("basebackup tar_total applies to a snapshot file only")
        if self.created_at is not None and not self.snapshot_file:
            raise InvalidArgument("basebackup created_at applies to a snapshot file only")
        if self.delta_from is not None and not (self.snapshot_file and self.snapshot):
            raise InvalidArgument(
                "basebackup delta_from applies to the snapshot_file of a snapshot only"
            )
        if self.mtime is not None and not 0 <= self.mtime < 8**11:
            raise InvalidArgument(f"basebackup mtime {self.mtime} does not fit a tar header")


@method("basebackup.plan", BasebackupPlan)
@dataclass(frozen=True, slots=True)
class BasebackupPlanRequest(ApiRequest):
    """What `basebackup` with the same parameters would describe in its result (LSN, PG
    timeline, system identifier), before any byte: an export checks against it that the
    snapshot it streamed is the one it was asked for."""

    node_id: str | None = None
    snapshot: str | None = None
    pg_timeline: int | None = None

    def __post_init__(self) -> None:
        if self.node_id is None and self.snapshot is None:
            raise InvalidArgument("basebackup needs a node_id or a snapshot")
        _check_positive("pg_timeline", self.pg_timeline)
