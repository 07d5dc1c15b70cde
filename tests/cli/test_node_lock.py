"""Per-node command locks: the lock itself (waiting, its message, the bounded wait, release when
the holder dies) and two real `neon pg checkout` commands started together on one node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cli.home import NeonHome
from cli.node_lock import node_lock
from proto.errors import Conflict
from tests.neoncli import NEON, NeonCli, free_port, psql


def test_a_second_holder_waits_says_for_what_and_gives_up_after_the_bound(tmp_path: Path) -> None:
    home = NeonHome(tmp_path)
    said: list[str] = []
    with node_lock(home, "primary1", "pg checkout"):
        started = time.monotonic()
        with (
            pytest.raises(Conflict) as failed,
            node_lock(home, "primary1", "pg start", wait=0.3, notify=said.append),
        ):
            pass
        assert time.monotonic() - started >= 0.3
    pid = os.getpid()
    assert said == [f"waiting for `pg checkout` on primary1 (pid {pid}) to finish..."]
    assert str(failed.value) == (
        f"`pg checkout` on primary1 (pid {pid}) is still running after 0.3 s; "
        "try again once it has finished"
    )
    # Other nodes are independent, and the lock is free again once released.
    with node_lock(home, "primary2", "pg start"), node_lock(home, "primary1", "pg stop"):
        pass
    assert oct((tmp_path / "locks").stat().st_mode & 0o777) == "0o700"


def test_the_waiter_proceeds_when_the_holder_finishes_or_is_killed(tmp_path: Path) -> None:
    home = NeonHome(tmp_path)
    order: list[str] = []

    def hold() -> None:
        with node_lock(home, "primary1", "pg checkout"):
            order.append("holder in")
            time.sleep(0.5)
            order.append("holder out")

    holder = threading.Thread(target=hold)
    holder.start()
    while not order:
        time.sleep(0.01)
    with node_lock(home, "primary1", "pg start", notify=lambda _m: None):
        order.append("waiter in")
    holder.join()
    assert order == ["holder in", "holder out", "waiter in"]

    # A holder killed with SIGKILL never leaves the node locked.
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from cli.home import NeonHome\n"
        "from cli.node_lock import node_lock\n"
        "with node_lock(NeonHome(Path(sys.argv[1])), 'primary1', 'pg checkout'):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "locked\n"
        said: list[str] = []
        killer = threading.Timer(0.3, os.kill, (child.pid, signal.SIGKILL))
        killer.start()
        with node_lock(home, "primary1", "pg start", wait=30, notify=said.append):
            pass
        assert said == [f"waiting for `pg checkout` on primary1 (pid {child.pid}) to finish..."]
    finally:
        child.kill()
        child.wait()


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_two_checkouts_started_together_end_in_one_state(neon: NeonCli, tmp_path: Path) -> None:
    neon.run("pg", "create", "--port", str(free_port()))
    c = neon.json("pg", "show", "pgdata1")["connstr"]
    psql(c, "CREATE TABLE t AS SELECT generate_series(1, 100) a")
    neon.run("snapshot", "create", "pgdata1@sA")
    psql(c, "INSERT INTO t SELECT generate_series(1, 100)")
    neon.run("snapshot", "create", "pgdata1@sB")
    psql(c, "INSERT INTO t SELECT generate_series(1, 100)")
    rows = {"sA": "100", "sB": "200"}

    # The second starts while the first holds the lock, whatever the speed of either: the
    # first is stopped (SIGSTOP) once the lock file names it, until the second says it waits
    # (a fixed delay between the two let a fast first checkout end before the second began).
    lock_file = neon.home / "locks" / "primary1.lock"
    stderr = {tag: tmp_path / f"{tag}.stderr" for tag in ("sA", "sB")}
    procs: dict[str, subprocess.Popen[str]] = {}

    def start(tag: str) -> None:
        with open(stderr[tag], "w") as err:
            procs[tag] = subprocess.Popen(
                [NEON, "pg", "checkout", f"pgdata1@{tag}"],
                env=neon.env(), stdout=subprocess.PIPE, stderr=err, text=True,
            )  # fmt: skip

    def holder() -> int | None:
        try:
            return int(json.loads(lock_file.read_bytes())["pid"])
        except (OSError, ValueError, KeyError):
            return None

    earlier = holder()  # the lock file stays, naming the last command that held it
    start("sA")
    _wait_for(lambda: holder() not in (None, earlier), "the first checkout to hold the lock")
    # The holder is the command's process: `neon` itself, or the child the home's warm
    # command server forked for it (cli/warm_server.py), whose stop is what stops the command.
    stopped = holder()
    assert stopped is not None
    os.kill(stopped, signal.SIGSTOP)
    try:
        start("sB")
        _wait_for(lambda: "waiting for" in stderr["sB"].read_text(), "the second to wait")
    finally:
        os.kill(stopped, signal.SIGCONT)
    stdout = {tag: p.communicate(timeout=300)[0] for tag, p in procs.items()}
    out = {tag: (stdout[tag], stderr[tag].read_text()) for tag in procs}
    for tag, p in procs.items():
        assert p.returncode == 0, out[tag]
        assert "Traceback" not in out[tag][1]
    waited = [tag for tag in out if "waiting for `pg checkout` on primary1 (pid" in out[tag][1]]
    assert len(waited) == 1, out
    (second,) = waited
    (first,) = set(out) - {second}
    assert out[second][1].strip().endswith("to finish...")
    # The node ends in the state of the checkout that ran second ...
    assert psql(c, "SELECT count(*) FROM t") == rows[second]
    # ... and each checkout named the state it replaced, in order: HEAD{0} is the state before
    # both, HEAD{1} the first checkout's.
    names = [s["name"] for s in neon.json("snapshot", "list")]
    assert names == [
        "pgdata1@sA",
        "pgdata1@sB",
        "pgdata1@HEAD{0}",
        "pgdata1@HEAD{1}",
        "pgdata1@CURRENT",
    ]
    for head, expected in (("HEAD{0}", "300"), ("HEAD{1}", rows[first])):
        ro = neon.run("snapshot", "start", f"pgdata1@{head}").stdout.strip()
        try:
            assert psql(ro, "SELECT count(*) FROM t") == expected
        finally:
            neon.run("snapshot", "stop", f"pgdata1@{head}")
