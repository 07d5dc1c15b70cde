"""One request and one response dataclass per proto method, and their wire form.

A method's params and result travel as msgpack maps (lists for the list methods); the names
and keys here are the wire format, so an older CLI or daemon still talks to a newer one.
Decoding (`from_wire`) checks each field's type and `__post_init__` its range, so a bad
request is refused with InvalidArgument naming the field, in one place for every handler and
whether the model came from the wire or from typed code.

The models themselves live in one module per area (models_nodes, models_snapshots, ...),
imported on first use of one of their names here (`__getattr__`): creating a frozen slotted
dataclass compiles six generated methods, and the 63 models took 37-67 ms of every `neon`
command's start (a tenth of a 1% `pg checkout`), which needs a third of them. Import the
models from here, as always; `REQUESTS` loads every area.
"""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

from pageserver_api.errors import InvalidArgument, ProtocolError
from pageserver_api.lazy_names import load_name
from pg15.constants import FORK_NAMES

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


def resolve_all_hints() -> int:
    """The field types of every model defined so far, resolved now (`typing.get_type_hints`
    evaluates each annotation's string: ~0.1 ms a model, ~13 ms for all 130) and kept: the
    daemon calls it before it serves, so that no request pays for its models' first
    decoding (a freshly started daemon's first delta push did: py-spy), and the warm server
    before it forks, whose every command is a fresh child that otherwise resolved each model
    it decoded again. Returns how many models there are."""
    seen: set[type] = set()
    pending = list(WireModel.__subclasses__())
    while pending:
        cls = pending.pop()
        if cls not in seen:
            seen.add(cls)
            _hints(cls)
            pending.extend(cls.__subclasses__())
    return len(seen)


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

_REQUESTS: dict[str, type[ApiRequest]] = {}
"""The request models of the areas imported so far, by method name (`REQUESTS`: all)."""


def method(name: str, response: type[ApiResponse], *, streams: bool = False) -> Any:
    """Class decorator: the request model of proto method `name`, answered by `response`."""

    def register(cls: M) -> M:
        if name in _REQUESTS:
            raise TypeError(f"two request models for {name!r}")
        cls.METHOD = name
        cls.RESPONSE = response
        cls.STREAMS = streams
        _REQUESTS[name] = cls
        return cls

    return register


# The models, by area


_AREAS: dict[str, tuple[str, ...]] = {
    "pageserver_api.models_nodes": (
        "NodeStatus",
        "StatusResponse",
        "StatusRequest",
        "NodeRegisterRequest",
        "NodePauseRequest",
        "NodeUnregisterRequest",
        "NodeListResponse",
        "NodeListRequest",
        "WaitDecodedResponse",
        "NodeWaitDecodedRequest",
        "WalTailResponse",
        "NodeWalTailRequest",
        "ImportResponse",
        "NodeImportRequest",
        "TimelineInfo",
        "TimelineInfoRequest",
    ),
    "pageserver_api.models_reads": (
        "ReadAt",
        "PageResponse",
        "PageGetRequest",
        "RelSizeResponse",
        "RelSizeRequest",
        "DbListResponse",
        "DbListRequest",
        "RelListResponse",
        "RelListRequest",
    ),
    "pageserver_api.models_snapshots": (
        "SnapshotInfo",
        "SnapshotListResponse",
        "SnapshotListRequest",
        "SnapshotShowRequest",
        "BasebackupPlan",
        "TablespaceLocation",
        "BasebackupResponse",
        "BasebackupRequest",
        "BasebackupPlanRequest",
    ),
    "pageserver_api.models_snapshot_writes": (
        "SnapshotCreateRequest",
        "SnapshotDestroyRequest",
        "SnapshotImportRequest",
        "SnapshotImportDeltaRequest",
        "BranchResponse",
        "NodeBranchRequest",
    ),
    "pageserver_api.models_pitr": (
        "PitrAreaInfo",
        "GcResult",
        "PitrCreateRequest",
        "PitrListResponse",
        "PitrListRequest",
        "PitrDestroyRequest",
        "PitrExtractRequest",
        "XactInfo",
        "PitrCommitsResponse",
        "PitrCommitsRequest",
        "RetainedInfo",
        "StorageUsageResponse",
        "StorageUsageRequest",
        "GcRunResponse",
        "GcRunRequest",
    ),
    "pageserver_api.models_remote": (
        "RemoteUploadStatus",
        "RemoteStorageUsage",
        "RemoteStatusResponse",
        "RemoteStatusRequest",
        "RemoteAttachRequest",
        "RemoteDetachRequest",
    ),
    "pageserver_api.models_diff": (
        "ForkDiff",
        "RelationDiff",
        "SnapshotDiffResponse",
        "SnapshotDiffRequest",
    ),
}
"""Each area module and the models it defines (tests/pageserver_api/test_models.py checks this
table against the modules and the TYPE_CHECKING imports below)."""
_AREA_OF = {name: module for module, names in _AREAS.items() for name in names}

if TYPE_CHECKING:
    from pageserver_api.models_diff import (
        ForkDiff as ForkDiff,
    )
    from pageserver_api.models_diff import (
        RelationDiff as RelationDiff,
    )
    from pageserver_api.models_diff import (
        SnapshotDiffRequest as SnapshotDiffRequest,
    )
    from pageserver_api.models_diff import (
        SnapshotDiffResponse as SnapshotDiffResponse,
    )
    from pageserver_api.models_nodes import (
        ImportResponse as ImportResponse,
    )
    from pageserver_api.models_nodes import (
        NodeImportRequest as NodeImportRequest,
    )
    from pageserver_api.models_nodes import (
        NodeListRequest as NodeListRequest,
    )
    from pageserver_api.models_nodes import (
        NodeListResponse as NodeListResponse,
    )
    from pageserver_api.models_nodes import (
        NodePauseRequest as NodePauseRequest,
    )
    from pageserver_api.models_nodes import (
        NodeRegisterRequest as NodeRegisterRequest,
    )
    from pageserver_api.models_nodes import (
        NodeStatus as NodeStatus,
    )
    from pageserver_api.models_nodes import (
        NodeUnregisterRequest as NodeUnregisterRequest,
    )
    from pageserver_api.models_nodes import (
        NodeWaitDecodedRequest as NodeWaitDecodedRequest,
    )
    from pageserver_api.models_nodes import (
        NodeWalTailRequest as NodeWalTailRequest,
    )
    from pageserver_api.models_nodes import (
        StatusRequest as StatusRequest,
    )
    from pageserver_api.models_nodes import (
        StatusResponse as StatusResponse,
    )
    from pageserver_api.models_nodes import (
        TimelineInfo as TimelineInfo,
    )
    from pageserver_api.models_nodes import (
        TimelineInfoRequest as TimelineInfoRequest,
    )
    from pageserver_api.models_nodes import (
        WaitDecodedResponse as WaitDecodedResponse,
    )
    from pageserver_api.models_nodes import (
        WalTailResponse as WalTailResponse,
    )
    from pageserver_api.models_pitr import (
        GcResult as GcResult,
    )
    from pageserver_api.models_pitr import (
        GcRunRequest as GcRunRequest,
    )
    from pageserver_api.models_pitr import (
        GcRunResponse as GcRunResponse,
    )
    from pageserver_api.models_pitr import (
        PitrAreaInfo as PitrAreaInfo,
    )
    from pageserver_api.models_pitr import (
        PitrCommitsRequest as PitrCommitsRequest,
    )
    from pageserver_api.models_pitr import (
        PitrCommitsResponse as PitrCommitsResponse,
    )
    from pageserver_api.models_pitr import (
        PitrCreateRequest as PitrCreateRequest,
    )
    from pageserver_api.models_pitr import (
        PitrDestroyRequest as PitrDestroyRequest,
    )
    from pageserver_api.models_pitr import (
        PitrExtractRequest as PitrExtractRequest,
    )
    from pageserver_api.models_pitr import (
        PitrListRequest as PitrListRequest,
    )
    from pageserver_api.models_pitr import (
        PitrListResponse as PitrListResponse,
    )
    from pageserver_api.models_pitr import (
        RetainedInfo as RetainedInfo,
    )
    from pageserver_api.models_pitr import (
        StorageUsageRequest as StorageUsageRequest,
    )
    from pageserver_api.models_pitr import (
        StorageUsageResponse as StorageUsageResponse,
    )
    from pageserver_api.models_pitr import (
        XactInfo as XactInfo,
    )
    from pageserver_api.models_reads import (
        DbListRequest as DbListRequest,
    )
    from pageserver_api.models_reads import (
        DbListResponse as DbListResponse,
    )
    from pageserver_api.models_reads import (
        PageGetRequest as PageGetRequest,
    )
    from pageserver_api.models_reads import (
        PageResponse as PageResponse,
    )
    from pageserver_api.models_reads import (
        ReadAt as ReadAt,
    )
    from pageserver_api.models_reads import (
        RelListRequest as RelListRequest,
    )
    from pageserver_api.models_reads import (
        RelListResponse as RelListResponse,
    )
    from pageserver_api.models_reads import (
        RelSizeRequest as RelSizeRequest,
    )
    from pageserver_api.models_reads import (
        RelSizeResponse as RelSizeResponse,
    )
    from pageserver_api.models_remote import (
        RemoteAttachRequest as RemoteAttachRequest,
    )
    from pageserver_api.models_remote import (
        RemoteDetachRequest as RemoteDetachRequest,
    )
    from pageserver_api.models_remote import (
        RemoteStatusRequest as RemoteStatusRequest,
    )
    from pageserver_api.models_remote import (
        RemoteStatusResponse as RemoteStatusResponse,
    )
    from pageserver_api.models_remote import (
        RemoteStorageUsage as RemoteStorageUsage,
    )
    from pageserver_api.models_remote import (
        RemoteUploadStatus as RemoteUploadStatus,
    )
    from pageserver_api.models_snapshot_writes import (
        BranchResponse as BranchResponse,
    )
    from pageserver_api.models_snapshot_writes import (
        NodeBranchRequest as NodeBranchRequest,
    )
    from pageserver_api.models_snapshot_writes import (
        SnapshotCreateRequest as SnapshotCreateRequest,
    )
    from pageserver_api.models_snapshot_writes import (
        SnapshotDestroyRequest as SnapshotDestroyRequest,
    )
    from pageserver_api.models_snapshot_writes import (
        SnapshotImportDeltaRequest as SnapshotImportDeltaRequest,
    )
    from pageserver_api.models_snapshot_writes import (
        SnapshotImportRequest as SnapshotImportRequest,
    )
    from pageserver_api.models_snapshots import (
        BasebackupPlan as BasebackupPlan,
    )
    from pageserver_api.models_snapshots import (
        BasebackupPlanRequest as BasebackupPlanRequest,
    )
    from pageserver_api.models_snapshots import (
        BasebackupRequest as BasebackupRequest,
    )
    from pageserver_api.models_snapshots import (
        BasebackupResponse as BasebackupResponse,
    )
    from pageserver_api.models_snapshots import (
        SnapshotInfo as SnapshotInfo,
    )
    from pageserver_api.models_snapshots import (
        SnapshotListRequest as SnapshotListRequest,
    )
    from pageserver_api.models_snapshots import (
        SnapshotListResponse as SnapshotListResponse,
    )
    from pageserver_api.models_snapshots import (
        SnapshotShowRequest as SnapshotShowRequest,
    )
    from pageserver_api.models_snapshots import (
        TablespaceLocation as TablespaceLocation,
    )

    REQUESTS: dict[str, type[ApiRequest]]
    """Every proto method the pageserver serves, by name, with its request model."""


def __getattr__(name: str) -> Any:
    """A model's area module, imported on first use of its name (PEP 562); `REQUESTS`: every
    area's requests."""
    if name == "REQUESTS":
        for area in _AREAS:
            importlib.import_module(area)
        globals()["REQUESTS"] = _REQUESTS
        return _REQUESTS
    return load_name(globals(), _AREA_OF, name)


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
