"""`neon pageserver run`: the pageserver in the foreground, configured by environment variables
alone, as a container beside a PostgreSQL container runs it (docker/compose.yaml).

    NEON_LISTEN, NEON_PORT, NEON_HTTP_PORT   where it listens (127.0.0.1, 6400, 9898; the image
                                             sets NEON_LISTEN=0.0.0.0 and compose publishes the
                                             ports on the host's loopback only)
    NEON_TOKEN_FILE                          the token CLIs on other hosts present (a secret
                                             file); default: one generated under NEON_HOME
    NEON_FOLLOW_CONNSTR                      libpq connection string of the server to follow
    NEON_FOLLOW_PASSWORD_FILE                its password (a secret file), else the connection
                                             string's, PGPASSWORD or the passfile
    NEON_FOLLOW_NAME                         the name its history has (default: postgres), so
                                             its snapshots are NAME@TAG
    NEON_FOLLOW_SLOT                         its replication slot (default: neon_NAME)
    NEON_PITR_TTL                            a PITR area NAME over it with this TTL (default
                                             7d; `none`: no area)
    NEON_S3_BUCKET, NEON_S3_ENDPOINT, ...     that area kept in S3 too (cli/container_s3.py)
    NEON_TLS_CERT, NEON_TLS_KEY              the proto port over TLS (read by the daemon)

The process supervises two children: the daemon (`python -m cli.pageserver_daemon`, so CLI
commands in the container find it as the home's running pageserver) and, until the server is
attached, `neon pg attach` (cli/attach.py), retried with a growing pause while the server is not
up or refuses (each failure is one line on stderr, with its fix). Once attached, a restart of
the container follows the same slot: the attachment is kept in NEON_HOME. SIGTERM or SIGINT
stops both children and exits with the daemon's status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cli import pageserver_control as control
from cli.container_s3 import S3Config, attach_storage, ensure_area
from cli.context import App
from cli.secrets import write_secret
from pageserver.config import DEFAULT_HTTP_PORT, DEFAULT_PROTO_PORT
from proto.errors import InvalidArgument

DEFAULT_NAME = "postgres"
DEFAULT_TTL = "7d"
RETRY_FIRST, RETRY_MAX = 2.0, 60.0


@dataclass(frozen=True, slots=True)
class ContainerConfig:
    listen: str = "127.0.0.1"
    port: int = DEFAULT_PROTO_PORT
    http_port: int = DEFAULT_HTTP_PORT
    token_file: Path | None = None
    follow_connstr: str | None = None
    follow_password_file: Path | None = None
    follow_name: str = DEFAULT_NAME
    follow_slot: str | None = None
    pitr_ttl: str | None = DEFAULT_TTL
    s3: S3Config | None = None

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> ContainerConfig:
        def port(name: str, default: int) -> int:
            raw = env.get(name, "")
            if not raw:
                return default
            if not raw.isdigit() or not 0 <= int(raw) < 65536:
                raise InvalidArgument(f"{name}={raw!r} is not a TCP port (0-65535)")
            return int(raw)

        def path(name: str) -> Path | None:
            raw = env.get(name, "")
            if not raw:
                return None
            if not Path(raw).is_file():
                raise InvalidArgument(f"{name}={raw}: no such file")
            return Path(raw)

        ttl = env.get("NEON_PITR_TTL", DEFAULT_TTL) or DEFAULT_TTL
        return cls(
            listen=env.get("NEON_LISTEN") or "127.0.0.1",
            port=port("NEON_PORT", DEFAULT_PROTO_PORT),
            http_port=port("NEON_HTTP_PORT", DEFAULT_HTTP_PORT),
            token_file=path("NEON_TOKEN_FILE"),
            follow_connstr=env.get("NEON_FOLLOW_CONNSTR") or None,
            follow_password_file=path("NEON_FOLLOW_PASSWORD_FILE"),
            follow_name=env.get("NEON_FOLLOW_NAME") or DEFAULT_NAME,
            follow_slot=env.get("NEON_FOLLOW_SLOT") or None,
            pitr_ttl=None if ttl.lower() == "none" else ttl,
            s3=S3Config.from_environ(env),
        )


def _log(message: str) -> None:
    print(f"neon pageserver run: {message}", file=sys.stderr, flush=True)


def run(app: App, config: ContainerConfig) -> int:
    """Run the daemon and, if configured, attach the server to follow; see the docstring."""
    if config.token_file is not None:
        token = config.token_file.read_text().strip()
        if not token:
            raise InvalidArgument(f"NEON_TOKEN_FILE {config.token_file} is empty")
        write_secret(control.token_path(app), token)  # the CLI in the container uses it too
    else:
        control.local_token(app)
    if config.s3 is not None:
        attach_storage(app, config.s3)
    workdir = control.local_config(app).workdir
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", control.DAEMON_MODULE,
        "--workdir", str(workdir),
        "--listen", config.listen,
        "--port", str(config.port),
        "--http-port", str(config.http_port),
        "--token-file", str(control.token_path(app)),
        "--log-stderr",
    ]  # fmt: skip
    daemon = subprocess.Popen(argv)
    stopping = threading.Event()
    attach: list[subprocess.Popen[bytes]] = []

    def stop(signum: int, _frame: object) -> None:
        stopping.set()
        for proc in (*attach, daemon):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if config.follow_connstr is not None:
        threading.Thread(
            target=_follow, args=(app, config, daemon, stopping, attach), daemon=True
        ).start()
    return daemon.wait()


def _follow(
    app: App,
    config: ContainerConfig,
    daemon: subprocess.Popen[bytes],
    stopping: threading.Event,
    attach: list[subprocess.Popen[bytes]],
) -> None:
    """Attach the configured server unless this home follows it already; retry until done."""
    name = config.follow_name
    pause = RETRY_FIRST
    while not stopping.is_set() and daemon.poll() is None:
        if control.running_pid(app) != daemon.pid:
            time.sleep(0.2)  # the daemon is still coming up
            continue
        node = App.open(app.home.root).registry.find_node(name)
        if node is not None and node.state != "creating":
            _log(f"following {name} ({node.extra.get('host')}:{node.port}, {node.state})")
            _keep_in_s3(app, config, stopping)
            return
        proc = subprocess.Popen(
            _attach_argv(app, config),
            env=_attach_env(config),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        attach[:] = [proc]
        _, err = proc.communicate()
        attach.clear()
        if proc.returncode == 0:
            _log(f"attached {name}: its history starts now")
            _keep_in_s3(app, config, stopping)
            return
        if stopping.is_set():
            return
        reason = err.decode(errors="replace").strip().splitlines()
        _log(f"attaching {name} failed, retrying in {pause:.0f}s: {reason[-1] if reason else ''}")
        stopping.wait(pause)
        pause = min(pause * 2, RETRY_MAX)


def _keep_in_s3(app: App, config: ContainerConfig, stopping: threading.Event) -> None:
    """With NEON_S3_BUCKET: the PITR area, kept in the bucket (retried until made)."""
    if config.s3 is None or config.pitr_ttl is None:
        return
    pause = RETRY_FIRST
    while (why := ensure_area(app, config.s3, config.follow_name, config.pitr_ttl)) is not None:
        _log(f"PITR area in s3 not created, retrying in {pause:.0f}s: {why}")
        if stopping.wait(pause):
            return
        pause = min(pause * 2, RETRY_MAX)


def _attach_argv(app: App, config: ContainerConfig) -> list[str]:
    assert config.follow_connstr is not None
    argv = [
        sys.executable, "-m", "cli.main", "--home", str(app.home.root),
        "pg", "attach", config.follow_name, "--connstr", config.follow_connstr,
    ]  # fmt: skip
    if config.follow_slot is not None:
        argv += ["--slot", config.follow_slot]
    if config.pitr_ttl is not None and config.s3 is None:  # else made with --storage
        argv += ["--pitr-ttl", config.pitr_ttl]
    return argv


def _attach_env(config: ContainerConfig) -> dict[str, str]:
    env = dict(os.environ)
    if config.follow_password_file is not None:
        env["PGPASSWORD"] = config.follow_password_file.read_text().rstrip("\r\n")
    return env
