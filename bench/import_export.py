"""Import/export benchmark (issue 11): `neon snapshot import|export` against pg_basebackup.

    .venv/bin/python -m bench.import_export [--db-gib 1] [--rounds 2] [--seed 1] [--keep]
                                            [--py-spy DIR]

1. One throwaway PostgreSQL 15 server (fsync off, autovacuum off), `pgbench -i` at 70 scale
   units per --db-gib, then CHECKPOINT. Nothing writes to it afterwards, so every backup and
   import is of the same state. The database size (sum of pg_database_size) is the numerator
   of every throughput: the work asked for is the same on both sides.
2. A private neon home (tests/neoncli.py's NeonCli: the real `neon` CLI, NEON_HOME in the
   temp dir). Its pageserver is stopped and started again, untimed, before each of our timed
   commands, so the daemon's VmHWM (peak RSS, /proc/PID/status, read right after the
   command) covers that command alone; its child processes (redo workers) are read too.
3. Import, --rounds rounds, the order alternating (--seed picks the side that goes first in
   round 1); the best (shortest) wall time of each side is compared:
   - ours: `neon snapshot import --from basebackup://USER:PASS@127.0.0.1:PORT/ benchN`
     (BASE_BACKUP over our replication client, unpacked, recovered by a temporary stock
     PostgreSQL, imported into image layers by the daemon);
   - pg_basebackup: `pg_basebackup -D DIR -X stream -c fast` (same server, same user).
4. Export of `bench1`, rounds alternating the same way:
   - ours: `neon snapshot export bench1 --format neon -o FILE` (tar from the page store,
     zstd frames at snapfile's level, 2, fsynced);
   - pg_basebackup: `pg_basebackup -D - -F tar -X none -c fast | zstd -q -3 -o FILE2`
     (two processes over a pipe, the real zstd binary at its default level, 3, as issue 11
     names it: `| zstd`; one thread). Both output sizes are printed.
   The sizes of both outputs are printed.
5. Peak RSS (VmHWM, /proc/PID/status): of our CLI child (sampled every 5 ms while it runs;
   see `run_timed`), of the pageserver daemon and of its child processes. The temporary
   PostgreSQL that recovers an import is stock PostgreSQL, not ours, and is not counted
   (neither are pg_ctl and other short helpers the CLI runs). pg_basebackup's and zstd's
   peaks are shown for comparison.

Goals (issue 11): import >= 0.8x and export >= 1.0x pg_basebackup's throughput, RSS of our
processes < 200 MiB. `os.sync()` runs before every timed command so earlier writes are not
flushed inside it. Prints a table and, last, one JSON line. Run by hand, never by CI.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from bench.common import (
    machine_info,
    mib,
    mib_per_s,
    password_env,
    pgbench_init,
    print_machine,
    print_table,
    process_cpu,
    run_benchmark,
    say,
    throwaway_cluster,
    tree_bytes,
    vm_hwm_kib,
)
from bench.pyspy import recording, summary, wrapped
from cli.pgbin import pg_binary, popen_kwargs
from datadir_files.pg_account import make_pg_dir
from snapfile.writer import DEFAULT_LEVEL
from tests.neoncli import NEON, NeonCli
from tests.pgtest import PASSWORD, SUPERUSER, PgTestServer

BENCH = "import_export"
SCALE_PER_GIB = 70  # pgbench: ~15 MiB of tables and indexes per scale unit (as bench.extract)
RSS_GOAL_MIB = 200
IMPORT_GOAL = 0.8  # ours / pg_basebackup throughput
EXPORT_GOAL = 1.0
REFERENCE_LEVEL = 3
"""zstd's default level: the reference the issues name is `pg_basebackup ... | zstd`. (Ours,
snapfile's DEFAULT_LEVEL, was 3 too until format version 2 of the `.neon` file.)"""


def server_settings() -> dict[str, object]:
    return {
        "fsync": "off",
        "autovacuum": "off",  # nothing writes during the measurements
        "shared_buffers": "256MB",
        "max_wal_size": "16GB",
        "checkpoint_timeout": "1h",
    }


def compiled_python(prefix: Path) -> dict[str, str]:
    """Environment for our CLI and daemon that lets Python cache compiled modules (in a
    private directory, not the source tree), as an installed package has them: with
    PYTHONDONTWRITEBYTECODE set, every `neon` command compiles ~150 modules first (~1 s)."""
    return {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(prefix)}


def database_bytes(server: PgTestServer) -> int:
    return int(server.psql("SELECT sum(pg_database_size(oid)) FROM pg_database"))


# -- timed children ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timed:
    """One timed command (or pipeline): wall time, CPU and peak RSS of each process."""

    wall: float
    cpu: float
    maxrss_kib: tuple[int, ...]  # per process of the pipeline: its VmHWM, last seen
    stdout: str


def run_timed(
    cmds: Sequence[Sequence[str]], kwargs: Sequence[Mapping[str, Any]], timeout: float = 7200
) -> Timed:
    """Run `cmds` as a pipeline (each one's stdout into the next's stdin, the last one's
    stdout captured) after `os.sync()`; the wall time until every process is reaped.

    Peak RSS is each process's VmHWM, sampled every 5 ms until it exits (a high-water mark:
    only a peak in its last 5 ms can be missed). wait4's ru_maxrss cannot serve: Linux
    carries the forking process's peak RSS (this Python's) into the child across exec."""
    os.sync()
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as files:
        errs = [files.enter_context(tempfile.TemporaryFile()) for _ in cmds]
        out = files.enter_context(tempfile.TemporaryFile())
        try:
            return _run_pipeline(cmds, kwargs, timeout, procs, errs, out)
        finally:
            for proc in procs:
                stop_child(proc)


def stop_child(proc: subprocess.Popen[bytes]) -> None:
    """Stop an unfinished child by its PID: SIGINT first (an interrupted `neon snapshot
    import` then stops its temporary PostgreSQL), SIGKILL if it is still there after 30 s."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _run_pipeline(
    cmds: Sequence[Sequence[str]],
    kwargs: Sequence[Mapping[str, Any]],
    timeout: float,
    procs: list[subprocess.Popen[bytes]],
    errs: Sequence[IO[bytes]],
    out: IO[bytes],
) -> Timed:
    """The body of `run_timed`: start the processes into `procs` (killed by the caller if
    anything fails), reap them all with their rusage."""
    t0 = time.perf_counter()
    stdin: Any = subprocess.DEVNULL
    for i, (cmd, kw) in enumerate(zip(cmds, kwargs, strict=True)):
        last = i == len(cmds) - 1
        proc = subprocess.Popen(
            list(cmd),
            stdin=stdin,
            stdout=out if last else subprocess.PIPE,
            stderr=errs[i],
            **kw,
        )
        if proc.stdout is not None:
            stdin = proc.stdout
        procs.append(proc)
    for proc in procs[:-1]:
        assert proc.stdout is not None
        proc.stdout.close()  # the next process holds it: a SIGPIPE reaches the writer
    deadline = t0 + timeout
    results: dict[int, tuple[int, Any]] = {}
    hwm = [0] * len(procs)
    while len(results) < len(procs):
        for i, proc in enumerate(procs):
            if proc.pid in results:
                continue
            hwm[i] = max(hwm[i], vm_hwm_kib(proc.pid))  # gone once it is a zombie
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                results[pid] = (os.waitstatus_to_exitcode(status), ru)
                proc.returncode = results[pid][0]
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{cmds[0][0]} did not finish within {timeout}s")
        time.sleep(0.005)
    wall = time.perf_counter() - t0
    for i, proc in enumerate(procs):
        code = results[proc.pid][0]
        if code != 0:
            errs[i].seek(0)
            text = errs[i].read().decode(errors="replace").strip()
            raise RuntimeError(f"{' '.join(cmds[i][:3])} ... failed ({code}): {text}")
    out.seek(0)
    rusages = [results[p.pid][1] for p in procs]
    return Timed(
        wall,
        sum(ru.ru_utime + ru.ru_stime for ru in rusages),
        tuple(hwm),
        out.read().decode(errors="replace"),
    )


# -- the pageserver daemon's peak RSS -------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Live descendants of `pid` (from every process's parent in /proc)."""
    parent_of: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent_of[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        children = [p for p, ppid in parent_of.items() if ppid == current]
        found.extend(children)
        frontier.extend(children)
    return found


@dataclass(frozen=True, slots=True)
class Daemon:
    pid: int
    start_hwm_kib: int  # VmHWM once started and idle
    start_cpu: float
    warm_server: int | None = None  # its warm command server (cli/warm_server.py)


def restart_pageserver(neon: NeonCli) -> Daemon:
    """A fresh daemon (untimed), so its VmHWM covers the next command only; and, unless
    NEON_WARM=0, its warm command server once it serves (its start is not the command's)."""
    neon.run("pageserver", "stop")
    neon.run("pageserver", "start")
    pid = int(neon.json("pageserver", "status")["pid"])
    server = None if neon.env().get("NEON_WARM") == "0" else warm_server(neon, pid)
    return Daemon(pid, vm_hwm_kib(pid), sum(process_cpu(pid)), server)


def warm_server(neon: NeonCli, daemon: int, timeout: float = 60.0) -> int:
    """The pid of the daemon's warm command server, once it listens."""
    from cli.launch import SOCKET_NAME

    deadline = time.monotonic() + timeout
    while True:
        for child in descendants(daemon):
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
                if (
                    b"cli.warm_server" in cmdline
                    and (neon.home / "pageserver" / SOCKET_NAME).exists()
                ):
                    return child
        if time.monotonic() > deadline:
            raise RuntimeError(f"no warm command server beside pageserver {daemon}")
        time.sleep(0.05)


def reaped_cpu(pid: int | None) -> float:
    """CPU seconds of the children `pid` has reaped (a warm server's: its commands)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")  # cutime, cstime


@dataclass(frozen=True, slots=True)
class DaemonUse:
    idle_hwm_kib: int  # once started, before the command
    hwm_kib: int
    children_hwm_kib: int  # the largest VmHWM among its live child processes
    children: int
    cpu: float
    warm_command_cpu: float = 0.0  # a command run warm: its CPU, in the server's child


def daemon_use(daemon: Daemon) -> DaemonUse:
    kids = descendants(daemon.pid)
    return DaemonUse(
        daemon.start_hwm_kib,
        vm_hwm_kib(daemon.pid),
        max((vm_hwm_kib(p) for p in kids), default=0),
        len(kids),
        sum(process_cpu(daemon.pid)) - daemon.start_cpu,
        reaped_cpu(daemon.warm_server),
    )


# -- the two sides of each comparison ------------------------------------------------------------


@dataclass
class Side:
    """Every round of one side; the best round is the shortest."""

    runs: list[Timed] = field(default_factory=list)
    daemon: list[DaemonUse] = field(default_factory=list)
    out_bytes: list[int] = field(default_factory=list)

    @property
    def best(self) -> Timed:
        return min(self.runs, key=lambda r: r.wall)

    def summary(self, db_bytes: int) -> dict[str, Any]:
        best = self.best
        out: dict[str, Any] = {
            "best_wall_s": round(best.wall, 3),
            "walls_s": [round(r.wall, 3) for r in self.runs],
            "mib_per_s": round(mib_per_s(db_bytes, best.wall), 1),
            "cpu_s_best": round(best.cpu, 3),
            "maxrss_kib": [
                max(r.maxrss_kib[i] for r in self.runs) for i in range(len(best.maxrss_kib))
            ],
            "out_bytes": self.out_bytes,
        }
        if self.daemon:
            out["daemon_vmhwm_kib"] = max(d.hwm_kib for d in self.daemon)
            out["daemon_idle_vmhwm_kib"] = max(d.idle_hwm_kib for d in self.daemon)
            out["daemon_children_vmhwm_kib"] = max(d.children_hwm_kib for d in self.daemon)
            out["daemon_cpu_s"] = [round(d.cpu, 3) for d in self.daemon]
        return out


def alternate(
    rounds: int, ref_first: bool, ours: Callable[[int], None], ref: Callable[[int], None]
) -> list[str]:
    """Run both sides `rounds` times, the order swapped every round; the orders used."""
    order = []
    for r in range(rounds):
        pair = [("pg_basebackup", ref), ("ours", ours)]
        if (r % 2 == 0) != ref_first:
            pair.reverse()
        for _side, fn in pair:
            fn(r)
        order.append(" then ".join(name for name, _ in pair))
    return order


def profiled(
    profile: Path | None, step: str, daemon: Daemon, cmd: list[str], kw: dict[str, Any]
) -> Timed:
    """Our command, timed; with `profile`, it and the daemon sampled by py-spy into it
    (bench/pyspy.py: where the time goes; such a run's ratios mean little)."""
    if profile is None:
        return run_timed([cmd], [kw])
    with recording(daemon.pid, profile / f"{step}.pageserver.txt"):
        return run_timed([wrapped(cmd, profile / f"{step}.cli.txt")], [kw])


def neon_cmd(neon: NeonCli, *args: str) -> tuple[list[str], dict[str, Any]]:
    return [NEON, *args], {"env": neon.env()}


def pg_cmd(binary: str, server: PgTestServer, *args: str) -> tuple[list[str], dict[str, Any]]:
    """A PostgreSQL client binary over TCP as the test superuser (replication allowed)."""
    cmd = [
        pg_binary(binary), "-h", "127.0.0.1", "-p", str(server.port), "-U", SUPERUSER, "-w",
        *args,
    ]  # fmt: skip
    return cmd, popen_kwargs(password_env())


# -- main ----------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    zstd = shutil.which("zstd")
    if zstd is None:
        raise SystemExit(
            "bench.import_export: error: zstd not found; install it (apt-get install zstd)"
        )
    results: dict[str, Any] = {"machine_before": machine_info()}
    ref_first = random.Random(args.seed).random() < 0.5
    with throwaway_cluster(keep=args.keep, prefix="neon-bench-io-") as cluster:
        say("initdb of a throwaway PostgreSQL 15 server")
        server = cluster.create(server_settings())
        scale = max(1, round(args.db_gib * SCALE_PER_GIB))
        pgbench_init(server, scale)
        server.psql("CHECKPOINT")
        db_bytes = database_bytes(server)
        say(f"database {mib(db_bytes):.0f} MiB (pgbench scale {scale}); no writes from now on")
        work = cluster.base / "bench"
        make_pg_dir(work, 0o711)  # pg_basebackup runs as PostgreSQL's OS user and writes here
        neon = NeonCli(cluster.base / "home", compiled_python(cluster.base / "pycache"))
        url = f"basebackup://{SUPERUSER}:{PASSWORD}@127.0.0.1:{server.port}/"
        imp_ours, imp_ref, exp_ours, exp_ref = Side(), Side(), Side(), Side()
        try:
            neon.run("pageserver", "start")  # also fills the compiled-module cache
            help_cmd, help_kw = neon_cmd(neon, "--help")
            cli_start = run_timed([help_cmd], [help_kw])

            def import_ours(r: int) -> None:
                daemon = restart_pageserver(neon)
                name = f"bench{r + 1}"
                say(f"round {r + 1}: neon snapshot import --from basebackup://... {name}")
                cmd, kw = neon_cmd(neon, "snapshot", "import", "--from", url, name)
                imp_ours.runs.append(profiled(args.py_spy, f"import{r + 1}", daemon, cmd, kw))
                imp_ours.daemon.append(daemon_use(daemon))
                say(f"  {imp_ours.runs[-1].wall:.2f} s")
                sizes = {s["name"]: s["size_bytes"] for s in neon.json("snapshot", "list")}
                imp_ours.out_bytes.append(int(sizes[name]))  # the page history it keeps
                if r:  # bench1 is exported below; the others only take room
                    neon.run("snapshot", "destroy", name)

            def import_ref(r: int) -> None:
                target = work / f"ref-import-{r + 1}"
                say(f"round {r + 1}: pg_basebackup -D {target.name} -X stream -c fast")
                cmd, kw = pg_cmd(
                    "pg_basebackup", server, "-D", str(target), "-X", "stream", "-c", "fast"
                )
                imp_ref.runs.append(run_timed([cmd], [kw]))
                imp_ref.out_bytes.append(tree_bytes(target)[0])
                say(f"  {imp_ref.runs[-1].wall:.2f} s")
                shutil.rmtree(target, ignore_errors=True)

            import_order = alternate(args.rounds, ref_first, import_ours, import_ref)

            def export_ours(r: int) -> None:
                daemon = restart_pageserver(neon)
                path = work / f"ours-{r + 1}.neon"
                say(f"round {r + 1}: neon snapshot export bench1 --format neon -o {path.name}")
                cmd, kw = neon_cmd(
                    neon, "snapshot", "export", "bench1", "--format", "neon", "-o", str(path)
                )
                exp_ours.runs.append(profiled(args.py_spy, f"export{r + 1}", daemon, cmd, kw))
                exp_ours.daemon.append(daemon_use(daemon))
                exp_ours.out_bytes.append(path.stat().st_size)
                say(f"  {exp_ours.runs[-1].wall:.2f} s")
                path.unlink()

            def export_ref(r: int) -> None:
                path = work / f"ref-{r + 1}.tar.zst"
                say(f"round {r + 1}: pg_basebackup -D - -F tar -X none -c fast | zstd")
                bb, bb_kw = pg_cmd(
                    "pg_basebackup", server, "-D", "-", "-F", "tar", "-X", "none", "-c", "fast"
                )
                zcmd = [zstd, "-q", f"-{REFERENCE_LEVEL}", "-o", str(path)]
                exp_ref.runs.append(run_timed([bb, zcmd], [bb_kw, {}]))
                exp_ref.out_bytes.append(path.stat().st_size)
                say(f"  {exp_ref.runs[-1].wall:.2f} s")
                path.unlink()

            export_order = alternate(args.rounds, ref_first, export_ours, export_ref)
            results["machine_after"] = machine_info()
        finally:
            neon.cleanup()

    imp_ratio = imp_ref.best.wall / imp_ours.best.wall  # throughput ours / reference
    exp_ratio = exp_ref.best.wall / exp_ours.best.wall
    cli_peak = max(r.maxrss_kib[0] for r in imp_ours.runs + exp_ours.runs)
    daemon_peak = max(d.hwm_kib for d in imp_ours.daemon + exp_ours.daemon)
    children_peak = max(d.children_hwm_kib for d in imp_ours.daemon + exp_ours.daemon)
    rss_peak = max(cli_peak, daemon_peak, children_peak)
    results.update(
        pgbench_scale=scale,
        db_bytes=db_bytes,
        rounds=args.rounds,
        best_of="shortest wall time per side",
        zstd_level=DEFAULT_LEVEL,
        reference_zstd_level=REFERENCE_LEVEL,
        cli_startup={"wall_s": round(cli_start.wall, 3), "vmhwm_kib": cli_start.maxrss_kib[0]},
        import_order=import_order,
        export_order=export_order,
        import_ours=imp_ours.summary(db_bytes),
        import_pg_basebackup=imp_ref.summary(db_bytes),
        export_ours=exp_ours.summary(db_bytes),
        export_pg_basebackup_zstd=exp_ref.summary(db_bytes),
        ratio_import=round(imp_ratio, 3),
        ratio_export=round(exp_ratio, 3),
        peak_rss_kib={"cli": cli_peak, "daemon": daemon_peak, "daemon_children": children_peak},
        goals={
            f"import_ge_{IMPORT_GOAL}": imp_ratio >= IMPORT_GOAL,
            f"export_ge_{EXPORT_GOAL}": exp_ratio >= EXPORT_GOAL,
            f"rss_lt_{RSS_GOAL_MIB}_mib": rss_peak < RSS_GOAL_MIB * 1024,
        },
    )

    def row(what: str, side: Side, daemon: bool) -> list[object]:
        best = side.best
        rss = " / ".join(f"{kib / 1024:.0f}" for kib in side.summary(db_bytes)["maxrss_kib"])
        daemon_rss = "-"
        if daemon:
            idle = max(d.idle_hwm_kib for d in side.daemon) / 1024
            peak = max(d.hwm_kib for d in side.daemon) / 1024
            kids = max(d.children_hwm_kib for d in side.daemon) / 1024
            daemon_rss = f"{peak:.0f} (idle {idle:.0f}, children {kids:.0f})"
        return [
            what,
            best.wall,
            ", ".join(f"{r.wall:.2f}" for r in side.runs),
            mib_per_s(db_bytes, best.wall),
            best.cpu,
            rss,
            daemon_rss,
            f"{mib(max(side.out_bytes)):.1f}" if side.out_bytes else "-",
        ]

    print()
    print(
        f"{mib(db_bytes):.0f} MiB pgbench database (scale {scale}), best of {args.rounds} "
        f"rounds (order alternating: {'; '.join(import_order)}); MiB/s = database size / wall"
    )
    print(
        "out MiB: import: the snapshot's page history (ours), the backup directory with its WAL "
        "(pg_basebackup); export: the file written. RSS MiB: VmHWM of each process "
        "(pg_basebackup / zstd); daemon MiB: the pageserver's VmHWM"
    )
    print_table(
        ["", "best s", "rounds s", "MiB/s", "CPU s", "RSS MiB", "daemon MiB", "out MiB"],
        [
            row("import: neon snapshot import", imp_ours, True),
            row("import: pg_basebackup -X stream", imp_ref, False),
            row("export: neon snapshot export", exp_ours, True),
            row("export: pg_basebackup | zstd", exp_ref, False),
        ],
    )
    print(
        f"ratio (throughput ours / pg_basebackup): import {imp_ratio:.3f} (goal >= "
        f"{IMPORT_GOAL}), export {exp_ratio:.3f} (goal >= {EXPORT_GOAL})"
    )
    print(
        f"peak RSS of ours: CLI {cli_peak / 1024:.0f} MiB, pageserver {daemon_peak / 1024:.0f} "
        f"MiB, its children {children_peak / 1024:.0f} MiB (goal < {RSS_GOAL_MIB} MiB); the "
        "temporary recovery PostgreSQL of an import is stock PostgreSQL, not counted"
    )
    print(
        "CPU s: the CLI child (and what it waited for) or the whole pipeline; the daemon's "
        f"(per round) import {results['import_ours']['daemon_cpu_s']}, "
        f"export {results['export_ours']['daemon_cpu_s']}; CLI start-up (neon --help) "
        f"{cli_start.wall:.2f} s, {cli_start.maxrss_kib[0] / 1024:.0f} MiB"
    )
    print_machine(results)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.import_export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--db-gib", type=float, default=1.0, help="database size (pgbench scale)")
    ap.add_argument("--rounds", type=int, default=2, help="timed runs of each side (best kept)")
    ap.add_argument("--seed", type=int, default=1, help="picks which side runs first in round 1")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (server, neon home)")
    ap.add_argument("--py-spy", type=Path, metavar="DIR", help="sample our commands into DIR")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    code = run_benchmark(BENCH, run, args)
    if args.py_spy is not None:
        for out in sorted(args.py_spy.glob("*.txt")):
            within = "neon:<module>" if out.name.endswith(".cli.txt") else None
            print(summary(out, within=within), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
