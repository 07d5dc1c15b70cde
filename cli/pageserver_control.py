"""The local pageserver daemon: started on demand, found through the registry, stopped by PID."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

from cli.context import App
from cli.detached import spawn_detached
from cli.ports import port_is_free
from cli.registry import PageserverRow
from cli.secrets import ensure_secret
from pageserver.config import DEFAULT_HTTP_PORT, DEFAULT_PROTO_PORT, PageserverConfig
from pageserver.pid_file import pid_alive
from pageserver_api.client import SyncPageserverClient
from proto.client import tls_context
from proto.errors import Unavailable

DAEMON_MODULE = "cli.pageserver_daemon"
"""The daemon with the home's `object.*` methods (a bare `pageserver.daemon` is found too)."""
TLS_CA_ENV = "NEON_TLS_CA"
"""For --pageserver: reach it over TLS, its certificate verified against this PEM file (the
CA or the self-signed certificate) and the host name."""
START_TIMEOUT = 20.0
STOP_TIMEOUT = 30.0


def local_config(app: App) -> PageserverConfig:
    return PageserverConfig(workdir=app.home.pageserver_dir)


def token_path(app: App) -> Path:
    return app.home.secrets_dir / "pageserver.token"


def local_token(app: App) -> str:
    return ensure_secret(token_path(app))


def running_pid(app: App) -> int | None:
    """PID of the live local daemon, from its pidfile (checked against /proc)."""
    config = local_config(app)
    try:
        pid = int(config.pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if DAEMON_MODULE.encode() in cmdline or b"pageserver.daemon" in cmdline else None


def _read_ports(config: PageserverConfig, pid: int) -> dict[str, Any] | None:
    try:
        info = json.loads(config.ports_file.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("pid") == pid else None


def _choose(default: int) -> int:
    return default if port_is_free(default) else 0


def _log_tail(config: PageserverConfig, stderr_path: Path) -> str:
    for path in (stderr_path, config.log_file):
        try:
            lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            continue
        if lines:
            return lines[-1]
    return ""


def start_local(
    app: App, proto_port: int | None = None, http_port: int | None = None
) -> PageserverRow:
    """Start the daemon unless it runs; return its endpoint.

    A lock file serializes concurrent `neon` commands so only one of them spawns the daemon.
    """
    config = local_config(app)
    pid = running_pid(app)
    info = _read_ports(config, pid) if pid is not None else None
    if info is not None:
        return _record(app, info)  # running: no lock to take (the home may be read-only)
    config.workdir.mkdir(parents=True, exist_ok=True)
    with open(config.workdir / "start.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _start_locked(app, config, proto_port, http_port)


def _start_locked(
    app: App, config: PageserverConfig, proto_port: int | None, http_port: int | None
) -> PageserverRow:
    pid = running_pid(app)
    if pid is not None:
        info = _read_ports(config, pid)
        if info is not None:
            return _record(app, info)
    local_token(app)
    explicit = proto_port is not None or http_port is not None
    try:
        return _spawn(
            app,
            config,
            proto_port if proto_port is not None else _choose(DEFAULT_PROTO_PORT),
            http_port if http_port is not None else _choose(DEFAULT_HTTP_PORT),
        )
    except PortTaken:
        if explicit:
            raise
        # A default port was free when checked and taken before the daemon bound it (another
        # program starting at the same moment): let the kernel pick free ones instead.
        return _spawn(app, config, 0, 0)


class PortTaken(Unavailable):
    """The daemon could not bind its port: another process holds it."""


def _spawn(app: App, config: PageserverConfig, proto_port: int, http_port: int) -> PageserverRow:
    stderr_path = config.workdir / "pageserver.stderr"
    cmd = [
        sys.executable,
        "-m",
        DAEMON_MODULE,
        "--workdir",
        str(config.workdir),
        "--port",
        str(proto_port),
        "--http-port",
        str(http_port),
        "--token-file",
        str(token_path(app)),
    ]
    proc = spawn_detached(cmd, stderr_path, config.workdir, append=False)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = _log_tail(config, stderr_path)
            error = PortTaken if "address already in use" in tail.lower() else Unavailable
            raise error(
                f"the pageserver failed to start: {tail or 'exit ' + str(proc.returncode)}"
                f" (log: {config.log_file})"
            )
        info = _read_ports(config, proc.pid)
        if info is not None:
            return _record(app, info)
        time.sleep(0.05)
    proc.kill()
    raise Unavailable(
        f"the pageserver did not come up within {START_TIMEOUT:.0f}s; see {config.log_file}"
    )


def _record(app: App, info: dict[str, Any]) -> PageserverRow:
    row = PageserverRow("local", "127.0.0.1", int(info["proto_port"]), int(info["http_port"]), True)
    if app.registry.pageserver("local") != row:
        with app.registry.transaction() as cur:
            app.registry.upsert_pageserver(cur, row)
    return row


def stop_local(app: App) -> bool:
    """SIGTERM the daemon by its PID and wait; False if it was not running."""
    pid = running_pid(app)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    local_config(app).pid_file.unlink(missing_ok=True)
    return True


def local_api(app: App, *, start: bool = True) -> SyncPageserverClient:
    """The typed API of the local daemon, which is started first unless `start` is False
    (then a stopped daemon is Unavailable); with `--pageserver`, that pageserver's."""
    if app.remote is not None:
        remote = app.remote
        ca = os.environ.get(TLS_CA_ENV) or None
        tls = None if ca is None else tls_context(ca)
        return SyncPageserverClient(remote.host, remote.port, token=remote.token, ssl=tls)
    if start:
        row = start_local(app)
    pid = running_pid(app)
    info = _read_ports(local_config(app), pid) if pid is not None else None
    if info is None:
        raise Unavailable(
            "the local pageserver is not running; start it with `neon pageserver start`"
        )
    row = _record(app, info)  # `pageserver run` started it: its ports are in its workdir
    return SyncPageserverClient(
        row.host, row.port, token=local_token(app), ssl=_local_tls(info.get("tls_cert"))
    )


def _local_tls(cert: str | None) -> ssl.SSLContext | None:
    """For a daemon serving TLS (NEON_TLS_CERT, for its remote peers): the home's own CLI
    trusts exactly the certificate the daemon said it serves, whatever host name it names
    (the CLI connects to 127.0.0.1)."""
    if cert is None:
        return None
    context = ssl.create_default_context(cafile=cert)
    context.check_hostname = False
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the leaf itself is the anchor
    return context
