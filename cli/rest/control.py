"""The REST daemon of a node: started in the background, found by its state file (its PID,
checked against /proc), stopped by that PID.

Imported by `neon pg` commands (a node's stop and destroy stop its REST server too), so it
imports nothing heavy: the server itself is cli/rest/daemon.py, run as its own process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli.context import App
from cli.detached import spawn_detached
from cli.ports import port_is_free
from cli.registry import NodeRow
from cli.secrets import generate_secret, write_secret
from datadir_files.pg_account import ensure_own_dir
from durable_files import write_file_durably
from pageserver.pid_file import pid_alive
from proto.errors import AlreadyExists, Conflict, InvalidArgument, Unavailable

DEFAULT_PORT = 3000  # PostgREST's
PORT_PROBES = 200
START_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0  # the daemon stops the snapshot servers it started first
DAEMON_MODULE = "cli.rest.daemon"


@dataclass(frozen=True, slots=True)
class RestInfo:
    """A running REST server, as its state file records it."""

    node_id: str
    pid: int
    listen: str
    port: int
    servers: tuple[str, ...] = ()  # snapshot servers it started (stopped with it)
    extracted: tuple[str, ...] = ()  # snapshots it extracted from PITR (destroyed with it)

    @property
    def url(self) -> str:
        return f"http://{self.listen}:{self.port}/"

    def to_json(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "pid": self.pid,
            "listen": self.listen,
            "port": self.port,
            "servers": list(self.servers),
            "extracted": list(self.extracted),
        }


def rest_dir(app: App, node_id: str) -> Path:
    return app.home.root / "rest" / node_id


def state_file(app: App, node_id: str) -> Path:
    return rest_dir(app, node_id) / "rest.json"


def log_file(app: App, node_id: str) -> Path:
    return rest_dir(app, node_id) / "rest.log"


def token_path(app: App, node_id: str) -> Path:
    return app.home.secrets_dir / f"node.{node_id}.rest-token"


def write_state(path: Path, info: RestInfo) -> None:
    write_file_durably(path, json.dumps(info.to_json()).encode())


def read_state(path: Path) -> RestInfo | None:
    try:
        raw = json.loads(path.read_text())
        return RestInfo(
            node_id=str(raw["node_id"]),
            pid=int(raw["pid"]),
            listen=str(raw["listen"]),
            port=int(raw["port"]),
            servers=tuple(raw.get("servers", ())),
            extracted=tuple(raw.get("extracted", ())),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_daemon(pid: int, node_id: str) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return DAEMON_MODULE.encode() in argv and node_id.encode() in argv and pid_alive(pid)


def running(app: App, node_id: str) -> RestInfo | None:
    """The node's live REST server, if any."""
    info = read_state(state_file(app, node_id))
    return info if info is not None and _is_daemon(info.pid, node_id) else None


def _pick_port(requested: int | None) -> int:
    if requested is not None:
        if not 1 <= requested <= 65535:
            raise InvalidArgument(f"port {requested} is out of range 1-65535")
        if not port_is_free(requested):
            raise Conflict(f"port {requested} is in use on 127.0.0.1; choose another with --port")
        return requested
    for port in range(DEFAULT_PORT, DEFAULT_PORT + PORT_PROBES):
        if port_is_free(port):
            return port
    raise Conflict(f"no free port in {DEFAULT_PORT}-{DEFAULT_PORT + PORT_PROBES - 1}; use --port")


def start(
    app: App,
    node: NodeRow,
    *,
    port: int | None,
    listen: str,
    database: str,
    statement_timeout: float,
    role: str | None = None,
) -> tuple[RestInfo, str]:
    """Spawn the node's REST daemon with a new token; return it once it listens."""
    found = running(app, node.id)
    if found is not None:
        raise AlreadyExists(
            f"a REST server for {node.pgdata} already runs on {found.url}; "
            f"stop it with `neon pg stop-rest {node.pgdata}`"
        )
    directory = rest_dir(app, node.id)
    ensure_own_dir(directory.parent, 0o700)
    ensure_own_dir(directory, 0o700)
    cleanup_leftovers(app, node.id)
    token = generate_secret()
    write_secret(token_path(app, node.id), token)
    chosen = _pick_port(port)
    cmd = [
        sys.executable,
        "-m",
        DAEMON_MODULE,
        "--home",
        str(app.home.root),
        "--node",
        node.id,
        "--listen",
        listen,
        "--port",
        str(chosen),
        "--db",
        database,
        "--statement-timeout",
        str(statement_timeout),
        *(("--role", role) if role else ()),
    ]
    log = log_file(app, node.id)
    proc = spawn_detached(cmd, log, directory, append=True)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Unavailable(
                f"the REST server failed to start: {_last_line(log) or proc.returncode} "
                f"(log: {log})"
            )
        info = read_state(state_file(app, node.id))
        if info is not None and info.pid == proc.pid:
            return info, token
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    raise Unavailable(f"the REST server did not come up within {START_TIMEOUT:.0f}s; see {log}")


def _last_line(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def stop(app: App, node_id: str) -> bool:
    """SIGTERM the node's REST daemon by its PID and wait (it stops the snapshot servers it
    started); SIGKILL after STOP_TIMEOUT. False if none ran."""
    info = running(app, node_id)
    token_path(app, node_id).unlink(missing_ok=True)  # no request is admitted any more
    if info is None:
        cleanup_leftovers(app, node_id)
        return False
    os.kill(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline and pid_alive(info.pid):
        time.sleep(0.05)
    if pid_alive(info.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGKILL)
    cleanup_leftovers(app, node_id)
    return True


def cleanup_leftovers(app: App, node_id: str) -> None:
    """After a daemon that did not exit by itself (killed, crashed): stop the snapshot servers
    and destroy the extracted snapshots its state file names, then forget it."""
    path = state_file(app, node_id)
    info = read_state(path)
    if info is not None and _is_daemon(info.pid, node_id):
        return
    if info is not None and (info.servers or info.extracted):
        # Imported here: the snapshot commands are heavy, and this is the rare path.
        from cli.pageserver_control import local_api
        from cli.snapshot_commands import remove_snapshot_server
        from pageserver_api.models import SnapshotDestroyRequest

        for name in info.servers:
            remove_snapshot_server(app, name)
        for name in info.extracted:
            with contextlib.suppress(Exception):
                local_api(app).snapshot_destroy(SnapshotDestroyRequest(name))
    path.unlink(missing_ok=True)


def remove(app: App, node_id: str) -> None:
    """A destroyed node's REST state: its server stopped, its directory and token gone."""
    stop(app, node_id)
    with contextlib.suppress(OSError):
        for child in rest_dir(app, node_id).iterdir():
            child.unlink()
        rest_dir(app, node_id).rmdir()
