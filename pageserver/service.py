"""The pageserver's shared state, independent of which protocol asks for it."""

from __future__ import annotations

import os
import shutil
import time
from typing import Any

from pageserver.config import PageserverConfig
from pageserver.followed_nodes import FollowedNode, FollowedNodes
from pageserver.metrics import Metrics
from pageserver.node_follower import NodeFollower, archive_dir
from proto.errors import NotFound

VERSION = "0.1.0"


class Pageserver:
    def __init__(self, config: PageserverConfig) -> None:
        self.config = config
        self.started_at = time.time()
        self.metrics = Metrics()
        self.nodes = FollowedNodes(config.nodes_file)
        self.followers: dict[str, NodeFollower] = {}
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

    def _follow(self, node: FollowedNode) -> NodeFollower:
        follower = NodeFollower(node, self.config.workdir, self.metrics)
        self.followers[node.node_id] = follower
        follower.start()
        return follower

    async def stop_following(self) -> None:
        for follower in list(self.followers.values()):
            await follower.stop()
        self.followers.clear()

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
        shutil.rmtree(archive_dir(self.config.workdir, node_id).parent, ignore_errors=True)
        return node.public()

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
