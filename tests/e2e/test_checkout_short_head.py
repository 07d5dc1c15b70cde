"""`pg checkout` never names HEAD{i} short of the node's last writes: when the pageserver has
not decoded the stopped node's shutdown checkpoint in time, the checkout is refused before
anything changes and the node started again; the WAL then streams from its slot and the next
checkout keeps every write in HEAD{i}. The lag is made deterministic by stopping (SIGSTOP)
the node's walreceiver process, and the server's wal_sender_timeout is short so that its
shutdown does not wait a minute for that receiver's reply.

This is the fast stop's wait: a checkout that patches the directory in place stops the node
at once and takes its last WAL from pg_wal instead (SIGKILLing a receiver that does not end:
tests/e2e/test_checkout_wal_tail.py). The node's hint mark is removed so that these checkouts
stop it fast (cli/checkout.py _may_stop_at_once)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from cli.context import App
from cli.hints_mark import HINTS_MARK
from cli.nodes import SHUTDOWN_CHECKPOINT_WAIT_ENV
from cli.pageserver_control import local_api
from pageserver_api.models import NodePauseRequest
from tests.e2e.test_ingest_wait import receiver_pid
from tests.neoncli import NEON, NeonCli, psql
from tests.pgtest import free_port
from tests.security.test_port_squatter import followed


def node_with_snapshot(neon: NeonCli) -> str:
    """pgdata1 with table t of 100 rows and snapshot pgdata1@s of it; its connstr."""
    neon.run("pg", "create", "--port", str(free_port()))
    c = str(neon.json("pg", "show", "pgdata1")["connstr"])
    psql(c, "CREATE TABLE t AS SELECT generate_series(1, 100) a")
    neon.run("snapshot", "create", "pgdata1@s")
    (Path(str(neon.json("pg", "show", "pgdata1")["datadir"])) / HINTS_MARK).unlink()
    return c


WAIT = 3
"""The checkout's wait for the shutdown checkpoint in these tests (30 s by default)."""


def refused_checkout(neon: NeonCli, c: str) -> str:
    """50 rows inserted while the node's walreceiver is stopped, then `pg checkout
    pgdata1@s` waiting WAIT seconds for the shutdown checkpoint, which must fail: its
    error."""
    psql(c, "ALTER SYSTEM SET wal_sender_timeout = '2s'; SELECT pg_reload_conf()")
    pid = receiver_pid(neon)
    os.kill(pid, signal.SIGSTOP)
    waiting = NeonCli(neon.home, {**neon.env_extra, SHUTDOWN_CHECKPOINT_WAIT_ENV: str(WAIT)})
    try:
        psql(c, "INSERT INTO t SELECT generate_series(1, 50)")  # never received meanwhile
        return waiting.fail("pg", "checkout", "pgdata1@s")
    finally:
        os.kill(pid, signal.SIGCONT)


def test_checkout_refuses_while_the_shutdown_checkpoint_is_not_ingested(neon: NeonCli) -> None:
    c = node_with_snapshot(neon)
    for bad in ("soon", "0", "nan", "601"):  # refused before the node is stopped
        env = {**neon.env_extra, SHUTDOWN_CHECKPOINT_WAIT_ENV: bad}
        for command in (["pg", "checkout", "pgdata1@s"], ["pg", "stop", "pgdata1"]):
            error = NeonCli(neon.home, env).fail(*command)
            assert f"{SHUTDOWN_CHECKPOINT_WAIT_ENV}={bad!r} is not a positive number" in error
        assert neon.json("pg", "show", "pgdata1")["state"] == "running"
    error = refused_checkout(neon, c)
    assert "has not received the last WAL of pgdata1" in error, error
    assert f"within {WAIT} s" in error, error
    assert "postgres on pgdata1 was started again" in error, error
    assert neon.json("pg", "show", "pgdata1")["state"] == "running"
    assert psql(c, "SELECT count(*) FROM t") == "150"
    names = [s["name"] for s in neon.json("snapshot", "list")]
    assert "pgdata1@HEAD{0}" not in names, names  # nothing was named

    neon.run("pg", "checkout", "pgdata1@s")
    assert psql(c, "SELECT count(*) FROM t") == "100"
    neon.run("pg", "checkout", "pgdata1@HEAD{0}")  # the state before: with the 50 rows
    assert psql(c, "SELECT count(*) FROM t") == "150"


def test_a_stopped_nodes_whole_wal_is_ingested_again_after_a_pageserver_kill(
    neon: NeonCli,
) -> None:
    """The pageserver dies after `pg stop` with the node's last WAL not yet in layer files:
    restarted, it re-ingests the archive up to the end its receiver closed it at
    (walreceiver/archive.py CLOSED_MARKER), the shutdown checkpoint included, without the
    node. Rounded down to a WAL page, the tail waited for the node's next start: the lag
    stayed above 0, and a checkout of the stopped node waited 30 s for the checkpoint
    (then, since 396db70, was refused)."""
    c = node_with_snapshot(neon)
    psql(c, "INSERT INTO t SELECT generate_series(1, 50)")
    neon.run("pg", "stop", "pgdata1")
    os.kill(neon.json("pageserver", "status")["pid"], signal.SIGKILL)
    neon.run("pageserver", "start")
    deadline = time.monotonic() + 30
    while (wal := neon.json("pg", "show", "pgdata1")["wal"])["lag_bytes"] != 0:
        assert time.monotonic() < deadline, wal
        time.sleep(0.2)
    assert wal["stream"] == "paused", wal  # ingested without the node
    neon.run("pg", "checkout", "pgdata1@s")
    assert psql(c, "SELECT count(*) FROM t") == "100"
    neon.run("pg", "checkout", "pgdata1@HEAD{0}")
    assert psql(c, "SELECT count(*) FROM t") == "150"


def test_checkout_starts_the_node_again_when_the_pageserver_dies_during_the_wait(
    neon: NeonCli,
) -> None:
    """The pageserver dies while the checkout waits for the stopped node's shutdown checkpoint
    (its receiver stalled, as above): the wait fails with an error, not a timeout. The node is
    started again as on a refusal, not left stopped with nothing changed (396db70 restarted it
    only when the wait timed out: fails on it, the node stays stopped)."""
    c = node_with_snapshot(neon)
    shown = neon.json("pg", "show", "pgdata1")
    psql(c, "ALTER SYSTEM SET wal_sender_timeout = '2s'; SELECT pg_reload_conf()")
    pid = receiver_pid(neon)
    pidfile = neon.home / "pageserver" / "pageserver.pid"
    os.kill(pid, signal.SIGSTOP)
    psql(c, "INSERT INTO t SELECT generate_series(1, 50)")  # never received meanwhile
    checkout = subprocess.Popen(
        [NEON, "pg", "checkout", "pgdata1@s"],
        env=neon.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while (Path(str(shown["datadir"])) / "postmaster.pid").exists():  # being stopped
            assert checkout.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(2)  # now in the wait for the shutdown checkpoint (30 s)
        assert checkout.poll() is None
        os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)
        _out, err = checkout.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # its parent is gone: it exits
        if checkout.poll() is None:
            checkout.kill()
            checkout.wait()
    assert checkout.returncode != 0, err
    assert "postgres on pgdata1 was started again" in err, err
    assert neon.json("pg", "show", "pgdata1")["state"] == "running"
    assert psql(c, "SELECT count(*) FROM t") == "150"
    names = [s["name"] for s in neon.json("snapshot", "list")]
    assert "pgdata1@HEAD{0}" not in names, names


def test_a_refused_checkout_starts_the_stopped_replica_again(neon: NeonCli) -> None:
    """The checkout stops the node's streaming replicas first; refused before anything
    changed (the shutdown checkpoint not ingested), the node runs again on its timeline and
    so does its replica, streaming where it was (fails on 396db70: the replica left stopped,
    though 'nothing was changed')."""
    c = node_with_snapshot(neon)
    neon.run("pg", "start", "--replica", "pgdata1", "-n", "ro", "--port", str(free_port()))
    r = str(neon.json("pg", "show", "ro")["connstr"])
    error = refused_checkout(neon, c)
    assert "has not received the last WAL of pgdata1" in error, error
    assert neon.json("pg", "show", "ro")["state"] == "running"
    psql(c, "INSERT INTO t VALUES (-1)")
    deadline = time.monotonic() + 60
    while psql(r, "SELECT count(*) FROM t") != "151":
        assert time.monotonic() < deadline, "the replica does not replay"
        time.sleep(0.2)


def test_pg_start_follows_again_a_running_node_a_killed_stop_left_unfollowed(
    neon: NeonCli,
) -> None:
    """`pg stop` (and `pg checkout`) pause the node's following before they stop it; killed
    in between, they leave the node running unfollowed. `pg start` of the running node
    follows it again: it returned at once, so the checkout run next waited 30 s for a
    shutdown checkpoint nothing streamed and was refused (the CI's flaky
    test_checkout_killed_midway_rolls_forward)."""
    c = node_with_snapshot(neon)
    local_api(App.open(neon.home), start=False).node_pause(NodePauseRequest("primary1"))
    assert followed(neon)["paused"] is True
    wal = neon.json("pg", "show", "pgdata1")["wal"]
    assert wal["ingest"] == "paused", wal
    assert "run `neon pg start pgdata1`" in wal["error"], wal
    assert "WAL ingest paused" in neon.run("pg", "list").stdout
    neon.run("pg", "start", "pgdata1")
    assert followed(neon)["paused"] is False
    psql(c, "INSERT INTO t SELECT generate_series(1, 50)")
    neon.run("pg", "checkout", "pgdata1@s")
    assert psql(c, "SELECT count(*) FROM t") == "100"
    neon.run("pg", "checkout", "pgdata1@HEAD{0}")
    assert psql(c, "SELECT count(*) FROM t") == "150"
