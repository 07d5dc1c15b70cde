"""Redo benchmark (issue 5): our native redo against stock PostgreSQL replaying the same WAL.

    .venv/bin/python -m bench.redo [--wal-mib 256] [--keep] [--profile FILE] [--python-redo]

1. A throwaway PostgreSQL 15 server (full_page_writes on, as by default); `pgbench -i`; then
   CHECKPOINT and, with the server idle (autovacuum off, nothing writes), the data directory
   is copied: BASE, a crash-consistent copy whose pg_control points at that checkpoint.
   wal_keep_size keeps every segment from then on.
2. Workload: rounds of `pgbench -c 4 -T 10` with a CHECKPOINT after each until --wal-mib of
   WAL exist past the checkpoint; then the server is stopped with `-m immediate` (a crash).
3. Ours: the crashed server's WAL from BASE's redo point to its end through WalReader +
   decode_record, and for every block reference `redo_block` on the page version kept in a
   dict (a page missing there is read from BASE's files when the record needs the previous
   version). Decode time, redo time and the time reading BASE pages are reported apart.
   Not replayed: what is no block reference (CLOG, VM bits cleared by heap records, ...).
   Then the product's path (`chain_redo`): a cleanly shut-down copy of BASE (taken right
   after it, before the workload) is imported into a page store, the WAL from there is
   ingested by the daemon's own call (C), and every page's versions go through
   `_redo.rebuild_page`, as basebackup and image creation rebuild pages; read, ingest and
   rebuild are timed, laying the in-memory layers out as layer files (storage) is not.
4. Stock: a copy of BASE whose pg_wal is replaced by the crashed server's (pre-staged, not
   timed) is started: PostgreSQL's crash recovery replays the same WAL. Its redo time is the
   "redo done ... elapsed" of its log; the start-to-ready time of `pg_ctl start -w`, less
   that of a baseline copy of BASE with no WAL to replay, is reported too (it includes the
   end-of-recovery checkpoint).

Prints a table and, last, one JSON line. Run by hand, never by CI.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import logging
import pstats
import re
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import (
    MIB,
    Measure,
    current_lsn,
    machine_info,
    measure,
    mib,
    pgbench_init,
    pgbench_rounds,
    pgbench_scale,
    print_machine,
    print_table,
    reset_peak,
    run_benchmark,
    say,
    throwaway_cluster,
    vm_hwm_kib,
    wal_segment_size,
)
from cli import postmaster
from pageserver.history.node_store import NodeStore, StorageHistory
from pageserver.reconstruct.apply_delta import continue_chain
from pageserver.reconstruct.reads import materialize
from pageserver.redo import (
    REDO_BY_RMGR,
    PageError,
    mask_page,
    needs_previous,
    redo_block,
    redo_block_python,
)
from pageserver.redo.native import redo as native_redo
from pageserver.redo.page import get_special, page_is_new
from pageserver.storage.keys import Key, describe, parse_rel_block_key
from pageserver.storage.timeline import Timeline
from pageserver.storage.values import TAG_DELTA, TAG_DELTA_INIT, TAG_IMAGE, WalDelta
from pg15.constants import BLCKSZ, RM_BTREE_ID, RM_HEAP_ID
from pg15.lsn import format_lsn, parse_lsn, segment_file_name
from pg15.records import DecodedRecord, RelFileNode, decode_records
from pg15.xlog_reader import WalReader
from proto.errors import NotFound
from tests.pgtest import PgTestCluster, PgTestServer

BENCH = "redo"
RELSEG_BLOCKS = (1 << 30) // BLCKSZ
GLOBALTABLESPACE_OID = 1664
FORK_SUFFIX = {0: "", 1: "_fsm", 2: "_vm", 3: "_init"}
START_TIMEOUT = 1800
RedoBlock = Callable[[DecodedRecord, int, "bytes | None"], bytes]

SERVER_SETTINGS: dict[str, object] = {
    "fsync": "off",
    "synchronous_commit": "off",
    "autovacuum": "off",  # the server must stay idle while BASE is copied
    "shared_buffers": "256MB",
    "max_wal_size": "16GB",
    "min_wal_size": "1GB",
    "wal_keep_size": "64GB",  # no segment since BASE's checkpoint is removed
    "checkpoint_timeout": "1h",
    "full_page_writes": "on",
}

_REDO_DONE = re.compile(
    r"redo done at (\S+) system usage: CPU: user: ([\d.]+) s, system: ([\d.]+) s, "
    r"elapsed: ([\d.]+) s"
)
_REDO_STARTS = re.compile(r"redo starts at (\S+)")

log = logging.getLogger(BENCH)

PageKey = tuple[RelFileNode, int, int]


def copy_tree(src: Path, dst: Path) -> None:
    """`cp -a`: as root this keeps the PostgreSQL account's ownership and modes."""
    subprocess.run(["cp", "-a", "--", str(src), str(dst)], check=True)


# -- the workload ------------------------------------------------------------------------------


@dataclass
class Workload:
    segment_size: int
    redo_lsn: int  # BASE's checkpoint redo point: where both replays start
    checkpoint_lsn: int
    end_lsn: int  # insert position just before the crash
    base: Path
    crashed_wal: Path
    scale: int
    rounds: int
    clean_base: Path  # the same state cleanly shut down (what an import takes)


def make_workload(cluster: PgTestCluster, wal_mib: int) -> Workload:
    server = cluster.create(SERVER_SETTINGS)
    seg = wal_segment_size(server)
    scale = pgbench_scale(wal_mib)
    pgbench_init(server, scale)
    server.psql("CHECKPOINT")
    redo, ckpt = server.psql("SELECT redo_lsn, checkpoint_lsn FROM pg_control_checkpoint()").split(
        "|"
    )
    base = cluster.base / "base"
    say(f"copying the idle data directory after the checkpoint at {ckpt} (redo {redo})")
    copy_tree(server.datadir, base)
    (base / "postmaster.pid").unlink(missing_ok=True)
    # The product path imports a cleanly shut-down directory; stock recovery needs BASE.
    server.stop()
    clean = cluster.base / "base-clean"
    copy_tree(server.datadir, clean)
    server.start()
    redo_lsn = parse_lsn(redo)
    rounds = pgbench_rounds(server, redo_lsn, redo_lsn + wal_mib * MIB)
    end = current_lsn(server, "pg_current_wal_insert_lsn")
    say(f"crash: pg_ctl stop -m immediate at {format_lsn(end)}")
    server.stop("immediate")
    return Workload(
        seg, redo_lsn, parse_lsn(ckpt), end, base, server.wal_dir, scale, rounds, clean
    )  # fmt: skip


# -- ours: native redo -------------------------------------------------------------------------


@dataclass
class OurRedo:
    measure: Measure = field(default_factory=Measure)
    records: int = 0
    records_with_blocks: int = 0
    pages: int = 0  # block references redone
    images: int = 0  # of which restored from a full-page image
    distinct_pages: int = 0
    base_reads: int = 0
    wal_bytes: int = 0
    last_end_lsn: int = 0
    decode_s: float = 0.0
    redo_s: float = 0.0
    base_read_s: float = 0.0
    unsupported: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)


class BasePages:
    """Pages of BASE's relation files, read on demand."""

    def __init__(self, datadir: Path) -> None:
        self.datadir = datadir

    def path(self, key: PageKey) -> Path:
        rnode, fork, blkno = key
        where = (
            self.datadir / "global"
            if rnode.spc == GLOBALTABLESPACE_OID
            else self.datadir / "base" / str(rnode.db)
        )
        segno = blkno // RELSEG_BLOCKS
        return where / f"{rnode.rel}{FORK_SUFFIX[fork]}{f'.{segno}' if segno else ''}"

    def read(self, key: PageKey) -> bytes | None:
        try:
            with open(self.path(key), "rb") as f:
                f.seek(key[2] % RELSEG_BLOCKS * BLCKSZ)
                page = f.read(BLCKSZ)
        except FileNotFoundError:
            return None
        return page if len(page) == BLCKSZ else None


def redo_wal(w: Workload, pages: dict[PageKey, bytes], redo: RedoBlock = redo_block) -> OurRedo:
    """Replay the crashed server's WAL from BASE's redo point with native redo; the final
    version of every page the WAL touches is left in `pages`.

    Records are read and decoded a batch at a time (WalReader.read_batch + decode_records,
    as the pageserver's catch-up loop does), then redone in order; the clock is read once
    per batch and per BASE read, not per record, so the harness costs little of the time."""
    out = OurRedo()
    base = BasePages(w.base)
    seg = w.segment_size
    reader = WalReader(w.redo_lsn, seg, timeline=1)
    perf = time.perf_counter
    with measure() as m:
        segno = w.redo_lsn // seg
        while reader.end_of_wal is None:
            path = w.crashed_wal / segment_file_name(1, segno, seg)
            if not path.exists():
                break
            t0 = perf()
            data = path.read_bytes()
            reader.feed(data[w.redo_lsn - segno * seg :] if segno == w.redo_lsn // seg else data)
            while True:
                batch = reader.read_batch()
                if not batch:
                    out.decode_s += perf() - t0
                    break
                records = decode_records(batch)
                t_decoded = perf()
                out.decode_s += t_decoded - t0
                base_read = _redo_batch(records, pages, base, redo, out)
                t0 = perf()
                out.redo_s += t0 - t_decoded - base_read
                out.base_read_s += base_read
                out.records += len(records)
                out.last_end_lsn = batch[-1].end_lsn
            segno += 1
    out.measure = m
    out.distinct_pages = len(pages)
    out.wal_bytes = out.last_end_lsn - w.redo_lsn
    return out


def _redo_batch(
    records: list[DecodedRecord],
    pages: dict[PageKey, bytes],
    base: BasePages,
    redo: RedoBlock,
    out: OurRedo,
) -> float:
    """Redo every block reference of `records` in order; returns the seconds spent reading
    BASE pages (not redo)."""
    perf = time.perf_counter
    base_read = 0.0
    for record in records:
        if not record.blocks:
            continue
        out.records_with_blocks += 1
        for ref in record.blocks:
            if not ref.apply_image and record.rmgr_id not in REDO_BY_RMGR:
                out.unsupported[record.rmgr_name] += 1
                continue
            key = (ref.rnode, ref.fork, ref.blkno)
            page = pages.get(key)
            if page is None and needs_previous(record, ref.block_id):
                t0 = perf()
                page = base.read(key)
                base_read += perf() - t0
                out.base_reads += 1
            try:
                pages[key] = redo(record, ref.block_id, page)
            except PageError as exc:
                if len(out.errors) < 20:
                    out.errors.append(str(exc))
                continue
            out.pages += 1
            out.images += ref.apply_image
    return base_read


# -- ours, the product's path: its ingest, then its C chain redo ------------------------------

_ENTRY = struct.Struct(">QBIII")  # a version entry: LSN, tag, block, offset, length


@dataclass
class ChainRedo:
    """The same WAL through the product: ingest into a page store, then the page rebuild
    that basebackup and image creation use (range_rebuild's `_redo.rebuild_page`)."""

    import_lsn: int = 0  # where the cleanly shut-down BASE was imported: the replay's start
    records: int = 0
    read_s: float = 0.0  # WalReader.read_batch: framing and CRCs
    read_cpu: float = 0.0
    ingest_s: float = 0.0  # NodeStore.ingest_raw_batch: decode, split per page (C)
    ingest_cpu: float = 0.0
    layout_s: float = 0.0  # in-memory layers to per-page chain segments (storage; not counted)
    base_s: float = 0.0  # the imported base page of each chain that starts with a delta: read
    base_cpu: float = 0.0  # from the image layers (counted: recovery reads its pages too)
    redo_s: float = 0.0  # rebuild_page on every chain segment (C decode + C redo)
    redo_cpu: float = 0.0
    keys: int = 0  # keys with deltas: relation pages of every fork, CLOG pages
    segments: int = 0  # rebuild_page calls: one per key per chain start
    deltas: int = 0  # delta versions redone
    handed_back: int = 0  # segments whose tail the Python redo finished (continue_chain)
    refused: list[str] = field(default_factory=list)
    pages: dict[Key, bytes] = field(default_factory=dict)  # the newest page of every key


def _segment(versions: list[tuple[int, int, bytes]]) -> tuple[bytes, list[bytes], int]:
    """One chain segment laid out as a layer holds it: (entries, [block], last LSN)."""
    entries, off = [], 0
    for lsn, tag, value in versions:
        entries.append(_ENTRY.pack(lsn, tag, 0, off, len(value)))
        off += len(value)
    return b"".join(entries), [b"".join(v for _, _, v in versions)], versions[-1][0]


def chain_redo(w: Workload, workdir: Path) -> ChainRedo:
    """Every page version the WAL makes, as the product makes it.

    The cleanly shut-down copy of BASE is imported into a NodeStore (as `neon pg create`
    does; not timed) and the crashed server's WAL from there is ingested by the daemon's own
    call (`ingest_raw_batch`: the C path decodes each record and puts every block reference
    as the page, an APPLY image, or as a WalDelta holding the record, plus CLOG and VM
    deltas). Ingest keeps the versions in its in-memory layers; they are laid out per key as
    a layer file holds them (not timed: that is storage) and cut at every chain start, so that
    every delta is redone once by `_redo.rebuild_page`, as crash recovery redoes every
    record (the product needs only the newest segment of a page)."""
    out = ChainRedo()
    store = NodeStore(StorageHistory(workdir / "history"), "redo")
    out.import_lsn = start = store.import_datadir(w.clean_base)
    timeline = store.timeline
    seg = w.segment_size
    reader = WalReader(start, seg, timeline=1)
    cpu, perf = time.process_time, time.perf_counter
    segno = start // seg
    while reader.end_of_wal is None:
        path = w.crashed_wal / segment_file_name(1, segno, seg)
        if not path.exists():
            break
        c0, t0 = cpu(), perf()
        data = path.read_bytes()
        reader.feed(data[start - segno * seg :] if segno == start // seg else data)
        while batch := reader.read_batch():
            c1, t1 = cpu(), perf()
            out.read_s += t1 - t0
            out.read_cpu += c1 - c0
            store.ingest_raw_batch(batch)
            out.records += len(batch)
            c0, t0 = cpu(), perf()
            out.ingest_s += t0 - t1
            out.ingest_cpu += c0 - c1
        out.read_s += perf() - t0
        out.read_cpu += cpu() - c0
        segno += 1
    t0 = perf()
    laid = _lay_out(timeline, out)
    t1, c1 = perf(), cpu()
    out.layout_s = t1 - t0 - out.base_s
    rebuild = native_redo.rebuild_page if native_redo is not None else None
    if rebuild is None:
        raise RuntimeError("the C chain redo (pageserver/redo/_redo.c) is not built")
    for key, segments in laid.items():
        page: bytes | None = None
        for entries, blocks, last in segments:
            got = rebuild(key, last, [(entries, 0, blocks, 0)], True)
            if isinstance(got, tuple):  # the C redo stopped: the Python redo goes on
                got = continue_chain(
                    key, got[0], [(lsn, WalDelta(p, init)) for lsn, init, p in got[1]]
                )
                out.handed_back += 1
            if got is False:
                out.refused.append(f"{describe(key)} at {format_lsn(last)}")
                break
            page = got
            out.segments += 1
        if page is not None:
            out.pages[key] = page
    out.redo_s, out.redo_cpu = perf() - t1, cpu() - c1
    return out


def _lay_out(timeline: Timeline, out: ChainRedo) -> dict[Key, list[tuple[bytes, list[bytes], int]]]:
    """Each key with deltas: its versions from the in-memory layers, cut into segments at
    every chain start (image, will_init delta, tombstone); a first segment without one
    starts from the imported page. Keys with images only go to `out.pages` as they are."""
    timeline.freeze()
    chains: dict[Key, list[tuple[int, bytes]]] = {}
    for layer in timeline._frozen:  # the ingested versions, oldest layer first
        for key, versions in layer.iter_key_groups():
            chains.setdefault(key, []).extend(versions)
    laid: dict[Key, list[tuple[bytes, list[bytes], int]]] = {}
    for key, versions in chains.items():
        if all(v[0] not in (TAG_DELTA, TAG_DELTA_INIT) for _, v in versions):
            if versions[-1][1][0] == TAG_IMAGE:
                out.pages[key] = versions[-1][1][1:]
            continue
        segments: list[list[tuple[int, int, bytes]]] = [[]]
        for lsn, value in versions:
            if value[0] != TAG_DELTA and segments[-1]:
                segments.append([])
            segments[-1].append((lsn, value[0], value))
            out.deltas += value[0] in (TAG_DELTA, TAG_DELTA_INIT)
        if segments[0][0][1] == TAG_DELTA:
            c0, t0 = time.process_time(), time.perf_counter()
            with contextlib.suppress(NotFound):
                base = materialize(timeline, key, out.import_lsn)
                segments[0].insert(0, (out.import_lsn, TAG_IMAGE, bytes((TAG_IMAGE,)) + base))
            out.base_s += time.perf_counter() - t0
            out.base_cpu += time.process_time() - c0
        laid[key] = [_segment(s) for s in segments]
        out.keys += 1
    return laid


def main_fork_pages(pages: dict[Key, bytes]) -> dict[PageKey, bytes]:
    """The main-fork relation pages of a page store's keys, keyed as the WAL-order replay's."""
    out: dict[PageKey, bytes] = {}
    for key, page in pages.items():
        rel = parse_rel_block_key(key)
        if rel is not None and rel.fork == 0:
            out[(RelFileNode(rel.spc, rel.db, rel.rel), rel.fork, rel.blkno)] = page
    return out


# -- stock: PostgreSQL's crash recovery --------------------------------------------------------


@dataclass
class StockStart:
    datadir: Path  # stopped
    wall: float  # pg_ctl start -w
    redo_start: str | None
    redo_done: str | None
    redo_cpu: float | None
    redo_elapsed: float | None
    log: str


def start_copy(
    cluster: PgTestCluster, base: Path, wal: Path | None, stop_mode: str = "immediate"
) -> StockStart:
    """Start a copy of BASE (its pg_wal replaced by `wal` if given); time it; stop it."""
    server: PgTestServer = cluster.create_empty(SERVER_SETTINGS)
    copy_tree(base, server.datadir)
    if wal is not None:
        shutil.rmtree(server.datadir / "pg_wal")
        copy_tree(wal, server.datadir / "pg_wal")
    postmaster.write_config(server.datadir, *server.config())
    try:
        t0 = time.perf_counter()
        postmaster.start(server.datadir, server.logfile, timeout=START_TIMEOUT)
        wall = time.perf_counter() - t0
    finally:
        server.stop(stop_mode)
    text = server.logfile.read_text(errors="replace")
    done = _REDO_DONE.search(text)
    starts = _REDO_STARTS.search(text)
    return StockStart(
        server.datadir,
        wall,
        starts.group(1) if starts else None,
        done.group(1) if done else None,
        float(done.group(2)) + float(done.group(3)) if done else None,
        float(done.group(4)) if done else None,
        text,
    )


@dataclass
class Comparison:
    pages: int = 0
    same: int = 0
    differing: list[str] = field(default_factory=list)


def compare_pages(pages: dict[PageKey, bytes], datadir: Path) -> Comparison:
    """Our final main-fork pages against the files of the recovered and cleanly stopped
    stock copy, under the heap or btree wal_consistency_checking mask (pgbench has only
    those: a page without special space is heap)."""
    out = Comparison()
    theirs = BasePages(datadir)
    for key, page in pages.items():
        if key[1] != 0:
            continue
        other = theirs.read(key)
        out.pages += 1
        if other is None:
            out.differing.append(f"{key[0]} blk {key[2]}: missing in the stock copy")
            continue
        a, b = bytearray(page), bytearray(other)
        if not (page_is_new(a) and page_is_new(b)):
            rmgr = RM_HEAP_ID if get_special(a) == BLCKSZ else RM_BTREE_ID
            mask_page(rmgr, a, key[2])
            mask_page(rmgr, b, key[2])
        if a == b:
            out.same += 1
        elif len(out.differing) < 10:
            diff = next(i for i in range(BLCKSZ) if a[i] != b[i])
            out.differing.append(f"{key[0]} blk {key[2]}: first difference at byte {diff}")
    return out


# -- main --------------------------------------------------------------------------------------


def rate(n: float, seconds: float | None) -> float:
    return n / seconds if seconds else float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"machine_before": machine_info()}
    with throwaway_cluster(keep=args.keep) as cluster:
        say("starting a throwaway PostgreSQL 15 server")
        w = make_workload(cluster, args.wal_mib)

        say(f"ours: native redo of {mib(w.end_lsn - w.redo_lsn):.0f} MiB of WAL")
        profile = cProfile.Profile() if args.profile else None
        if profile is not None:
            profile.enable()
        pages: dict[PageKey, bytes] = {}
        try:
            ours = redo_wal(w, pages, redo_block_python if args.python_redo else redo_block)
        finally:
            if profile is not None:
                profile.disable()
                profile.dump_stats(args.profile)
        results["machine_after_ours"] = machine_info()
        chain: ChainRedo | None = None
        chain_pages: dict[PageKey, bytes] = {}
        if native_redo is not None and not args.python_redo:
            say("ours: the product's path: the WAL ingested into a page store, then rebuilt")
            reset_peak()  # VmHWM from here: the page store runs in this process
            results["rss_before_chain_mib"] = round(vm_hwm_kib() / 1024, 1)
            chain = chain_redo(w, cluster.base / "store")
            results["harness_peak_rss_mib"] = round(vm_hwm_kib() / 1024, 1)
            chain_pages = main_fork_pages(chain.pages)
            chain.pages.clear()
            chain_same = sum(chain_pages.get(k) == v for k, v in pages.items() if k[1] == 0)
            results["machine_after_chain"] = machine_info()

        say("stock: baseline start of BASE (nothing to replay)")
        baseline = start_copy(cluster, w.base, None)
        say("stock: crash recovery of BASE with the crashed server's pg_wal")
        stock = start_copy(cluster, w.base, w.crashed_wal, stop_mode="fast")
        say("comparing our pages with the recovered copy's")
        comparison = compare_pages(pages, stock.datadir)
        chain_comparison = compare_pages(chain_pages, stock.datadir) if chain else None
        chain_pages.clear()
        pages.clear()
        results["machine_after"] = machine_info()
    if profile is not None:
        pstats.Stats(str(args.profile)).sort_stats("tottime").print_stats(20)
    if stock.redo_elapsed is None:
        raise RuntimeError(f"no 'redo done' line in the recovery log:\n{stock.log[-2000:]}")

    implementation = (
        "C fast path (pageserver/redo/_redo.c), the rest in Python"
        if native_redo is not None and not args.python_redo
        else "pure Python"
    )
    m = ours.measure
    ours_total = ours.decode_s + ours.redo_s
    stock_ready = stock.wall - baseline.wall
    stock_rate = rate(ours.records, stock.redo_elapsed)
    results.update(
        redo_implementation=implementation,
        wal_mib=round(mib(ours.wal_bytes), 1),
        pgbench_scale=w.scale,
        pgbench_rounds=w.rounds,
        redo_from=format_lsn(w.redo_lsn),
        redo_to=format_lsn(ours.last_end_lsn),
        ours={
            "records": ours.records,
            "records_with_blocks": ours.records_with_blocks,
            "pages_redone": ours.pages,
            "of_which_images": ours.images,
            "distinct_pages": ours.distinct_pages,
            "base_page_reads": ours.base_reads,
            "decode_s": round(ours.decode_s, 3),
            "redo_s": round(ours.redo_s, 3),
            "base_read_s": round(ours.base_read_s, 3),
            "wall_s": round(m.wall, 3),
            "cpu_s": round(m.cpu, 3),
            "redo_records_per_s": round(rate(ours.records, ours.redo_s)),
            "redo_pages_per_s": round(rate(ours.pages, ours.redo_s)),
            "records_per_s": round(rate(ours.records, ours_total)),
            "pages_per_s": round(rate(ours.pages, ours_total)),
            "unsupported": dict(ours.unsupported),
            "errors": ours.errors,
        },
        stock={
            "redo_starts_at": stock.redo_start,
            "redo_done_at": stock.redo_done,
            "redo_elapsed_s": stock.redo_elapsed,
            "redo_cpu_s": stock.redo_cpu,
            "start_wall_s": round(stock.wall, 3),
            "baseline_start_wall_s": round(baseline.wall, 3),
            "start_minus_baseline_s": round(stock_ready, 3),
            "records_per_s": round(stock_rate),
            "pages_per_s": round(rate(ours.pages, stock.redo_elapsed)),
            "records_per_s_start_to_ready": round(rate(ours.records, stock_ready)),
        },
        pages_compared={
            "pages": comparison.pages,
            "same": comparison.same,
            "differing": comparison.differing,
        },
        ratio=round(rate(ours.records, ours_total) / stock_rate, 4),
        ratio_redo_only=round(rate(ours.records, ours.redo_s) / stock_rate, 4),
        # CPU time is less sensitive to a busy machine than wall time.
        ratio_cpu=round(stock.redo_cpu / m.cpu, 4) if stock.redo_cpu and m.cpu else None,
    )
    if chain is not None and chain_comparison is not None:
        chain_total = chain.read_s + chain.ingest_s + chain.base_s + chain.redo_s
        chain_cpu = chain.read_cpu + chain.ingest_cpu + chain.base_cpu + chain.redo_cpu
        chain_rate = rate(chain.records, chain_total)
        results["chain"] = {
            "import_lsn": format_lsn(chain.import_lsn),
            "records": chain.records,
            "read_s": round(chain.read_s, 3),
            "ingest_s": round(chain.ingest_s, 3),
            "redo_s": round(chain.redo_s, 3),
            "base_pages_s": round(chain.base_s, 3),
            "layout_s": round(chain.layout_s, 3),
            "read_cpu_s": round(chain.read_cpu, 3),
            "ingest_cpu_s": round(chain.ingest_cpu, 3),
            "redo_cpu_s": round(chain.redo_cpu, 3),
            "keys": chain.keys,
            "segments": chain.segments,
            "deltas_redone": chain.deltas,
            "handed_back": chain.handed_back,
            "refused": chain.refused[:10],
            "pages_equal_to_wal_order": chain_same,
            "pages_compared": {
                "pages": chain_comparison.pages,
                "same": chain_comparison.same,
                "differing": chain_comparison.differing,
            },
            "records_per_s": round(chain_rate),
        }
        results["ratio_chain"] = round(chain_rate / stock_rate, 4)
        results["ratio_chain_cpu"] = (
            round(stock.redo_cpu / chain_cpu, 4) if stock.redo_cpu and chain_cpu else None
        )
    print()
    print(
        f"Redo of {results['wal_mib']} MiB of pgbench WAL (scale {w.scale}, {ours.records:,} "
        f"records, {ours.pages:,} block references, {ours.images:,} of them images), "
        f"{results['redo_from']}..{results['redo_to']}; redo: {implementation}"
    )
    print_table(
        ["", "seconds", "records/s", "pages/s"],
        [
            ["ours: redo only", ours.redo_s, round(rate(ours.records, ours.redo_s)),
             round(rate(ours.pages, ours.redo_s))],
            ["ours: decode (reader + decode_records)", ours.decode_s,
             round(rate(ours.records, ours.decode_s)), "-"],
            ["ours: decode + redo", ours_total, round(rate(ours.records, ours_total)),
             round(rate(ours.pages, ours_total))],
            ["(ours: reading BASE pages)", ours.base_read_s, "-", "-"],
            ["stock: crash recovery redo (its log)", stock.redo_elapsed, round(stock_rate),
             round(rate(ours.pages, stock.redo_elapsed))],
            ["stock: start to ready - baseline start", stock_ready,
             round(rate(ours.records, stock_ready)), round(rate(ours.pages, stock_ready))],
        ],
    )  # fmt: skip
    print(
        f"ratio ours / stock (records/s): {results['ratio']:.4f} with decoding, "
        f"{results['ratio_redo_only']:.4f} redo only"
    )
    print(
        f"CPU seconds: ours {m.cpu:.2f} (decode + redo), stock redo {stock.redo_cpu}: ratio "
        f"{results['ratio_cpu']}"
    )
    print(
        f"stock redo {stock.redo_start}..{stock.redo_done}; baseline start "
        f"{baseline.wall:.3f} s, with the WAL {stock.wall:.3f} s"
    )
    print(
        f"our final main-fork pages equal to the recovered copy's (masked): "
        f"{comparison.same:,} / {comparison.pages:,} {comparison.differing[:3] or ''}"
    )
    if chain is not None and chain_comparison is not None:
        c = results["chain"]
        print(
            f"the product's path ({chain.records:,} records from the import at "
            f"{c['import_lsn']}): read {chain.read_s:.3f} s + ingest {chain.ingest_s:.3f} s + "
            f"base pages {chain.base_s:.3f} s + rebuild_page {chain.redo_s:.3f} s = "
            f"{c['records_per_s']:,} records/s "
            f"({chain.deltas:,} deltas of {chain.keys:,} keys in {chain.segments:,} segments, "
            f"{chain.handed_back} handed back, {len(chain.refused)} refused); laying out the "
            f"in-memory layers {chain.layout_s:.3f} s (storage, not counted)"
        )
        print(
            f"ratio ours / stock, the product's path: {results['ratio_chain']:.4f}; CPU "
            f"{results['ratio_chain_cpu']}; its main-fork pages equal to the recovered "
            f"copy's (masked): {chain_comparison.same:,} / {chain_comparison.pages:,} "
            f"{chain_comparison.differing[:3] or ''}, to the WAL-order replay's: "
            f"{chain_same:,}"
        )
    if ours.unsupported or ours.errors:
        print(f"not redone: unsupported {dict(ours.unsupported)}, errors {ours.errors[:3]}")
    if chain is not None:
        print(
            f"this process's peak RSS over the product's path: "
            f"{results['harness_peak_rss_mib']:.0f} MiB, of which "
            f"{results['rss_before_chain_mib']:.0f} MiB held before it (the WAL-order replay's "
            "pages). Not a pageserver's: this harness keeps every page version of the whole "
            "WAL in memory (to lay each key's chain out once) and every rebuilt page (to "
            "compare them), where the daemon flushes its in-memory layers at their size bound; "
            "the daemon's peak over the same redo is what bench.extract, bench.checkout and "
            "bench.ingest print"
        )
    else:
        print("peak RSS over the product's path: not measured (no C chain redo)")
    print_machine(results)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.redo", description=__doc__)
    ap.add_argument("--wal-mib", type=int, default=256, help="pgbench WAL to replay")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (BASE, WAL, logs)")
    ap.add_argument("--profile", type=Path, help="cProfile our replay into this file")
    ap.add_argument(
        "--python-redo",
        action="store_true",
        help="redo with the Python reference only (the C fast path of pageserver/redo off)",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    # Ctrl-C and SIGTERM both unwind through the finally blocks that stop what we started.
    return run_benchmark(BENCH, run, args)


if __name__ == "__main__":
    sys.exit(main())
