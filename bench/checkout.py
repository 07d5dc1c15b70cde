"""Checkout benchmark (issue 10 item 3): `neon pg checkout` to a snapshot a few pages away,
in place (cli/checkout_delta.py), against a full extraction and pg_basebackup, one run.

    .venv/bin/python -m bench.checkout [--scale 70] [--newcomer-scale 30] [--changed-pct 1]
                                       [--pgbench-seconds 30] [--repeat 3] [--py-spy DIR]

Everything through the real `neon` CLI on a private NEON_HOME, on two nodes, because issue 10
asks for two sizes: the newcomer's path on a `pgbench -i -s 30` node, and the 1% checkout on
a 1 GiB node (`-s 70`: 1.05 GiB).

The newcomer's path (node pgdata1, --newcomer-scale; with --pgbench-seconds 0, step 1 only):
1. `neon pg create`; `pgbench -i -s NEWCOMER_SCALE` (timed); `neon snapshot create
   pgdata1@base` (timed: a checkpoint, then ingest catches up).
2. `pgbench -c 4 -T S`, then `pg checkout pgdata1@base` (timed), compared with
   `pg_basebackup -X stream -c fast` of the node taken right after it. The node is stopped
   after this part.

The 1% checkout (node pgdata2, --scale):
4. `pgbench -i -s SCALE`, `snapshot create pgdata2@base` (both timed), a pg_basebackup.
5. About --changed-pct of the database's pages changed: one row updated on every Nth page
   of pgbench_accounts (N from the page counts), the new versions go elsewhere (fillfactor
   100) and the primary key gets one entry each; `snapshot diff --stat` counts the pages.
6. `neon pg checkout pgdata2@base`, timed (stop, HEAD snapshot, delta, apply, start), then
   the same change made again and checked out again, --repeat times in all (the first right
   after the load, as a user would; the others at a steadier state): the median is the
   figure, each run is printed; the directory's inode shows it was patched in place.
7. References in the same run: a full extraction of `pgdata2@base` (the tar streamed from
   the pageserver and unpacked, as a full rebuild's download: no start), --repeat times
   (the median the reference), and the same checkout with the full rebuild (the same change
   made again, the hint mark removed so the CLI falls back: what `pg checkout` did before).

`--py-spy DIR` samples the pageserver daemon (by PID) and the CLI during the snapshot create
after the load and each in-place checkout (bench/pyspy.py) and prints where their time went.

Peak RSS: the CLI's (wait4) per checkout, the pageserver's high-water mark (VmHWM, since it
started: ingest included), also after each step (the step that raised it reached the peak).
Prints a table and, last, one JSON line. Run by hand, never by CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import json_line, machine_info, mib, print_machine, print_table, say
from bench.import_export import compiled_python
from bench.pyspy import recording, summary, wrapped
from cli.context import App
from cli.hints_mark import HINTS_MARK
from cli.pageserver_control import local_api
from cli.pgbin import pg_binary
from datadir_files.untar import extract_stream
from pageserver_api.client import PageserverClient
from pageserver_api.models import BasebackupRequest
from tests.neoncli import NEON, NeonCli, free_port, neon_home, psql

BENCH = "checkout"


@dataclass(frozen=True)
class Timed:
    wall: float
    max_rss_mib: float


def timed(cmd: list[str], env: dict[str, str] | None = None) -> Timed:
    """Run a command to its end: wall time and peak RSS (wait4)."""
    with tempfile.TemporaryFile() as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _pid, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            out.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.read().decode(errors='replace')}")
    return Timed(wall, ru.ru_maxrss / 1024)


def neon_timed(neon: NeonCli, *args: str) -> Timed:
    return timed([NEON, *args], env=neon.env())


def neon_step(neon: NeonCli, profile: Path | None, step: str, *args: str) -> Timed:
    """`neon ARGS`, timed; with `profile`, the daemon and the CLI sampled into it."""
    if profile is None:
        return neon_timed(neon, *args)
    pid = int(neon.json("pageserver", "status")["pid"])
    with recording(pid, profile / f"{step}.pageserver.txt"):
        return timed(wrapped([NEON, *args], profile / f"{step}.cli.txt"), env=neon.env())


def pageserver_hwm_mib(neon: NeonCli) -> float:
    pid = neon.json("pageserver", "status")["pid"]
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def mark_rss(neon: NeonCli, r: dict[str, Any], step: str) -> None:
    """The pageserver's peak RSS so far, after `step`: the step that raised it is where
    the peak the goal counts was reached."""
    r.setdefault("pageserver_hwm_after_mib", {})[step] = round(pageserver_hwm_mib(neon), 1)


def full_extraction(neon: NeonCli, snapshot: str, target: Path) -> float:
    """Seconds to stream a whole basebackup of `snapshot` and unpack it into `target`."""
    app = App.open(neon.home)

    async def fetch(client: PageserverClient) -> None:
        async with client.basebackup(BasebackupRequest(snapshot=snapshot)) as stream:
            await extract_stream(stream.__aiter__(), target)

    t0 = time.perf_counter()
    local_api(app).run(fetch)
    return time.perf_counter() - t0


def pg_basebackup(c: str, target: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [pg_binary("pg_basebackup"), "-d", c, "-D", str(target), "-X", "stream", "-c", "fast"],
        check=True,
        capture_output=True,
    )
    return time.perf_counter() - t0


def change_pages(c: str, pct: float) -> str:
    """Update one row on every Nth page of pgbench_accounts, N so that about `pct` % of the
    database's pages change (the updated page, the page of the new version, an index leaf);
    the SQL run, for the same change again."""
    heap, total = (
        int(x)
        for x in psql(
            c,
            "SELECT pg_relation_size('pgbench_accounts') / 8192, "
            "pg_database_size(current_database()) / 8192",
        ).split("|")
    )
    stride = max(1, int(heap / max(1.0, total * pct / 100 / 2)))
    sql = (
        "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE ctid = ANY (ARRAY("
        f"SELECT format('(%s,1)', p)::tid FROM generate_series(0, {heap - 1}, {stride}) p))"
    )
    psql(c, sql)
    return sql


def diff_pages(neon: NeonCli, a: str, b: str) -> int:
    return int(neon.json("snapshot", "diff", "--stat", a, b)["pages_changed"])


def datadir(neon: NeonCli, node: str) -> Path:
    return Path(neon.json("pg", "show", node)["datadir"])


def loaded_node(
    neon: NeonCli, node: str, scale: int, profile: Path | None, step: str
) -> tuple[str, dict[str, Any]]:
    """`pg create`, `pgbench -i -s SCALE` and `snapshot create NODE@base`, timed: the node's
    connection string and the figures."""
    neon.run("pg", "create", "-n", node, "--port", str(free_port()))
    c = str(neon.json("pg", "show", node)["connstr"])
    say(f"{node}: pgbench -i -s {scale}")
    t0 = time.perf_counter()
    subprocess.run([pg_binary("pgbench"), "-i", "-q", "-s", str(scale), c], check=True,
                   capture_output=True)  # fmt: skip
    figures: dict[str, Any] = {"load_s": time.perf_counter() - t0}
    figures["db_mib"] = mib(int(psql(c, "SELECT pg_database_size(current_database())")))
    say(f"snapshot create {node}@base")
    figures["snapshot_create_s"] = neon_step(
        neon, profile, step, "snapshot", "create", f"{node}@base"
    ).wall
    return c, figures


def newcomer(args: argparse.Namespace, neon: NeonCli, scratch: Path) -> dict[str, Any]:
    """Issue 10's newcomer: `snapshot create` after `pgbench -i`, and `pg checkout` back to it
    after `pgbench -c 4`, against pg_basebackup of the node right after that checkout."""
    c, figures = loaded_node(neon, "pgdata1", args.newcomer_scale, args.py_spy, "snapshot_create")
    r: dict[str, Any] = {"newcomer_scale": args.newcomer_scale, **figures}
    mark_rss(neon, r, "newcomer load + snapshot")
    if args.pgbench_seconds:
        say(f"pgbench -c 4 -T {args.pgbench_seconds}, then pg checkout pgdata1@base")
        subprocess.run([pg_binary("pgbench"), "-n", "-c", "4", "-j", "2", "-T",
                        str(args.pgbench_seconds), c], check=True, capture_output=True)  # fmt: skip
        inode = datadir(neon, "pgdata1").stat().st_ino
        checkout = neon_step(
            neon, args.py_spy, "newcomer_checkout", "pg", "checkout", "pgdata1@base"
        )
        r["newcomer_checkout_s"] = checkout.wall
        r["newcomer_in_place"] = datadir(neon, "pgdata1").stat().st_ino == inode
        r["newcomer_pages_changed"] = diff_pages(neon, "pgdata1@base", "pgdata1@HEAD{0}")
        mark_rss(neon, r, "pgbench + newcomer checkout")
        # The reference of the node as the checkout left it: the daemon's compaction of the
        # load (or of pgbench's WAL) shares the box with whichever pg_basebackup runs nearer
        # to it, so the ratio uses this one, taken right after the checkout.
        say("pg_basebackup of the node after its checkout")
        r["pg_basebackup_after_s"] = pg_basebackup(c, scratch / "pgbb")
        shutil.rmtree(scratch / "pgbb")
    neon.run("pg", "stop", "pgdata1")  # the 1% part has the box (but for the daemon)
    return r


def one_percent(args: argparse.Namespace, neon: NeonCli, scratch: Path) -> dict[str, Any]:
    """The in-place checkout of a 1 GiB node to a snapshot --changed-pct of pages away,
    against a full extraction of that snapshot (and the full rebuild's checkout)."""
    c, figures = loaded_node(neon, "pgdata2", args.scale, None, "")
    r: dict[str, Any] = {"scale": args.scale, **{f"big_{k}": v for k, v in figures.items()}}
    mark_rss(neon, r, "1% node load + snapshot")
    say("pg_basebackup of the node")
    r["pg_basebackup_s"] = pg_basebackup(c, scratch / "pgbb")
    shutil.rmtree(scratch / "pgbb")

    say(f"changing ~{args.changed_pct}% of the pages")
    sql = change_pages(c, args.changed_pct)
    inode = datadir(neon, "pgdata2").stat().st_ino
    walls: list[float] = []
    for i in range(args.repeat):
        if i:
            psql(c, sql)  # the same change again, from the snapshot the checkout went back to
        say(f"pg checkout pgdata2@base (in place, {i + 1} of {args.repeat})")
        profile = args.py_spy if i == 0 else None
        fast = neon_step(neon, profile, "checkout", "pg", "checkout", "pgdata2@base")
        walls.append(fast.wall)
        r["checkout_cli_rss_mib"] = max(r.get("checkout_cli_rss_mib", 0.0), fast.max_rss_mib)
        if i == 0:
            changed = diff_pages(neon, "pgdata2@base", "pgdata2@HEAD{0}")
    r["checkout_runs_s"] = walls
    r["checkout_s"] = statistics.median(walls)
    r["in_place"] = datadir(neon, "pgdata2").stat().st_ino == inode
    r["pages_changed"] = changed
    r["pages_changed_pct"] = 100 * changed / max(1, int(r["big_db_mib"] * 128))
    mark_rss(neon, r, "1% checkout")

    extractions = []
    for i in range(args.repeat):
        say(f"full extraction of pgdata2@base ({i + 1} of {args.repeat})")
        extractions.append(full_extraction(neon, "pgdata2@base", scratch / "full"))
        shutil.rmtree(scratch / "full")
    r["extraction_runs_s"] = extractions
    r["extraction_s"] = statistics.median(extractions)
    mark_rss(neon, r, "full extraction")

    say("the same change, then pg checkout with a full rebuild")
    psql(c, sql)
    (datadir(neon, "pgdata2") / HINTS_MARK).unlink()
    full = neon_timed(neon, "pg", "checkout", "pgdata2@base")
    r["full_checkout_s"] = full.wall
    r["full_checkout_cli_rss_mib"] = full.max_rss_mib
    r["full_in_place"] = datadir(neon, "pgdata2").stat().st_ino == inode
    mark_rss(neon, r, "full-rebuild checkout")
    return r


def run(args: argparse.Namespace, neon: NeonCli, scratch: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"machine_before": machine_info()}
    newcomer_part = newcomer(args, neon, scratch)
    one_percent_part = one_percent(args, neon, scratch)
    marks = {**newcomer_part.pop("pageserver_hwm_after_mib"),
             **one_percent_part.pop("pageserver_hwm_after_mib")}  # fmt: skip
    results.update(newcomer_part, **one_percent_part, pageserver_hwm_after_mib=marks)
    results["pageserver_peak_rss_mib"] = pageserver_hwm_mib(neon)
    results["machine_after"] = machine_info()
    return results


def report(r: dict[str, Any]) -> None:
    ext, pgbb = r["extraction_s"], r["pg_basebackup_s"]
    print(
        f"newcomer: database {r['db_mib']:.0f} MiB (pgbench -s {r['newcomer_scale']}, loaded "
        f"in {r['load_s']:.1f} s); snapshot create {r['snapshot_create_s']:.2f} s "
        f"({r['snapshot_create_s'] / r['load_s']:.3f}x the load)"
    )
    goals = [
        ("snapshot create after the load / load time", r["snapshot_create_s"] / r["load_s"], 0.1),
    ]
    if "newcomer_checkout_s" in r:
        t, pgbb2 = r["newcomer_checkout_s"], r["pg_basebackup_after_s"]
        print(
            f"newcomer: pg checkout after pgbench {t:.2f} s"
            f"{'' if r['newcomer_in_place'] else ' (NOT in place)'}, "
            f"{r['newcomer_pages_changed']:,} pages changed; pg_basebackup after it {pgbb2:.2f} s"
        )
        goals.append(("pg checkout after pgbench / pg_basebackup after it", t / pgbb2, 1.5))
    print(
        f"1%: database {r['big_db_mib']:.0f} MiB (pgbench -s {r['scale']}, loaded in "
        f"{r['big_load_s']:.1f} s, snapshot create {r['big_snapshot_create_s']:.2f} s); "
        f"pages changed: {r['pages_changed']:,} ({r['pages_changed_pct']:.2f}% of the database)"
    )
    rows: list[list[object]] = [
        ["pg checkout, in place" + ("" if r["in_place"] else " (NOT in place)"),
         r["checkout_s"], r["checkout_s"] / ext, r["checkout_s"] / pgbb,
         r["checkout_cli_rss_mib"]],
        ["pg checkout, full rebuild", r["full_checkout_s"], r["full_checkout_s"] / ext,
         r["full_checkout_s"] / pgbb, r["full_checkout_cli_rss_mib"]],
        ["full extraction (stream + unpack)", ext, 1.0, ext / pgbb, "-"],
        ["pg_basebackup -X stream", pgbb, pgbb / ext, 1.0, "-"],
    ]  # fmt: skip
    print_table(["what", "seconds", "x extraction", "x pg_basebackup", "CLI peak RSS MiB"], rows)
    runs = ", ".join(f"{t:.3f}" for t in r["checkout_runs_s"])
    refs = ", ".join(f"{t:.3f}" for t in r["extraction_runs_s"])
    print(f"1% checkout runs (s): {runs} (median above); full extractions (s): {refs}")
    print(f"pageserver peak RSS (VmHWM, ingest included): {r['pageserver_peak_rss_mib']:.0f} MiB")
    steps = ", ".join(f"{s} {v:.0f}" for s, v in r["pageserver_hwm_after_mib"].items())
    print(f"  its peak so far after each step (MiB): {steps}")
    goals.append(("pg checkout, 1% changed / full extraction", r["checkout_s"] / ext, 0.2))
    print_table(["issue 10 goal", "measured", "goal (<=)"], [list(g) for g in goals])
    print_machine(r)


def installed_bytecode(neon: NeonCli, cache: Path) -> None:
    """Run the CLI with cached bytecode (bench.import_export's compiled_python), filled once
    before anything is timed: compiling every module on every run added a quarter of a
    second to each command."""
    neon.env_extra.update(compiled_python(cache))
    warm = "import cli.main, cli.pg_commands, cli.snapshot_commands, cli.pitr_commands"
    subprocess.run([sys.executable, "-c", warm], env=neon.env(), check=True)


def _scratch() -> Generator[Path, None, None]:
    base = Path(tempfile.mkdtemp(prefix="neon-bench-checkout-"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.checkout", description=__doc__)
    parser.add_argument("--scale", type=int, default=70, help="the 1%% part's node")
    parser.add_argument("--newcomer-scale", type=int, default=30)
    parser.add_argument("--changed-pct", type=float, default=1.0)
    parser.add_argument("--pgbench-seconds", type=int, default=30)
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="the 1%% checkout (the same change made again each time) and the full "
        "extraction, each timed this many times: their medians make the ratio",
    )
    parser.add_argument("--py-spy", type=Path, metavar="DIR", help="sample with py-spy into DIR")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    home = neon_home()
    neon = next(home)
    scratch = _scratch()
    where = next(scratch)
    installed_bytecode(neon, where / "pycache")
    try:
        results = run(args, neon, where)
    finally:
        home.close()
        scratch.close()
    report(results)
    if args.py_spy is not None:
        for out in sorted(args.py_spy.glob("*.txt")):
            # The CLI's main thread, idle included: where the command's wall time went.
            print(summary(out, within="neon:<module>" if out.name.endswith(".cli.txt") else None))
    json_line(BENCH, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
