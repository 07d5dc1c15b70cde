"""`pg checkout` names HEAD{i} and branches while PostgreSQL's processes still exit after its
shutdown checkpoint (cli/checkout.py), and changes the directory only once the postmaster
has gone, also when a killed checkout is rolled forward. The exit is held up by a second
replication client stopped with SIGSTOP: the server's walsender for it waits for its reply
before the postmaster may exit (WalSndDone, src/backend/replication/walsender.c), up to
wal_sender_timeout; SIGCONT lets it answer and the server exit.

Only a fast stop has that exit to overlap: a checkout that patches the directory in place
stops the node at once (tests/e2e/test_checkout_wal_tail.py). The node's hint mark is removed
so that these checkouts stop it fast (and rebuild the directory whole)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from cli.hints_mark import HINTS_MARK
from cli.pgbin import pg_binary
from tests.neoncli import NEON, NeonCli, psql
from tests.pgtest import free_port

WAIT = 60.0


def _node(neon: NeonCli) -> tuple[str, Path]:
    """pgdata1: table t of 100 rows in snapshot pgdata1@s, then 50 more; connstr, datadir."""
    neon.run("pg", "create", "--port", str(free_port()))
    shown = neon.json("pg", "show", "pgdata1")
    c = str(shown["connstr"])
    # Long enough that the old order (HEAD named after the exit) shows; short enough that a
    # failing run ends.
    psql(c, "ALTER SYSTEM SET wal_sender_timeout = '20s'; SELECT pg_reload_conf()")
    psql(c, "CREATE TABLE t AS SELECT generate_series(1, 100) a")
    neon.run("snapshot", "create", "pgdata1@s")
    psql(c, "INSERT INTO t SELECT generate_series(1, 50)")
    datadir = Path(str(shown["datadir"]))
    (datadir / HINTS_MARK).unlink()  # a fast stop (cli/checkout.py _may_stop_at_once)
    return c, datadir


@contextlib.contextmanager
def _exit_held(c: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A pg_receivewal streaming from the node, stopped (SIGSTOP): a shutdown of the node
    ends only once it is continued (SIGCONT). Stopped by PID at the end."""
    wal = tmp_path / "receivewal"
    wal.mkdir()
    proc = subprocess.Popen(
        [pg_binary("pg_receivewal"), "-d", f"{c} application_name=held", "-D", str(wal),
         "--no-loop", "--synchronous"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT
        # Caught up (it reports each write at once: --synchronous): stopped with WAL still to
        # take, its walsender would wait to send it and hold up the shutdown checkpoint itself
        # (WalSndWaitStopping), not only the exit.
        sql = (
            "SELECT count(*) FROM pg_stat_replication WHERE application_name = 'held' "
            "AND state = 'streaming' AND flush_lsn = pg_current_wal_flush_lsn()"
        )
        while psql(c, sql) != "1":
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGSTOP)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
        proc.wait()


def _journal(datadir: Path) -> Path:
    return datadir.with_name(datadir.name + ".checkout.json")


def _applying(datadir: Path) -> Path:
    return datadir.with_name(datadir.name + ".checkout.applying")


def _until_journal(datadir: Path, proc: subprocess.Popen[bytes]) -> None:
    """Until the checkout wrote its journal (HEAD named): the postmaster must still be there
    (held), and the directory untouched."""
    deadline = time.monotonic() + WAIT
    while not _journal(datadir).exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert (datadir / "postmaster.pid").exists(), "HEAD was named only after the exit"
    assert not _applying(datadir).exists()


def _untouched_while_held(datadir: Path, proc: subprocess.Popen[bytes]) -> None:
    """For a second, the command waits for the held postmaster without changing anything."""
    until = time.monotonic() + 1.0
    while time.monotonic() < until:
        assert proc.poll() is None, proc.communicate()
        assert (datadir / "postmaster.pid").exists()
        assert not _applying(datadir).exists()
        time.sleep(0.01)


def _checked_out(neon: NeonCli, c: str, datadir: Path) -> None:
    assert psql(c, "SELECT count(*) FROM t") == "100"
    assert not _journal(datadir).exists()
    neon.run("pg", "checkout", "pgdata1@HEAD{0}")  # every write before the stop is in it
    assert psql(c, "SELECT count(*) FROM t") == "150"


def _neon(neon: NeonCli, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [NEON, *args], env=neon.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


@contextlib.contextmanager
def _killed_at_end(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """`proc`, killed by PID at the end if it still runs: a command left running when an
    assertion fails would go on changing the directory after `_exit_held`'s SIGCONT."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _ends_once_released(
    proc: subprocess.Popen[bytes], datadir: Path, held: subprocess.Popen[bytes]
) -> None:
    """`proc` leaves the directory alone while the exit is held, then (SIGCONT: the held
    client answers, the server exits) ends well."""
    _untouched_while_held(datadir, proc)
    os.kill(held.pid, signal.SIGCONT)
    _out, err = proc.communicate(timeout=WAIT)
    assert proc.returncode == 0, err


def test_checkout_names_head_while_postgres_exits(neon: NeonCli, tmp_path: Path) -> None:
    c, datadir = _node(neon)
    with (
        _exit_held(c, tmp_path) as held,
        _killed_at_end(_neon(neon, "pg", "checkout", "pgdata1@s")) as checkout,
    ):
        _until_journal(datadir, checkout)
        _ends_once_released(checkout, datadir, held)
    _checked_out(neon, c, datadir)


def test_a_killed_checkout_is_rolled_forward_once_postgres_exited(
    neon: NeonCli, tmp_path: Path
) -> None:
    """Killed once its journal is written, the postmaster still exiting: the next `pg start`
    waits for that exit before it changes the directory (postmaster.wait_exiting)."""
    c, datadir = _node(neon)
    with _exit_held(c, tmp_path) as held:
        with _killed_at_end(_neon(neon, "pg", "checkout", "pgdata1@s")) as checkout:
            _until_journal(datadir, checkout)  # then killed, still waiting for the exit
        with _killed_at_end(_neon(neon, "pg", "start", "pgdata1")) as start:
            _ends_once_released(start, datadir, held)
    _checked_out(neon, c, datadir)
