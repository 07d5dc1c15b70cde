"""The typed client against the real proto handlers on a loopback socket: models in and out,
and a bad request (as an untyped peer could send) refused with the field named."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pageserver.api.proto_service import build_handlers
from pageserver.api.service import Pageserver
from pageserver.config import PageserverConfig
from pageserver.history.flusher import FOREGROUND
from pageserver.history.snapshots import Snapshot, new_snapshot
from pageserver_api import models as m
from pageserver_api.client import PageserverClient, SyncPageserverClient
from pageserver_api.errors import InvalidArgument, NotFound
from proto.server import ProtoServer

TOKEN = "t0ken"


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[PageserverClient]:
    (tmp_path / "ps").mkdir()
    ps = Pageserver(PageserverConfig(tmp_path / "ps"))
    server = ProtoServer(build_handlers(ps), token=TOKEN, server_name="test pageserver")
    await server.start("127.0.0.1", 0)
    try:
        async with await PageserverClient.connect("127.0.0.1", server.port, token=TOKEN) as c:
            yield c
    finally:
        await server.close()
        await ps.stop_following()


async def test_typed_calls(client: PageserverClient) -> None:
    status = await client.status()
    assert isinstance(status, m.StatusResponse) and status.nodes == []
    assert await client.node_list() == []
    assert await client.snapshot_list() == []
    assert await client.pitr_list() == []
    assert await client.gc_run() == []
    with pytest.raises(NotFound, match="snapshot 'pgdata1@nope' does not exist"):
        await client.snapshot_show(m.SnapshotShowRequest("pgdata1@nope"))
    with pytest.raises(NotFound, match="does not follow node 'primary9'"):
        await client.timeline_info(m.TimelineInfoRequest("primary9"))


async def test_registered_node_comes_back_typed(client: PageserverClient) -> None:
    # Nothing listens on the node's port: the follower retries in the background.
    request = m.NodeRegisterRequest("primary1", "127.0.0.1", 1, "repl", "secret", pgdata="pg1")
    registered = await client.node_register(request)
    assert (registered.node_id, registered.pgdata) == ("primary1", "pg1")
    assert registered.state is not None  # followed (connecting in the background)
    (listed,) = await client.node_list()
    assert listed.node_id == "primary1" and listed.port == 1
    gone = await client.node_unregister(m.NodeUnregisterRequest("primary1"))
    assert gone.node_id == "primary1" and gone.state is None
    assert "password" not in gone.to_wire()


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("page.get", {"node_id": "p", "spc": "1663", "db": 5, "rel": 1, "blkno": 0}, "'spc'"),
        ("rel.size", {"node_id": "p", "spc": 1, "db": 5, "rel": 1, "fork": "x"}, "'fork'"),
        ("snapshot.create", {"node_id": "p"}, "'name' is missing"),
        ("node.branch", {"node_id": "p", "snapshot": "a@b", "pg_timeline": 0}, "'pg_timeline'"),
        ("pitr.extract", {"name": "a", "time": "noon"}, "invalid time 'noon'"),
        ("node.register", {"node_id": "p", "host": "h", "port": True}, "'port'"),
    ],
)
async def test_bad_params_name_the_field(
    client: PageserverClient, method: str, params: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        await client.proto.call(method, **params)


async def test_sync_client_from_a_thread(client: PageserverClient) -> None:
    host, port = client.proto.address.rsplit(":", 1)
    sync = SyncPageserverClient(host, int(port), token=TOKEN)
    status = await asyncio.to_thread(sync.status)
    assert status.nodes == [] and status.pid > 0


async def test_a_user_snapshot_ends_the_pause_of_compaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once `snapshot create` has named a user's snapshot compaction goes on at once (its
    next pass writes the snapshot's image layers), not LINGER later; a checkout's HEAD{i}
    keeps the pause (the checkout goes on). The naming itself is the service's (a node's
    history, tested with real PostgreSQL in tests/e2e/test_checkout_prepared.py): here it
    answers at once, to see what the handler does after it."""
    (tmp_path / "ps").mkdir()
    ps = Pageserver(PageserverConfig(tmp_path / "ps"))

    async def named(node_id: str, name: str, wait_lsn: int | None, timeout: float) -> Snapshot:
        return new_snapshot(name, node_id, "0" * 32, 0x1000)

    monkeypatch.setattr(ps, "create_snapshot", named)
    server = ProtoServer(build_handlers(ps), token=TOKEN, server_name="test pageserver")
    await server.start("127.0.0.1", 0)
    try:
        async with await PageserverClient.connect("127.0.0.1", server.port, token=TOKEN) as c:
            FOREGROUND.release()
            await c.snapshot_create(m.SnapshotCreateRequest("primary1", "pgdata1@HEAD{0}"))
            assert FOREGROUND.busy()  # LINGER after the request
            await c.snapshot_create(m.SnapshotCreateRequest("primary1", "pgdata1@s1"))
            assert not FOREGROUND.busy()
    finally:
        FOREGROUND.release()  # no linger for later tests
        await server.close()
        await ps.stop_following()
