"""`pg checkout` stops the node at once (no shutdown checkpoint) and the pageserver takes
from the node's pg_wal what its walsender had not sent (pageserver/follow/wal_tail.py):
HEAD{i} holds every commit the node made, and the directory patched in place equals the
target page for page, although PostgreSQL never wrote its dirty buffers.

The lag is made deterministic by stopping (SIGSTOP) the node's walsender: the commits are
flushed to pg_wal (synchronous_commit on, no synchronous standby) and never sent. At the
immediate stop the postmaster SIGKILLs the stopped walsender after 5 s
(SIGKILL_CHILDREN_AFTER_SECS, src/backend/postmaster/postmaster.c)."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from cli.context import App
from cli.pageserver_control import local_api
from datadir_files.untar import extract_stream
from pageserver_api.client import PageserverClient
from pageserver_api.models import BasebackupRequest
from pg15.lsn import parse_lsn
from tests.e2e.test_checkout_delta import connstr, datadir, node_dumps
from tests.e2e.test_ingest_wait import receiver_pid
from tests.e2e.test_pitr_faithfulness import amcheck, assert_same_dumps
from tests.neoncli import NeonCli, psql
from tests.page_compare import fork_pages, masked_page, relation_files
from tests.pgtest import free_port


def extract(neon: NeonCli, snapshot: str, target: Path) -> None:
    """A full extraction of `snapshot` into `target` (the tar a full rebuild unpacks)."""

    async def fetch(client: PageserverClient) -> None:
        async with client.basebackup(BasebackupRequest(snapshot=snapshot)) as stream:
            await extract_stream(stream.__aiter__(), target)

    local_api(App.open(neon.home)).run(fetch)


def test_checkout_takes_the_wal_the_walsender_did_not_send(neon: NeonCli, tmp_path: Path) -> None:
    neon.run("pg", "create", "--port", str(free_port()))
    c = connstr(neon)
    psql(c, "CREATE EXTENSION amcheck")
    psql(
        c,
        "CREATE TABLE t (a int PRIMARY KEY, pad text) WITH (fillfactor = 50); "
        "INSERT INTO t SELECT g, repeat('s', 100) FROM generate_series(1, 20000) g",
    )
    neon.run("snapshot", "create", "pgdata1@s")
    at_s = node_dumps(c)
    table = psql(c, "SELECT pg_relation_filepath('t')")
    inode = datadir(neon).stat().st_ino
    sender = int(psql(c, "SELECT pid FROM pg_stat_replication"))
    os.kill(sender, signal.SIGSTOP)
    try:
        # Pages of s changed (their dirty buffers lost at the stop), new pages, a new file.
        psql(c, "UPDATE t SET pad = 'head' WHERE a % 7 = 0")
        psql(c, "INSERT INTO t SELECT g, 'new' FROM generate_series(20001, 22000) g")
        psql(c, "CREATE TABLE u AS SELECT generate_series(1, 100) b")
        flushed = parse_lsn(psql(c, "SELECT pg_current_wal_flush_lsn()"))
        ingested = parse_lsn(neon.json("pg", "show", "pgdata1")["wal"]["ingested_lsn"])
        assert ingested < flushed, "the pageserver has the node's last WAL already"
        live = node_dumps(c)
        out = neon.run("pg", "checkout", "pgdata1@s", timeout=120).stdout
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(sender, signal.SIGCONT)
    assert "Rolling back" in out
    assert datadir(neon).stat().st_ino == inode, "the directory was rebuilt, not patched"
    log = (neon.home / "logs" / "primary1" / "postgresql.log").read_text()
    assert "received immediate shutdown request" in log

    # The patched directory, before anything reads it (a read prunes and hints pages), is
    # the target's: the table's pages equal a full extraction's, under the masks of what
    # PostgreSQL changes without WAL.
    neon.run("pg", "stop", "pgdata1")
    extract(neon, "pgdata1@s", tmp_path / "full")
    fork = (int(Path(table).name), 0)
    mine = fork_pages(relation_files((datadir(neon) / table).parent)[fork])
    full = fork_pages(relation_files((tmp_path / "full" / table).parent)[fork])
    assert len(mine) == len(full)
    differ = [
        blkno
        for blkno, (a, b) in enumerate(zip(mine, full, strict=True))
        if masked_page("heap", a, blkno) != masked_page("heap", b, blkno)
    ]
    assert differ == [], f"pages of t differ from the target's: {differ[:20]}"
    neon.run("pg", "start", "pgdata1")
    assert_same_dumps(node_dumps(c), at_s, "back to s")
    amcheck(c)

    # HEAD{0} is the node as it was stopped: every commit, none of which was streamed.
    neon.run("pg", "checkout", "pgdata1@HEAD{0}")
    assert_same_dumps(node_dumps(c), live, "forward to HEAD{0}")
    assert psql(c, "SELECT count(*), count(*) FILTER (WHERE pad = 'head') FROM t") == "22000|2857"
    amcheck(c)


def test_a_checkout_takes_the_tail_of_a_timeline_no_receiver_streamed(neon: NeonCli) -> None:
    """Right after a checkout the node's new timeline has nothing archived until its new
    receiver process connects (100 ms and more), and a checkout may come first. Made
    deterministic with max_wal_senders = 0 (no receiver connects at all): the tail is taken
    from the segment of the timeline's start."""
    neon.run("pg", "create", "--port", str(free_port()))
    c = connstr(neon)
    psql(c, "CREATE TABLE t AS SELECT generate_series(1, 1000) a")
    neon.run("snapshot", "create", "pgdata1@s")
    psql(c, "ALTER SYSTEM SET max_wal_senders = 0")
    neon.run("pg", "checkout", "pgdata1@s")  # started again without walsenders
    psql(c, "INSERT INTO t SELECT generate_series(1001, 1500); CREATE TABLE u (b int)")
    wal = neon.json("pg", "show", "pgdata1")["wal"]
    assert wal["received_lsn"] is None, wal
    live = node_dumps(c)
    neon.run("pg", "checkout", "pgdata1@s")
    assert psql(c, "SELECT count(*) FROM t") == "1000"
    psql(c, "ALTER SYSTEM RESET max_wal_senders")
    neon.run("pg", "checkout", "pgdata1@HEAD{1}")
    assert_same_dumps(node_dumps(c), live, "HEAD{1}: the timeline no receiver streamed")
    psql(c, "INSERT INTO t VALUES (0)")  # followed again: a snapshot waits for it
    neon.run("snapshot", "create", "pgdata1@after")


def test_a_checkout_takes_the_tail_of_a_node_found_crashed(neon: NeonCli) -> None:
    """A node stopped at once whose tail nobody took (a checkout killed right after its
    stop, here `pg stop -m immediate` with the walsender stopped) is in a crashed state, its
    last commits in its pg_wal only: the next checkout takes them into HEAD{i} too."""
    neon.run("pg", "create", "--port", str(free_port()))
    c = connstr(neon)
    psql(c, "CREATE TABLE t AS SELECT generate_series(1, 1000) a")
    neon.run("snapshot", "create", "pgdata1@s")
    sender = int(psql(c, "SELECT pid FROM pg_stat_replication"))
    os.kill(sender, signal.SIGSTOP)
    try:
        psql(c, "INSERT INTO t SELECT generate_series(1001, 1500)")
        live = node_dumps(c)
        neon.run("pg", "stop", "-m", "immediate", "pgdata1", timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(sender, signal.SIGCONT)
    neon.run("pg", "checkout", "pgdata1@s")
    assert psql(c, "SELECT count(*) FROM t") == "1000"
    neon.run("pg", "checkout", "pgdata1@HEAD{0}")
    assert_same_dumps(node_dumps(c), live, "HEAD{0}: the crashed node's last commits")


def test_a_receiver_that_does_not_end_is_killed_and_the_tail_taken(neon: NeonCli) -> None:
    """The node's receiver process stopped (SIGSTOP): told to end it cannot, and it holds the
    archive; a second later it is SIGKILLed and the tail taken from pg_wal as ever (a fast
    stop's checkout waits for the shutdown checkpoint such a receiver never takes and is
    refused: tests/e2e/test_checkout_short_head.py)."""
    neon.run("pg", "create", "--port", str(free_port()))
    c = connstr(neon)
    psql(c, "CREATE TABLE t AS SELECT generate_series(1, 100) a")
    neon.run("snapshot", "create", "pgdata1@s")
    receiver = receiver_pid(neon)
    os.kill(receiver, signal.SIGSTOP)
    try:
        psql(c, "INSERT INTO t SELECT generate_series(101, 150)")  # never received
        neon.run("pg", "checkout", "pgdata1@s")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(receiver, signal.SIGCONT)
    assert psql(c, "SELECT count(*) FROM t") == "100"
    neon.run("pg", "checkout", "pgdata1@HEAD{0}")
    assert psql(c, "SELECT count(*) FROM t") == "150"
