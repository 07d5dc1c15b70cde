"""Failure injection: a storage on a small tmpfs fills up while a node writes, and a home
mounted read-only (issue 16 item 7).

Every command then answers in one line (no traceback); the pageserver stops ingesting with
the error visible in `pg list`, resumes when the filesystem is grown, and loses nothing: an
extraction at a point before the fill holds what the server had there. Needs root (mount).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from pg15.lsn import format_lsn, parse_lsn
from tests.neoncli import NeonCli, psql
from tests.pgtest import free_port, pg_reachable_tmpdir

CHECKPOINTS = "SELECT checkpoints_req FROM pg_stat_bgwriter"
CHECKSUM = "SELECT count(*) || ':' || md5(string_agg(a::text || b, ',' ORDER BY a)) FROM t"


@contextlib.contextmanager
def mounted(kind: list[str], target: Path) -> Iterator[Path]:
    """`mount ... target`, always unmounted afterwards (lazily, should a process hold it)."""
    subprocess.run(["mount", *kind, str(target)], check=True, capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=False, capture_output=True)


def one_line_answer(neon: NeonCli, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a command that may fail: no traceback, and a failure is one `neon: error:` line."""
    proc = neon.run(*args, check=False, timeout=60)
    assert "Traceback" not in proc.stderr, (args, proc.stderr)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("neon: error: "), (args, proc.stderr)
    return proc


def node_wal(neon: NeonCli) -> dict[str, object]:
    wal = neon.json("pg", "show", "pgdata1")["wal"]
    assert isinstance(wal, dict)
    return wal


def wait_until(what: str, check: object, timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def fill(path: Path, leave: int) -> None:
    """Take all but about `leave` bytes of the filesystem of `path` (others write there too)."""
    with open(path, "wb") as f:
        for _attempt in range(10):
            st = os.statvfs(path)
            try:
                os.posix_fallocate(f.fileno(), 0, f.tell() + st.f_bavail * st.f_frsize - leave)
                return
            except OSError:
                time.sleep(0.1)
    raise AssertionError(f"could not fill the filesystem of {path}")


def take_the_rest(path: Path) -> None:
    """Write to `path` until its filesystem has no byte left (ENOSPC)."""
    chunk = bytes(4096)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


def test_full_storage_stalls_ingest_and_loses_nothing(neon: NeonCli) -> None:
    base = pg_reachable_tmpdir("neon-diskfull-")
    try:
        with mounted(["-t", "tmpfs", "-o", "size=200m,mode=0711", "tmpfs"], base) as fs:
            try:
                neon.run("pageserver", "start", "--port", "0", "--http-port", "0")
                neon.run("storage", "attach", "-t", "native", "-n", "small", "-c", f"path={fs}/s")
                neon.run("pg", "create", "-s", "small", "--port", str(free_port()))
                neon.run("pitr", "create", "area", "--pg", "pgdata1", "--ttl", "inf")
                c = neon.json("pg", "show", "pgdata1")["connstr"]
                psql(c, "CREATE TABLE t (a int, b text)")
                psql(c, "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 5000) g")
                before_fill = psql(c, CHECKSUM)
                fill_lsn = parse_lsn(psql(c, "SELECT pg_current_wal_insert_lsn()"))
                # A fresh WAL segment for the server (created while there is room), then the
                # rest of the filesystem but a little is taken.
                psql(c, "SELECT pg_switch_wal()")
                psql(c, "SELECT pg_logical_emit_message(false, 'neon', 'x')")
                # Written by the WAL writer, a moment later (a non-transactional message is
                # not flushed by its statement): the segment exists once it is flushed.
                caught_up = parse_lsn(psql(c, "SELECT pg_current_wal_insert_lsn()"))
                wait_until(
                    "the server's flush of the new segment",
                    lambda: parse_lsn(psql(c, "SELECT pg_current_wal_flush_lsn()")) >= caught_up,
                )
                wait_until(
                    "ingest of the switch",
                    lambda: parse_lsn(str(node_wal(neon)["decoded_lsn"])) >= caught_up,
                )
                # WAL-only writes (no data file grows, so the server itself keeps going) on a
                # session opened before the fill (a new one writes files) until the pageserver's
                # archive of them hits the full filesystem.
                watch = psycopg.connect(c, autocommit=True)  # opened before the fill, too
                checkpoints = watch.execute(CHECKPOINTS).fetchone()
                with psycopg.connect(c, autocommit=True) as session:
                    fill(fs / "filler", leave=1 << 20)
                    for _ in range(40):
                        session.execute(
                            "SELECT pg_logical_emit_message(false, 'neon', repeat('y', 200000))"
                        )
                        if node_wal(neon).get("ingest") == "stalled":
                            break
                        time.sleep(0.2)
                wal = node_wal(neon)
                assert wal["ingest"] == "stalled", wal
                assert "No space left on device" in str(wal["error"]), wal
                assert "ingest stalled" in neon.run("pg", "list").stdout

                for args in (
                    ("pg", "list"),
                    ("pg", "show", "pgdata1"),
                    ("snapshot", "create", "pgdata1@during"),
                    ("snapshot", "list"),
                    ("pitr", "list"),
                    ("storage", "show", "small"),
                ):
                    one_line_answer(neon, *args)
                error = one_line_answer(neon, "snapshot", "create", "pgdata1@during").stderr
                assert "No space left on device" in error, error
                # Refused before the server was asked for a CHECKPOINT: on a full disk one may take
                # it down (CheckPointReplicationOrigin PANICs when it cannot write its file).
                assert watch.execute(CHECKPOINTS).fetchone() == checkpoints
                watch.close()
                # A command that writes to the full filesystem says where, not "internal error".
                # Whatever the stalled archive left free is taken first: how much that is depends
                # on where its last write stopped.
                take_the_rest(fs / "filler-rest")
                error = one_line_answer(neon, "pitr", "create", "more", "--pg", "pgdata1").stderr
                assert "No space left on device writing" in error and str(fs) in error, error

                # Space returns: ingest catches up by itself, from the WAL the slot kept.
                subprocess.run(["mount", "-o", "remount,size=512m", str(fs)], check=True)
                server = parse_lsn(psql(c, "SELECT pg_current_wal_flush_lsn()"))
                wait_until(
                    "ingest to resume",
                    lambda: (
                        (w := node_wal(neon))["ingest"] == "ok"
                        and parse_lsn(str(w["decoded_lsn"])) >= server
                    ),
                )
                neon.run("snapshot", "create", "pgdata1@after")
                neon.run(
                    "pitr", "extract-snapshot", "area", "--lsn", format_lsn(fill_lsn), "--as", "old"
                )
                ro = neon.run("snapshot", "start", "pgdata1@old").stdout.strip()
                try:
                    assert psql(ro, CHECKSUM) == before_fill
                finally:
                    neon.run("snapshot", "stop", "pgdata1@old")
            finally:
                neon.cleanup()  # the node's server, before its filesystem goes (also on failure)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_read_only_home_serves_read_only_commands(neon: NeonCli) -> None:
    neon.run("pg", "create", "--port", str(free_port()))
    neon.run("pitr", "create", "area", "--pg", "pgdata1")
    neon.run("snapshot", "create", "pgdata1@s1")
    neon.run("pg", "stop", "pgdata1")  # its server would write its data directory
    with mounted(["--bind", str(neon.home)], neon.home):
        subprocess.run(["mount", "-o", "remount,bind,ro", str(neon.home)], check=True)
        assert "primary1" in neon.run("pg", "list").stdout
        assert "primary1" in neon.run("pg", "show", "pgdata1").stdout
        assert "pgdata1@s1" in neon.run("snapshot", "list").stdout
        assert "area" in neon.run("pitr", "list").stdout
        assert "local" in neon.run("storage", "list").stdout
        neon.run("storage", "show", "local")
        line = neon.fail("pg", "create")
        assert "read-only" in line and str(neon.home) in line, line


def test_full_home_says_so_in_one_line_and_changes_nothing() -> None:
    base = pg_reachable_tmpdir("neon-fullhome-")
    try:
        with mounted(["-t", "tmpfs", "-o", "size=8m,mode=0711", "tmpfs"], base) as fs:
            neon = NeonCli(fs / "home", {})
            neon.run("storage", "list")
            fill(fs / "filler", leave=0)
            attach = ("storage", "attach", "-t", "s3", "-n", "b", "-c", "bucket=my-bucket")
            line = one_line_answer(neon, *attach).stderr
            assert "No space left" in line or "full" in line, line
            assert str(fs) in line, line
            assert "b" not in [s["name"] for s in neon.json("storage", "list")]
            subprocess.run(["mount", "-o", "remount,size=64m", str(fs)], check=True)
            neon.run(*attach)
            assert "b" in [s["name"] for s in neon.json("storage", "list")]
    finally:
        shutil.rmtree(base, ignore_errors=True)
