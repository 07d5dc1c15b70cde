"""The models of node following: registration, status, pause, waits, import, timeline info.

Imported on first use through pageserver_api.models (its module docstring says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Self

from pageserver_api.errors import InvalidArgument
from pageserver_api.models import (
    DEFAULT_WAIT_SECONDS,
    ApiRequest,
    ApiResponse,
    ListResponse,
    WireModel,
    _check_lsn,
    _check_wait,
    _convert,
    _kind,
    method,
)


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
    wal_tail: bool = False
    """The node is stopped at once next and its last WAL taken from its pg_wal
    (node.take_wal_tail): the stream is ended now, no connection waited for."""


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
class WalTailResponse(ApiResponse):
    """The end of the node's valid WAL its history was brought to, and whether that was
    decoded within the wait."""

    end_lsn: int
    reached: bool


@method("node.take_wal_tail", WalTailResponse)
@dataclass(frozen=True, slots=True)
class NodeWalTailRequest(ApiRequest):
    """The CLI stopped the paused node at once (immediate: no shutdown checkpoint, its
    walsender killed): take what it did not send from its `pg_wal` directory, up to the end
    of its valid WAL (pageserver/follow/wal_tail.py), and wait for it to be decoded."""

    node_id: str
    pg_wal: str
    timeline: int
    """The node's timeline, from its pg_control (its segment files' names)."""
    wait_timeout: float = DEFAULT_WAIT_SECONDS

    def __post_init__(self) -> None:
        if not self.pg_wal.startswith("/"):
            raise InvalidArgument("parameter 'pg_wal' must be an absolute path")
        if not 0 < self.timeline < 1 << 32:
            raise InvalidArgument("parameter 'timeline' must be a PostgreSQL timeline ID")
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
