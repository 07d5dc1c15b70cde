"""Commands that name a state the server wrote but ingest has not stored yet wait for ingest.

The lag is made deterministic by stopping (SIGSTOP) the node's walreceiver process: the server
goes on writing, nothing reaches the page store until it is continued (SIGCONT).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pg15.lsn import format_lsn, parse_lsn
from tests.neoncli import NEON, NeonCli, psql, run_on_tty
from tests.pgtest import free_port


def receiver_pid(neon: NeonCli) -> int:
    """The pageserver's walreceiver child (one node is followed)."""
    parent = (neon.home / "pageserver" / "pageserver.pid").read_text().strip()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = stat.rsplit(")", 1)[1].split()[1]
        if ppid == parent and b"walreceiver.receiver" in cmdline:
            found.append(int(proc.name))
    assert len(found) == 1, found
    return found[0]


def test_extraction_waits_for_wal_the_server_wrote_and_refuses_beyond(neon: NeonCli) -> None:
    neon.run("pg", "create", "-n", "main", "--port", str(free_port()))
    c = str(neon.json("pg", "show", "main")["connstr"])
    neon.run("pitr", "create", "all", "--ttl", "inf")
    psql(c, "CREATE TABLE before_stop AS SELECT generate_series(1, 10) a")
    neon.run("snapshot", "create", "main@synced")  # ingest has caught up
    pid = receiver_pid(neon)
    os.kill(pid, signal.SIGSTOP)
    try:
        before = parse_lsn(psql(c, "SELECT pg_current_wal_flush_lsn()"))
        psql(c, "CREATE TABLE while_stopped AS SELECT generate_series(1, 1000) a")
        flush = parse_lsn(psql(c, "SELECT pg_current_wal_flush_lsn()"))
        lag = neon.json("pg", "show", "main")["wal"]
        assert lag["lag_bytes"] >= flush - before, lag
        extract = subprocess.Popen(
            [NEON, "pitr", "extract-snapshot", "all", "--lsn", format_lsn(flush),
             "--as", "late", "--json"],
            env=neon.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(3)
        assert extract.poll() is None, extract.communicate()  # waiting, not refused
    finally:
        os.kill(pid, signal.SIGCONT)
    out, err = extract.communicate(timeout=120)
    assert extract.returncode == 0, err
    snap = json.loads(out)
    assert snap["name"] == "main@late" and before < snap["lsn"] <= flush, snap
    # Ingest catches up: the lag returns to 0. Polled, not read once: the idle server still
    # writes now and then (the bgwriter's running-xacts record every 15 s after activity,
    # autovacuum), and a record written just before `pg show` is not ingested yet.
    deadline = time.monotonic() + 60
    while (lag := neon.json("pg", "show", "main")["wal"])["lag_bytes"] != 0:
        assert time.monotonic() < deadline, lag
        time.sleep(0.2)

    beyond = format_lsn(flush + 64 * 1024 * 1024)
    error = neon.fail("pitr", "extract-snapshot", "all", "--lsn", beyond, "--as", "future")
    assert f"LSN {beyond} is past what node primary1 has written" in error, error


def test_the_wait_shows_progress_on_a_terminal_only(neon: NeonCli) -> None:
    """Issue 10 item 6: while ingest lags, `pitr extract-snapshot` and `snapshot create` show
    the wait's bar (percent of the WAL left) on a terminal, and nothing on a pipe."""
    neon.run("pg", "create", "-n", "main", "--port", str(free_port()))
    c = str(neon.json("pg", "show", "main")["connstr"])
    neon.run("pitr", "create", "all", "--ttl", "inf")
    neon.run("snapshot", "create", "main@synced")  # ingest has caught up
    for n, command in enumerate(
        (
            ("pitr", "extract-snapshot", "all", "--lsn", "{flush}", "--as", "late{n}"),
            ("snapshot", "create", "main@late{n}"),
        )
    ):
        for tty in (True, False):
            with ThreadPoolExecutor(1) as pool:
                pid = receiver_pid(neon)  # looked up each time
                os.kill(pid, signal.SIGSTOP)
                try:
                    psql(c, f"CREATE TABLE t{n}_{tty:d} AS SELECT generate_series(1, 1000) a")
                    flush = format_lsn(parse_lsn(psql(c, "SELECT pg_current_wal_flush_lsn()")))
                    args = [arg.format(flush=flush, n=f"{n}{tty:d}") for arg in command]
                    done = pool.submit(run_on_tty if tty else _run_piped, neon, *args)
                    time.sleep(2)
                    assert not done.done(), done.result()  # waiting for ingest
                finally:
                    os.kill(pid, signal.SIGCONT)
                code, shown = done.result(timeout=120)
            assert code == 0, shown
            if tty:
                assert "Ingesting primary1's WAL" in shown and "%" in shown, shown
            else:
                assert "Ingesting" not in shown, shown


def _run_piped(neon: NeonCli, *args: str) -> tuple[int, str]:
    """`neon ARGS` with its stderr on a pipe: its exit code and its stderr."""
    proc = neon.run(*args, check=False)
    return proc.returncode, proc.stderr
