"""Issue 15 item 1: `neon pg attach` follows a PostgreSQL 15 server pg-neon did not create.

A plain initdb server (tests/pgtest.py, not a neon node) is attached; pgbench and SQL run on
it; states extracted from the page history at recorded LSNs equal `pg_dump` of the server at
that moment, also after the pageserver was SIGKILLed mid-pgbench (its slot kept the WAL).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest

from cli.pgbin import pg_binary
from pg15.lsn import parse_lsn
from tests.e2e.test_pitr_faithfulness import assert_same_dumps, dump_all, mask_setval
from tests.neoncli import NeonCli
from tests.pgtest import PASSWORD, SUPERUSER, PgTestCluster, PgTestServer, free_port

pytestmark = pytest.mark.slow


def connstr(server: PgTestServer, user: str = SUPERUSER, password: str = PASSWORD) -> str:
    return f"host=127.0.0.1 port={server.port} user={user} password={password}"


def live_state(server: PgTestServer) -> tuple[int, dict[str, str]]:
    """The server's flush LSN and the dump of every database, with nothing writing."""
    lsn = parse_lsn(server.psql("SELECT pg_current_wal_flush_lsn()"))
    return lsn, mask_setval(dump_all(server.dsn()))


def extracted_dumps(neon: NeonCli, lsn: int, tag: str) -> dict[str, str]:
    neon.run("pitr", "extract-snapshot", "srv", "--lsn", f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}",
             "--as", tag, "--json")  # fmt: skip
    return started_dumps(neon, f"srv@{tag}")


def started_dumps(neon: NeonCli, snapshot: str) -> dict[str, str]:
    started = neon.json("snapshot", "start", snapshot)
    try:
        return mask_setval(dump_all(started["connstr"]))
    finally:
        neon.run("snapshot", "stop", snapshot)


def pgbench(server: PgTestServer, *args: str) -> None:
    proc = subprocess.run(
        [pg_binary("pgbench"), *args, server.dsn()], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr


def slots(server: PgTestServer) -> list[str]:
    return server.psql("SELECT slot_name FROM pg_replication_slots ORDER BY 1").split()


def pageserver_pid(neon: NeonCli) -> int:
    return int((neon.home / "pageserver" / "pageserver.pid").read_text().split()[0])


def test_attached_server_history_equals_the_server(
    neon: NeonCli, pg_cluster: PgTestCluster
) -> None:
    server = pg_cluster.create({"max_prepared_transactions": 5})
    pgbench(server, "-i", "-s", "2", "-q")
    server.psql(
        "CREATE TABLE notes (id int PRIMARY KEY, body text); "
        "INSERT INTO notes SELECT g, repeat('n', g % 300) FROM generate_series(1, 2000) g"
    )

    out = neon.run("pg", "attach", "srv", "--connstr", connstr(server), "--pitr-ttl", "inf")
    assert "Attached srv" in out.stdout
    assert slots(server) == ["neon_srv"]
    listed = {n["id"]: n for n in neon.json("pg", "list")}
    assert listed["srv"]["state"] == "attached"
    assert listed["srv"]["endpoint"] == f"127.0.0.1:{server.port}"
    shown = neon.run("pg", "show", "srv", "--json").stdout
    assert PASSWORD not in shown  # never printed
    assert PASSWORD not in neon.run("pg", "list").stdout

    # State as of the attach, then writes of every kind, then a snapshot of the live state.
    pgbench(server, "-T", "3", "-c", "2", "-n")
    lsn1, dump1 = live_state(server)
    server.psql("""
        UPDATE notes SET body = 'changed' WHERE id % 3 = 0;
        DELETE FROM notes WHERE id % 7 = 0;
        CREATE TABLE later AS SELECT g AS a FROM generate_series(1, 500) g;
        TRUNCATE pgbench_history;
        CREATE DATABASE other;
        BEGIN; INSERT INTO notes VALUES (-1, 'prepared'); PREPARE TRANSACTION 'p1';
    """)  # fmt: skip
    lsn2, dump2 = live_state(server)
    neon.run("snapshot", "create", "srv@now")
    wal = neon.json("pg", "show", "srv")["wal"]  # the server's position asked of the server
    assert wal["stream"] == "streaming" and wal["server_lsn"] is not None, wal
    assert isinstance(wal["lag_bytes"], int), wal
    assert_same_dumps(started_dumps(neon, "srv@now"), dump2, "snapshot srv@now")
    assert_same_dumps(extracted_dumps(neon, lsn1, "at1"), dump1, "extraction at lsn1")
    assert lsn2 > lsn1

    # SIGKILL of the pageserver in the middle of pgbench: the slot keeps the WAL meanwhile.
    bench = threading.Thread(target=pgbench, args=(server, "-T", "6", "-c", "2", "-n"))
    bench.start()
    time.sleep(2)
    os.kill(pageserver_pid(neon), signal.SIGKILL)
    time.sleep(1)
    bench.join()
    server.psql("COMMIT PREPARED 'p1'")
    lsn3, dump3 = live_state(server)
    neon.run("snapshot", "create", "srv@after-kill")  # restarts the pageserver, waits for WAL
    assert_same_dumps(extracted_dumps(neon, lsn3, "at3"), dump3, "extraction after the kill")
    assert_same_dumps(started_dumps(neon, "srv@after-kill"), dump3, "snapshot after the kill")

    # Diff and export work on its snapshots as on a node's; the exported file imports back.
    stat = neon.json("snapshot", "diff", "srv@now", "srv@after-kill", "--stat")
    changed = {f"{r['schema']}.{r['name']}" for r in stat["relations"]}
    assert {"public.pgbench_accounts", "public.pgbench_history"} <= changed, changed
    assert "public.later" not in changed  # untouched between the two (no autovacuum either)
    exported = neon.home.parent / "srv.neon"
    neon.json("snapshot", "export", "srv@after-kill", "-o", str(exported))
    neon.run("snapshot", "import", "--from", str(exported), "srvcopy")
    assert_same_dumps(started_dumps(neon, "srvcopy"), dump3, "export of srv@after-kill")

    # What pg-neon cannot do to a server it does not run, said clearly.
    for args in (("pg", "start", "srv"), ("pg", "stop", "srv"), ("pg", "checkout", "srv@now")):
        assert "follows but does not run" in neon.fail(*args)
    # A rollback is a new node from a snapshot.
    node = json.loads(
        neon.run(
            "pg", "create", "--snapshot", "srv@now", "--port", str(free_port()), "--json"
        ).stdout
    )
    assert_same_dumps(mask_setval(dump_all(node["connstr"])), dump2, "node from srv@now")

    # Detach keeping the history: the slot is gone from the server, the snapshots stay.
    neon.run("pg", "detach", "srv", "--keep", "--yes")
    assert slots(server) == []
    assert neon.json("pg", "show", "srv")["state"] == "detached"
    assert_same_dumps(started_dumps(neon, "srv@now"), dump2, "snapshot kept after detach")
    neon.run("pg", "destroy", "srv", "--yes")
    assert "srv" not in {n["id"] for n in neon.json("pg", "list")}


def test_attach_refusals_name_the_fix_and_leave_nothing(
    neon: NeonCli, pg_cluster: PgTestCluster
) -> None:
    server = pg_cluster.create({"max_replication_slots": 1})
    server.psql("CREATE ROLE plain LOGIN PASSWORD 'plainpw'")
    with (server.datadir / "pg_hba.conf").open("a") as f:
        f.write("host replication plain 127.0.0.1/32 scram-sha-256\n")
    server.psql("SELECT pg_reload_conf()")

    assert "password authentication failed" in neon.fail(
        "pg", "attach", "a1", "--connstr", connstr(server, password="wrong")
    )
    assert "REPLICATION" in neon.fail(
        "pg", "attach", "a1", "--connstr", connstr(server, "plain", "plainpw")
    )
    server.psql("SELECT pg_create_physical_replication_slot('taken')")
    assert "max_replication_slots" in neon.fail("pg", "attach", "a1", "--connstr", connstr(server))
    assert "cannot connect" in neon.fail(
        "pg", "attach", "a1", "--connstr", f"host=127.0.0.1 port={free_port()} user=x"
    )
    assert "invalid connection string" in neon.fail("pg", "attach", "a1", "--connstr", "host='")
    assert "looks like a node ID" in neon.fail(
        "pg", "attach", "primary3", "--connstr", connstr(server)
    )
    assert neon.json("pg", "list") == []
    assert slots(server) == ["taken"]

    minimal = pg_cluster.create({"wal_level": "minimal", "max_wal_senders": 0})
    message = neon.fail("pg", "attach", "a2", "--connstr", connstr(minimal))
    assert "wal_level" in message and "max_wal_senders" in message
    assert neon.json("pg", "list") == []
