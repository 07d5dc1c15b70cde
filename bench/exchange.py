"""Exchange benchmark (issue 12): `neon snapshot push|pull` over file, ssh, s3 and neon://
against `pg_basebackup -F tar -X none -D - | zstd` piped over the same path, in one run.

    .venv/bin/python -m bench.exchange [--scale 70] [--rounds 2] [--seed 1] [--keep]
                                       [--profile DIR]

1. A sender NEON_HOME (tests/neoncli.py's NeonCli: the real `neon` CLI) runs one node,
   `pgbench -i -s SCALE` (70: about 1 GiB), `neon snapshot create pgdata1@s1`; then an UPDATE
   of a contiguous 1% of pgbench_accounts' aids and `neon snapshot create pgdata1@s2`; then a
   CHECKPOINT and a sync (the load's writes done before the rounds). Nothing writes
   afterwards. A receiver NEON_HOME takes pulls and runs `neon snapshot recv`.
2. The places, all on 127.0.0.1 and in the temp dir: a local directory (file), a directory
   through a real sshd with throwaway keys (tests/sshd.py), a bucket of moto's S3 server
   (tests/s3d.py), and `neon snapshot recv` in the receiver's home (neon://).
3. For each place, --rounds rounds, the order of the two sides alternating (--seed picks the
   side that goes first), each round into a fresh directory, prefix or receiver:
   - ours: `neon snapshot push --to PLACE pgdata1@s1` (full), then `push --to PLACE
     pgdata1@s2` (incremental: a delta on @s1, now at the destination), then `neon snapshot
     pull --from PLACE/pgdata1@s1.neon` into the receiver's home (not for neon://: recv
     imports as it receives, and nothing can be pulled from it);
   - reference: `pg_basebackup -F tar -X none -D - -c fast` of the node | `zstd -3` | the
     place: `dd conv=fsync` to a file; `ssh ... 'cat > F && sync F'`; an S3 multipart upload
     of the stream (bench/pipe_ends.py: boto3's managed transfer, 8 parts of 16 MiB as ours);
     a plain TCP socket to a sink that writes and fsyncs a file before it answers (for
     neon://). Pull: the stored stream (`cat`, `ssh ... cat`, an S3 download) | `zstd -d` |
     `tar -x` into a directory.
   The best (shortest) wall time of each side is compared. Every MiB/s is the snapshot's data
   (the uncompressed tar size push reports, `snapshot_bytes`) per second, on both sides.
4. Incremental: the delta's bytes against the full push's bytes (goal <= 5%) and its time
   against the full push's time (goal <= 10%), round by round, the worst round shown.
5. CPU seconds of each side (ours: the CLI and its pageserver; the reference: its pipeline's
   processes, not PostgreSQL's walsender): what a shared box's load does not change. For
   neon:// the receiving side's (recv and the receiver's pageserver) during each round's full
   push is in the JSON apart (`recv_side_cpu_s`): the reference's sink process is its twin.
6. Peak RSS (VmHWM): our CLI process (sampled while it runs, bench.import_export's
   run_timed) and the pageserver, restarted untimed before each of our commands so its peak
   covers that command (bench.import_export's restart_pageserver); for neon:// also the
   `neon snapshot recv` process and the receiver's pageserver.

Goal: full transfers >= 0.8x the reference pipe's throughput. `--profile DIR` runs our CLI
and pageserver processes under cProfile (bench/profile_site/sitecustomize.py), writes one
.prof file per process into DIR and prints the functions with the most own time (cProfile
slows them: ratios from such a run mean nothing). Prints a table and, last, one JSON line.
Run by hand, never by CI.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import pstats
import random
import select
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    machine_info,
    mib,
    mib_per_s,
    print_machine,
    print_table,
    process_cpu,
    run_benchmark,
    say,
)
from bench.import_export import (
    REFERENCE_LEVEL,
    Daemon,
    DaemonUse,
    Timed,
    alternate,
    compiled_python,
    daemon_use,
    neon_cmd,
    restart_pageserver,
    run_timed,
    stop_child,
    vm_hwm_kib,
)
from cli.pgbin import pg_binary, popen_kwargs
from datadir_files.pg_account import make_pg_dir
from tests.neoncli import NEON, NeonCli, psql
from tests.pgtest import free_port, pg_reachable_tmpdir
from tests.s3d import MotoS3, moto_s3
from tests.sshd import SshServer, ssh_server

BENCH = "exchange"
FULL_GOAL = 0.8  # ours / reference throughput
INCR_BYTES_GOAL = 0.05  # incremental push bytes / full push bytes
INCR_TIME_GOAL = 0.10  # incremental push time / full push time
CHANGED_SHARE = 0.01  # of pgbench_accounts, updated between @s1 and @s2
ACCOUNTS_PER_SCALE = 100_000
SNAP1, SNAP2 = "pgdata1@s1", "pgdata1@s2"
REF_FILE = "ref.tar.zst"
PROFILE_SITE = Path(__file__).with_name("profile_site")
PIPE_ENDS = [sys.executable, "-m", "bench.pipe_ends"]

Cmd = tuple[list[str], dict[str, Any]]  # argv and subprocess.Popen's keyword arguments


def timed(*cmds: Cmd) -> Timed:
    """A pipeline of `cmds`, timed (bench.import_export.run_timed)."""
    return run_timed([argv for argv, _ in cmds], [kw for _, kw in cmds])


# -- the places snapshots go to ------------------------------------------------------------------


class Place:
    """One destination for one side of one round: where our push goes (a directory URL),
    where a pull reads, and the reference pipeline's last stage (and first, to read back)."""

    pulls = True
    env: dict[str, str]  # for our CLI

    def push_url(self) -> str:
        raise NotImplementedError

    def pull_url(self, snapshot: str) -> str:
        raise NotImplementedError

    def ref_sink(self) -> list[Cmd]:
        """Commands that store the compressed stream read on stdin."""
        raise NotImplementedError

    def ref_source(self) -> list[Cmd]:
        """Commands that write the stored stream to stdout."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class FilePlace(Place):
    def __init__(self, root: Path) -> None:
        self.root, self.env = root, {}
        root.mkdir()

    def push_url(self) -> str:
        return f"{self.root}/"

    def pull_url(self, snapshot: str) -> str:
        return str(self.root / f"{snapshot}.neon")

    def ref_sink(self) -> list[Cmd]:
        out = self.root / REF_FILE
        return [(["dd", f"of={out}", "bs=1M", "conv=fsync", "status=none"], {})]

    def ref_source(self) -> list[Cmd]:
        return [(["cat", str(self.root / REF_FILE)], {})]

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


class SshPlace(FilePlace):
    """A directory of this machine reached through sshd on 127.0.0.1, as another host."""

    def __init__(self, root: Path, server: SshServer) -> None:
        super().__init__(root)
        self.server = server
        self.env = server.env()

    def push_url(self) -> str:
        return self.server.url(f"{self.root}/")

    def pull_url(self, snapshot: str) -> str:
        return self.server.url(f"{self.root}/{snapshot}.neon")

    def _ssh(self, script: str) -> Cmd:
        login = [*shlex.split(self.server.ssh_command), "-T", "-p", str(self.server.port)]
        return [*login, f"{self.server.user}@127.0.0.1", script], {}

    def ref_sink(self) -> list[Cmd]:
        out = shlex.quote(str(self.root / REF_FILE))
        return [self._ssh(f"cat > {out} && sync {out}")]

    def ref_source(self) -> list[Cmd]:
        return [self._ssh(f"cat {shlex.quote(str(self.root / REF_FILE))}")]


class S3Place(Place):
    def __init__(self, server: MotoS3, bucket: str, prefix: str) -> None:
        self.server, self.bucket, self.prefix = server, bucket, prefix
        self.env = server.env()

    def push_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}/"

    def pull_url(self, snapshot: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}/{snapshot}.neon"

    def _pipe_end(self, verb: str) -> Cmd:
        key = f"{self.prefix}/{REF_FILE}"
        return [*PIPE_ENDS, verb, self.bucket, key], {"env": {**os.environ, **self.env}}

    def ref_sink(self) -> list[Cmd]:
        return [self._pipe_end("s3-put")]

    def ref_source(self) -> list[Cmd]:
        return [self._pipe_end("s3-get")]

    def close(self) -> None:
        client = self.server.client()
        listing = client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}/")
        for obj in listing.get("Contents", []):
            client.delete_object(Bucket=self.bucket, Key=obj["Key"])


@dataclass(frozen=True, slots=True)
class ReceiverUse:
    """Peak RSS on the receiving side of pushes to neon://."""

    recv_hwm_kib: int  # the `neon snapshot recv` process
    daemon: DaemonUse  # the receiver home's pageserver
    push_cpu_s: list[float]  # recv + that pageserver, CPU seconds of each push taken (in order)


class NeonPlace(Place):
    """`neon snapshot recv` in the receiver's home, started at the first push (its pageserver
    restarted first, so that its peak RSS covers these pushes); its snapshots are destroyed
    at the end. The reference's place is a TCP sink writing a file (bench/pipe_ends.py)."""

    pulls = False

    def __init__(self, root: Path, receiver: NeonCli, uses: list[ReceiverUse]) -> None:
        self.root, self.receiver, self.uses, self.env = root, receiver, uses, {}
        root.mkdir()
        self.recv: subprocess.Popen[bytes] | None = None
        self.sink: subprocess.Popen[bytes] | None = None
        self.daemon: Daemon | None = None
        self.cpu_marks: list[float] = []  # the receiving side's CPU when each push began

    def push_url(self) -> str:
        """The URL recv printed last: a fresh one-time token for each push."""
        if self.recv is None:
            self.daemon = restart_pageserver(self.receiver)
            self.recv = subprocess.Popen(
                [NEON, "snapshot", "recv"],
                env=self.receiver.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,  # a refused push: the pusher says why
            )
        url = read_line(self.recv, "neon snapshot recv")
        self.cpu_marks.append(self._receiving_cpu())
        return url

    def _receiving_cpu(self) -> float:
        """CPU seconds so far of recv and the receiver's pageserver (the far side's work,
        which the reference's sink process counts on its side)."""
        pids = [p.pid for p in (self.recv,) if p is not None]
        if self.daemon is not None:
            pids.append(self.daemon.pid)
        return sum(sum(process_cpu(pid)) for pid in pids)

    def ref_sink(self) -> list[Cmd]:
        self.sink = subprocess.Popen(
            [*PIPE_ENDS, "tcp-sink", str(self.root / REF_FILE)], stdout=subprocess.PIPE
        )
        port = read_line(self.sink, "the TCP sink")
        return [([*PIPE_ENDS, "tcp-send", port], {})]

    def close(self) -> None:
        if self.recv is not None and self.daemon is not None:
            marks = [*self.cpu_marks, self._receiving_cpu()]
            pushes = [round(b - a, 3) for a, b in itertools.pairwise(marks)]
            use = ReceiverUse(vm_hwm_kib(self.recv.pid), daemon_use(self.daemon), pushes)
            self.uses.append(use)
        for proc in (self.recv, self.sink):
            if proc is not None:
                stop_child(proc)
        shutil.rmtree(self.root, ignore_errors=True)
        if self.recv is not None:
            for snap in self.receiver.json("snapshot", "list"):
                self.receiver.run("snapshot", "destroy", snap["name"])


def read_line(proc: subprocess.Popen[bytes], what: str, timeout: float = 60) -> str:
    """The next line `proc` prints on stdout."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode().strip() if ready else ""
    if not line:
        raise RuntimeError(f"{what} printed nothing (exit {proc.poll()})")
    return line


# -- measurements ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ours:
    """One of our timed commands: the pipeline's numbers, the pageserver's, its --json."""

    run: Timed
    daemon: DaemonUse
    out: dict[str, Any]


@dataclass
class Transport:
    """Every round of one transport, both sides."""

    name: str
    push: list[Ours] = field(default_factory=list)
    incr: list[Ours] = field(default_factory=list)
    pull: list[Ours] = field(default_factory=list)
    ref_push: list[Timed] = field(default_factory=list)
    ref_pull: list[Timed] = field(default_factory=list)
    receiver: list[ReceiverUse] = field(default_factory=list)


def best_wall(runs: list[Ours] | list[Timed]) -> float:
    return min(r.run.wall if isinstance(r, Ours) else r.wall for r in runs)


class Bench:
    """The two homes, the node's snapshots and the commands run on them."""

    def __init__(self, base: Path, sender: NeonCli, receiver: NeonCli) -> None:
        self.sender, self.receiver = sender, receiver
        self.work = base / "places"
        make_pg_dir(self.work, 0o711)  # pg_basebackup runs as PostgreSQL's OS user
        self.connstr = ""
        self.snapshot_bytes = 0

    def make_snapshots(self, scale: int) -> None:
        self.sender.run("pg", "create", "--port", str(free_port()), timeout=300)
        self.connstr = str(self.sender.json("pg", "show", "pgdata1")["connstr"])
        say(f"pgbench -i -s {scale}")
        subprocess.run(
            [pg_binary("pgbench"), "-i", "-q", "-s", str(scale), self.connstr],
            check=True, capture_output=True, timeout=7200,
        )  # fmt: skip
        self.sender.run("snapshot", "create", SNAP1, timeout=3600)
        changed = round(scale * ACCOUNTS_PER_SCALE * CHANGED_SHARE)
        say(f"UPDATE of {changed} accounts (aid <= {changed}), then {SNAP2}")
        psql(self.connstr, f"UPDATE pgbench_accounts SET abalance = abalance + 1 "
                           f"WHERE aid <= {changed}", timeout=3600)  # fmt: skip
        self.sender.run("snapshot", "create", SNAP2, timeout=3600)
        # The load's dirty buffers written out now, not beside the first rounds: PostgreSQL's
        # checkpoint after the load spreads ~1 GiB of writes over the next minutes, in which
        # the first scheme's pushes and their fsyncs, ours and the reference's, ran ~1.5x
        # slower than the same later (the reference push 4.58 s, then 2.95 s).
        say("CHECKPOINT and sync before the rounds")
        psql(self.connstr, "CHECKPOINT", timeout=3600)
        os.sync()

    def home(self, neon: NeonCli, place: Place, tag: str) -> NeonCli:
        """`neon` with the place's environment (and the profile's tag for this step)."""
        return NeonCli(neon.home, {**neon.env_extra, **place.env, "BENCH_PROFILE_TAG": tag})

    def ours(self, neon: NeonCli, tag: str, *args: str) -> Ours:
        """`neon ARGS --json`, timed, on a freshly started pageserver."""
        daemon = restart_pageserver(neon)
        cmd = neon_cmd(neon, *args, "--json")
        run = timed(cmd)
        out = json.loads(run.stdout)
        say(f"  {tag}: {run.wall:.2f} s")
        return Ours(run, daemon_use(daemon), out)

    def push(self, place: Place, snapshot: str, tag: str) -> Ours:
        home = self.home(self.sender, place, tag)
        return self.ours(home, tag, "snapshot", "push", "--to", place.push_url(), snapshot)

    def pull(self, place: Place, name: str, tag: str) -> Ours:
        home = self.home(self.receiver, place, tag)
        pulled = self.ours(home, tag, "snapshot", "pull", "--from", place.pull_url(SNAP1), name)
        self.receiver.run("snapshot", "destroy", name)
        return pulled

    def ref_push(self, place: Place) -> Timed:
        basebackup = [pg_binary("pg_basebackup"), "-d", self.connstr,
                      "-F", "tar", "-X", "none", "-D", "-", "-c", "fast"]  # fmt: skip
        zstd = ["zstd", "-q", f"-{REFERENCE_LEVEL}", "-c"]
        run = timed((basebackup, popen_kwargs()), (zstd, {}), *place.ref_sink())
        say(f"  reference push: {run.wall:.2f} s")
        return run

    def ref_pull(self, place: Place, target: Path) -> Timed:
        target.mkdir()
        try:
            tar = ["tar", "-x", "-f", "-", "-C", str(target)]
            run = timed(*place.ref_source(), (["zstd", "-q", "-d", "-c"], {}), (tar, {}))
            if not (target / "PG_VERSION").is_file():
                raise RuntimeError(f"the reference pull made no data directory in {target}")
        finally:
            shutil.rmtree(target, ignore_errors=True)
        say(f"  reference pull: {run.wall:.2f} s")
        return run

    def measure(
        self, t: Transport, open_place: Callable[[str], Place], rounds: int, ref_first: bool
    ) -> list[str]:
        """Both sides over one transport, `rounds` times; the orders used."""

        def ours(r: int) -> None:
            say(f"{t.name} round {r + 1}: ours")
            with contextlib.closing(open_place(f"ours{r}")) as place:
                full = self.push(place, SNAP1, f"push-{t.name}-{r}")
                incr = self.push(place, SNAP2, f"incr-{t.name}-{r}")
                if full.out["parent"] is not None or incr.out["parent"] != SNAP1:
                    raise RuntimeError(
                        f"{t.name}: expected a full push then a delta on {SNAP1}, got parents "
                        f"{full.out['parent']}, {incr.out['parent']}"
                    )
                t.push.append(full)
                t.incr.append(incr)
                self.snapshot_bytes = int(full.out["snapshot_bytes"])
                if place.pulls:
                    t.pull.append(self.pull(place, f"pulled-{t.name}-{r}", f"pull-{t.name}-{r}"))

        def ref(r: int) -> None:
            say(f"{t.name} round {r + 1}: reference")
            with contextlib.closing(open_place(f"ref{r}")) as place:
                t.ref_push.append(self.ref_push(place))
                if place.pulls:
                    t.ref_pull.append(self.ref_pull(place, self.work / f"extract-{t.name}-{r}"))

        return alternate(rounds, ref_first, ours, ref)


# -- main ----------------------------------------------------------------------------------------


SCHEMES = ("file", "ssh", "s3", "neon")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("zstd") is None:
        raise SystemExit("bench.exchange: error: zstd not found; install it (apt-get install zstd)")
    results: dict[str, Any] = {"machine_before": machine_info()}
    ref_first = random.Random(args.seed).random() < 0.5
    base = pg_reachable_tmpdir("neon-bench-ex-")
    extra = compiled_python(base / "pycache")
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        extra.update(PYTHONPATH=str(PROFILE_SITE), BENCH_PROFILE_DIR=str(args.profile.resolve()))
    sender, receiver = NeonCli(base / "sender", extra), NeonCli(base / "receiver", extra)
    transports = [Transport(name) for name in args.schemes]
    orders: dict[str, list[str]] = {}
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's server: no request log
    try:
        with ssh_server() as sshd, moto_s3() as s3:
            bench = Bench(base, sender, receiver)
            bench.make_snapshots(args.scale)
            receiver.run("pageserver", "start")
            bucket = s3.new_bucket()
            neon = next((t for t in transports if t.name == "neon"), Transport("neon"))
            places: dict[str, Callable[[str], Place]] = {
                "file": lambda key: FilePlace(bench.work / f"file-{key}"),
                "ssh": lambda key: SshPlace(bench.work / f"ssh-{key}", sshd),
                "s3": lambda key: S3Place(s3, bucket, key),
                "neon": lambda key: NeonPlace(bench.work / f"neon-{key}", receiver, neon.receiver),
            }
            for t in transports:
                orders[t.name] = bench.measure(t, places[t.name], args.rounds, ref_first)
            results["machine_after"] = machine_info()
    finally:
        receiver.cleanup()
        sender.cleanup()
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    rep = report(transports, bench.snapshot_bytes, args.scale, args.rounds)
    results.update(
        scale=args.scale, rounds=args.rounds, orders=orders, snapshot_bytes=bench.snapshot_bytes,
        **rep.json, goals=rep.goals,
    )  # fmt: skip
    print_machine(results)
    if args.profile is not None:
        print_profiles(args.profile)
    return results


def cli_hwm(ours: list[Ours]) -> int:
    return max(max(o.run.maxrss_kib) for o in ours)


def daemon_hwm(ours: list[Ours]) -> int:
    return max(o.daemon.hwm_kib for o in ours)


def ours_cpu(o: Ours) -> float:
    """CPU seconds of one of our commands: the CLI and its pageserver (load-independent,
    where the walls of a shared box are not; a warm command's run in the server's child)."""
    return o.run.cpu + o.daemon.cpu + o.daemon.warm_command_cpu


def rss_cells(ours: list[Ours], receiver: list[ReceiverUse]) -> list[str]:
    """Peak RSS in MiB of our CLI and of the pageserver (and of the receiving side)."""
    cli, daemon = f"{cli_hwm(ours) / 1024:.0f}", f"{daemon_hwm(ours) / 1024:.0f}"
    if receiver:
        cli += f" / recv {max(u.recv_hwm_kib for u in receiver) / 1024:.0f}"
        daemon += f" / recv {max(u.daemon.hwm_kib for u in receiver) / 1024:.0f}"
    return [cli, daemon]


class Report:
    """The table's rows and the JSON line's numbers, one comparison at a time."""

    def __init__(self, data_bytes: int) -> None:
        self.data_bytes = data_bytes
        self.rows: list[list[object]] = []
        self.json: dict[str, Any] = {}
        self.goals: dict[str, bool] = {}

    def full(self, op: str, t: Transport, ours: list[Ours], ref: list[Timed]) -> None:
        """A whole transfer: throughput ours / reference (best rounds), goal >= FULL_GOAL."""
        what = f"{op} {t.name}"
        ours_s, ref_s = best_wall(ours), best_wall(ref)
        ratio = ref_s / ours_s
        met = self.goals[what] = ratio >= FULL_GOAL
        moved = max(int(o.out.get("bytes_sent", o.out.get("bytes_received", 0))) for o in ours)
        receiver = t.receiver if op == "push" else []
        self.rows.append(
            [
                what, f"{ours_s:.2f} s", f"{ref_s:.2f} s", ratio, f">= {FULL_GOAL}",
                "yes" if met else "NO", mib_per_s(self.data_bytes, ours_s),
                mib_per_s(self.data_bytes, ref_s), f"{mib(moved):.1f}",
                f"{min(ours_cpu(o) for o in ours):.2f} / {min(r.cpu for r in ref):.2f}",
                *rss_cells(ours, receiver),
            ]
        )  # fmt: skip
        self.json[f"{op}_{t.name}"] = {
            "ours_walls_s": [round(o.run.wall, 3) for o in ours],
            "ref_walls_s": [round(r.wall, 3) for r in ref],
            "ours_cpu_s": [round(ours_cpu(o), 3) for o in ours],
            "ref_cpu_s": [round(r.cpu, 3) for r in ref],
            "ratio": round(ratio, 3),
            "ours_mib_per_s": round(mib_per_s(self.data_bytes, ours_s), 1),
            "ref_mib_per_s": round(mib_per_s(self.data_bytes, ref_s), 1),
            "bytes": moved,
            "cli_vmhwm_kib": cli_hwm(ours),
            "daemon_vmhwm_kib": daemon_hwm(ours),
            "ref_vmhwm_kib": [max(kib) for kib in zip(*(r.maxrss_kib for r in ref), strict=True)],
            **self._receiver(receiver),
        }

    @staticmethod
    def _receiver(uses: list[ReceiverUse]) -> dict[str, Any]:
        if not uses:
            return {}
        return {
            "recv_vmhwm_kib": max(u.recv_hwm_kib for u in uses),
            "recv_daemon_vmhwm_kib": max(u.daemon.hwm_kib for u in uses),
            # the full push of each round (the first push a receiver takes)
            "recv_side_cpu_s": [u.push_cpu_s[0] for u in uses if u.push_cpu_s],
        }

    def incremental(self, t: Transport) -> None:
        """The delta push against the full push before it, round by round; the worst round."""
        rounds = list(zip(t.push, t.incr, strict=True))
        sent = [(i.out["bytes_sent"], f.out["bytes_sent"]) for f, i in rounds]
        walls = [(i.run.wall, f.run.wall) for f, i in rounds]
        delta_bytes, full_bytes = max(sent, key=lambda p: p[0] / p[1])
        delta_s, full_s = max(walls, key=lambda p: p[0] / p[1])
        for kind, ours, ref, share, goal in (
            ("bytes", f"{mib(delta_bytes):.2f} MiB", f"{mib(full_bytes):.1f} MiB",
             delta_bytes / full_bytes, INCR_BYTES_GOAL),
            ("time", f"{delta_s:.2f} s", f"{full_s:.2f} s", delta_s / full_s, INCR_TIME_GOAL),
        ):  # fmt: skip
            what = f"incr {kind} {t.name}"
            met = self.goals[what] = share <= goal
            row = [what, ours, ref, share, f"<= {goal}", "yes" if met else "NO", "", "", ""]
            cpu = f"{max(ours_cpu(i) for i in t.incr):.2f} / -" if kind == "time" else ""
            self.rows.append([*row, cpu, *rss_cells(t.incr, [])])
        self.json[f"incremental_{t.name}"] = {
            "delta_bytes": [d for d, _ in sent],
            "full_bytes": [f for _, f in sent],
            "delta_walls_s": [round(d, 3) for d, _ in walls],
            "full_walls_s": [round(f, 3) for _, f in walls],
            "delta_cpu_s": [round(ours_cpu(i), 3) for i in t.incr],
            "cli_vmhwm_kib": cli_hwm(t.incr),
            "daemon_vmhwm_kib": daemon_hwm(t.incr),
        }

    def show(self, scale: int, rounds: int) -> None:
        print()
        print(
            f"{mib(self.data_bytes):.0f} MiB of snapshot data (pgbench scale {scale}; the tar "
            f"size push reports), best of {rounds} rounds per side; MiB/s = that size / wall"
        )
        print(
            f"reference: pg_basebackup -F tar -X none | zstd -{REFERENCE_LEVEL} | the place "
            "(push), the place | zstd -d | tar -x (pull); incr rows: the delta push of @s2 after "
            "@s1 against that full push, worst round. CPU s: ours (CLI + pageserver) / the "
            "reference pipeline's processes (PostgreSQL's walsender not counted), least of the "
            "rounds (load-independent, unlike the walls). RSS: VmHWM of our CLI / the pageserver "
            "(neon://: also of recv and the receiver's pageserver)"
        )
        print_table(
            ["", "ours", "reference", "ratio", "goal", "met", "ours MiB/s", "ref MiB/s",
             "moved MiB", "CPU s ours / ref", "CLI RSS MiB", "pageserver RSS MiB"],
            self.rows,
        )  # fmt: skip


def report(transports: list[Transport], data_bytes: int, scale: int, rounds: int) -> Report:
    """Print the table; the report's numbers go to the JSON line."""
    rep = Report(data_bytes)
    for t in transports:
        rep.full("push", t, t.push, t.ref_push)
    for t in transports:
        if t.pull:
            rep.full("pull", t, t.pull, t.ref_pull)
    for t in transports:
        rep.incremental(t)
    rep.show(scale, rounds)
    return rep


def print_profiles(directory: Path) -> None:
    """The functions with most own time, summed over every push and every pull, per process
    kind (the .prof files stay in `directory`)."""
    for step in ("push", "incr", "pull"):
        for kind in ("neon-snapshot", "pageserver.daemon"):
            files = sorted(str(p) for p in directory.glob(f"{step}-*-{kind}*.prof"))
            if files:
                print(f"\n--- profile: {step}, {kind} ({len(files)} processes)")
                pstats.Stats(*files).sort_stats("tottime").print_stats(12)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.exchange",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--scale", type=int, default=70, help="pgbench scale (70: about 1 GiB)")
    ap.add_argument("--rounds", type=int, default=2, help="timed runs of each side (best kept)")
    ap.add_argument("--seed", type=int, default=1, help="picks which side runs first in round 1")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (homes, places)")
    ap.add_argument("--profile", type=Path, metavar="DIR", help="cProfile our processes into DIR")
    ap.add_argument(
        "--schemes",
        type=lambda s: s.split(","),
        default=list(SCHEMES),
        metavar="LIST",
        help=f"comma-separated transports to measure (default: {','.join(SCHEMES)})",
    )
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.scale < 1:
        ap.error("--rounds and --scale must be at least 1")
    if not args.schemes or any(s not in SCHEMES for s in args.schemes):
        ap.error(f"--schemes: a comma-separated list of {', '.join(SCHEMES)}")
    return run_benchmark(BENCH, run, args)


if __name__ == "__main__":
    sys.exit(main())
