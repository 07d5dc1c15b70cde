"""The pageserver's shared state, independent of which protocol asks for it."""

from __future__ import annotations

import os
import time
from typing import Any

from pageserver.config import PageserverConfig
from pageserver.followed_nodes import FollowedNode, FollowedNodes
from pageserver.metrics import Metrics

VERSION = "0.1.0"


class Pageserver:
    def __init__(self, config: PageserverConfig) -> None:
        self.config = config
        self.started_at = time.time()
        self.metrics = Metrics()
        self.nodes = FollowedNodes(config.nodes_file)
        self.metrics.describe("pageserver_up", "gauge", "1 while the pageserver serves.")
        self.metrics.set("pageserver_up", 1)
        self.metrics.describe("pageserver_uptime_seconds", "gauge", "Seconds since start.")
        self.metrics.computed("pageserver_uptime_seconds", lambda: time.time() - self.started_at)
        self.metrics.describe("pageserver_followed_nodes", "gauge", "PostgreSQL nodes followed.")
        self.metrics.computed("pageserver_followed_nodes", lambda: len(self.nodes.all()))
        self.metrics.describe(
            "pageserver_proto_requests_total", "counter", "Proto requests by method and outcome."
        )
        self.metrics.describe("pageserver_http_requests_total", "counter", "HTTP requests by path.")

    def status(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "workdir": str(self.config.workdir),
            "listen_host": self.config.listen_host,
            "proto_port": self.config.proto_port,
            "http_port": self.config.http_port,
            "nodes": [n.public() for n in self.nodes.all()],
        }

    def register_node(self, node: FollowedNode) -> dict[str, Any]:
        self.nodes.add(node)
        return node.public()

    def unregister_node(self, node_id: str) -> dict[str, Any]:
        return self.nodes.remove(node_id).public()
