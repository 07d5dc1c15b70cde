"""Replicas (`neon pg start --replica`) through the real CLI, on real servers: a hot standby
materialized from the page history streams from its primary under pgbench, shows its lag,
survives the primary's restart and a checkout, and goes away with its slot."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from cli.pgbin import pg_binary
from tests.neoncli import NeonCli, free_port, pgbench, psql


@pytest.fixture
def home(neon: NeonCli) -> Iterator[NeonCli]:
    """The neon home; the replicas still running at the end are stopped by PID (the home's
    own cleanup stops nodes and the pageserver)."""
    yield neon
    with contextlib.suppress(Exception):
        for node in neon.json("pg", "list"):
            for replica in node["replicas"]:
                if replica["pid"]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(replica["pid"], signal.SIGQUIT)


def until(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def slots(connstr: str) -> list[str]:
    return psql(connstr, "SELECT slot_name FROM pg_replication_slots ORDER BY 1").split()


def test_replica_under_pgbench_restart_list_and_destroy(home: NeonCli) -> None:
    neon = home
    neon.run("pg", "create", "--port", str(free_port()))
    primary = neon.json("pg", "show", "pgdata1")
    c = primary["connstr"]
    pgbench(c, "-i", "-s", "1", "-q")
    psql(c, "CREATE TABLE marks (n int)")
    neon.run("snapshot", "create", "pgdata1@before")
    psql(c, "INSERT INTO marks VALUES (1)")

    bench = subprocess.Popen(
        [pg_binary("pgbench"), "-T", "6", "-c", "2", "-n", c],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1)
        out = neon.run("pg", "start", "--replica", "pgdata1", "--port", str(free_port())).stdout
        assert out.startswith("Started replica replica-1 on localhost:")
        replica = neon.json("pg", "show", "replica-1")
        r = replica["connstr"]
        assert psql(r, "SELECT pg_is_in_recovery()") == "t"
        assert psql(r, "SELECT count(*) FROM pgbench_accounts") == "100000"
        assert psql(r, "SELECT status FROM pg_stat_wal_receiver") == "streaming"
        # It replays: what the primary writes after the replica started appears there.
        psql(c, "CREATE TABLE later AS SELECT 1 AS x")
        until(lambda: psql(r, "SELECT to_regclass('later') IS NOT NULL") == "t", "replay")
        lag = neon.json("pg", "show", "replica-1")["lag"]
        assert lag["receiver"] == "streaming"
        assert isinstance(lag["lag_bytes"], int) and lag["lag_bytes"] >= 0
        assert isinstance(lag["lag_seconds"], float)
    finally:
        _, err = bench.communicate(timeout=60)
    assert bench.returncode == 0, err

    def caught_up() -> bool:
        return neon.json("pg", "show", "replica-1")["lag"]["lag_bytes"] == 0

    until(caught_up, "the replica to catch up")
    total = "SELECT sum(abalance), (SELECT count(*) FROM pgbench_history) FROM pgbench_accounts"
    assert psql(r, total) == psql(c, total)

    def shown_caught_up() -> bool:  # the primary may write again meanwhile (autovacuum)
        text = neon.run("pg", "show", "replica-1").stdout
        return "    lag: 0B," in text and "behind the primary" in text

    until(shown_caught_up, "`pg show` to say the replica caught up")

    # The replica keeps working across a restart of its primary (the walreceiver reconnects).
    neon.run("pg", "stop", "pgdata1")
    assert "is not running" in neon.fail("pg", "start", "--replica", "pgdata1")
    neon.run("pg", "start", "pgdata1")
    psql(c, "INSERT INTO marks VALUES (2)")
    until(lambda: psql(r, "SELECT count(*) FROM marks") == "2", "rows after the restart")

    # A static read-only replica at a snapshot: replica-2, its data from before.
    out = neon.run("pg", "start", "--replica", "pgdata1", "--from-snapshot", "pgdata1@before")
    assert out.stdout.startswith("Started replica replica-2 on localhost:")
    static = neon.json("pg", "show", "replica-2")
    assert static["kind"] == "static" and static["slot"] is None
    assert psql(static["connstr"], "SELECT count(*) FROM marks") == "0"

    # `pg list`: replicas right under their primary, as in the proposal's table.
    lines = neon.run("pg", "list").stdout.splitlines()
    assert lines[0].split()[:5] == ["ID", "PGDATA", "USED", "STORAGE", "ENDPOINT"]
    assert lines[1].split()[0] == "primary1"
    assert lines[2].split()[:5] == ["replica-1", "-", "-", "-", f"localhost:{replica['port']}"]
    assert lines[3].split()[:5] == ["replica-2", "-", "-", "-", f"localhost:{static['port']}"]
    # Replicas have no history of their own: the pageserver follows the primary only.
    followed = neon.json("pageserver", "status")["nodes"]
    assert [n["node_id"] for n in followed] == ["primary1"]

    # Stop and start again; destroy: the slot goes with it. A primary with replicas stays.
    assert slots(c) == ["neon_primary1", "neon_replica_1"]
    assert "replicas (replica-1, replica-2)" in neon.fail("pg", "destroy", "--yes", "pgdata1")
    neon.run("pg", "stop", "replica-1")
    assert neon.json("pg", "show", "replica-1")["state"] == "stopped"
    psql(c, "INSERT INTO marks VALUES (3)")
    neon.run("pg", "start", "replica-1")
    until(lambda: psql(r, "SELECT count(*) FROM marks") == "3", "rows after the replica's start")
    neon.run("pg", "destroy", "--yes", "replica-1")
    neon.run("pg", "destroy", "--yes", "replica-2")
    assert slots(c) == ["neon_primary1"]
    assert [n["replicas"] for n in neon.json("pg", "list")] == [[]]
    assert not (neon.home / "replicas" / "replica-1").exists()
    assert "does not exist" in neon.fail("pg", "show", "replica-1")
    neon.run("pg", "destroy", "--yes", "pgdata1")


def test_checkout_reseeds_replica_and_slot_of_stopped_primary(home: NeonCli) -> None:
    neon = home
    neon.run("pg", "create", "--port", str(free_port()))
    c = neon.json("pg", "show", "pgdata1")["connstr"]
    psql(c, "CREATE TABLE t AS SELECT generate_series(1, 1000) a")
    neon.run("snapshot", "create", "pgdata1@s1")
    psql(c, "INSERT INTO t SELECT generate_series(1, 500)")
    neon.run("pg", "start", "--replica", "pgdata1", "-n", "ro", "--port", str(free_port()))
    r = neon.json("pg", "show", "ro")["connstr"]
    assert psql(r, "SELECT count(*) FROM t") == "1500"
    assert "looks like" in neon.fail("pg", "start", "--replica", "pgdata1", "-n", "pgdata7")
    assert "already exists" in neon.fail("pg", "start", "--replica", "pgdata1", "-n", "ro")

    # The checkout rolls the replica back with its primary, on the new timeline.
    out = neon.run("pg", "checkout", "pgdata1@s1").stdout
    assert "Stopped replica ro." in out and "Seeding replica ro again from pgdata1." in out
    assert psql(r, "SELECT count(*) FROM t") == "1000"
    assert neon.json("pg", "show", "ro")["timeline"] == 2
    psql(c, "INSERT INTO t VALUES (-1)")
    until(lambda: psql(r, "SELECT count(*) FROM t") == "1001", "replay on timeline 2")
    assert psql(r, "SELECT status FROM pg_stat_wal_receiver") == "streaming"
    assert slots(c) == ["neon_primary1", "neon_replica_1"]

    # Destroyed while its primary is stopped: the slot is dropped all the same.
    neon.run("pg", "stop", "pgdata1")
    neon.run("pg", "destroy", "--yes", "ro")
    neon.run("pg", "start", "pgdata1")
    assert slots(c) == ["neon_primary1"]
