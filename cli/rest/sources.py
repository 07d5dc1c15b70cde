"""The database states a REST server reads: the live node, and read-only servers over its
snapshots and over PITR extractions, started on first use and stopped at close.

The read-only servers are `neon snapshot start`'s (cli/snapshot_servers.py): starting one
blocks for seconds and uses the registry (SQLite, bound to one thread), so every such step
runs on one worker thread, one at a time. Each pool's connections are read-only and time
limited from their start-up packet on.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from cli.context import App
from cli.rest.query import Target
from proto.aio import within
from proto.errors import NeonError, NotFound

T = TypeVar("T")
POOL_SIZE = 4
LIVE = ""  # the key of the live node's pool


@dataclass(frozen=True, slots=True)
class Source:
    label: str  # "" (the live node) or the snapshot's name
    pool: asyncpg.Pool


class Sources:
    def __init__(
        self,
        home: Path,
        node_id: str,
        database: str,
        statement_timeout: float,
        on_change: Callable[[list[str], list[str]], None] = lambda _s, _e: None,
        *,
        role: str | None = None,
    ) -> None:
        self.home = home
        self.node_id = node_id
        self.database = database
        self.settings = {
            "default_transaction_read_only": "on",
            "statement_timeout": str(max(1, int(statement_timeout * 1000))),
            "application_name": "neon-rest",
        }
        if role is not None:
            # The role's privileges from the start-up packet on (RESET ROLE comes back to it).
            self.settings["role"] = role
        self._on_change = on_change  # (servers started, snapshots extracted): for cleanup
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="neon-rest-snapshots")
        self._app: App | None = None  # opened on the worker thread, used only there
        self._pools: dict[str, asyncpg.Pool] = {}
        self._refs: dict[str, str] = {}  # a path's @REF -> the snapshot's name
        self._stacks: dict[str, contextlib.ExitStack] = {}  # worker thread only
        self._extracted: list[str] = []  # worker thread only
        self._lock = asyncio.Lock()

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    def _application(self) -> App:
        if self._app is None:
            self._app = App.open(self.home)
        return self._app

    async def source(self, target: Target) -> Source:
        """The pool for the target's state, its server started if need be."""
        ref = target.snapshot if target.snapshot is not None else target.lsn
        key = LIVE if ref is None else self._refs.get(ref)
        if key is not None and key in self._pools:
            return Source(key, self._pools[key])
        async with self._lock:
            if ref is None:
                name, params = LIVE, await self._run(self._live_params)
            elif target.snapshot is not None:
                name, params = await self._run(self._snapshot_params, target.snapshot)
            else:
                assert target.lsn is not None
                name, params = await self._run(self._lsn_params, target.lsn)
            if name not in self._pools:
                self._pools[name] = await asyncpg.create_pool(
                    **params,
                    database=self.database,
                    min_size=0,
                    max_size=POOL_SIZE,
                    server_settings=self.settings,
                )
            if ref is not None:
                self._refs[ref] = name
            return Source(name, self._pools[name])

    def _live_params(self) -> dict[str, Any]:
        from cli import nodes

        app = self._application()
        node = app.registry.get_node(self.node_id)
        return _connect_params(nodes.connstr(app, node))

    def _node_pgdata(self) -> str:
        return self._application().registry.get_node(self.node_id).pgdata

    def _snapshot_params(self, ref: str) -> tuple[str, dict[str, Any]]:
        from cli.pageserver_control import local_api
        from pageserver_api.models import SnapshotShowRequest

        app = self._application()
        name = app.registry.snapshot_name(ref)
        if name not in self._stacks:
            info = local_api(app).snapshot_show(SnapshotShowRequest(name))
            if info.node_id != self.node_id:
                raise NotFound(f"{name} is not a snapshot of {self._node_pgdata()}")
        return name, self._serve(name)

    def _lsn_params(self, lsn_text: str) -> tuple[str, dict[str, Any]]:
        """A snapshot at the LSN, extracted from a PITR area of the node (destroyed at close)."""
        from cli.node_lock import node_lock
        from cli.pageserver_control import local_api
        from pageserver_api.models import PitrExtractRequest
        from pg15.lsn import parse_lsn

        app = self._application()
        lsn = parse_lsn(lsn_text)
        hi, lo = lsn_text.split("/")
        name = f"{self._node_pgdata()}@rest-{hi}-{lo}"
        if name in self._stacks:
            return name, self._serve(name)
        api = local_api(app)
        if name not in {s.name for s in api.snapshot_list()}:
            areas = [a for a in api.pitr_list() if a.node_id == self.node_id]
            if not areas:
                raise NotFound(
                    f"no PITR area keeps the history of {self._node_pgdata()}, so no LSN can "
                    "be read; create one with `neon pitr create`"
                )
            error: NeonError | None = None
            with node_lock(app.home, self.node_id, "REST extraction", notify=lambda _m: None):
                for area in areas:
                    try:
                        request = PitrExtractRequest(area.name, lsn=lsn, tag=name.split("@")[1])
                        name = api.pitr_extract(request).name
                        break
                    except NeonError as exc:
                        error = exc
                else:
                    assert error is not None
                    raise error
            self._extracted.append(name)
            self._changed()
        return name, self._serve(name)

    def _serve(self, name: str) -> dict[str, Any]:
        """Connection parameters of the read-only server over `name`, started if need be (one
        the user started with `neon snapshot start` is used as is, and left running)."""
        from cli.snapshot_servers import snapshot_server

        if name not in self._stacks:
            stack = contextlib.ExitStack()
            connstr = stack.enter_context(snapshot_server(self._application(), name))
            self._stacks[name] = stack
            self._changed()
            return _connect_params(connstr)
        running = self._application().registry.snapshot_server(name)
        if running is None:
            # Stopped meanwhile (`neon snapshot stop`): start it again.
            self._stacks.pop(name).close()
            return self._serve(name)
        from cli.snapshot_commands import server_connstr

        return _connect_params(server_connstr(self._application(), running["port"]))

    def _changed(self) -> None:
        self._on_change(list(self._stacks), list(self._extracted))

    async def forget(self, label: str) -> None:
        """Drop a snapshot's pool after its server went away (the next request restarts it);
        the live node's connections are reopened (the node restarted: a checkout)."""
        if label == LIVE:
            if LIVE in self._pools:
                await self._pools[LIVE].expire_connections()
            return
        async with self._lock:
            pool = self._pools.pop(label, None)
            self._refs = {r: k for r, k in self._refs.items() if k != label}
            if pool is not None:
                pool.terminate()

    async def close(self) -> None:
        """Close the pools, stop the servers started here, destroy the snapshots extracted."""
        for pool in self._pools.values():
            with contextlib.suppress(Exception):
                await within(pool.close(), 10)
        self._pools.clear()
        await self._run(self._close_worker)
        self._worker.shutdown()

    def _close_worker(self) -> None:
        for stack in self._stacks.values():
            with contextlib.suppress(Exception):
                stack.close()
        self._stacks.clear()
        if self._extracted:
            from cli.pageserver_control import local_api
            from pageserver_api.models import SnapshotDestroyRequest

            for name in self._extracted:
                with contextlib.suppress(Exception):
                    local_api(self._application()).snapshot_destroy(SnapshotDestroyRequest(name))
            self._extracted.clear()
        self._changed()
        if self._app is not None:
            self._app.registry.close()


def _connect_params(connstr: str) -> dict[str, Any]:
    """asyncpg's keywords for a libpq key=value string (host is the unix socket directory)."""
    from psycopg.conninfo import conninfo_to_dict

    raw = conninfo_to_dict(connstr)
    return {"host": str(raw["host"]), "port": int(str(raw["port"])), "user": str(raw["user"])}
