"""Basebackup benchmark (issue 10 item 2): the tar of a node's state right after a bulk load,
with the pages that need redo rebuilt in bulk (range_rebuild, the C chain redo) against the
per-key path (`TimelineSource(bulk=False)`: get_reconstruct_data + reconstruct per page), in
one run.

    .venv/bin/python -m bench.basebackup [--scale 20] [--rounds 3] [--keep]

1. A throwaway PostgreSQL 15 server is initdb'd and imported into a NodeStore (as `neon pg
   create` does), started, loaded with `pgbench -i -s SCALE`; pg_switch_wal() ends the WAL.
2. The daemon's ingest path over its pg_wal (reader → decode → NodeStore.ingest →
   maybe_flush, the background flusher writing layers and compacting), then a wait for the
   flusher: the store a `neon snapshot create` right after the load names; its last part
   stays in the open in-memory layer, as on a live node.
3. --rounds rounds, the two sides alternating (bulk first in odd rounds): basebackup at the
   end LSN into a hashing sink (the page cache cleared before each). The tars must be equal.

Prints a table (best and median of each side), the machine's load, and one JSON line. Run
by hand, never by CI.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import statistics
import time
from typing import Any

from bench.common import (
    machine_info,
    mib,
    mib_per_s,
    pgbench_init,
    print_machine,
    print_table,
    run_benchmark,
    say,
    switch_wal,
    throwaway_cluster,
    vm_hwm_kib,
    wal_segment_size,
)
from bench.extract import WalTail, server_settings
from pageserver.basebackup.sources import TimelineSource
from pageserver.basebackup.tar_stream import basebackup
from pageserver.history.node_store import NodeStore, StorageHistory
from pageserver.reconstruct.page_cache import PAGE_CACHE
from pageserver.storage.keys import FULL_KEYSPACE
from pg15.lsn import format_lsn

BENCH = "basebackup"
SIDES = ("bulk", "per_key")


class _Sink:
    """A file-like end for the tar: counts and hashes, keeps nothing."""

    def __init__(self) -> None:
        self.n = 0
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.n += len(data)
        self.digest.update(data)
        return len(data)


def _one(store: NodeStore, lsn: int, bulk: bool) -> tuple[float, int, str]:
    PAGE_CACHE.clear()
    sink = _Sink()
    t0 = time.perf_counter()
    basebackup(TimelineSource(store.timeline, lsn, bulk=bulk), lsn, out=sink, now=0)  # type: ignore[arg-type]
    return time.perf_counter() - t0, sink.n, sink.digest.hexdigest()


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine_before": machine_info(), "scale": args.scale}
    with throwaway_cluster(keep=args.keep) as cluster:
        server = cluster.create(server_settings(1.0, args.scale / 70), start=False)
        history = StorageHistory(cluster.base / "pagestore")
        store = NodeStore(history, "bench")
        try:
            import_lsn = store.import_datadir(server.datadir)
            server.start()
            seg = wal_segment_size(server)
            t0 = time.perf_counter()
            pgbench_init(server, args.scale)
            results["load_s"] = round(time.perf_counter() - t0, 2)
            end = switch_wal(server, seg)
            server.stop()
            say(f"ingest of {mib(end - import_lsn):.0f} MiB of WAL up to {format_lsn(end)}")
            tail = WalTail(store, server.wal_dir, -(-import_lsn // 8) * 8, seg)
            t0 = time.perf_counter()
            tail.feed_until(end)
            timeline = store.timeline
            store.flusher.wait(lambda: timeline.frozen_count == 0)
            results["ingest_s"] = round(time.perf_counter() - t0, 2)
            layers = timeline.layer_map()
            view = timeline.persistent_view(FULL_KEYSPACE, end)
            results["image_layers"] = len(layers.images)
            results["delta_layers"] = len(layers.layers()) - len(layers.images)
            results["keys_in_memory"] = len(view.in_memory)
            say(f"layers: {results['image_layers']} image, {results['delta_layers']} delta; "
                f"{len(view.in_memory)} keys in memory at the end")  # fmt: skip
            times: dict[str, list[float]] = {side: [] for side in SIDES}
            digests: set[str] = set()
            tar_bytes = 0
            results["machine_before_runs"] = machine_info()
            for r in range(args.rounds):
                order = SIDES if r % 2 == 0 else SIDES[::-1]
                for side in order:
                    wall, tar_bytes, digest = _one(store, end, side == "bulk")
                    digests.add(digest)
                    times[side].append(wall)
                    say(f"round {r + 1} {side}: {wall:.2f} s")
            if len(digests) != 1:
                raise RuntimeError("the bulk and per-key tars differ")
        finally:
            history.close()
    results["tar_mib"] = round(mib(tar_bytes), 1)
    for side in SIDES:
        results[f"{side}_best_s"] = round(min(times[side]), 2)
        results[f"{side}_median_s"] = round(statistics.median(times[side]), 2)
        results[f"{side}_runs_s"] = [round(t, 2) for t in times[side]]
    results["speedup_best"] = round(results["per_key_best_s"] / results["bulk_best_s"], 2)
    results["machine_after"] = machine_info()
    results["pageserver_peak_rss_mib"] = round(vm_hwm_kib() / 1024, 1)
    print_table(
        ["side", "best s", "median s", "MiB/s (best)"],
        [
            [side, results[f"{side}_best_s"], results[f"{side}_median_s"],
             round(mib_per_s(tar_bytes, min(times[side])), 1)]
            for side in SIDES
        ],
    )  # fmt: skip
    print(
        f"pageserver peak RSS (VmHWM of this process, which runs the page store: import, "
        f"ingest, both sides' basebackups): {results['pageserver_peak_rss_mib']:.0f} MiB"
    )
    print_machine(results)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=20, help="pgbench -i scale")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of each side")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return run_benchmark(BENCH, run, args)


if __name__ == "__main__":
    raise SystemExit(main())
