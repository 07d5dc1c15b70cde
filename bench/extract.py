"""Extract benchmark (issue 6): a startable data directory at a past LSN, against stock tools.

    .venv/bin/python -m bench.extract [--db-gib 1] [--wal-gib 1] [--min-run-mib 256]
                                      [--big-gib 4] [--snapshots 5] [--seed 1] [--keep]
                                      [--py-spy DIR] [--stream]

1. A throwaway PostgreSQL 15 server is initdb'd (not started); its data directory is copied
   (BASE, the reference's base backup) and imported into a NodeStore at its shutdown
   checkpoint, as `neon pg create` does. Started with wal_keep_size covering the history.
2. `pgbench -i` at a scale giving --db-gib of data (70 per GiB), then rounds of
   `pgbench -c 4 -T 10` + CHECKPOINT until --wal-gib of WAL exist since the import and at
   least --min-run-mib of them after `pgbench -i`; pg_switch_wal(); END is that boundary.
3. The daemon's ingest path over the server's pg_wal (WalReader in 128 KiB chunks →
   decode_record → NodeStore.ingest → maybe_flush, final flush); timed for information.
   The segments are copied to a WAL archive for the reference, and TARGET is picked: the end
   of a random record in the second half of the history (and after `pgbench -i`).
4. Timed until each server accepts connections (read-write), one after the other:
   - ours: basebackup(TimelineSource(timeline, TARGET)) written into the new directory as
     the home's own daemon writes it into the directory the `neon` CLI hands it
     (pageserver/api/local_files.py's write_tar_into); with --stream, as a remote
     pageserver streams it: through a pipe into a process unpacking it (datadir_files/untar.py's
     extract_basebackup, `bench.pipe_ends untar`); configuration written, pg_ctl start -w
     (no recovery: the tar has a shutdown checkpoint);
   - pg_basebackup: `pg_basebackup -X stream -c fast` of the live server into a directory,
     configuration written, pg_ctl start -w (replays the WAL of the backup);
   - PITR: copy of BASE, restore_command from the archive, recovery_target_lsn = TARGET
     (exclusive: the records ending at or before it), recovery_target_action = promote;
     started, then polled until pg_is_in_recovery() is false.
   Ours and PITR are then cross-checked (row counts and balance sums of pgbench's tables).
5. Snapshot create, the daemon's way: one committed INSERT on the live server, then the
   clock runs while ingest catches up to pg_current_wal_flush_lsn() (read from pg_wal, as a
   follower that was caught up) and `StorageHistory.snapshots.add(new_snapshot(...))`
   names it; --snapshots times, median and max. At the --db-gib database, and (unless
   --big-gib 0) at a second node of the same storage whose --big-gib database was loaded
   with wal_level=minimal (no WAL to ingest) and imported whole.

Prints a table and, last, one JSON line. Run by hand, never by CI.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from bench.common import (
    MIB,
    current_lsn,
    machine_info,
    measure,
    mib,
    mib_per_s,
    pgbench_init,
    pgbench_rounds,
    print_machine,
    print_table,
    run_benchmark,
    say,
    switch_wal,
    throwaway_cluster,
    tree_bytes,
    vm_hwm_kib,
    wal_segment_size,
)
from bench.pyspy import recording, summary, wrapped
from cli import postmaster
from datadir_files.pg_account import give_to_pg_user, make_pg_dir
from datadir_files.untar import staged_dir
from pageserver.api.local_files import write_tar_into
from pageserver.basebackup.snapshot_file import TarCounter
from pageserver.basebackup.sources import TimelineSource
from pageserver.basebackup.tar_stream import AlignedChunks, basebackup, basebackup_chunks
from pageserver.history.node_store import NodeStore, StorageHistory
from pageserver.history.snapshots import new_snapshot
from pageserver.malloc_tuning import tune_malloc
from pg15.lsn import format_lsn, segment_file_name
from pg15.records import decode_record
from pg15.xlog_reader import WalReader
from tests.pgtest import PgTestCluster, PgTestServer

BENCH = "extract"
GIB = 1 << 30
SCALE_PER_GIB = 70  # pgbench: ~15 MiB of tables and indexes per scale unit
CONFIG_FILES = ("postgresql.conf", "pg_hba.conf", "pg_ident.conf", "postgresql.auto.conf")
SANITY_SQL = (
    "SELECT (SELECT count(*) FROM pgbench_accounts) || ' ' || "
    "(SELECT sum(abalance) FROM pgbench_accounts) || ' ' || "
    "(SELECT sum(bbalance) FROM pgbench_branches) || ' ' || "
    "(SELECT count(*) FROM pgbench_history)"
)

log = logging.getLogger(BENCH)


def server_settings(wal_gib: float, db_gib: float) -> dict[str, object]:
    keep_mib = int((wal_gib + db_gib) * 2 * 1024) + 2048
    return {
        "fsync": "off",
        "autovacuum": "off",
        "shared_buffers": "256MB",
        "max_wal_size": "16GB",
        "min_wal_size": "1GB",
        # Keeps every segment since the import (our ingest and the archive read pg_wal).
        "wal_keep_size": f"{keep_mib}MB",
        "checkpoint_timeout": "1h",
    }


# -- our ingest: pg_wal → reader → decode → NodeStore, resumable --------------------------------


CHUNK = 128 * 1024
"""WAL fed to the reader at a time: MAX_SEND_SIZE, the largest XLogData message a walsender
sends (bench.ingest, which this was imported from, now reads as the daemon's archive
decoder does)."""


class WalTail:
    """Feeds a server's pg_wal to a NodeStore from `start` onwards, up to any LSN it is asked
    for (bytes past a live server's flush LSN are never read)."""

    def __init__(self, store: NodeStore, wal_dir: Path, start: int, seg: int) -> None:
        self.store, self.wal_dir, self.seg = store, wal_dir, seg
        self.pos = start
        self.reader = WalReader(start, seg, timeline=1)
        self.records = 0

    def feed_until(self, upto: int) -> None:
        store, reader = self.store, self.reader
        while self.pos < upto:
            segno, off = divmod(self.pos, self.seg)
            n = min(CHUNK - self.pos % CHUNK, upto - self.pos, self.seg - off)
            with open(self.wal_dir / segment_file_name(1, segno, self.seg), "rb") as f:
                f.seek(off)
                data = f.read(n)
            if len(data) != n:
                raise RuntimeError(f"short read of WAL at {format_lsn(self.pos)}")
            reader.feed(data)
            for raw in reader.records():
                store.ingest(decode_record(raw), raw.data)
                self.records += 1
            if reader.end_of_wal is not None:
                raise RuntimeError(f"WAL ended early at {format_lsn(reader.end_of_wal.lsn)}")
            self.pos += n
            store.maybe_flush()


def record_end_at_or_after(wal_dir: Path, pos: int, seg: int) -> int:
    """The end LSN of the first record ending at or after `pos` (read from its segment)."""
    segno = pos // seg
    reader = WalReader(segno * seg, seg, timeline=1)
    while True:
        reader.feed((wal_dir / segment_file_name(1, segno, seg)).read_bytes())
        for raw in reader.records():
            if raw.end_lsn >= pos:
                return int(raw.end_lsn)
        segno += 1


# -- the three ways to a startable directory ----------------------------------------------------


@dataclass
class StartResult:
    wall: float
    parts: dict[str, float]
    server: PgTestServer


def config_files(server: PgTestServer) -> dict[str, bytes]:
    return {name: (server.datadir / name).read_bytes() for name in CONFIG_FILES}


def ours(
    cluster: PgTestCluster,
    store: NodeStore,
    target: int,
    config: dict[str, bytes],
    py_spy: Path | None = None,
    stream: bool = False,
) -> tuple[StartResult, float, int]:
    """basebackup at `target` written into the new data directory as the home's own daemon
    writes it into the directory the `neon` CLI hands it (pageserver/api/local_files.py:
    the tar made on one thread, unpacked with the CLI's checks on another), configure,
    start. With `stream`, as a remote pageserver streams it instead: through a pipe into a
    process that unpacks it. With `py_spy`, both sides are sampled into it (basebackup.txt:
    this process, every thread; untar.txt: the unpacking process, idle included, so its
    wait for the pipe shows)."""
    state = store.state
    assert state is not None
    server = cluster.create_empty(cluster.servers[0].settings)
    untar = [sys.executable, "-m", "bench.pipe_ends", "untar", str(server.datadir)]
    sampling: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if py_spy is not None:
        untar = wrapped(untar, py_spy / "untar.txt")
        sampling = recording(os.getpid(), py_spy / "basebackup.txt")
    parts: dict[str, float] = {}
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    source = TimelineSource(store.timeline, target)
    with sampling, measure() as m:
        t0 = time.perf_counter()
        if stream:
            with subprocess.Popen(untar, stdin=subprocess.PIPE) as proc:
                assert proc.stdin is not None
                counted = _CountingWriter(proc.stdin)
                with proc.stdin:
                    basebackup(
                        source,
                        target,
                        pg_timeline=state.pg_timeline,
                        out=cast(BinaryIO, counted),  # it only writes
                        config_files=config,
                    )
                parts["basebackup_s"] = time.perf_counter() - t0
            if proc.returncode != 0:
                raise RuntimeError(f"unpacking our basebackup failed (exit {proc.returncode})")
            tar_bytes = counted.bytes
        else:
            aligned = AlignedChunks()
            _info, chunks = basebackup_chunks(
                source, target, pg_timeline=state.pg_timeline, config_files=config, aligned=aligned
            )
            tar = TarCounter(chunks)
            with staged_dir(server.datadir) as tmp:  # what the CLI makes and hands over
                fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
                try:
                    write_tar_into(iter(tar), fd, aligned=aligned)
                finally:
                    os.close(fd)
            tar_bytes = tar.bytes
        parts["basebackup_and_unpack_s"] = time.perf_counter() - t0
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        parts["unpack_cpu_s"] = (children1.ru_utime - children0.ru_utime) + (
            children1.ru_stime - children0.ru_stime
        )
        t0 = time.perf_counter()
        postmaster.write_config(server.datadir, *server.config())
        server.start()
        parts["start_s"] = time.perf_counter() - t0
    return StartResult(m.wall, parts, server), m.cpu, tar_bytes


class _CountingWriter:
    """A binary sink that counts what goes through it (the tar's size)."""

    def __init__(self, sink: IO[bytes]) -> None:
        self._sink = sink
        self.bytes = 0

    def write(self, data: bytes) -> int:
        n = self._sink.write(data)
        self.bytes += n
        return n


def pg_basebackup_ref(cluster: PgTestCluster, source: PgTestServer) -> StartResult:
    """pg_basebackup -X stream -c fast of the live server, configure, start."""
    server = cluster.create_empty(source.settings)
    parts: dict[str, float] = {}
    t_start = t0 = time.perf_counter()
    source.run(
        "pg_basebackup", "-D", str(server.datadir), "-X", "stream", "-c", "fast",
        "-d", source.dsn(),
    )  # fmt: skip
    parts["pg_basebackup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    postmaster.write_config(server.datadir, *server.config())
    server.start()
    parts["start_s"] = time.perf_counter() - t0
    return StartResult(time.perf_counter() - t_start, parts, server)


def pitr_ref(
    cluster: PgTestCluster, source: PgTestServer, base: Path, archive: Path, target: int
) -> StartResult:
    """Copy of BASE + stock archive recovery to `target`, promoted."""
    settings = {
        **source.settings,
        "restore_command": f"cp {archive}/%f %p",
        "recovery_target_lsn": format_lsn(target),
        "recovery_target_inclusive": False,
        "recovery_target_action": "promote",
    }
    server = cluster.create_empty(settings)
    parts: dict[str, float] = {}
    t_start = t0 = time.perf_counter()
    subprocess.run(["cp", "-a", str(base), str(server.datadir)], check=True)
    parts["copy_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    postmaster.write_config(server.datadir, *server.config())
    (server.datadir / "recovery.signal").touch()
    give_to_pg_user(server.datadir / "recovery.signal")
    server.start()  # returns once it accepts (read-only) connections, during recovery
    parts["start_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    deadline = t0 + 3600
    while server.psql("SELECT pg_is_in_recovery()") != "f":
        if time.perf_counter() > deadline:
            raise TimeoutError("stock recovery did not finish within an hour")
        time.sleep(0.05)
    parts["replay_until_promoted_s"] = time.perf_counter() - t0
    return StartResult(time.perf_counter() - t_start, parts, server)


def first_scan(server: PgTestServer) -> tuple[str, float]:
    """The cross-check's query, timed, right after the start: it reads every table, so what a
    side's writing left out of the page cache is paid here, outside the extraction's own
    window (f6a84b2's uncached writes moved ~3 s of reads here; reverted)."""
    t0 = time.perf_counter()
    out = server.psql(SANITY_SQL)
    return out, time.perf_counter() - t0


def stop_and_remove(server: PgTestServer) -> None:
    server.stop("immediate")
    shutil.rmtree(server.datadir, ignore_errors=True)


# -- snapshot create ---------------------------------------------------------------------------


@dataclass
class SnapshotTimes:
    seconds: list[float]
    waited_bytes: list[int]

    def summary(self) -> dict[str, Any]:
        return {
            "n": len(self.seconds),
            "median_ms": round(statistics.median(self.seconds) * 1e3, 3),
            "max_ms": round(max(self.seconds) * 1e3, 3),
            "median_wal_waited_bytes": int(statistics.median(self.waited_bytes)),
        }


def time_snapshots(
    server: PgTestServer, tail: WalTail, node: str, n: int, tag: str
) -> SnapshotTimes:
    """`n` times: a committed INSERT, then (timed) ingest up to the flush LSN + snapshot add."""
    store = tail.store
    state = store.state
    assert state is not None
    server.psql("CREATE TABLE IF NOT EXISTS bench_snap (i int, t timestamptz)")
    tail.feed_until(current_lsn(server, "pg_current_wal_flush_lsn"))  # caught up, as a follower
    store.flush()  # so no periodic flush (due every 10 s) lands in the timed section
    out = SnapshotTimes([], [])
    for i in range(n):
        server.psql(f"INSERT INTO bench_snap VALUES ({i}, now())")
        flush = current_lsn(server, "pg_current_wal_flush_lsn")
        before = tail.pos
        t0 = time.perf_counter()
        tail.feed_until(flush)
        lsn = store.timeline.last_record_lsn
        store.history.snapshots.add(
            new_snapshot(f"{node}@{tag}{i}", node, state.timeline_id, lsn, parent=state.parent)
        )
        out.seconds.append(time.perf_counter() - t0)
        out.waited_bytes.append(flush - before)
    return out


def database_bytes(server: PgTestServer) -> int:
    return int(server.psql("SELECT sum(pg_database_size(oid)) FROM pg_database"))


def big_node(
    cluster: PgTestCluster, history: StorageHistory, big_gib: float, n: int
) -> dict[str, Any]:
    """A --big-gib database loaded without WAL, imported whole, then snapshot create timed."""
    minimal = {
        **cluster.servers[0].settings,
        "wal_level": "minimal",
        "max_wal_senders": 0,
        "max_replication_slots": 0,
    }
    server = cluster.create(minimal)
    scale = max(1, round(big_gib * SCALE_PER_GIB))
    pgbench_init(server, scale)  # COPY after TRUNCATE in one transaction: no WAL at minimal
    server.stop()
    for key in ("wal_level", "max_wal_senders", "max_replication_slots"):
        del server.settings[key]
    postmaster.write_config(server.datadir, *server.config())
    server.start()  # once at wal_level=replica, so pg_control says so
    db_bytes = database_bytes(server)
    server.stop()
    say(f"import of the {mib(db_bytes):.0f} MiB data directory (node 'big')")
    store = NodeStore(history, "big")
    with measure() as m:
        import_lsn = store.import_datadir(server.datadir)
    server.start()
    tail = WalTail(store, server.wal_dir, -(-import_lsn // 8) * 8, wal_segment_size(server))
    say(f"snapshot create x{n} at {mib(db_bytes):.0f} MiB")
    times = time_snapshots(server, tail, "big", n, "big")
    server.stop()
    return {
        "pgbench_scale": scale,
        "db_bytes": db_bytes,
        "import_s": round(m.wall, 3),
        "import_mib_per_s": round(mib_per_s(db_bytes, m.wall), 1),
        "snapshot": times.summary(),
    }


# -- main --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine_before": machine_info()}
    scans: dict[str, float] = {}  # first full scan after the start, per side
    rng = random.Random(args.seed)
    with throwaway_cluster(keep=args.keep) as cluster:
        say("initdb of a throwaway PostgreSQL 15 server; BASE copy; import")
        server = cluster.create(server_settings(args.wal_gib, args.db_gib), start=False)
        work = cluster.base / "bench"
        make_pg_dir(work, 0o711)
        base = work / "base"
        subprocess.run(["cp", "-a", str(server.datadir), str(base)], check=True)
        history = StorageHistory(work / "pagestore")
        store = NodeStore(history, "bench")
        try:
            import_lsn = store.import_datadir(server.datadir)
            server.start()
            seg = wal_segment_size(server)

            scale = max(1, round(args.db_gib * SCALE_PER_GIB))
            t0 = time.perf_counter()
            pgbench_init(server, scale)
            init_end = current_lsn(server)
            target_wal = max(
                import_lsn + int(args.wal_gib * GIB), init_end + args.min_run_mib * MIB
            )
            rounds = pgbench_rounds(server, import_lsn, target_wal)
            end = switch_wal(server, seg)
            workload_s = time.perf_counter() - t0
            db_bytes = database_bytes(server)
            say(
                f"history {mib(end - import_lsn):.0f} MiB of WAL ({format_lsn(import_lsn)}.."
                f"{format_lsn(end)}), database {mib(db_bytes):.0f} MiB"
            )

            say("ours: ingest of the history (reader + decode + NodeStore ingest + flush)")
            tail = WalTail(store, server.wal_dir, -(-import_lsn // 8) * 8, seg)
            with measure() as ingest_m:
                tail.feed_until(end)
                store.flush()
            say(f"ingested {tail.records:,} records in {ingest_m.wall:.1f} s")
            layer_bytes, _ = tree_bytes(history.root / "timelines")

            mid = (import_lsn + end) // 2
            lo = max(mid, init_end)
            target = record_end_at_or_after(server.wal_dir, rng.randrange(lo, end - seg), seg)
            say(f"TARGET {format_lsn(target)} ({mib(target - import_lsn):.0f} MiB into history)")

            archive = work / "archive"
            make_pg_dir(archive)
            for segno in range(import_lsn // seg, end // seg):
                name = segment_file_name(1, segno, seg)
                shutil.copyfile(server.wal_dir / name, archive / name)
                give_to_pg_user(archive / name)
            config = config_files(server)
            results["machine_before_runs"] = machine_info()

            way = "a pipe → unpacked by a process of its own" if args.stream else "files"
            say(f"ours: basebackup at TARGET → {way} → start")
            our, our_cpu, tar_bytes = ours(cluster, store, target, config, args.py_spy, args.stream)
            ours_check, scans["ours"] = first_scan(our.server)
            say(f"ours: {our.wall:.1f} s; PITR reference: copy BASE, replay to TARGET")
            pitr = pitr_ref(cluster, server, base, archive, target)
            pitr_check, scans["pitr"] = first_scan(pitr.server)
            say(f"PITR: {pitr.wall:.1f} s; cross-check")
            stop_and_remove(our.server)
            stop_and_remove(pitr.server)
            shutil.rmtree(archive, ignore_errors=True)

            say("pg_basebackup reference of the live server")
            ref = pg_basebackup_ref(cluster, server)
            _, scans["pg_basebackup"] = first_scan(ref.server)
            stop_and_remove(ref.server)
            results["machine_after_runs"] = machine_info()

            say(f"snapshot create x{args.snapshots} at {mib(db_bytes):.0f} MiB")
            snaps = time_snapshots(server, tail, "bench", args.snapshots, "s")
            server.stop()
            big = None
            if args.big_gib > 0:
                shutil.rmtree(server.datadir, ignore_errors=True)  # room for the big one
                big = big_node(cluster, history, args.big_gib, args.snapshots)
            results["machine_after"] = machine_info()
        finally:
            history.close()

    results.update(
        pgbench_scale=scale,
        pgbench_rounds=rounds,
        workload_s=round(workload_s, 1),
        db_bytes=db_bytes,
        history_wal_bytes=end - import_lsn,
        init_wal_bytes=init_end - import_lsn,
        target_lsn=format_lsn(target),
        target_offset_bytes=target - import_lsn,
        ingest={
            "wall_s": round(ingest_m.wall, 1),
            "cpu_s": round(ingest_m.cpu, 1),
            "records": tail.records,
            "mib_per_s": round(mib_per_s(end - import_lsn, ingest_m.wall), 2),
            "layer_bytes": layer_bytes,
        },
        ours={
            "way": "stream" if args.stream else "files",
            "wall_s": round(our.wall, 3),
            "cpu_s": round(our_cpu, 3),
            "tar_bytes": tar_bytes,
            **{k: round(v, 3) for k, v in our.parts.items()},
        },
        pg_basebackup={
            "wall_s": round(ref.wall, 3),
            **{k: round(v, 3) for k, v in ref.parts.items()},
        },
        pitr={"wall_s": round(pitr.wall, 3), **{k: round(v, 3) for k, v in pitr.parts.items()}},
        ratio_ours_pg_basebackup=round(our.wall / ref.wall, 3),
        ratio_ours_pitr=round(our.wall / pitr.wall, 3),
        same_as_pitr=ours_check == pitr_check,
        check={"ours": ours_check, "pitr": pitr_check},
        first_scan_s={k: round(v, 3) for k, v in scans.items()},
        ratio_with_first_scan_ours_pitr=round(
            (our.wall + scans["ours"]) / (pitr.wall + scans["pitr"]), 3
        ),
        snapshot={"db_bytes": db_bytes, **snaps.summary()},
        snapshot_big=big,
        pageserver_peak_rss_mib=round(vm_hwm_kib() / 1024, 1),
    )

    print()
    print(
        f"Startable directory from a {mib(db_bytes):.0f} MiB database with "
        f"{mib(end - import_lsn):.0f} MiB of WAL since its base (pgbench scale {scale}), "
        f"at {format_lsn(target)} ({mib(target - import_lsn):.0f} MiB into the history)"
    )
    print_table(
        ["", "wall s", "parts"],
        [
            ["ours: basebackup+extract+start", our.wall, _parts(our.parts)],
            ["pg_basebackup -X stream + start", ref.wall, _parts(ref.parts)],
            ["PITR: copy base + replay + promote", pitr.wall, _parts(pitr.parts)],
        ],
    )
    print(
        f"ratio ours / pg_basebackup: {our.wall / ref.wall:.3f}; ours / PITR: "
        f"{our.wall / pitr.wall:.3f}; ours CPU {our_cpu:.1f} s, tar {mib(tar_bytes):.0f} MiB"
    )
    print(f"same state as PITR (counts, balances): {ours_check == pitr_check} ({ours_check})")
    print(
        f"first full scan after the start (the cross-check's query, untimed above): ours "
        f"{scans['ours']:.2f} s, pg_basebackup {scans['pg_basebackup']:.2f} s, PITR "
        f"{scans['pitr']:.2f} s; with it ours / PITR "
        f"{(our.wall + scans['ours']) / (pitr.wall + scans['pitr']):.3f}"
    )
    print(
        f"ingest: {tail.records:,} records in {ingest_m.wall:.1f} s "
        f"({mib_per_s(end - import_lsn, ingest_m.wall):.2f} MiB/s), "
        f"layers {mib(layer_bytes):.0f} MiB"
    )
    print()
    print("snapshot create (ingest up to the flush LSN + snapshots.add)")
    rows: list[list[object]] = [
        [f"{mib(db_bytes):.0f} MiB", *_snap_row(snaps.summary())],
    ]
    if big is not None:
        rows.append([f"{mib(big['db_bytes']):.0f} MiB", *_snap_row(big["snapshot"])])
    print_table(["database", "n", "median ms", "max ms", "WAL waited (median bytes)"], rows)
    print(
        f"pageserver peak RSS (VmHWM of this process, which runs the page store: ingest, "
        f"extraction, snapshot create, the big node's import): "
        f"{results['pageserver_peak_rss_mib']:.0f} MiB"
    )
    print_machine(results)
    return results


def _parts(parts: dict[str, float]) -> str:
    return ", ".join(f"{k.removesuffix('_s')} {v:.2f}" for k, v in parts.items())


def _snap_row(s: dict[str, Any]) -> list[object]:
    return [s["n"], s["median_ms"], s["max_ms"], s["median_wal_waited_bytes"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.extract", description=__doc__)
    ap.add_argument("--db-gib", type=float, default=1.0, help="database size (pgbench scale)")
    ap.add_argument("--wal-gib", type=float, default=1.0, help="WAL since the base image")
    ap.add_argument(
        "--min-run-mib", type=int, default=256, help="pgbench run WAL after pgbench -i, at least"
    )
    ap.add_argument(
        "--big-gib", type=float, default=4.0, help="second database for snapshot create (0: skip)"
    )
    ap.add_argument("--snapshots", type=int, default=5, help="snapshot creates timed per size")
    ap.add_argument("--seed", type=int, default=1, help="random seed for the target LSN")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (data, layers)")
    ap.add_argument("--py-spy", type=Path, metavar="DIR", help="sample our extraction into DIR")
    ap.add_argument(
        "--stream",
        action="store_true",
        help="ours as a remote pageserver's: the tar through a pipe to an unpacking process",
    )
    args = ap.parse_args(argv)
    if args.snapshots < 1:
        ap.error("--snapshots must be at least 1")
    if args.py_spy is not None:
        args.py_spy.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    # This process ingests and makes the tar as the pageserver does: with its malloc settings,
    # set before any thread starts (pageserver/daemon.py).
    tune_malloc()
    # Ctrl-C and SIGTERM both unwind through the finally blocks that stop what we started.
    code = run_benchmark(BENCH, run, args)
    if args.py_spy is not None:
        for out in sorted(args.py_spy.glob("*.txt")):
            print(summary(out), file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
