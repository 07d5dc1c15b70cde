"""One request and one response dataclass per proto method, and their wire form.

A method's params and result travel as msgpack maps (lists for the list methods); the names
and keys here are the wire format, so an older CLI or daemon still talks to a newer one.
Decoding (`from_wire`) checks each field's type and `__post_init__` its range, so a bad
request is refused with InvalidArgument naming the field, in one place for every handler and
whether the model came from the wire or from typed code.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Self, TypeVar

from pageserver_api.errors import InvalidArgument, ProtocolError
from pg15.constants import FORK_NAMES
from pg15.lsn import format_lsn

MAX_WAIT_SECONDS = 600
DEFAULT_WAIT_SECONDS = 30.0


class WireModel:
    """Base of every model: conversion between the dataclass and its msgpack form."""

    __slots__ = ()
    _NOUN: ClassVar[str] = "field"
    _OMIT_WHEN_NONE: ClassVar[frozenset[str]] = frozenset()
    """Fields left out of the wire form while None (absent on the wire means None)."""

    @classmethod
    def from_wire(cls, raw: Any, where: str = "") -> Self:
        """Check and convert a decoded msgpack map; unknown keys are ignored (newer peers)."""
        if not isinstance(raw, dict):
            raise InvalidArgument(f"{where or cls.__name__} must be a map, not {_kind(raw)}")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            name = f"{where}.{f.name}" if where else f.name
            if f.name in raw:
                values[f.name] = _convert(raw[f.name], _hints(cls)[f.name], name, cls._NOUN)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise InvalidArgument(f"{cls._NOUN} {name!r} is missing")
        return cls(**values)

    def to_wire(self) -> dict[str, Any]:
        """The msgpack map of this model (nested models become maps too)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.name in self._OMIT_WHEN_NONE:
                continue
            out[f.name] = _to_wire(value)
        return out


class ApiRequest(WireModel):
    """Params of one proto method; optional params are sent only when set."""

    __slots__ = ()
    _NOUN = "parameter"
    METHOD: ClassVar[str]
    RESPONSE: ClassVar[type[ApiResponse]]
    STREAMS: ClassVar[bool] = False
    """The method streams bytes before its result (use ProtoClient.download)."""

    def to_wire(self) -> dict[str, Any]:
        # An older daemon treats a present key as set (e.g. basebackup's pg_timeline): a None
        # is sent as an absent key.
        return {k: v for k, v in super().to_wire().items() if v is not None}


class ApiResponse(WireModel):
    """Result of one proto method."""

    __slots__ = ()


class ListResponse(ApiResponse):
    """A result that is a list on the wire: the model holds it in its one field `items`."""

    __slots__ = ()
    items: Any

    @classmethod
    def from_wire(cls, raw: Any, where: str = "") -> Self:
        return super().from_wire({"items": raw}, where)

    def to_wire(self) -> Any:
        return super().to_wire()["items"]


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


_KINDS: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    bytes: "bytes",
    datetime: "an ISO 8601 time",
    type(None): "null",
}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arm) for arm in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is dict or (isinstance(tp, type) and issubclass(tp, WireModel)):
        return "a map"
    return _KINDS.get(tp, str(tp))


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _convert(value: Any, tp: Any, name: str, noun: str, shown: Any = None) -> Any:
    """`value` as type `tp`, or InvalidArgument naming the field (and type `shown`)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(arms) < len(typing.get_args(tp)):
            return None
        if len(arms) == 1:  # an optional value: its own errors (a bad time, ...) show
            return _convert(value, arms[0], name, noun, tp)
        for arm in arms:
            try:
                return _convert(value, arm, name, noun)
            except InvalidArgument:
                continue
    elif origin is list:
        if isinstance(value, list | tuple):
            (item_tp,) = typing.get_args(tp)
            return [_convert(v, item_tp, f"{name}[{i}]", noun) for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return value
    elif isinstance(tp, type) and issubclass(tp, WireModel):
        if isinstance(value, dict):
            return tp.from_wire(value, name)
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is bytes:
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
    elif tp is datetime:
        if isinstance(value, str):
            return parse_time(value, name)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"{name}: no wire conversion for {tp!r}")
    raise InvalidArgument(f"{noun} {name!r} must be {_describe(shown or tp)}, not {_kind(value)}")


def _to_wire(value: Any) -> Any:
    if isinstance(value, WireModel):
        return value.to_wire()
    if isinstance(value, list | tuple):
        return [_to_wire(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def parse_time(text: str, name: str = "time") -> datetime:
    """An ISO 8601 time, or InvalidArgument naming the field."""
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(
            f"invalid {name} {text!r}: use ISO 8601, e.g. 2026-11-23T22:00:00+00:00"
        ) from None


def _check_lsn(name: str, value: int | None) -> None:
    if value is not None and value < 0:
        raise InvalidArgument(f"parameter {name!r} must be a non-negative integer")


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise InvalidArgument(f"parameter {name!r} must be a positive integer")


def _check_wait(value: float) -> None:
    if not 0 <= value <= MAX_WAIT_SECONDS:
        raise InvalidArgument(
            f"parameter 'wait_timeout' must be a number of seconds <= {MAX_WAIT_SECONDS}"
        )


def fork_number(fork: int | str) -> int:
    """A fork given by name ('main', 'fsm', 'vm', 'init') or number, as its number."""
    if isinstance(fork, str) and fork in FORK_NAMES:
        return FORK_NAMES.index(fork)
    if isinstance(fork, int) and not isinstance(fork, bool) and 0 <= fork < len(FORK_NAMES):
        return fork
    raise InvalidArgument(
        f"parameter 'fork': unknown fork {fork!r}: use one of {', '.join(FORK_NAMES)}"
    )


M = TypeVar("M", bound=type[ApiRequest])

REQUESTS: dict[str, type[ApiRequest]] = {}
"""Every proto method the pageserver serves, by name, with its request model."""


def method(name: str, response: type[ApiResponse], *, streams: bool = False) -> Any:
    """Class decorator: the request model of proto method `name`, answered by `response`."""

    def register(cls: M) -> M:
        if name in REQUESTS:
            raise TypeError(f"two request models for {name!r}")
        cls.METHOD = name
        cls.RESPONSE = response
        cls.STREAMS = streams
        REQUESTS[name] = cls
        return cls

    return register


# Responses shared by several methods


@dataclass(frozen=True, slots=True)
class NodeStatus(ApiResponse):
    """A followed node (never its password), and, while a follower runs, its stream state."""

    node_id: str
    host: str
    port: int
    user: str
    system_id: str | None = None
    store_dir: str | None = None
    pgdata: str | None = None
    socket_dir: str | None = None
    replication_slot: str | None = None
    auth_methods: list[str] | None = None
    paused: bool | None = None
    """The node was stopped with the CLI: nothing connects to it until `pg start`."""
    state: str | None = None
    """The receiver's state ("streaming", ...); None: registered but not followed now."""
    timeline: int | None = None
    received_lsn: str | None = None
    flushed_lsn: str | None = None
    flushed_lsn_int: int | None = None
    decoded_lsn: str | None = None
    ingested_lsn: str | None = None
    """End of the last record in the page store: what snapshots and reads can see."""
    ingested_lsn_int: int | None = None
    durable_lsn: str | None = None
    """End of the last record flushed to layer files (a crash re-ingests above it)."""
    records: int | None = None
    last_error: str | None = None
    decode_error: str | None = None
    ingest: str | None = None
    """"ok", "stalled" (retrying: storage full) or "failed" (decoding stopped for good)."""
    ingest_error: str | None = None
    """What stops ingest, if anything (shown by `pg list`; waiting commands fail with it)."""
    stream_ended: bool | None = None

    _NODE_FIELDS: ClassVar[tuple[str, ...]] = (
        "node_id",
        "host",
        "port",
        "user",
        "system_id",
        "store_dir",
        "pgdata",
        "socket_dir",
        "replication_slot",
        "auth_methods",
        "paused",
    )

    def to_wire(self) -> dict[str, Any]:
        out = WireModel.to_wire(self)
        if self.state is None:  # not followed: the registration only
            return {k: out[k] for k in self._NODE_FIELDS}
        return out


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


# Node following


@dataclass(frozen=True, slots=True)
class StatusResponse(ApiResponse):
    version: str
    pid: int
    uptime_seconds: float
    workdir: str
    listen_host: str
    proto_port: int
    http_port: int
    nodes: list[NodeStatus]


@method("status", StatusResponse)
@dataclass(frozen=True, slots=True)
class StatusRequest(ApiRequest):
    pass


@method("node.register", NodeStatus)
@dataclass(frozen=True, slots=True)
class NodeRegisterRequest(ApiRequest):
    node_id: str
    host: str
    port: int
    user: str
    password: str
    system_id: str | None = None
    store_dir: str | None = None
    pgdata: str | None = None
    socket_dir: str | None = None
    """Connect through the node's unix socket there (a directory private to its OS user)."""
    replication_slot: str | None = None
    """Stream from this slot instead of `neon_<node id>` (an attached server's)."""
    auth_methods: list[str] | None = None
    """Authentication methods to answer (pg_hba.conf names); None: the managed-node policy."""
    paused: bool = False
    """Register without connecting yet (an attached server before its image is imported)."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise InvalidArgument("parameter 'port' must be a TCP port (1-65535)")


@method("node.pause", NodeStatus)
@dataclass(frozen=True, slots=True)
class NodePauseRequest(ApiRequest):
    """The CLI is stopping the node: after its last WAL, connect no more until the node is
    registered again (`pg start`)."""

    node_id: str
    disconnect: bool = False
    """Stop streaming at once instead of after the stream's end: an attached server being
    detached keeps running, so its stream never ends by itself (`neon pg detach`)."""


@method("node.unregister", NodeStatus)
@dataclass(frozen=True, slots=True)
class NodeUnregisterRequest(ApiRequest):
    node_id: str


@dataclass(frozen=True, slots=True)
class NodeListResponse(ListResponse):
    items: list[NodeStatus]


@method("node.list", NodeListResponse)
@dataclass(frozen=True, slots=True)
class NodeListRequest(ApiRequest):
    pass


@dataclass(frozen=True, slots=True)
class WaitDecodedResponse(ApiResponse):
    """Whether the record was decoded in time; the node's status rides along on the wire."""

    reached: bool
    node: NodeStatus

    @classmethod
    def from_wire(cls, raw: Any, where: str = "") -> Self:
        if not isinstance(raw, dict):
            raise InvalidArgument(f"{where or cls.__name__} must be a map, not {_kind(raw)}")
        reached = _convert(raw.get("reached"), bool, "reached", cls._NOUN)
        return cls(reached, NodeStatus.from_wire(raw, where))

    def to_wire(self) -> dict[str, Any]:
        return {"reached": self.reached, **self.node.to_wire()}


@method("node.wait_decoded", WaitDecodedResponse)
@dataclass(frozen=True, slots=True)
class NodeWaitDecodedRequest(ApiRequest):
    """Wait until the record at `lsn` (e.g. a shutdown checkpoint) has been decoded."""

    node_id: str
    lsn: int
    wait_timeout: float = DEFAULT_WAIT_SECONDS

    def __post_init__(self) -> None:
        _check_lsn("lsn", self.lsn)
        _check_wait(self.wait_timeout)


@dataclass(frozen=True, slots=True)
class ImportResponse(ApiResponse):
    lsn: int
    lsn_text: str


@method("node.import", ImportResponse)
@dataclass(frozen=True, slots=True)
class NodeImportRequest(ApiRequest):
    """Import a node's cleanly shut-down data directory before its first start."""

    node_id: str
    datadir: str
    at_lsn: int | None = None
    """An attached server's recovered base backup: the backup's end LSN (see
    pageserver/ingest/import_datadir.py)."""


@dataclass(frozen=True, slots=True)
class TimelineInfo(ApiResponse):
    """A node's current timeline; only node_id and imported=False before its import."""

    node_id: str
    imported: bool
    timeline_id: str | None = None
    start_lsn: int | None = None
    pg_timeline: int | None = None
    checkouts: int | None = None
    parent: str | None = None
    last_record_lsn: int | None = None
    prev_record_lsn: int | None = None
    disk_consistent_lsn: int | None = None
    layers: int | None = None
    size_bytes: int | None = None

    def to_wire(self) -> dict[str, Any]:
        out = WireModel.to_wire(self)
        return out if self.imported else {"node_id": self.node_id, "imported": False}


@method("timeline.info", TimelineInfo)
@dataclass(frozen=True, slots=True)
class TimelineInfoRequest(ApiRequest):
    node_id: str


# Reads at an LSN (`neon debug`)


@dataclass(frozen=True, slots=True)
class ReadAt(ApiRequest):
    """A read of a node's pages at `lsn` (default: the latest ingested); a future LSN is
    waited for up to `wait_timeout` seconds."""

    node_id: str
    lsn: int | None = field(default=None, kw_only=True)
    wait_timeout: float = field(default=DEFAULT_WAIT_SECONDS, kw_only=True)

    def __post_init__(self) -> None:
        _check_lsn("lsn", self.lsn)
        _check_wait(self.wait_timeout)


@dataclass(frozen=True, slots=True)
class PageResponse(ApiResponse):
    lsn: int
    page: bytes


@method("page.get", PageResponse)
@dataclass(frozen=True, slots=True)
class PageGetRequest(ReadAt):
    spc: int
    db: int
    rel: int
    blkno: int
    fork: int | str = "main"

    def __post_init__(self) -> None:
        ReadAt.__post_init__(self)
        fork_number(self.fork)


@dataclass(frozen=True, slots=True)
class RelSizeResponse(ApiResponse):
    lsn: int
    nblocks: int


@method("rel.size", RelSizeResponse)
@dataclass(frozen=True, slots=True)
class RelSizeRequest(ReadAt):
    spc: int
    db: int
    rel: int
    fork: int | str = "main"

    def __post_init__(self) -> None:
        ReadAt.__post_init__(self)
        fork_number(self.fork)


@dataclass(frozen=True, slots=True)
class DbListResponse(ApiResponse):
    lsn: int
    dbs: list[list[int]]
    """[spc, db] of every database, [1664, 0] standing for the shared catalogs."""


@method("db.list", DbListResponse)
@dataclass(frozen=True, slots=True)
class DbListRequest(ReadAt):
    pass


@dataclass(frozen=True, slots=True)
class RelListResponse(ApiResponse):
    lsn: int
    rels: list[list[int]]
    """[relfilenode, fork] of every relation fork of the database."""


@method("rel.list", RelListResponse)
@dataclass(frozen=True, slots=True)
class RelListRequest(ReadAt):
    spc: int
    db: int


# Snapshots and branches


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
    full rebuild is right."""
    hints_logged_from: int | None = None
    """With checkout_from: the LSN from which the directory's hint bits are WAL-logged."""

    def __post_init__(self) -> None:
        if self.node_id is None and self.snapshot is None:
            raise InvalidArgument("basebackup needs a node_id or a snapshot")
        if self.checkout_from is not None and not (
            self.node_id and self.snapshot is None
            and self.delta_from is None and self.hints_logged_from is not None
        ):  # fmt: skip
            raise InvalidArgument(
                "basebackup checkout_from applies to a node's branch point, with hints_logged_from"
            )
        _check_positive("pg_timeline", self.pg_timeline)
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


# PITR areas and GC


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


# Remote storages (s3): pageserver/remote/


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


@method("gc.run", GcRunResponse)
@dataclass(frozen=True, slots=True)
class GcRunRequest(ApiRequest):
    pass


# Comparing snapshots


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


R = TypeVar("R", bound=ApiResponse)


def decode_result(request: ApiRequest, response: type[R], raw: Any) -> R:
    """The server's result for `request` as `response`; a result that does not fit is the
    server's fault, not the user's."""
    if request.RESPONSE is not response:
        raise TypeError(f"{request.METHOD!r} answers {request.RESPONSE.__name__}")
    try:
        return response.from_wire(raw)
    except InvalidArgument as exc:
        raise ProtocolError(f"the pageserver answered {request.METHOD!r} with {exc}") from None
