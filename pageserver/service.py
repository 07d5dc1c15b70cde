"""The pageserver's shared state, independent of which protocol asks for it."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pageserver.config import PageserverConfig
from pageserver.followed_nodes import FollowedNode, FollowedNodes
from pageserver.metrics import Metrics
from pageserver.node_follower import NodeFollower
from pageserver.node_store import NodeStore
from pageserver.redo_pool import RedoPool
from proto.errors import NotFound, Unavailable
from walreceiver.lsn import format_lsn

VERSION = "0.1.0"


class Pageserver:
    def __init__(self, config: PageserverConfig) -> None:
        self.config = config
        self.started_at = time.time()
        self.metrics = Metrics()
        self.nodes = FollowedNodes(config.nodes_file)
        self.followers: dict[str, NodeFollower] = {}
        self.stores: dict[str, NodeStore] = {}
        self.redo_pool = RedoPool()
        m = self.metrics
        m.describe("pageserver_up", "gauge", "1 while the pageserver serves.")
        m.set("pageserver_up", 1)
        m.describe("pageserver_uptime_seconds", "gauge", "Seconds since start.")
        m.computed("pageserver_uptime_seconds", lambda: time.time() - self.started_at)
        m.describe("pageserver_followed_nodes", "gauge", "PostgreSQL nodes followed.")
        m.computed("pageserver_followed_nodes", lambda: len(self.nodes.all()))
        m.describe("pageserver_proto_requests_total", "counter", "Proto requests by method.")
        m.describe("pageserver_http_requests_total", "counter", "HTTP requests by path.")
        m.describe("pageserver_wal_received_bytes_total", "counter", "Durable WAL bytes per node.")
        m.describe("pageserver_wal_records_total", "counter", "WAL records decoded per node.")

    # following nodes

    def start_following(self) -> None:
        """Start a follower for every registered node (needs the running event loop)."""
        for node in self.nodes.all():
            self._follow(node)

    def store_dir(self, node: FollowedNode) -> Path:
        if node.store_dir:
            return Path(node.store_dir)
        return self.config.workdir / "nodes" / node.node_id

    def store(self, node_id: str) -> NodeStore:
        store = self.stores.get(node_id)
        if store is None:
            store = NodeStore(self.store_dir(self.nodes.get(node_id)))
            self.stores[node_id] = store
        return store

    def _follow(self, node: FollowedNode) -> NodeFollower:
        follower = NodeFollower(node, self.store(node.node_id), self.metrics)
        self.followers[node.node_id] = follower
        follower.start()
        return follower

    async def stop_following(self) -> None:
        """Stop every follower, then flush and close the stores (a clean restart re-ingests
        nothing)."""
        for follower in list(self.followers.values()):
            await follower.stop()
        self.followers.clear()
        for store in list(self.stores.values()):
            await asyncio.to_thread(self._flush_and_close, store)
        self.stores.clear()
        await asyncio.to_thread(self.redo_pool.close)

    @staticmethod
    def _flush_and_close(store: NodeStore) -> None:
        try:
            store.flush()
        finally:
            store.close()

    def follower(self, node_id: str) -> NodeFollower:
        try:
            return self.followers[node_id]
        except KeyError:
            raise NotFound(f"the pageserver does not follow node {node_id!r}") from None

    async def register_node(self, node: FollowedNode) -> dict[str, Any]:
        """Follow a node, or (same node again, e.g. on `pg start`) reconnect to it now."""
        current = self.followers.get(node.node_id)
        if current is not None and current.node == node:
            current.kick()
            return current.status()
        if current is not None:
            await current.stop()
        self.nodes.add(node)
        return self._follow(node).status()

    async def unregister_node(self, node_id: str) -> dict[str, Any]:
        """Stop following a node and delete what the pageserver kept of it."""
        node = self.nodes.get(node_id)
        follower = self.followers.pop(node_id, None)
        if follower is not None:
            await follower.stop()
        self.nodes.remove(node_id)
        store = self.stores.pop(node_id, None)
        if store is not None:
            store.close()
        shutil.rmtree(self.store_dir(node), ignore_errors=True)
        return node.public()

    async def import_node(self, node_id: str, datadir: Path) -> int:
        """Import a node's cleanly shut-down data directory before its first start."""
        store = self.store(node_id)
        lsn = await asyncio.to_thread(store.import_datadir, datadir)
        follower = self.followers.get(node_id)
        if follower is not None:
            follower.kick()
        return lsn

    async def wait_for_lsn(self, node_id: str, lsn: int | None, timeout: float) -> int:
        """The LSN to read at: the latest ingested by default; a future one is waited for."""
        timeline = self.store(node_id).timeline
        if lsn is None:
            return timeline.last_record_lsn
        deadline = time.monotonic() + timeout
        while timeline.last_record_lsn < lsn:
            if time.monotonic() >= deadline:
                raise Unavailable(
                    f"node {node_id}: LSN {format_lsn(lsn)} not ingested within {timeout:.0f}s "
                    f"(last ingested: {format_lsn(timeline.last_record_lsn)})"
                )
            await asyncio.sleep(0.05)
        return lsn

    def store_info(self, node_id: str) -> dict[str, Any]:
        store = self.store(node_id)
        state = store.state
        if state is None:
            return {"node_id": node_id, "imported": False}
        timeline = store.timeline
        return {
            "node_id": node_id,
            "imported": True,
            "timeline_id": state.timeline_id,
            "import_lsn": state.import_lsn,
            "last_record_lsn": timeline.last_record_lsn,
            "prev_record_lsn": timeline.prev_record_lsn,
            "disk_consistent_lsn": timeline.disk_consistent_lsn,
            "layers": len(list(timeline.layer_map().layers())),
        }

    def node_statuses(self) -> list[dict[str, Any]]:
        return [
            self.followers[n.node_id].status() if n.node_id in self.followers else n.public()
            for n in self.nodes.all()
        ]

    def status(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "workdir": str(self.config.workdir),
            "listen_host": self.config.listen_host,
            "proto_port": self.config.proto_port,
            "http_port": self.config.http_port,
            "nodes": self.node_statuses(),
        }
