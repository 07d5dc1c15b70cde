"""Ingest benchmark (issue 4): decode + ingest + flush throughput, GetPage latency, bytes stored.

    .venv/bin/python -m bench.ingest [--backlog-mib 512] [--hot-pages 200] [--hot-rounds 5]
                                     [--cold-reads 300] [--seed 1] [--keep] [--profile FILE]

1. A throwaway PostgreSQL 15 server is initdb'd (not started) and imported into a NodeStore
   at its shutdown checkpoint, as `neon pg create` does. It is then started with
   wal_keep_size large enough to retain the whole backlog, and a physical slot for the
   reference is created.
2. pgbench (init, then rounds of `-c 4 -T 10` with a CHECKPOINT after each) until
   --backlog-mib of WAL exist; pg_switch_wal(); END is that segment boundary.
3. Reference: `pg_receivewal` streams the backlog from its slot (bench.common.run_pg_receivewal).
4. The server is stopped. Ours: the daemon's ingest path over the server's pg_wal from the
   import LSN to END, as its follower decodes the archive its receiver writes
   (NodeFollower._decode_loop): each segment read READ_CHUNK (1 MiB) at a time and fed whole
   to a WalReader → NodeStore.ingest_raw_batch per batch (decode and ingest fused in C where
   it applies, NEON_PURE_PYTHON=1 for none) → NodeStore.maybe_flush per read, and a final
   NodeStore.flush (freeze, write L0 layers, compaction), all timed together. Two figures:
   "durable" is the time until everything ingested is in L0 layer files (what the daemon
   waits for before it calls WAL durable: its compaction runs in the background meanwhile and
   after); "with compaction" goes on until the final flush's compaction pass (which first
   waits for a background pass running then) is done: the figure of earlier runs.
5. GetPage (`materialize`): hot pages (every pgbench_branches/tellers page and the most
   recently written pgbench_accounts pages in the last WAL, read at the last LSN, in
   --hot-rounds random passes: first reads rebuild, later ones hit the caches) and cold pages
   (random pgbench_accounts pages at random LSNs after pgbench -i, page cache cleared).
6. Bytes stored: layer files on disk after the final flush, less what the import wrote, per
   byte of WAL ingested (the daemon also keeps the raw WAL archive, not counted here).
7. Compaction: the wall time of image creation and of L0 merges over every pass (the
   background flusher's included), the peak RSS of this process (the page store runs in
   it) right after the ingest, and the CPU time of each of its threads (`thread_cpu`).

Prints a table and, last, one JSON line. Run by hand, never by CI.
"""

from __future__ import annotations

import argparse
import cProfile
import logging
import os
import pstats
import random
import resource
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    MIB,
    REF_SLOT,
    Measure,
    create_slot,
    generate_backlog,
    machine_info,
    measure,
    mib,
    mib_per_s,
    percentile,
    print_machine,
    print_table,
    restart_lsn,
    run_benchmark,
    run_pg_receivewal,
    say,
    throwaway_cluster,
    tree_bytes,
)
from pageserver.follow.node_follower import READ_CHUNK
from pageserver.history.node_store import NodeStore, StorageHistory
from pageserver.reconstruct.page_cache import PAGE_CACHE
from pageserver.reconstruct.reads import get_rel_size, materialize
from pageserver.storage.compaction import CompactionTotals
from pageserver.storage.keys import Key, rel_block_key
from pageserver.storage.timeline import Timeline
from pg15.lsn import format_lsn, segment_file_name
from pg15.records import decode_record
from pg15.xlog_reader import WalReader
from tests.pgtest import PgTestServer

BENCH = "ingest"
DEFAULTTABLESPACE_OID = 1663
HOT_WAL_TAIL = 8 * MIB  # hot pages: those written in this much WAL before END

log = logging.getLogger(BENCH)


def server_settings(backlog_mib: int) -> dict[str, object]:
    return {
        "fsync": "off",
        "synchronous_commit": "off",
        "autovacuum": "off",
        "shared_buffers": "256MB",
        "max_wal_size": "16GB",
        "min_wal_size": "1GB",
        # Keeps every segment since the import (the slot only exists once the server runs).
        "wal_keep_size": f"{2 * backlog_mib + 1024}MB",
        "checkpoint_timeout": "1h",
    }


@dataclass
class PgbenchRels:
    db: int
    accounts: int
    branches: int
    tellers: int


def pgbench_rels(server: PgTestServer) -> PgbenchRels:
    db = int(server.psql("SELECT oid FROM pg_database WHERE datname = 'postgres'"))
    nodes = [
        int(server.psql(f"SELECT pg_relation_filenode('{t}')"))
        for t in ("pgbench_accounts", "pgbench_branches", "pgbench_tellers")
    ]
    return PgbenchRels(db, *nodes)


# -- ours: the daemon's ingest path ------------------------------------------------------------


@dataclass
class IngestResult:
    measure: Measure
    wal_bytes: int
    records: int
    flushes: int
    flush_seconds: float  # inside `measure`: freeze + layer writes + compaction
    durable_seconds: float  # inside `measure`: from the start until every L0 file is written
    compaction: CompactionTotals  # every pass, background ones included
    peak_rss_mib: float  # this process (the page store runs in it), after the ingest
    thread_cpu: dict[str, float]  # CPU seconds by thread (thread_cpu), after the ingest


def segments_between(wal_dir: Path, start: int, end: int, seg: int) -> list[tuple[Path, int]]:
    """(segment file, offset to start reading at) covering [start, end)."""
    out = []
    for segno in range(start // seg, (end - 1) // seg + 1):
        path = wal_dir / segment_file_name(1, segno, seg)
        out.append((path, start - segno * seg if segno == start // seg else 0))
    return out


def ingest_backlog(store: NodeStore, wal_dir: Path, start: int, end: int, seg: int) -> IngestResult:
    """Segments read READ_CHUNK at a time → WalReader batches → NodeStore.ingest_raw_batch
    (fused C decode + ingest where it applies), maybe_flush per read, final flush: what the
    daemon's decode loop does over its archive (NodeFollower._decode_loop). Feeding 128 KiB
    slices of whole segments read at once (a walsender's messages; the daemon decodes from
    its archive, not from them) cost the decode thread ~20% more CPU (a fresh 16 MiB buffer
    a segment, faulted in: 41k page faults against 14k; bench/README)."""
    timeline = store.timeline
    reader = WalReader(start, seg, timeline=1)
    records = flushes = 0
    flush_seconds = 0.0
    with measure() as m:
        started = time.perf_counter()
        for path, offset in segments_between(wal_dir, start, end, seg):
            with path.open("rb") as f:
                f.seek(offset)
                while data := f.read(READ_CHUNK):
                    reader.feed(data)
                    while batch := reader.read_batch():
                        store.ingest_raw_batch(batch)
                        records += len(batch)
                    durable = timeline.disk_consistent_lsn
                    t0 = time.perf_counter()
                    # the WAL not read yet, as the daemon's follower tells it (its archive's end)
                    store.maybe_flush(backlog=max(0, end - reader.fed_lsn))
                    if timeline.disk_consistent_lsn != durable:
                        flushes += 1
                        flush_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        store.make_durable()
        durable_seconds = time.perf_counter() - started
        store.flush()  # nothing left to write: the compaction pass (after a running one)
        flushes += 1
        flush_seconds += time.perf_counter() - t0
    if reader.end_of_wal is not None:
        raise RuntimeError(f"WAL ended early at {format_lsn(reader.end_of_wal.lsn)}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return IngestResult(
        m, end - start, records, flushes, flush_seconds, durable_seconds,
        store.compaction_totals, peak, thread_cpu(),
    )  # fmt: skip


def thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's live threads by name, a pool's threads together
    (MainThread: reading, decoding, ingest and the final pass; flush-*: L0 writes; compact-*:
    background compaction; layer-zstd: compression of every layer): on a shared box, wall
    times say little about where the CPU went (Linux /proc/self/task/<tid>/stat, utime and
    stime in clock ticks)."""
    names = {th.native_id: th.name.rsplit("_", 1)[0] for th in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid, name in names.items():
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:
            continue  # ended meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        out[name] = round(out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick, 2)
    return out


# -- GetPage latency ---------------------------------------------------------------------------


@dataclass
class Latencies:
    seconds: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float | int]:
        return {
            "reads": len(self.seconds),
            "p50_ms": round(percentile(self.seconds, 50) * 1e3, 3),
            "p99_ms": round(percentile(self.seconds, 99) * 1e3, 3),
            "max_ms": round(max(self.seconds, default=float("nan")) * 1e3, 3),
        }


def timed_read(timeline: Timeline, key: Key, lsn: int, into: Latencies) -> None:
    t0 = time.perf_counter()
    materialize(timeline, key, lsn)
    into.seconds.append(time.perf_counter() - t0)


def recent_pages(
    wal_dir: Path, end: int, seg: int, rels: PgbenchRels, accounts_pages: int
) -> list[Key]:
    """Main-fork pages of branches and tellers, and the `accounts_pages` accounts pages
    written last, among the block references of the WAL tail before `end`."""
    start = max(seg, end - HOT_WAL_TAIL) // seg * seg
    reader = WalReader(start, seg, timeline=1)
    seen: dict[tuple[int, int], None] = {}  # (relfilenode, blkno), in order of last write
    wanted = {rels.accounts, rels.branches, rels.tellers}
    for path, offset in segments_between(wal_dir, start, end, seg):
        reader.feed(memoryview(path.read_bytes())[offset:])
        for raw in reader.records():
            for ref in decode_record(raw).blocks:
                if ref.fork == 0 and ref.rnode.db == rels.db and ref.rnode.rel in wanted:
                    seen.pop((ref.rnode.rel, ref.blkno), None)
                    seen[(ref.rnode.rel, ref.blkno)] = None
    small = [k for k in seen if k[0] != rels.accounts]
    accounts = [k for k in seen if k[0] == rels.accounts][-accounts_pages:]
    return [rel_block_key(DEFAULTTABLESPACE_OID, rels.db, r, 0, b) for r, b in small + accounts]


def hot_reads(
    timeline: Timeline, keys: list[Key], rounds: int, rng: random.Random
) -> tuple[Latencies, Latencies]:
    """(first reads, repeated reads) of `keys` at the last LSN, in random order per round."""
    lsn = timeline.last_record_lsn
    first, again = Latencies(), Latencies()
    for i in range(rounds):
        order = list(keys)
        rng.shuffle(order)
        for key in order:
            timed_read(timeline, key, lsn, first if i == 0 else again)
    return first, again


def cold_reads(
    timeline: Timeline, rels: PgbenchRels, lo: int, hi: int, n: int, rng: random.Random
) -> Latencies:
    """Random accounts pages at random LSNs in [lo, hi), with the redone-page cache cleared."""
    PAGE_CACHE.clear()
    out = Latencies()
    while len(out.seconds) < n:
        lsn = rng.randrange(lo, hi)
        size = get_rel_size(timeline, DEFAULTTABLESPACE_OID, rels.db, rels.accounts, 0, lsn)
        if not size:
            continue
        key = rel_block_key(DEFAULTTABLESPACE_OID, rels.db, rels.accounts, 0, rng.randrange(size))
        timed_read(timeline, key, lsn, out)
    return out


# -- main --------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine_before": machine_info()}
    rng = random.Random(args.seed)
    with throwaway_cluster(keep=args.keep) as cluster:
        say("initdb of a throwaway PostgreSQL 15 server; import at its shutdown checkpoint")
        server = cluster.create(server_settings(args.backlog_mib), start=False)
        work = cluster.base / "bench"
        work.mkdir()
        history = StorageHistory(work / "pagestore")
        store = NodeStore(history, "bench")
        layers = history.root / "timelines"
        try:
            import_lsn = store.import_datadir(server.datadir)
            import_bytes, _ = tree_bytes(layers)
            server.start()
            create_slot(server, REF_SLOT)
            backlog = generate_backlog(server, args.backlog_mib)
            seg, end = backlog.segment_size, backlog.end_lsn
            rels = pgbench_rels(server)
            ref_bytes = end - restart_lsn(server, REF_SLOT) // seg * seg

            say(f"pg_receivewal: {mib(ref_bytes):.0f} MiB")
            ref = run_pg_receivewal(server, work / "pg_receivewal", end, seg)
            server.stop()  # nothing else competes for the CPU while we ingest

            say(
                f"ours (reader + decode + NodeStore ingest + flush): "
                f"{mib(end - import_lsn):.0f} MiB from {format_lsn(import_lsn)}"
            )
            profile = cProfile.Profile() if args.profile else None
            if profile is not None:
                profile.enable()
            try:
                start = -(-import_lsn // 8) * 8  # the next record starts MAXALIGNed
                ours = ingest_backlog(store, server.wal_dir, start, end, seg)
            finally:
                if profile is not None:
                    profile.disable()
                    profile.dump_stats(args.profile)
            results["machine_after_ingest"] = machine_info()
            stored_bytes, layer_files = tree_bytes(layers)

            say("GetPage latency: hot and cold pages")
            timeline = store.timeline
            hot_keys = recent_pages(server.wal_dir, end, seg, rels, args.hot_pages)
            hot_first, hot_again = hot_reads(timeline, hot_keys, args.hot_rounds, rng)
            cold = cold_reads(
                timeline, rels, backlog.init_end_lsn, timeline.last_record_lsn,
                args.cold_reads, rng,
            )  # fmt: skip
            results["machine_after"] = machine_info()
        finally:
            history.close()
    if profile is not None:
        pstats.Stats(str(args.profile)).sort_stats("tottime").print_stats(20)

    m = ours.measure
    ref_rate = mib_per_s(ref_bytes, ref.wall)
    our_rate = mib_per_s(ours.wal_bytes, m.wall)
    durable_rate = mib_per_s(ours.wal_bytes, ours.durable_seconds)
    grown = stored_bytes - import_bytes
    results.update(
        backlog_mib=round(mib(end - backlog.start_lsn), 1),
        pgbench_scale=backlog.scale,
        pgbench_rounds=backlog.rounds,
        pg_receivewal={
            "mib": round(mib(ref_bytes), 1),
            "wall_s": round(ref.wall, 3),
            "cpu_s": round(ref.cpu, 3),
            "mib_per_s": round(ref_rate, 1),
        },
        ours={
            "mib": round(mib(ours.wal_bytes), 1),
            "wall_s": round(m.wall, 3),
            "cpu_s": round(m.cpu, 3),
            "mib_per_s": round(our_rate, 2),
            "records": ours.records,
            "records_per_s": round(ours.records / m.wall),
            "flushes": ours.flushes,
            "flush_s": round(ours.flush_seconds, 3),
            "durable_wall_s": round(ours.durable_seconds, 3),
            "durable_mib_per_s": round(durable_rate, 2),
            "image_creation_s": round(ours.compaction.image_seconds, 3),
            "images_written": ours.compaction.images_written,
            "l0_merge_s": round(ours.compaction.l0_seconds, 3),
            "peak_rss_mib": round(ours.peak_rss_mib, 1),
            "thread_cpu_s": ours.thread_cpu,
        },
        ratio=round(our_rate / ref_rate, 4),
        ratio_durable=round(durable_rate / ref_rate, 4),
        get_page={
            "hot_pages": len(hot_keys),
            "hot_first": hot_first.summary(),
            "hot_repeat": hot_again.summary(),
            "cold": cold.summary(),
        },
        stored={
            "import_bytes": import_bytes,
            "total_bytes": stored_bytes,
            "files": layer_files,
            "wal_bytes": ours.wal_bytes,
            "bytes_per_wal_byte": round(grown / ours.wal_bytes, 4),
        },
    )
    print()
    print(f"Ingest of a {results['backlog_mib']} MiB pgbench backlog (scale {backlog.scale})")
    print_table(
        ["", "MiB", "wall s", "CPU s", "MiB/s", "records/s", "flush s"],
        [
            ["pg_receivewal", mib(ref_bytes), ref.wall, ref.cpu, ref_rate, "-", "-"],
            ["ours: decode+ingest+flush", mib(ours.wal_bytes), m.wall, m.cpu, our_rate,
             round(ours.records / m.wall), ours.flush_seconds],
        ],
    )  # fmt: skip
    print(f"ratio ours / pg_receivewal: {our_rate / ref_rate:.4f} ({ours.records:,} records)")
    print(
        f"ingested durable (L0 written, compaction still to run in the background): "
        f"{ours.durable_seconds:.3f} s, {durable_rate:.1f} MiB/s, "
        f"ratio {durable_rate / ref_rate:.4f}"
    )
    print(
        f"compaction (background passes included, wall time): image creation "
        f"{ours.compaction.image_seconds:.2f} s ({ours.compaction.images_written} layers), "
        f"L0 merge {ours.compaction.l0_seconds:.2f} s; peak RSS {ours.peak_rss_mib:.0f} MiB"
    )
    print("CPU by thread (s): " + ", ".join(f"{k} {v:.2f}" for k, v in ours.thread_cpu.items()))
    print()
    print("GetPage (materialize) latency")
    print_table(
        ["", "reads", "p50 ms", "p99 ms", "max ms"],
        [
            [name, s["reads"], s["p50_ms"], s["p99_ms"], s["max_ms"]]
            for name, s in (
                (f"hot, first read ({len(hot_keys)} pages)", hot_first.summary()),
                (f"hot, repeated ({args.hot_rounds - 1} more rounds)", hot_again.summary()),
                ("cold (random accounts page, random LSN)", cold.summary()),
            )
        ],
    )
    print()
    print(
        f"stored: {mib(stored_bytes):.1f} MiB in {layer_files} files "
        f"({mib(import_bytes):.1f} MiB from the import): "
        f"{grown / ours.wal_bytes:.3f} bytes per WAL byte"
    )
    print_machine(results)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__)
    ap.add_argument("--backlog-mib", type=int, default=512, help="pgbench WAL to ingest")
    ap.add_argument("--hot-pages", type=int, default=200, help="recent accounts pages read hot")
    ap.add_argument("--hot-rounds", type=int, default=5, help="passes over the hot pages")
    ap.add_argument("--cold-reads", type=int, default=300, help="random cold reads")
    ap.add_argument("--seed", type=int, default=1, help="random seed for page and LSN choice")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (data, layers)")
    ap.add_argument("--profile", type=Path, help="cProfile our ingest into this file")
    args = ap.parse_args(argv)
    if args.hot_rounds < 2:
        ap.error("--hot-rounds must be at least 2 (first reads, then repeated ones)")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    # Ctrl-C and SIGTERM both unwind through the finally blocks that stop what we started.
    return run_benchmark(BENCH, run, args)


if __name__ == "__main__":
    sys.exit(main())
