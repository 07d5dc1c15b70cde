"""Settings of one pageserver process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_PROTO_PORT = 6400
DEFAULT_HTTP_PORT = 9898


@dataclass(frozen=True, slots=True)
class PageserverConfig:
    workdir: Path
    listen_host: str = "127.0.0.1"
    proto_port: int = DEFAULT_PROTO_PORT
    http_port: int = DEFAULT_HTTP_PORT
    token: str | None = None

    @property
    def pid_file(self) -> Path:
        return self.workdir / "pageserver.pid"

    @property
    def log_file(self) -> Path:
        return self.workdir / "pageserver.log"

    @property
    def ports_file(self) -> Path:
        """Where the daemon says which ports it bound (port 0 means 'pick one')."""
        return self.workdir / "pageserver.ports.json"

    @property
    def nodes_file(self) -> Path:
        return self.workdir / "nodes.json"
