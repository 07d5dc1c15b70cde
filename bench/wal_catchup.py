"""WAL catch-up benchmark: our receiver + archive + decoder against pg_receivewal.

    .venv/bin/python -m bench.wal_catchup [--backlog-mib 512] [--live-seconds 30] [--keep]
                                          [--profile FILE]

1. A throwaway PostgreSQL 15 server (fsync off, autovacuum off, large max_wal_size,
   wal_keep_size 0); two physical slots reserve WAL *before* any is generated.
2. pgbench (init, then rounds of `-c 4 -T 10` with a CHECKPOINT after each, so the backlog
   has full-page images like a real one) until --backlog-mib of WAL exist; pg_switch_wal();
   END is that segment boundary.
3. Reference: `pg_receivewal --slot bench_pgrecv --endpos END --no-loop` with its default
   durability (fsync when a segment completes and at exit; no --synchronous); the clock
   stops when END's segment is complete (see run_pg_receivewal).
4. Ours: the pageserver's own `NodeFollower` from slot neon_catchup: its walreceiver process
   (WalReceiver into the fsynced WalArchive) and its decode thread (WalReader.read_batch and
   decode_records on every record, C fast paths when built), stopped once END is decoded.
   CPU is ours plus the receiver child's.
5. Live: the server is stopped and its data directory imported into a page store (as
   `neon pg create` does), restarted, and followed on slot neon_live while
   `pgbench -c 4 -T <live-seconds>` runs: here the follower *ingests* (C paths when built,
   flushes and compaction included). Every 0.25 s the server's insert LSN and the ingested
   LSN (what a snapshot can name) are sampled: the ingested lag in bytes and in seconds of
   WAL (bytes / the run's WAL rate), p50/p99/max; then how long after pgbench's end ingest
   reached its last LSN. CPU seconds per MiB of WAL.

Prints a table and, last, one JSON line. Run by hand, never by CI.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import pstats
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import uvloop

from bench.common import (
    REF_SLOT,
    Measure,
    create_slot,
    current_lsn,
    generate_backlog,
    machine_info,
    measure,
    mib,
    mib_per_s,
    percentile,
    pgbench_args,
    print_machine,
    print_table,
    process_cpu,
    reset_peak,
    restart_lsn,
    run_benchmark,
    run_pg_receivewal,
    say,
    throwaway_cluster,
    tps_of,
    vm_hwm_kib,
)
from cli.pgbin import pg_binary, popen_kwargs
from pageserver.api.metrics import Metrics
from pageserver.follow.followed_nodes import FollowedNode, slot_name
from pageserver.follow.node_follower import NodeFollower
from pageserver.history.node_store import NodeStore, StorageHistory
from pg15.lsn import (
    format_lsn,
    parse_lsn,
    parse_segment_file_name,
    segment_start,
)
from pg15.records import decode_records
from pg15.xlog_reader import WalReader
from proto.aio import wait_event
from tests.pgtest import PASSWORD, SUPERUSER, PgTestServer
from walreceiver.receiver import ReceiverState

BENCH = "wal_catchup"
CATCHUP_NODE = "catchup"
LIVE_NODE = "live"
GOAL_RATIO = 0.5

SERVER_SETTINGS: dict[str, object] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "autovacuum": "off",  # nothing but our streams may touch the server while we measure
    "shared_buffers": "256MB",
    "max_wal_size": "16GB",
    "min_wal_size": "1GB",
    "wal_keep_size": 0,
    "checkpoint_timeout": "1h",  # we checkpoint after each pgbench round instead
}

log = logging.getLogger(BENCH)


# -- ours: the pageserver's NodeFollower ---------------------------------------------------------


def make_follower(
    server: PgTestServer, node_id: str, workdir: Path, store: NodeStore | None = None
) -> NodeFollower:
    """A follower of `server`; without `store`, one that was never imported: ingest is a
    no-op, so catch-up measures receive + archive + read + decode."""
    node = FollowedNode(node_id, "127.0.0.1", server.port, SUPERUSER, PASSWORD)
    return NodeFollower(node, store or node_store(workdir, node_id), Metrics())


def node_store(workdir: Path, node_id: str) -> NodeStore:
    return NodeStore(StorageHistory(workdir / "history"), node_id)


async def wait_decoded(follower: NodeFollower, lsn: int, timeout: float) -> None:
    """Until every record ending at or before `lsn` is decoded (or, for an imported store,
    in its history already: a server restarted after its import may write nothing past the
    import's LSN, so the follower decodes nothing); raise on failure or timeout."""
    deadline = time.monotonic() + timeout
    while not await follower.wait_decoded(lsn - 1, timeout=0.5):
        if follower.decode_error is not None:
            raise RuntimeError(f"decoding failed: {follower.decode_error}")
        r = follower.receiver
        if r.state == ReceiverState.FAILED or (r.last_error and r.state == ReceiverState.BACKOFF):
            raise RuntimeError(f"receiver failed: {r.last_error}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"decoded only up to {format_lsn(follower.decoded_lsn)}, wanted {format_lsn(lsn)}"
            )


async def catch_up(
    server: PgTestServer, workdir: Path, end_lsn: int, profile: cProfile.Profile | None
) -> tuple[Measure, NodeFollower]:
    follower = make_follower(server, CATCHUP_NODE, workdir)
    child = (0.0, 0.0)
    with measure() as m:
        if profile is not None:
            profile.enable()
        started = time.perf_counter()
        follower.start()
        try:
            await wait_decoded(follower, end_lsn, timeout=3600)
            # The clock stops when END is decoded (pg_receivewal's when END's segment is
            # complete); stopping the follower is teardown, its CPU still counts.
            done = time.perf_counter() - started
        finally:
            child = process_cpu(follower.receiver.pid)  # the receiver process, before it ends
            await follower.stop()
            if profile is not None:
                profile.disable()
    m.user += child[0]
    m.sys += child[1]
    m.wall = done
    return m, follower


def decode_only(archive: Path, segment_size: int) -> tuple[Measure, int, int]:
    """Reader + decoder alone over the archived segments (no network, no fsync): the share of
    the catch-up that is decoding. Returns (measure, bytes, records)."""
    segments = sorted(p for p in archive.iterdir() if len(p.name) == 24)  # complete ones
    if not segments:
        return Measure(), 0, 0
    tli, segno, _ = parse_segment_file_name(segments[0].name, segment_size)
    reader = WalReader(segment_start(segno, segment_size), segment_size, timeline=tli)
    nbytes = records = 0
    with measure() as m:
        for path in segments:
            data = path.read_bytes()
            nbytes += len(data)
            reader.feed(data)
            while batch := reader.read_batch():  # as NodeFollower reads
                decode_records(batch)
                records += len(batch)
    return m, nbytes, records


async def wait_streaming(follower: NodeFollower, lsn: int, timeout: float) -> None:
    """Until the receiver streams and its archive is durable up to `lsn`."""
    deadline = time.monotonic() + timeout
    while not (follower.receiver.state == ReceiverState.STREAMING and follower.flushed_lsn >= lsn):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"receiver {follower.receiver.state.value}, durable up to "
                f"{format_lsn(follower.flushed_lsn)}, wanted {format_lsn(lsn)}"
            )
        await asyncio.sleep(0.05)


@dataclass
class LiveResult:
    seconds: float
    wal_bytes: int
    cpu: float
    records: int
    tps: float
    lag_decoded_bytes: int  # pg_current_wal_insert_lsn() - ingested, when pgbench ended
    lag_flushed_bytes: int  # ... - flushed (durable in our archive)
    catchup_after_end: float  # seconds from pgbench's end until we had ingested its WAL
    lag_samples: list[int]  # insert LSN - ingested LSN, every SAMPLE_SECONDS during pgbench
    lag_parts: list[tuple[int, int, int]]  # each sample's lag split, see LagSample.parts
    lag_times: list[float]  # each sample's lag in time, see lag_in_time


SAMPLE_SECONDS = 0.25


@dataclass(frozen=True, slots=True)
class LagSample:
    """The positions along the way at one moment (ours read just before the server's)."""

    at: float  # time.perf_counter() when the server's were read
    insert: int  # the server's WAL insert position
    server_flushed: int  # what it has flushed: all a walsender may send
    durable: int  # fsynced in our archive and reported (NodeFollower.flushed_lsn)
    ingested: int  # in the page store (what a snapshot can name)

    @property
    def lag(self) -> int:
        return max(0, self.insert - self.ingested)

    @property
    def parts(self) -> tuple[int, int, int]:
        """(not yet flushed by the server, flushed there but not durable here, durable here
        but not ingested): where the lag is (the server's walwriter, the stream and the
        receiver's fsync and report, the decode thread)."""
        flushed = min(self.server_flushed, self.insert)
        durable = min(self.durable, flushed)
        return self.insert - flushed, flushed - durable, max(0, durable - self.ingested)


def connect(server: PgTestServer) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(server.dsn(), autocommit=True)


def lag_in_time(samples: list[LagSample]) -> list[float]:
    """Per sample, how long ago the server inserted the WAL ingested by then (the insert
    position interpolated between samples): seconds of WAL at the *rate of that moment*. At
    the start of a load right after a checkpoint every first touch of a page writes a
    full-page image, so the WAL rate is several times the run's average and a lag in bytes
    over the average rate overstates how far behind the follower is."""
    out: list[float] = []
    j = 0
    for s in samples:
        if s.ingested >= s.insert:
            out.append(0.0)
            continue
        while j + 1 < len(samples) and samples[j + 1].insert <= s.ingested:
            j += 1
        a = samples[j]
        if a.insert > s.ingested:  # before the first sample: at least since then
            out.append(s.at - a.at)
            continue
        b = samples[j + 1]  # exists: s itself has insert > ingested
        when = a.at + (s.ingested - a.insert) / max(b.insert - a.insert, 1) * (b.at - a.at)
        out.append(max(0.0, s.at - when))
    return out


def server_positions(conn: psycopg.Connection[tuple[Any, ...]]) -> tuple[int, int]:
    row = conn.execute(
        "SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text"
    ).fetchone()
    assert row is not None
    return parse_lsn(row[0]), parse_lsn(row[1])


async def sample_lag(
    server: PgTestServer, follower: NodeFollower, into: list[LagSample], stop: asyncio.Event
) -> None:
    """Our positions are read just before the server's (over a connection kept open, not a
    psql process per sample): the lag is never understated by the time the query takes."""
    timeline = follower.store.timeline
    conn = await asyncio.to_thread(connect, server)
    try:
        while not stop.is_set():
            durable, ingested = follower.flushed_lsn, timeline.last_record_lsn
            insert, flushed = await asyncio.to_thread(server_positions, conn)
            into.append(LagSample(time.perf_counter(), insert, flushed, durable, ingested))
            await wait_event(stop, SAMPLE_SECONDS)
    finally:
        await asyncio.to_thread(conn.close)


def imported_store(server: PgTestServer, workdir: Path) -> NodeStore:
    """The stopped server's data directory imported as the live node's history (restarted)."""
    server.stop()
    store = node_store(workdir, LIVE_NODE)
    store.import_datadir(server.datadir)
    server.start()
    return store


async def live(server: PgTestServer, store: NodeStore, workdir: Path, seconds: int) -> LiveResult:
    create_slot(server, slot_name(LIVE_NODE))
    follower = make_follower(server, LIVE_NODE, workdir, store)
    follower.start()
    samples: list[LagSample] = []
    stop_sampling = asyncio.Event()
    proc: subprocess.Popen[str] | None = None
    try:
        lsn0 = await asyncio.to_thread(current_lsn, server, "pg_current_wal_insert_lsn")
        await wait_decoded(follower, lsn0, timeout=60)
        # The page store may hold lsn0 from the import already: wait for the stream too, so
        # that the lag measured is following, not the receiver process starting.
        await wait_streaming(follower, lsn0, timeout=60)
        ingested0, records0 = store.timeline.last_record_lsn, follower.records
        env = {"PGHOST": str(server.sockdir), "PGPORT": str(server.port), "PGUSER": SUPERUSER}
        say(f"live: pgbench -c 4 -T {seconds} while following")
        child0 = process_cpu(follower.receiver.pid)
        sampler = asyncio.ensure_future(sample_lag(server, follower, samples, stop_sampling))
        with measure() as m:
            # uvloop cannot spawn as another user: Popen here, wait in a thread.
            proc = subprocess.Popen(
                [pg_binary("pgbench"), *pgbench_args(4, seconds), "postgres"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                **popen_kwargs(env),  # type: ignore[call-overload]
            )
            out, err = await asyncio.to_thread(proc.communicate)
            stop_sampling.set()
            await sampler
            if proc.returncode != 0:
                raise RuntimeError(f"pgbench failed: {err.strip()}")
            t_end = time.perf_counter()
            end = await asyncio.to_thread(current_lsn, server, "pg_current_wal_insert_lsn")
            lag_decoded = max(0, end - follower.decoded_lsn)
            lag_flushed = max(0, end - follower.receiver.flushed_lsn)
            await wait_decoded(follower, end, timeout=300)
            catchup = time.perf_counter() - t_end
            child1 = process_cpu(follower.receiver.pid)
        m.user += child1[0] - child0[0]
        m.sys += child1[1] - child0[1]
        return LiveResult(
            m.wall,
            store.timeline.last_record_lsn - ingested0,
            m.cpu,
            follower.records - records0,
            tps_of(out),
            lag_decoded,
            lag_flushed,
            catchup,
            [x.lag for x in samples],
            [x.parts for x in samples],
            lag_in_time(samples),
        )
    finally:
        stop_sampling.set()
        if proc is not None and proc.poll() is None:
            proc.kill()  # by its PID
            await asyncio.to_thread(proc.wait)
        await follower.stop()


def lag_seconds(lr: LiveResult) -> dict[str, Any]:
    """The sampled ingested lag as seconds of the run's WAL (bytes / its average rate), and
    where it was: the server's own unflushed WAL, the stream and our receiver, our decoder."""
    rate = lr.wal_bytes / max(lr.seconds, 1e-9)
    secs = [b / rate for b in lr.lag_samples] if rate else []
    parts = [tuple(round(b / rate, 2) for b in p) for p in lr.lag_parts] if rate else []
    return {
        "samples": len(secs),
        "p50": round(percentile(secs, 50), 3),
        "p99": round(percentile(secs, 99), 3),
        "max": round(max(secs, default=0.0), 3),
        "series": [round(x, 2) for x in secs],
        "time_p50": round(percentile(lr.lag_times, 50), 3),
        "time_p99": round(percentile(lr.lag_times, 99), 3),
        "time_max": round(max(lr.lag_times, default=0.0), 3),
        "time_series": [round(x, 2) for x in lr.lag_times],
        "parts_series": parts,  # (server unflushed, stream + receiver, decode + ingest)
        "parts_p50": [round(percentile([p[i] for p in parts], 50), 3) for i in range(3)],
        "parts_max": [round(max((p[i] for p in parts), default=0.0), 3) for i in range(3)],
        # ours alone: the server's flushed WAL (all a walsender may send) not yet ingested
        "behind_flushed": {
            q: round(fn([p[1] + p[2] for p in parts]), 3)
            for q, fn in (
                ("p50", lambda x: percentile(x, 50)),
                ("p99", lambda x: percentile(x, 99)),
                ("max", lambda x: max(x, default=0.0)),
            )
        },
    }


# -- main ------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine_before": machine_info()}
    with throwaway_cluster(keep=args.keep) as cluster:
        say("starting a throwaway PostgreSQL 15 server")
        server = cluster.create(SERVER_SETTINGS)
        work = cluster.base / "bench"
        work.mkdir()
        for slot in (REF_SLOT, slot_name(CATCHUP_NODE)):
            create_slot(server, slot)
        backlog = generate_backlog(server, args.backlog_mib)
        seg = backlog.segment_size
        ref_bytes = backlog.end_lsn - restart_lsn(server, REF_SLOT) // seg * seg
        our_bytes = backlog.end_lsn - restart_lsn(server, slot_name(CATCHUP_NODE)) // seg * seg

        say(f"pg_receivewal: {mib(ref_bytes):.0f} MiB")
        ref = run_pg_receivewal(server, work / "pg_receivewal", backlog.end_lsn, seg)

        say(f"ours (NodeFollower: receiver process + decode thread): {mib(our_bytes):.0f} MiB")
        profile = cProfile.Profile() if args.profile else None
        ours, follower = uvloop.run(catch_up(server, work, backlog.end_lsn, profile))
        if profile is not None:
            profile.dump_stats(args.profile)
            pstats.Stats(profile).sort_stats("tottime").print_stats(20)

        say("decode only: WalReader.read_batch + decode_records over our archived segments")
        dec, dec_bytes, dec_records = decode_only(follower.store.wal_dir, seg)
        # The follower runs in this process (its walreceiver child not counted).
        results["pageserver_peak_rss_mib"] = {"catchup": round(vm_hwm_kib() / 1024, 1)}

        live_result = None
        if args.live_seconds > 0:
            say("live: importing the stopped server's data directory, then following it")
            reset_peak()
            store = imported_store(server, work)
            live_result = uvloop.run(live(server, store, work, args.live_seconds))
            results["pageserver_peak_rss_mib"]["live"] = round(vm_hwm_kib() / 1024, 1)
        results["machine_after"] = machine_info()

    ref_rate = mib_per_s(ref_bytes, ref.wall)
    our_rate = mib_per_s(our_bytes, ours.wall)
    results.update(
        backlog_mib=round(mib(backlog.end_lsn - backlog.start_lsn), 1),
        pgbench_scale=backlog.scale,
        pgbench_rounds=backlog.rounds,
        pg_receivewal={
            "mib": round(mib(ref_bytes), 1),
            "wall_s": round(ref.wall, 3),
            "cpu_s": round(ref.cpu, 3),
            "mib_per_s": round(ref_rate, 1),
            "cpu_s_per_mib": round(ref.cpu / mib(ref_bytes), 5),
        },
        ours={
            "mib": round(mib(our_bytes), 1),
            "wall_s": round(ours.wall, 3),
            "cpu_s": round(ours.cpu, 3),
            "cpu_user_s": round(ours.user, 3),
            "cpu_sys_s": round(ours.sys, 3),
            "mib_per_s": round(our_rate, 1),
            "cpu_s_per_mib": round(ours.cpu / mib(our_bytes), 5),
            "records": follower.records,
            "records_per_s": round(follower.records / ours.wall),
        },
        decode_only={
            "mib": round(mib(dec_bytes), 1),
            "cpu_s": round(dec.cpu, 3),
            "mib_per_s": round(mib_per_s(dec_bytes, dec.wall), 1),
            "cpu_s_per_mib": round(dec.cpu / max(mib(dec_bytes), 1e-9), 5),
            "records": dec_records,
            "records_per_s": round(dec_records / max(dec.wall, 1e-9)),
            "us_per_record": round(dec.cpu / max(dec_records, 1) * 1e6, 2),
        },
        ratio=round(our_rate / ref_rate, 3),
        goal_ratio=GOAL_RATIO,
    )
    print()
    print(f"WAL catch-up of a {results['backlog_mib']} MiB backlog (pgbench scale {backlog.scale})")
    print_table(
        ["", "MiB", "wall s", "CPU s", "MiB/s", "CPU s/MiB", "records/s"],
        [
            ["pg_receivewal", mib(ref_bytes), ref.wall, ref.cpu, ref_rate,
             ref.cpu / mib(ref_bytes), "-"],
            ["ours", mib(our_bytes), ours.wall, ours.cpu, our_rate,
             ours.cpu / mib(our_bytes), round(follower.records / ours.wall)],
            ["(decode only)", mib(dec_bytes), dec.wall, dec.cpu, mib_per_s(dec_bytes, dec.wall),
             dec.cpu / max(mib(dec_bytes), 1e-9), round(dec_records / max(dec.wall, 1e-9))],
        ],
    )  # fmt: skip
    verdict = "meets" if our_rate / ref_rate >= GOAL_RATIO else "BELOW"
    print(
        f"ratio ours / pg_receivewal: {our_rate / ref_rate:.3f} ({verdict} the {GOAL_RATIO} goal)"
    )
    print(f"records decoded: {follower.records:,}")
    if live_result is not None:
        lr = live_result
        results["live"] = {
            "seconds": round(lr.seconds, 2),
            "wal_mib": round(mib(lr.wal_bytes), 1),
            "cpu_s": round(lr.cpu, 3),
            "cpu_s_per_mib": round(lr.cpu / max(mib(lr.wal_bytes), 1e-9), 5),
            "records": lr.records,
            "pgbench_tps": lr.tps,
            "lag_ingested_bytes_at_end": lr.lag_decoded_bytes,
            "lag_flushed_bytes_at_end": lr.lag_flushed_bytes,
            "catchup_after_end_s": round(lr.catchup_after_end, 3),
            "ingested_lag_s": lag_seconds(lr),
        }
        print()
        print(f"live: pgbench -c 4 -T {args.live_seconds} ({lr.tps:.0f} tps) while following")
        print_table(
            ["", "WAL MiB", "CPU s", "CPU s/MiB", "records", "lag at end", "caught up after"],
            [
                ["ours", mib(lr.wal_bytes), lr.cpu, lr.cpu / max(mib(lr.wal_bytes), 1e-9),
                 lr.records, f"{lr.lag_decoded_bytes / 1024:.0f} KiB",
                 f"{lr.catchup_after_end:.2f} s"],
            ],
        )  # fmt: skip
        lag = results["live"]["ingested_lag_s"]
        print(
            f"ingested lag during pgbench, in seconds of WAL: p50 {lag['p50']:.2f}, "
            f"p99 {lag['p99']:.2f}, max {lag['max']:.2f} ({lag['samples']} samples)"
        )
        print(
            f"  in time (how long ago the server inserted what was ingested): p50 "
            f"{lag['time_p50']:.2f}, p99 {lag['time_p99']:.2f}, max {lag['time_max']:.2f} s"
        )
        ours = lag["behind_flushed"]
        print(
            f"  behind the server's flushed WAL (ours alone): p50 {ours['p50']:.2f}, "
            f"p99 {ours['p99']:.2f}, max {ours['max']:.2f}"
        )
        worst = sorted(range(len(lag["series"])), key=lambda i: -lag["series"][i])[:3]
        print(
            "  of which (server unflushed, stream + receiver, decode + ingest): p50 "
            f"{lag['parts_p50']}, max {lag['parts_max']}; worst samples "
            + ", ".join(f"#{i} {lag['series'][i]} = {list(lag['parts_series'][i])}" for i in worst)
        )
    rss = results["pageserver_peak_rss_mib"]
    print(
        f"pageserver peak RSS (VmHWM of this process, which runs the follower; its walreceiver "
        f"child not counted): catch-up and decode {rss['catchup']:.0f} MiB"
        + (f", live import and ingest {rss['live']:.0f} MiB" if "live" in rss else "")
    )
    print_machine(results)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.wal_catchup", description=__doc__)
    ap.add_argument("--backlog-mib", type=int, default=512, help="WAL backlog to catch up")
    ap.add_argument("--live-seconds", type=int, default=30, help="live phase; 0 skips it")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (data, archives)")
    ap.add_argument("--profile", type=Path, help="cProfile our catch-up into this file")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    return run_benchmark(BENCH, run, args)


if __name__ == "__main__":
    sys.exit(main())
