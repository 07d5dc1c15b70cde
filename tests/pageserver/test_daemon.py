"""The pageserver daemon as the CLI runs it: start/stop/status/run, HTTP and proto."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from pageserver.config import PageserverConfig
from pageserver.daemon import LOG_MAX_BYTES, setup_logging
from proto.client import call_sync
from proto.errors import AuthFailed, Unavailable
from tests.neoncli import NEON, NeonCli
from tests.pgtest import free_port


def http_get(port: int, path: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
        return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()


def ok_status_calls(http_port: int) -> int:
    _, _, body = http_get(http_port, "/metrics")
    prefix = 'pageserver_proto_requests_total{method="status",outcome="ok"} '
    return int(next(ln for ln in body.splitlines() if ln.startswith(prefix)).split()[-1])


def test_start_status_http_proto_stop(neon: NeonCli) -> None:
    stopped = neon.run("pageserver", "status", "--json", check=False)
    assert stopped.returncode == 3 and json.loads(stopped.stdout) == {"running": False}
    out = neon.run("pageserver", "start", "--port", "0", "--http-port", "0").stdout
    assert out.startswith("pageserver started")
    status = neon.json("pageserver", "status")
    assert status["running"] and status["pid"] > 0
    pid, proto_port, http_port = status["pid"], status["proto_port"], status["http_port"]
    assert "already running" in neon.run("pageserver", "start").stdout

    code, ctype, body = http_get(http_port, "/v1/status")
    assert code == 200 and ctype.startswith("application/json")
    assert json.loads(body)["pid"] == pid
    code, ctype, body = http_get(http_port, "/metrics")
    assert ctype.startswith("text/plain")
    assert "\npageserver_up 1\n" in "\n" + body
    assert 'pageserver_http_requests_total{path="/v1/status"} 1' in body

    token = (neon.home / "secrets" / "pageserver.token").read_text().strip()
    assert call_sync("127.0.0.1", proto_port, "status", token=token)["pid"] == pid
    with pytest.raises(AuthFailed, match="wrong token"):
        call_sync("127.0.0.1", proto_port, "status", token="not-the-token")
    # Garbage on the proto port does not hurt the daemon.
    with socket.create_connection(("127.0.0.1", proto_port), timeout=5) as s:
        s.sendall(b"\x00\x00\x00\x05garbage-and-more" * 10)
        s.settimeout(5)
        while s.recv(4096):
            pass
    before = ok_status_calls(http_port)
    assert call_sync("127.0.0.1", proto_port, "status", token=token)["pid"] == pid
    assert ok_status_calls(http_port) == before + 1

    assert neon.run("pageserver", "stop").stdout.strip() == "pageserver stopped"
    assert not (neon.home / "pageserver" / "pageserver.pid").exists()
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    with pytest.raises(Unavailable, match="neon pageserver start"):
        call_sync("127.0.0.1", proto_port, "status", token=token)
    assert "not running" in neon.run("pageserver", "stop").stdout


def test_nodes_register_with_pageserver_on_demand(neon: NeonCli) -> None:
    neon.run("pg", "create", "--no-start")
    status = neon.json("pageserver", "status")
    assert [n["node_id"] for n in status["nodes"]] == ["primary1"]
    assert "password" not in json.dumps(status)
    assert neon.json("pageserver", "status")["nodes"][0]["user"] == "neon_replication"
    neon.run("pg", "destroy", "--yes", "primary1")
    assert neon.json("pageserver", "status")["nodes"] == []


def test_run_in_foreground_and_sigterm(neon: NeonCli) -> None:
    port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [NEON, "pageserver", "run", "--port", str(port), "--http-port", str(http_port)],
        env=neon.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                _code, _, body = http_get(http_port, "/v1/status")
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "daemon did not come up"
                time.sleep(0.1)
        # The daemon runs as the foreground process's child (`python -m pageserver.daemon`,
        # so that CLI commands on the same home find it running).
        daemon_pid = json.loads(body)["pid"]
        ppid = int(Path(f"/proc/{daemon_pid}/stat").read_text().rpartition(")")[2].split()[1])
        assert ppid == proc.pid
        assert neon.json("pageserver", "status")["pid"] == daemon_pid
        # A second daemon on the same workdir refuses clearly.
        second = neon.run("pageserver", "run", "--port", "0", "--http-port", "0", check=False)
        assert second.returncode == 1 and "already runs" in second.stderr
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert "shutting down" in err and "stopped" in err
        assert not (neon.home / "pageserver" / "pageserver.pid").exists()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


def test_log_rotates_at_10_mib_keeping_five(tmp_path: Path) -> None:
    config = PageserverConfig(workdir=tmp_path)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(config, to_stderr=False)
        chunk = "x" * (64 << 10)
        for _ in range(7 * 10 * 16 + 1):  # 70 MiB: more than the log and its 5 backups hold
            logging.getLogger("pageserver").info(chunk)
        for handler in root.handlers:
            handler.close()
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["pageserver.log", *(f"pageserver.log.{i}" for i in range(1, 6))]
    for path in tmp_path.iterdir():
        assert path.stat().st_size <= LOG_MAX_BYTES + (70 << 10)


def test_a_default_port_taken_at_the_last_moment_falls_back_to_free_ones(
    neon: NeonCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The default ports are checked, then bound by the daemon: a program that takes one in
    between (another test run, another service starting) must not make `neon` fail."""
    from cli import pageserver_control
    from cli.context import App

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        monkeypatch.setenv("NEON_HOME", str(neon.home))
        monkeypatch.setattr(pageserver_control, "_choose", lambda default: taken)
        app = App.open(None)
        try:
            row = pageserver_control.start_local(app)
            assert row.port != taken and row.http_port != taken
            with pytest.raises(pageserver_control.PortTaken, match="already in use"):
                pageserver_control.stop_local(app)
                pageserver_control.start_local(app, proto_port=taken)
        finally:
            pageserver_control.stop_local(app)
            app.registry.close()
    finally:
        holder.close()


def test_shutdown_stops_the_local_writes_before_the_stores_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At SIGTERM the local basebackup socket is closed first (its running writes told to
    stop and waited for), then the stores close (stop_following): closed the other way
    round, a write mid-way read its tar from closed stores (296065e)."""
    from pageserver import daemon
    from pageserver.api.local_files import LocalFilesServer
    from pageserver.api.service import Pageserver

    order: list[str] = []
    close, stop_following = LocalFilesServer.close, Pageserver.stop_following

    async def closing_local(self: LocalFilesServer, wait: float = 10.0) -> None:
        order.append("local basebackup socket")
        await close(self, wait)

    async def closing_stores(self: Pageserver) -> None:
        order.append("stores")
        await stop_following(self)

    monkeypatch.setattr(LocalFilesServer, "close", closing_local)
    monkeypatch.setattr(Pageserver, "stop_following", closing_stores)
    config = PageserverConfig(tmp_path / "ps", proto_port=0, http_port=0)

    async def run() -> None:
        serving = asyncio.ensure_future(daemon.serve(config))
        for _ in range(3000):
            if config.ports_file.exists() or serving.done():
                break
            await asyncio.sleep(0.01)
        assert config.ports_file.exists()
        os.kill(os.getpid(), signal.SIGTERM)  # the daemon's own handler: its `stop`
        await asyncio.wait_for(serving, 60)

    asyncio.run(run())
    assert order == ["local basebackup socket", "stores"]
