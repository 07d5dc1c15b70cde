"""Runs the real `neon` command against a private NEON_HOME, and cleans up after it."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli.home import NeonHome
from cli.launch import WARM_ENV
from cli.pgbin import pg_binary
from cli.transport.ssh import stop_kept_connections
from pageserver.pid_file import pid_alive
from tests.pgtest import free_port as free_port  # re-exported: tests import it from here
from tests.pgtest import pg_reachable_tmpdir, pgport_base

NEON = str(Path(sys.executable).with_name("neon"))


@dataclass
class NeonCli:
    home: Path
    env_extra: dict[str, str]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["NEON_HOME"] = str(self.home)
        env["PGPORT"] = str(pgport_base())  # nodes created without --port search from it
        env.update(self.env_extra)
        return env

    def run(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        with subprocess.Popen(
            [NEON, *args],
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(),
        ) as child:
            try:
                out, err = child.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                raise AssertionError(
                    f"neon {' '.join(args)} still running after {timeout:g} s\n"
                    + self.where_stuck(child)
                ) from None
        proc = subprocess.CompletedProcess(child.args, child.returncode, out, err)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"neon {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def where_stuck(self, child: subprocess.Popen[str]) -> str:
        """A command that does not end: the stacks of its threads and of the pageserver's,
        its output and the pageserver's log's tail; the command is killed. Also kept in a
        file named in the message (the home is removed, and a run's output is often read
        by its tail only: a rare hang's stacks were lost that way)."""
        pageserver = self.dump_stacks([child.pid])
        child.kill()
        out, err = child.communicate()
        report = f"its stdout:\n{out}\nits stderr:\n{err}\n{pageserver}"
        kept = Path(tempfile.mkdtemp(prefix="neon-stuck-")) / "where_stuck.txt"
        kept.write_text(f"{child.args!r}\n{report}")
        return f"(kept in {kept})\n{report}"

    def dump_stacks(self, pids: list[int]) -> str:
        """Make `pids` (`neon` commands: their stderr) and this home's pageserver (its
        pageserver.stderr) dump every thread's stack (SIGUSR1: faulthandler, they go on);
        the tails of the pageserver's stderr and log."""
        pageserver = self.home / "pageserver"
        with contextlib.suppress(OSError, ValueError):
            pids = [*pids, int((pageserver / "pageserver.pid").read_text())]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        time.sleep(2)
        parts = []
        for name in ("pageserver.stderr", "pageserver.log"):
            with contextlib.suppress(OSError):
                parts.append(f"{name}:\n{(pageserver / name).read_text()[-30_000:]}")
        return "\n".join(parts)

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "--json").stdout)

    def fail(self, *args: str) -> str:
        """Run a command that must fail; return its single stderr line."""
        proc = self.run(*args, check=False)
        assert proc.returncode != 0, f"neon {' '.join(args)} unexpectedly succeeded"
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, f"expected one error line, got: {proc.stderr!r}"
        assert lines[0].startswith("neon: error: "), lines[0]
        assert "Traceback" not in proc.stderr
        return lines[0]

    def cleanup(self) -> None:
        """Stop every node and the pageserver of this home, by PID, and the ssh connections
        its commands kept open (`ssh -O exit`)."""
        stop_kept_connections(NeonHome(self.home))
        with contextlib.suppress(Exception):
            for node in self.json("pg", "list"):
                if node["pid"]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(node["pid"], signal.SIGQUIT)
        pidfile = self.home / "pageserver" / "pageserver.pid"
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            os.kill(pid, signal.SIGTERM)
            # Until it has exited: a zombie counts as gone (the daemon is init's child here,
            # and this box's init reaps it ~1.5 s later: a second and a half of every
            # teardown, ~270 s of the suite's, went to waiting for that).
            for _ in range(100):
                if not pid_alive(pid):
                    return
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)


def wait_gone(pid: int, timeout: float = 10) -> None:
    """Until process `pid` has exited (a zombie counts as gone: this box's init reaps late)."""
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"pid {pid} still alive after {timeout} s")
        time.sleep(0.05)


def psql(connstr: str, sql: str, dbname: str | None = None, timeout: float = 300) -> str:
    """Run SQL (from stdin, ON_ERROR_STOP) over a connection string; the unaligned output."""
    if dbname:
        connstr = connstr.replace("dbname=postgres", f"dbname={dbname}")
    proc = subprocess.run(
        [pg_binary("psql"), connstr, "-X", "-qAt", "-v", "ON_ERROR_STOP=1"],
        input=sql,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def pgbench(connstr: str, *args: str) -> None:
    proc = subprocess.run(
        [pg_binary("pgbench"), *args, connstr], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr


def run_on_tty(neon: NeonCli, *args: str) -> tuple[int, str]:
    """Run neon with its stderr on a pseudo-terminal; its exit code and what it showed there."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([NEON, *args], env=neon.env(), stderr=slave, stdout=subprocess.PIPE)
    os.close(slave)
    shown = b""
    with contextlib.suppress(OSError):  # EIO once the child closed the terminal
        while chunk := os.read(master, 4096):
            shown += chunk
    os.close(master)
    return proc.wait(timeout=120), shown.decode(errors="replace")


def kill_when(neon: NeonCli, caught: Callable[[], bool], *args: str, timeout: float = 120) -> None:
    """Run `neon ARGS` and SIGKILL it as soon as `caught()` holds: a crash at that step. It
    must not have ended first; it is killed and reaped whatever happens.

    Run cold (WARM_ENV=0): a warm command runs in a child of the home's warm server, which
    kills it only once it sees its launcher gone (cli/warm_server.py), so on a loaded box it
    went on for a while after the launcher's SIGKILL: a push cut at 8 of 18 MB finished its
    upload, and the receiver kept nothing for the push run again (the CI run at 2edaed8).
    tests/e2e/test_warm_commands.py tests that warm kill itself."""
    env = {**neon.env(), WARM_ENV: "0"}
    proc = subprocess.Popen(
        [NEON, *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + timeout
        while not caught():
            assert proc.poll() is None, f"neon {' '.join(args)} ended before it was caught"
            assert time.monotonic() < deadline
            time.sleep(0.0005)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"neon {' '.join(args)} ended before the kill"


def neon_home() -> Generator[NeonCli, None, None]:
    """The real `neon` CLI on a private NEON_HOME (a fixture body); nodes and daemon are
    stopped and the home removed afterwards.

    The home is not under tmp_path: pytest keeps its directories 0700 (and a concurrent
    session resets them), while PostgreSQL's OS user must enter the home's parents.
    """
    base = pg_reachable_tmpdir("neon-home-")
    cli = NeonCli(base / "home", {})
    try:
        yield cli
    finally:
        cli.cleanup()
        shutil.rmtree(base, ignore_errors=True)
