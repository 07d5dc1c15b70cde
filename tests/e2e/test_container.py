"""Issue 15 item 2: the pageserver configured by environment variables alone (the container of
docker/compose.yaml, started here as a process beside a PostgreSQL the test starts) follows the
server from its first start, and a CLI on the host with its own home works against it with
`--pageserver neon://…` and the token: snapshot, extract, start read-only servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from pg15.lsn import format_lsn
from tests.e2e.test_attach import live_state, started_dumps
from tests.e2e.test_pitr_faithfulness import assert_same_dumps
from tests.neoncli import NEON, NeonCli
from tests.pgtest import PASSWORD, SUPERUSER, PgTestCluster, free_port, pg_reachable_tmpdir

pytestmark = pytest.mark.slow

TOKEN = "container-token-0123456789"


def start_container(home: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "NEON"))}
    return subprocess.Popen(
        [NEON, "pageserver", "run"],
        env={**base, "NEON_HOME": str(home), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def stop_container(proc: subprocess.Popen[str]) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
    return err


def test_environment_configured_pageserver_follows_and_serves_a_remote_cli(
    neon: NeonCli, pg_cluster: PgTestCluster
) -> None:
    server = pg_cluster.create()
    server.psql("CREATE TABLE t (a int PRIMARY KEY, b text); "
                "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 3000) g")  # fmt: skip
    secrets = pg_reachable_tmpdir("neon-container-")
    (secrets / "token").write_text(TOKEN + "\n")
    (secrets / "pgpass").write_text(PASSWORD + "\n")
    port, http_port = free_port(), free_port()
    env = {
        "NEON_PORT": str(port),
        "NEON_HTTP_PORT": str(http_port),
        "NEON_TOKEN_FILE": str(secrets / "token"),
        "NEON_FOLLOW_CONNSTR": f"host=127.0.0.1 port={server.port} user={SUPERUSER}",
        "NEON_FOLLOW_PASSWORD_FILE": str(secrets / "pgpass"),
        "NEON_FOLLOW_NAME": "db",
        "NEON_PITR_TTL": "inf",
    }
    home = secrets / "home"
    container = start_container(home, env)
    host = NeonCli(neon.home, {"NEON_PAGESERVER": f"neon://127.0.0.1:{port}", "NEON_TOKEN": TOKEN})
    try:
        deadline = time.monotonic() + 90
        while "db" not in {a["name"] for a in _areas(host)}:
            assert container.poll() is None, stop_container(container)
            assert time.monotonic() < deadline, "the server was not attached"
            time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/status", timeout=10) as r:
            assert r.status == 200
            status = json.loads(r.read())
        assert [n["node_id"] for n in status["nodes"]] == ["db"]
        assert PASSWORD not in json.dumps(status)

        server.psql("UPDATE t SET b = 'x' WHERE a % 4 = 0; DELETE FROM t WHERE a % 9 = 0")
        lsn1, dump1 = live_state(server)
        server.psql("INSERT INTO t SELECT g, 'late' FROM generate_series(5000, 6000) g")
        lsn2, dump2 = live_state(server)
        host.run("snapshot", "create", "db@now")
        assert_same_dumps(started_dumps(host, "db@now"), dump2, "db@now through --pageserver")
        host.run("pitr", "extract-snapshot", "db", "--lsn", format_lsn(lsn1), "--as", "then")
        assert_same_dumps(started_dumps(host, "db@then"), dump1, "extraction at lsn1")
        assert lsn2 > lsn1
        assert "db@now" in {s["name"] for s in host.json("snapshot", "list")}
        pushed = secrets / "db-now.neon"
        host.run("snapshot", "push", "--to", str(pushed), "db@now")
        assert "own pageserver" in host.fail("snapshot", "import", "--from", str(pushed), "c")
        assert "own pageserver" in host.fail("pg", "list")
        neon.run("snapshot", "import", "--from", str(pushed), "copied")  # the host's pageserver
        assert_same_dumps(started_dumps(neon, "copied"), dump2, "db@now pushed to the host")

        wrong = NeonCli(neon.home, {"NEON_PAGESERVER": f"neon://127.0.0.1:{port}",
                                    "NEON_TOKEN": "wrong"})  # fmt: skip
        assert "token" in wrong.fail("snapshot", "list").lower()
        assert "neon://HOST:PORT" in neon.fail("--pageserver", "http://x:1", "snapshot", "list")

        err = stop_container(container)
        assert container.returncode == 0, err
        assert not (home / "pageserver" / "pageserver.pid").exists()
        # Started again with the same environment: it follows the same slot, no new attach.
        container = start_container(home, env)
        deadline = time.monotonic() + 60
        while "db@now" not in {s["name"] for s in _snapshots(host)}:
            assert container.poll() is None, stop_container(container)
            assert time.monotonic() < deadline, "the restarted pageserver did not answer"
            time.sleep(0.5)
        time.sleep(1)
        err = stop_container(container)
        assert "following db" in err, err
        assert server.psql("SELECT slot_name FROM pg_replication_slots") == "neon_db"
    finally:
        stop_container(container)


def _areas(host: NeonCli) -> list[dict[str, object]]:
    proc = host.run("pitr", "list", "--json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else []


def _snapshots(host: NeonCli) -> list[dict[str, object]]:
    proc = host.run("snapshot", "list", "--json", check=False)
    return json.loads(proc.stdout) if proc.returncode == 0 else []
