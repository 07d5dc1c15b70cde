"""Small helpers shared by the benchmarks: throwaway servers, timing, child CPU, formatting.

Benchmarks are run by hand (`python -m bench.<name>`), never by CI. Each prints a human table
and, last, one JSON line (`json_line`) so results can be collected by a script.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.pgtest import PASSWORD, SUPERUSER, PgTestCluster, PgTestServer

MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- throwaway servers -----------------------------------------------------------------------


@contextlib.contextmanager
def throwaway_cluster(keep: bool = False, prefix: str = "neon-bench-") -> Iterator[PgTestCluster]:
    """A PgTestCluster in a fresh temp dir; every server stopped by PID, the dir removed.

    With `keep`, the directory (data dirs, logs, archives) is left for inspection.
    """
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o711)
    cluster = PgTestCluster(base)
    try:
        yield cluster
    finally:
        cluster.stop_all()
        if keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


def conn_args(server: PgTestServer) -> list[str]:
    """libpq command-line arguments for a TCP (loopback) connection as the test superuser."""
    return ["-h", "127.0.0.1", "-p", str(server.port), "-U", SUPERUSER, "-w"]


def password_env() -> dict[str, str]:
    return {"PGPASSWORD": PASSWORD}


# -- timing ------------------------------------------------------------------------------------


@dataclass
class Measure:
    """Wall time and this process's CPU time (all threads) over a `with` block."""

    wall: float = 0.0
    user: float = 0.0
    sys: float = 0.0

    @property
    def cpu(self) -> float:
        return self.user + self.sys


@contextlib.contextmanager
def measure() -> Iterator[Measure]:
    m = Measure()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    try:
        yield m
    finally:
        m.wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        m.user = r1.ru_utime - r0.ru_utime
        m.sys = r1.ru_stime - r0.ru_stime


@dataclass(frozen=True)
class ChildRun:
    returncode: int
    wall: float
    user: float
    sys: float
    stdout: str
    stderr: str

    @property
    def cpu(self) -> float:
        return self.user + self.sys


def run_child_timed(
    cmd: Sequence[str],
    popen_kwargs: Mapping[str, Any] | None = None,
    timeout: float = 3600,
    done: Callable[[], bool] | None = None,
) -> ChildRun:
    """Run a command; its wall time and exact CPU time (wait4's rusage).

    Without `done`, until it exits. With `done` (polled every 10 ms), the wall time ends when
    `done()` is first true; the child is then sent SIGINT and reaped (its CPU time includes
    that short exit).
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        t_done: float | None = None
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, **(popen_kwargs or {}))
        deadline = t0 + timeout
        try:
            while True:
                pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if t_done is None and done is not None and done():
                    t_done = time.perf_counter()
                    proc.send_signal(signal.SIGINT)  # by its PID
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"{cmd[0]} did not finish within {timeout}s")
                time.sleep(0.01)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # by its PID
            proc.wait()
            raise
        wall = (t_done or time.perf_counter()) - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return ChildRun(
            proc.returncode,
            wall,
            ru.ru_utime,
            ru.ru_stime,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def proc_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) a running process has used so far, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


# -- formatting --------------------------------------------------------------------------------


def mib(nbytes: float) -> float:
    return nbytes / MIB


def mib_per_s(nbytes: float, seconds: float) -> float:
    return mib(nbytes) / seconds if seconds > 0 else float("inf")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain aligned text table; floats get 3 significant decimals."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
        if isinstance(v, int):
            return f"{v:,}"
        return str(v)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in text:
        print(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )


def machine_info() -> dict[str, Any]:
    """What else the machine was doing: results on a shared box are only indicative."""
    load1, load5, _ = os.getloadavg()
    return {"cpus": os.cpu_count(), "loadavg_1m": round(load1, 2), "loadavg_5m": round(load5, 2)}


def json_line(bench: str, results: Mapping[str, Any]) -> None:
    """The machine-readable result: one line, `{"bench": ..., ...}`, printed last."""
    print(json.dumps({"bench": bench, **results}, sort_keys=False), flush=True)
