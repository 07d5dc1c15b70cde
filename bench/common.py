"""Helpers shared by the benchmarks: throwaway servers, pgbench WAL, pg_receivewal, timing,
child CPU, formatting.

Benchmarks are run by hand (`python -m bench.<name>`), never by CI. Each prints a human table
and, last, one JSON line (`json_line`) so results can be collected by a script.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
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

from cli.pgbin import pg_binary, popen_kwargs
from datadir_files.pg_account import make_pg_dir
from pg15.lsn import format_lsn, parse_lsn, segment_file_name
from tests.pgtest import PASSWORD, SUPERUSER, PgTestCluster, PgTestServer

MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")
REF_SLOT = "bench_pgrecv"


def say(msg: str) -> None:
    """Progress, timestamped, to stderr (stdout is for the table and the JSON line)."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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


def process_cpu(pid: int | None) -> tuple[float, float]:
    """(user, sys) CPU seconds a live process has used so far (0, 0 if it is gone)."""
    if pid is None:
        return 0.0, 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick  # utime, stime


def vm_hwm_kib(pid: int | str = "self") -> int:
    """Peak resident set size (VmHWM) of a live process since it started or since
    `reset_peak` (0 if it is gone): the pageserver's, or this process's where the bench runs
    the page store in-process."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak() -> None:
    """Reset this process's VmHWM (Linux: clear_refs 5): the next reading covers what follows."""
    Path("/proc/self/clear_refs").write_text("5")


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


def percentile(values: Sequence[float], pct: float) -> float:
    """The `pct` percentile (0-100) of `values`, nearest rank; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[min(len(ordered), int(rank)) - 1]


def tree_bytes(root: Path) -> tuple[int, int]:
    """(total bytes, file count) of the regular files under `root`."""
    total = files = 0
    for path in root.rglob("*"):
        if path.is_file():
            total += path.stat().st_size
            files += 1
    return total, files


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


def print_machine(results: Mapping[str, Any]) -> None:
    """The machine_info() taken before and after a run (results' machine_before/_after)."""
    before, after = results["machine_before"], results["machine_after"]
    print(f"machine: {before} -> {after} (a shared box: numbers are indicative)")


def json_line(bench: str, results: Mapping[str, Any]) -> None:
    """The machine-readable result: one line, `{"bench": ..., ...}`, printed last."""
    print(json.dumps({"bench": bench, **results}, sort_keys=False), flush=True)


# -- the source server: LSNs, slots, pgbench WAL -----------------------------------------------


def current_lsn(server: PgTestServer, fn: str = "pg_current_wal_lsn") -> int:
    return parse_lsn(server.psql(f"SELECT {fn}()"))


def restart_lsn(server: PgTestServer, slot: str) -> int:
    return parse_lsn(
        server.psql(f"SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'")
    )


def create_slot(server: PgTestServer, slot: str) -> None:
    """A physical slot that reserves WAL from now on."""
    server.psql(f"SELECT pg_create_physical_replication_slot('{slot}', true)")


def wal_segment_size(server: PgTestServer) -> int:
    return int(server.psql("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'"))


def pgbench_args(clients: int, seconds: int) -> list[str]:
    return ["-n", "-M", "prepared", "-c", str(clients), "-j", "2", "-T", str(seconds)]


def tps_of(pgbench_output: str) -> float:
    m = re.search(r"tps = ([0-9.]+)", pgbench_output)
    return float(m.group(1)) if m else 0.0


def pgbench_scale(wal_mib: int) -> int:
    """A pgbench scale that suits a WAL volume: 1 per 50 MiB, between 1 and 50."""
    return max(1, min(50, wal_mib // 50))


def pgbench_init(server: PgTestServer, scale: int) -> None:
    say(f"pgbench -i -s {scale}")
    server.run("pgbench", "-i", "-q", "-s", str(scale), "postgres")


def pgbench_rounds(server: PgTestServer, start: int, target: int) -> int:
    """Rounds of `pgbench -c 4 -T 10`, each followed by a CHECKPOINT (so the WAL holds
    full-page images like a real one), until the insert position reaches `target`."""
    rounds = 0
    while (lsn := current_lsn(server)) < target:
        done, total = mib(lsn - start), mib(target - start)
        say(f"WAL {done:.0f} / {total:.0f} MiB: pgbench round {rounds + 1}")
        server.run("pgbench", *pgbench_args(4, 10), "postgres")
        server.psql("CHECKPOINT")
        rounds += 1
    return rounds


def switch_wal(server: PgTestServer, segment_size: int) -> int:
    """pg_switch_wal(); returns the segment boundary where the switched segment ends."""
    switched = parse_lsn(server.psql("SELECT pg_switch_wal()"))
    return -(-switched // segment_size) * segment_size


@dataclass
class Backlog:
    segment_size: int
    start_lsn: int  # before pgbench -i
    end_lsn: int  # a segment boundary, just after pg_switch_wal()
    init_end_lsn: int  # after pgbench -i: pgbench's tables exist from here on
    scale: int
    rounds: int
    seconds: float


def generate_backlog(server: PgTestServer, backlog_mib: int) -> Backlog:
    """pgbench init, then rounds with a CHECKPOINT after each until `backlog_mib` of WAL
    exist; pg_switch_wal(), so the backlog ends at a segment boundary."""
    seg = wal_segment_size(server)
    start = current_lsn(server)
    scale = pgbench_scale(backlog_mib)
    t0 = time.perf_counter()
    pgbench_init(server, scale)
    init_end = current_lsn(server)
    rounds = pgbench_rounds(server, start, start + backlog_mib * MIB)
    end = switch_wal(server, seg)
    seconds = time.perf_counter() - t0
    say(f"backlog {mib(end - start):.0f} MiB ({format_lsn(start)}..{format_lsn(end)})")
    return Backlog(seg, start, end, init_end, scale, rounds, seconds)


# -- reference: pg_receivewal ------------------------------------------------------------------


def run_pg_receivewal(
    server: PgTestServer, outdir: Path, end_lsn: int, segment_size: int, slot: str = REF_SLOT
) -> ChildRun:
    """pg_receivewal from `slot` until the segment ending at `end_lsn` is complete (fsynced
    and renamed), with its default durability (fsync per segment, no --synchronous).

    --endpos at a segment boundary makes pg_receivewal wait for the next WAL message past it
    (on an idle server, up to the bgwriter's 15 s snapshot record), so the clock stops when
    the last segment appears under its final name, and the child is then stopped by SIGINT.
    """
    make_pg_dir(outdir)  # it runs as the PostgreSQL account when we are root
    last = outdir / segment_file_name(1, (end_lsn - 1) // segment_size, segment_size)
    cmd = [
        pg_binary("pg_receivewal"),
        "-D", str(outdir),
        "--slot", slot,
        "--endpos", format_lsn(end_lsn),
        "--no-loop",
        *conn_args(server),
    ]  # fmt: skip
    run = run_child_timed(cmd, popen_kwargs(password_env()), done=last.exists)
    if run.returncode not in (0, 130, -2) or not last.exists():
        raise RuntimeError(f"pg_receivewal failed ({run.returncode}): {run.stderr.strip()}")
    return run


def run_benchmark(name: str, run: Callable[[Any], dict[str, Any]], args: Any) -> int:
    """The end of every benchmark's main(): run it so that Ctrl-C and SIGTERM unwind through
    the finally blocks that stop what it started (SIGINT too when started from a
    non-interactive shell, which ignores it for us), then print the JSON line."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        results = run(args)
    except KeyboardInterrupt:
        print("interrupted; everything stopped", file=sys.stderr)
        return 130
    json_line(name, results)
    return 0
