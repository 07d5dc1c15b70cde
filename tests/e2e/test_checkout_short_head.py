"""`pg checkout` never names HEAD{i} short of the node's last writes: when the pageserver has
not decoded the stopped node's shutdown checkpoint in time, the checkout is refused before
anything changes and the node started again; the WAL then streams from its slot and the next
checkout keeps every write in HEAD{i}. The lag is made deterministic by stopping (SIGSTOP)
the node's walreceiver process, and the server's wal_sender_timeout is short so that its
shutdown does not wait a minute for that receiver's reply."""

from __future__ import annotations

import os
import signal

from tests.e2e.test_ingest_wait import receiver_pid
from tests.neoncli import NeonCli, psql
from tests.pgtest import free_port


def test_checkout_refuses_while_the_shutdown_checkpoint_is_not_ingested(neon: NeonCli) -> None:
    neon.run("pg", "create", "--port", str(free_port()))
    c = str(neon.json("pg", "show", "pgdata1")["connstr"])
    psql(c, "CREATE TABLE t AS SELECT generate_series(1, 100) a")
    neon.run("snapshot", "create", "pgdata1@s")
    psql(c, "ALTER SYSTEM SET wal_sender_timeout = '2s'; SELECT pg_reload_conf()")
    pid = receiver_pid(neon)
    os.kill(pid, signal.SIGSTOP)
    try:
        psql(c, "INSERT INTO t SELECT generate_series(1, 50)")  # never received meanwhile
        error = neon.fail("pg", "checkout", "pgdata1@s")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert "has not received the last WAL of pgdata1" in error, error
    assert "postgres on pgdata1 was started again" in error, error
    assert neon.json("pg", "show", "pgdata1")["state"] == "running"
    assert psql(c, "SELECT count(*) FROM t") == "150"
    names = [s["name"] for s in neon.json("snapshot", "list")]
    assert "pgdata1@HEAD{0}" not in names, names  # nothing was named

    neon.run("pg", "checkout", "pgdata1@s")
    assert psql(c, "SELECT count(*) FROM t") == "100"
    neon.run("pg", "checkout", "pgdata1@HEAD{0}")  # the state before: with the 50 rows
    assert psql(c, "SELECT count(*) FROM t") == "150"
