"""The API models: every one survives the wire, every bad field is named, and the set of
models is exactly the set of methods the pageserver serves."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgpack
import pytest

from pageserver.api.proto_service import build_handlers
from pageserver.api.service import Pageserver
from pageserver.config import PageserverConfig
from pageserver_api import models as m
from pageserver_api.client import PageserverClient, SyncPageserverClient
from pageserver_api.errors import InvalidArgument, ProtocolError

NODE = m.NodeStatus(
    "primary1", "127.0.0.1", 5432, "neon_replication", pgdata="pgdata1", socket_dir="/run"
)
FOLLOWED = dataclasses.replace(
    NODE,
    state="streaming",
    timeline=1,
    received_lsn="0/3000000",
    flushed_lsn="0/3000000",
    flushed_lsn_int=0x3000000,
    decoded_lsn="0/2FFFFF0",
    records=12,
    stream_ended=False,
)
SNAP = m.SnapshotInfo("pgdata1@s1", "primary1", "ab" * 16, 0x3000028, 1.5e9, parent=None)
AREA = m.PitrAreaInfo("long", "primary1", "inf", "10G", 1.5e9)

REQUESTS: list[m.ApiRequest] = [
    m.StatusRequest(),
    m.NodeRegisterRequest("primary1", "127.0.0.1", 5432, "repl", "secret", store_dir="/s"),
    m.NodePauseRequest("primary1"),
    m.NodeUnregisterRequest("primary1"),
    m.NodeListRequest(),
    m.NodeWaitDecodedRequest("primary1", 0x3000028, wait_timeout=5.0),
    m.NodeWalTailRequest("primary1", "/srv/neon/pgdata1/pg_wal", 3, wait_timeout=5.0),
    m.NodeImportRequest("primary1", "/data/pgdata1"),
    m.TimelineInfoRequest("primary1"),
    m.PageGetRequest("primary1", 1663, 5, 16384, 7, fork="vm", lsn=0x3000028),
    m.RelSizeRequest("primary1", 1663, 5, 16384, fork=0, wait_timeout=60.0),
    m.DbListRequest("primary1"),
    m.RelListRequest("primary1", 1663, 5, lsn=16),
    m.SnapshotCreateRequest("primary1", "pgdata1@s1", lsn=0x3000028, wait_timeout=120.0),
    m.SnapshotListRequest(),
    m.SnapshotShowRequest("pgdata1@s1"),
    m.SnapshotDestroyRequest("pgdata1@s1"),
    m.SnapshotImportRequest("oldpg", "/tmp/import-1/pgdata", "/srv/neon/pagestore"),
    m.SnapshotImportRequest("got", "/tmp/import-2/pgdata", "/srv/neon/pagestore", '{"lsn": 1}'),
    m.SnapshotImportDeltaRequest("got2", "/tmp/import-3/delta", "got", '{"lsn": 2}'),
    m.NodeBranchRequest("primary1", "pgdata1@s1", pg_timeline=1, checkout=True),
    m.BasebackupRequest(snapshot="pgdata1@s1", pg_timeline=2, timeline_history=b"1\t0/3\tx\n"),
    m.BasebackupRequest(snapshot="pgdata1@s1", mtime=1_780_000_000),
    m.BasebackupRequest(snapshot="pgdata1@s2", snapshot_file=True, delta_from=["pgdata1@s1"]),
    m.BasebackupRequest(
        node_id="primary1",
        checkout_from="pgdata1@HEAD1",
        hints_logged_from=8,
        sparse_wal=True,
        fork_sizes=True,
    ),
    m.BasebackupRequest(
        snapshot="pgdata1@s1", pg_timeline=3, checkout_from="pgdata1@HEAD1", hints_logged_from=8
    ),
    m.BasebackupPlanRequest(snapshot="pgdata1@s1"),
    m.PitrCreateRequest("long", "primary1", ttl="30d"),
    m.PitrListRequest(),
    m.PitrDestroyRequest("long"),
    m.PitrExtractRequest("long", time=datetime(2026, 11, 23, 22, tzinfo=UTC), tag="old"),
    m.GcRunRequest(),
    m.SnapshotDiffRequest("pgdata1@s1", "pgdata1@CURRENT"),
    m.PitrCreateRequest("s3", "primary1", remote={"storage": "s3tank", "bucket": "b"}),
    m.RemoteStatusRequest(),
    m.RemoteAttachRequest({"storage": "s3tank", "bucket": "b", "prefix": "", "endpoint": None}),
    m.RemoteDetachRequest("s3tank"),
    m.PitrCommitsRequest("primary1", lsn=5, limit=3),
    m.StorageUsageRequest("/home/storage/local/pagestore"),
]

RESPONSES: list[m.ApiResponse] = [
    m.StatusResponse("0.1.0", 42, 1.25, "/w", "127.0.0.1", 6400, 9898, [NODE, FOLLOWED]),
    NODE,
    FOLLOWED,
    m.NodeListResponse([FOLLOWED, NODE]),
    m.WaitDecodedResponse(True, FOLLOWED),
    m.WalTailResponse(0x3000028, True),
    m.ImportResponse(0x3000028, "0/3000028"),
    m.TimelineInfo("primary1", False),
    m.TimelineInfo(
        "primary1", True, "ab" * 16, 16, 1, 0, None, 0x3000028, 0x3000000, 0x3000000, 4, 8192
    ),
    m.PageResponse(0x3000028, bytes(8192)),
    m.RelSizeResponse(0x3000028, 3),
    m.DbListResponse(0x3000028, [[1664, 0], [1663, 5]]),
    m.RelListResponse(0x3000028, [[16384, 0], [16384, 1]]),
    SNAP,
    dataclasses.replace(SNAP, size_bytes=65536, parent="pgdata1@HEAD0"),
    m.SnapshotListResponse([dataclasses.replace(SNAP, size_bytes=0)]),
    m.BranchResponse("cd" * 16, 0x3000028, 16 << 20, 2, 1, 0x3000028, decode_from=0x3000000),
    m.BasebackupResponse(1, 2, 3, 1, "000000010000000000000003", 7, 16 << 20, 10240),
    m.BasebackupResponse(
        *(1, 2, 3, 1, "000000010000000000000003", 7, 16 << 20, 10240),
        [m.TablespaceLocation(16385, "/srv/ts"), m.TablespaceLocation(16386, "")],
    ),
    m.BasebackupResponse(
        *(1, 2, 3, 1, "000000010000000000000003", 7, 16 << 20, 10240),
        tar_bytes=4096,
        parent="pgdata1@s1",
        parent_lsn=0x2000028,
        full_tar_bytes=1 << 20,
    ),
    m.BasebackupPlan(1, 2, 3, 1, "000000010000000000000003", 7, 16 << 20),
    AREA,
    m.PitrListResponse([dataclasses.replace(AREA, from_lsn=16, to_lsn=32)]),
    m.GcRunResponse([m.GcResult(3, 4096), m.GcResult(0, 0)]),
    m.RemoteStorageUsage("s3tank", 4096, ["long"], []),
    m.RemoteStatusResponse(
        [
            m.RemoteUploadStatus(
                "long",
                "s3tank",
                "primary1",
                1,
                0x3B8,
                0x3A0,
                24,
                2,
                8192,
                4096,
                12288,
                1,
                "upload to s3://b/x: S3 answered 503",
                1.5e9,
            )
        ],
        [m.RemoteStorageUsage("s3tank", 4096, ["long"], [])],
    ),
    m.SnapshotDiffResponse(
        "pgdata1@s1",
        "pgdata1@s2",
        16,
        32,
        16,
        3,
        3 * 8192,
        [
            m.RelationDiff(
                "postgres",
                "public",
                "t",
                "table",
                "public.t",
                "modified",
                1663,
                5,
                16384,
                16384,
                4,
                5,
                3,
                3 * 8192,
                [m.ForkDiff("main", 4, 5, 3), m.ForkDiff("init", None, 0, 0)],
            ),
            m.RelationDiff(
                "postgres",
                None,
                None,
                "relation",
                None,
                "created",
                1663,
                5,
                16390,
                None,
                0,
                0,
                0,
                0,
                [m.ForkDiff("main", None, 0, 0)],
            ),
        ],
    ),
    m.PitrCommitsResponse(
        "primary1",
        "t1",
        300,
        [m.XactInfo(100, 180, 731, "commit", datetime(2026, 12, 4, 10, tzinfo=UTC))],
        [m.XactInfo(300, 380, 732, "prepare", datetime(2026, 12, 4, 11, tzinfo=UTC), "g1")],
        0,
        4096,
    ),
    m.StorageUsageResponse([m.RetainedInfo("snapshot", "pgdata1@s1", 8192, 4096)]),
]


def over_the_wire(value: Any) -> Any:
    """What the peer decodes: the proto frames' msgpack settings."""
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)


def response_types() -> set[type[m.ApiResponse]]:
    return {cls.RESPONSE for cls in m.REQUESTS.values()}


def test_every_model_has_a_sample() -> None:
    assert {type(r) for r in REQUESTS} == set(m.REQUESTS.values())
    assert response_types() <= {type(r) for r in RESPONSES}


@pytest.mark.parametrize("model", REQUESTS + RESPONSES, ids=lambda x: type(x).__name__)
def test_round_trip(model: m.WireModel) -> None:
    assert type(model).from_wire(over_the_wire(model.to_wire())) == model


def test_wire_form_is_what_the_handlers_always_sent() -> None:
    """Keys an older CLI or daemon reads; absent optional params stay absent."""
    assert m.BasebackupRequest(node_id="primary1").to_wire() == {"node_id": "primary1"}
    assert m.PitrExtractRequest("a", lsn=5).to_wire() == {"name": "a", "lsn": 5}
    assert m.TimelineInfo("primary1", False).to_wire() == {"node_id": "primary1", "imported": False}
    assert "size_bytes" not in SNAP.to_wire() and SNAP.to_wire()["parent"] is None
    assert set(NODE.to_wire()) == {
        "node_id",
        "host",
        "port",
        "user",
        "system_id",
        "store_dir",
        "pgdata",
        "socket_dir",
        "replication_slot",  # attached servers (neon pg attach); older readers ignore them
        "auth_methods",
        "paused",
    }
    assert m.WaitDecodedResponse(True, FOLLOWED).to_wire() == {
        "reached": True,
        **FOLLOWED.to_wire(),
    }
    assert m.GcRunResponse([m.GcResult(1, 2)]).to_wire() == [
        {"removed_layers": 1, "removed_bytes": 2}
    ]
    when = m.PitrExtractRequest.from_wire({"name": "a", "time": "2026-11-23T22:00:00Z"})
    assert when.time == datetime(2026, 11, 23, 22, tzinfo=UTC)


def wrong_values(model: m.WireModel) -> Iterator[tuple[str, dict[str, Any]]]:
    """(field, wire dict with that field set to a value of another type) per field."""
    wire = model.to_wire()
    for name in wire:
        for bad in (1.5, "x", True, [], None):
            yield name, {**wire, name: bad}


@pytest.mark.parametrize("model", REQUESTS, ids=lambda x: type(x).__name__)
def test_each_bad_request_field_is_named(model: m.ApiRequest) -> None:
    cls = type(model)
    wire = model.to_wire()
    refused: set[str] = set()
    for name, raw in wrong_values(model):
        try:
            cls.from_wire(raw)
        except InvalidArgument as exc:
            assert name in str(exc), f"{cls.__name__}: {exc} does not name {name!r}"
            refused.add(name)
    assert refused == set(wire), f"{cls.__name__}: no bad value refused for some field"
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.default is dataclasses.MISSING:
            with pytest.raises(InvalidArgument, match=f"parameter '{f.name}' is missing"):
                cls.from_wire({k: v for k, v in wire.items() if k != f.name})


def test_bad_response_is_a_protocol_error_naming_the_field() -> None:
    raw = m.StatusResponse("v", 1, 1.0, "/w", "h", 1, 2, [NODE]).to_wire()
    raw["nodes"][0]["port"] = "5432"
    with pytest.raises(ProtocolError, match=r"'nodes\[0\].port' must be an integer"):
        m.decode_result(m.StatusRequest(), m.StatusResponse, raw)
    with pytest.raises(ProtocolError, match="'items' must be a list"):
        m.decode_result(m.GcRunRequest(), m.GcRunResponse, {"removed_layers": 1})


@pytest.mark.parametrize(
    ("cls", "raw", "message"),
    [
        (m.PageGetRequest, {"lsn": -1}, "'lsn' must be a non-negative"),
        (m.PageGetRequest, {"fork": "heap"}, "'fork': unknown fork 'heap'"),
        (m.PageGetRequest, {"fork": 4}, "'fork': unknown fork 4"),
        (m.RelSizeRequest, {"wait_timeout": 601}, "'wait_timeout' must be a number of seconds"),
        (m.SnapshotCreateRequest, {"wait_timeout": -1}, "'wait_timeout' must be a number"),
        (m.NodeBranchRequest, {"pg_timeline": 0}, "'pg_timeline' must be a positive"),
        (m.BasebackupRequest, {"pg_timeline": 0}, "'pg_timeline' must be a positive"),
        (m.NodeRegisterRequest, {"port": 0}, "'port' must be a TCP port"),
        (m.NodeWaitDecodedRequest, {"lsn": -5}, "'lsn' must be a non-negative"),
        (m.NodeWalTailRequest, {"pg_wal": "pg_wal"}, "'pg_wal' must be an absolute path"),
        (m.NodeWalTailRequest, {"timeline": 0}, "'timeline' must be a PostgreSQL timeline"),
        (m.PitrExtractRequest, {"time": "yesterday"}, "invalid time 'yesterday'"),
        (m.PitrExtractRequest, {"lsn": 5, "time": "2026-01-01T00:00:00Z"}, "exactly one of"),
    ],
)
def test_range_checks_name_the_field(
    cls: type[m.ApiRequest], raw: dict[str, Any], message: str
) -> None:
    sample = next(r for r in REQUESTS if type(r) is cls)
    with pytest.raises(InvalidArgument, match=message):
        cls.from_wire({**sample.to_wire(), **raw})


def test_typed_construction_is_checked_the_same_way() -> None:
    with pytest.raises(InvalidArgument, match="exactly one of"):
        m.PitrExtractRequest("long")
    with pytest.raises(InvalidArgument, match="needs a node_id or a snapshot"):
        m.BasebackupRequest()
    with pytest.raises(
        InvalidArgument, match="delta_from applies to the snapshot_file of a snapshot"
    ):
        m.BasebackupRequest(snapshot="pgdata1@s2", delta_from=["pgdata1@s1"])
    with pytest.raises(InvalidArgument, match="sparse_wal applies to a checkout's tar only"):
        m.BasebackupRequest(snapshot="pgdata1@s2", sparse_wal=True)
    # A checkout's delta: of the node's branch point, or of the snapshot it is being branched
    # at, whose PostgreSQL timeline is then said (the branch's is not made yet); never both.
    for point in (
        {"node_id": "primary1", "snapshot": "pgdata1@s1", "pg_timeline": 2},
        {"snapshot": "pgdata1@s1"},
    ):
        with pytest.raises(InvalidArgument, match="checkout_from applies to a node's branch"):
            m.BasebackupRequest(checkout_from="pgdata1@HEAD1", hints_logged_from=8, **point)
    assert m.fork_number("fsm") == 1 and m.fork_number(3) == 3


def test_served_methods_and_models_match(tmp_path: Path) -> None:
    """A method served without a model (or a model nobody serves) fails here."""
    ps = Pageserver(PageserverConfig(tmp_path))
    assert set(build_handlers(ps)) == set(m.REQUESTS)


def test_the_clients_have_one_method_per_api_call() -> None:
    for name in m.REQUESTS:
        attr = name.replace(".", "_")
        assert callable(getattr(PageserverClient, attr)), name
        if not m.REQUESTS[name].STREAMS:
            assert callable(getattr(SyncPageserverClient, attr)), name


def _area_models(module: Any) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if isinstance(value, type)
        and issubclass(value, m.WireModel)
        and value.__module__ == module.__name__
    }


def test_every_model_is_served_by_its_area() -> None:
    """models._AREAS names each area module's models, and only those: a model missing there
    would be an AttributeError of `pageserver_api.models` although its module defines it."""
    import importlib

    for module_name, names in m._AREAS.items():
        module = importlib.import_module(module_name)
        assert _area_models(module) == set(names), module_name
        for name in names:
            assert getattr(m, name) is getattr(module, name)
    with pytest.raises(AttributeError, match="NoSuchModel"):
        m.NoSuchModel  # noqa: B018


def test_type_checking_imports_are_the_area_table() -> None:
    """mypy sees the models through models.py's TYPE_CHECKING imports: the same names and
    modules as the table the runtime loads them by."""
    import ast

    tree = ast.parse(Path(m.__file__).read_text())
    seen: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for imp in node.body:
                if isinstance(imp, ast.ImportFrom) and imp.module:
                    seen.setdefault(imp.module, set()).update(a.name for a in imp.names)
    assert seen == {module: set(names) for module, names in m._AREAS.items()}


def test_models_import_creates_no_model_until_used() -> None:
    """A fresh interpreter: importing pageserver_api.models loads no area; using one model
    loads its area only; REQUESTS loads them all (every method the daemon serves)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import pageserver_api.models as m\n"
        "areas = lambda: sorted(k for k in sys.modules if k.startswith('pageserver_api.models_'))\n"
        "print(areas())\n"
        "m.SnapshotShowRequest('a@b')\n"
        "print(areas())\n"
        "print(len(m.REQUESTS), areas() == sorted(m._AREAS))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = proc.stdout.splitlines()
    assert lines[0] == "[]"
    assert lines[1] == "['pageserver_api.models_snapshots']"
    assert lines[2] == f"{len({type(r) for r in REQUESTS})} True"


_RESOLVED_IN_SERVER = """
import json, typing
from pathlib import Path
from cli.warm_server import _Server
from pageserver_api import models

_Server(Path("/nonexistent"), 0).preload_commands()
calls = []
typing.get_type_hints = lambda *a, **k: calls.append(a) or {}
request = models.BasebackupRequest.from_wire({"snapshot": "p@s", "mtime": 1})
info = models.SnapshotInfo.from_wire(
    {"name": "p@s", "node_id": "n", "timeline_id": "t", "lsn": 1, "created_at": 0.0}
)
print(json.dumps([request.snapshot, info.lsn, len(calls)]))
"""


def test_every_models_types_are_resolved_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """`resolve_all_hints` resolves every model's field types once (the daemon before it
    serves, the warm server before it forks its commands): decoding then never evaluates
    an annotation again, in the server's forked commands either."""
    monkeypatch.setattr(m, "_HINTS", {})
    count = m.resolve_all_hints()
    assert count > 50 and len(m._HINTS) == count
    monkeypatch.setattr(m.typing, "get_type_hints", lambda *a, **k: pytest.fail("resolved"))
    assert m.SnapshotShowRequest.from_wire({"name": "p@s"}).name == "p@s"
    out = subprocess.run(
        [sys.executable, "-c", _RESOLVED_IN_SERVER], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == ["p@s", 1, 0]
