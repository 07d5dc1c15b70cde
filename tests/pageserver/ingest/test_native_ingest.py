"""The C ingest path (pageserver/ingest/_walingest.c) against WalIngest.ingest_record.

One real server's WAL (pgbench, updates, deletes, VACUUM, index builds and page splits,
full-page images after checkpoints, wal_log_hints) is ingested twice into stores imported
from the same data directory: record by record through the Python reference, and in batches
through NodeStore.ingest_batch with the C path. The layers written must be identical, byte
for byte and cut at the same LSNs, and the C path must have taken most records.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pageserver.api.metrics import Metrics
from pageserver.follow.followed_nodes import FollowedNode
from pageserver.follow.node_follower import NodeFollower
from pageserver.history.node_store import NodeStore, StorageHistory
from pageserver.ingest import native
from pageserver.ingest.walingest import WalIngest
from pageserver.storage.keys import FULL_KEYSPACE
from pageserver.storage.layers import native as layers_native
from pageserver.storage.layers.inmemory import ArenaLayer
from pageserver.storage.settings import StoreSettings
from pg15.lsn import DEFAULT_SEGMENT_SIZE as SEG
from pg15.lsn import segment_file_name
from pg15.pg_control import read_control_file
from pg15.records import (
    BlockRef,
    DecodedRecord,
    RecordDecodeError,
    RelFileNode,
    decode_record,
    decode_records,
)
from pg15.xlog_reader import RawRecord, WalReader, record_crc
from tests.native_ext import require_c_extension
from tests.pgtest import PgTestCluster
from walreceiver.receiver import WalChunk

SMALL = StoreSettings(checkpoint_distance=4 * 1024 * 1024)
"""Several freezes within the workload, so the cut points are compared too."""


@pytest.fixture
def c_extension() -> None:
    require_c_extension(native.walingest, "pageserver.ingest._walingest")


@dataclass(frozen=True)
class Workload:
    base: Path  # the data directory at its shutdown checkpoint, before the workload
    records: list[DecodedRecord]
    raws: list[RawRecord]
    wal_dir: Path  # the server's pg_wal, from `start` (the import's checkpoint record)
    start: int


@pytest.fixture(scope="module")
def workload(
    pg_cluster_module: PgTestCluster, tmp_path_factory: pytest.TempPathFactory
) -> Workload:
    server = pg_cluster_module.create(
        {"wal_log_hints": "on", "autovacuum": "off", "wal_keep_size": "1GB"}, start=False
    )
    base = tmp_path_factory.mktemp("base") / "pgdata"
    shutil.copytree(server.datadir, base)
    server.start()
    c = server.dsn()
    server.run("pgbench", "-i", "-s", "2", "-q", c)
    server.psql("CHECKPOINT")
    server.run("pgbench", "-c", "2", "-t", "300", c)
    server.psql(
        "CREATE TABLE t (id int PRIMARY KEY, pad text);"
        "INSERT INTO t SELECT g, repeat('x', g % 200) FROM generate_series(1, 20000) g;"
        "CREATE INDEX ON t (pad);"
        "UPDATE t SET pad = pad || 'y' WHERE id % 3 = 0;"
        "DELETE FROM t WHERE id % 5 = 0;"
        "VACUUM FREEZE t;"
        "CHECKPOINT;"
        "UPDATE t SET pad = 'z' WHERE id % 7 = 0;"
        "DROP INDEX t_pad_idx;"
        "TRUNCATE pgbench_history;"
    )
    # Subtransactions (more than a commit record caches: assignment records too) and aborts.
    server.psql(
        "CREATE TABLE s (a int);"
        "DO $$ BEGIN FOR i IN 1..100 LOOP BEGIN INSERT INTO s VALUES (i);"
        " IF i % 2 = 0 THEN RAISE EXCEPTION 'x'; END IF;"
        " EXCEPTION WHEN OTHERS THEN NULL; END; END LOOP; END $$;"
    )
    server.psql("BEGIN; INSERT INTO s VALUES (-1); ROLLBACK;")
    server.stop()
    records: list[DecodedRecord] = []
    raws: list[RawRecord] = []
    start = read_control_file(base).checkpoint_lsn  # its record is skipped: already imported
    reader = WalReader(start, SEG, timeline=1)
    segno = start // SEG
    while reader.end_of_wal is None:
        path = server.wal_dir / segment_file_name(1, segno, SEG)
        if not path.exists():
            break
        data = path.read_bytes()
        reader.feed(data[start - segno * SEG :] if segno == start // SEG else data)
        while batch := reader.read_batch():
            raws.extend(batch)
            records.extend(decode_records(batch))
        segno += 1
    assert len(records) > 20000
    return Workload(base, records, raws, server.wal_dir, start)


@pytest.fixture
def stores(tmp_path: Path, workload: Workload) -> Iterator[tuple[NodeStore, NodeStore]]:
    histories = [StorageHistory(tmp_path / name, SMALL) for name in ("python", "native")]
    pair = (NodeStore(histories[0], "py"), NodeStore(histories[1], "c"))
    for store in pair:
        store.import_datadir(workload.base)
    yield pair
    for history in histories:
        history.close()


def layer_contents(store: NodeStore) -> list[tuple[int, int, list[tuple[bytes, int, bytes]]]]:
    store.timeline.freeze_and_flush()
    layers = sorted(
        (x for x in store.timeline.layer_map().layers() if not x.name.is_image),
        key=lambda x: x.lsn_start,
    )
    return [(x.lsn_start, x.lsn_end, list(x.iter_encoded())) for x in layers]


@pytest.mark.usefixtures("c_extension")
def test_c_ingest_writes_the_same_layers_as_python(
    workload: Workload, stores: tuple[NodeStore, NodeStore]
) -> None:
    python, fast = stores
    for record, raw in zip(workload.records, workload.raws, strict=True):
        python.ingest(record, raw.data)

    taken = 0
    ingest_native = WalIngest.ingest_native

    def counting(self: WalIngest, records: list[DecodedRecord], raws: list[bytes | None],
                 start: int) -> int:  # fmt: skip
        nonlocal taken
        reached = ingest_native(self, records, raws, start)
        taken += reached - start
        return reached

    WalIngest.ingest_native = counting  # type: ignore[method-assign]
    try:
        for i in range(0, len(workload.records), 500):  # the decode loop's batches
            fast.ingest_batch(
                workload.records[i : i + 500], [r.data for r in workload.raws[i : i + 500]]
            )
    finally:
        WalIngest.ingest_native = ingest_native  # type: ignore[method-assign]

    assert fast.timeline.last_record_lsn == python.timeline.last_record_lsn
    assert fast.timeline.prev_record_lsn == python.timeline.prev_record_lsn
    assert len(layer_contents(python)) > 2
    assert layer_contents(fast) == layer_contents(python)
    assert fast.index.last_lsn == python.index.last_lsn
    python.index.flush()  # observe per record against LsnIndex.observe_all per batch
    fast.index.flush()
    assert fast.index.path.read_bytes() == python.index.path.read_bytes()
    assert taken > 0.6 * len(workload.records), (taken, len(workload.records))


@pytest.mark.usefixtures("c_extension")
def test_records_without_raw_bytes_and_restarts_go_to_python(
    workload: Workload, stores: tuple[NodeStore, NodeStore]
) -> None:
    """No raw bytes: deltas cannot be made in C; already-ingested records are skipped."""
    python, fast = stores
    head = workload.records[:3000]
    for i, (record, raw) in enumerate(zip(head, workload.raws, strict=False)):
        python.ingest(record, raw.data if i < 2000 else None)
    fast.ingest_batch(head[:2000], [r.data for r in workload.raws[:2000]])
    fast.ingest_batch(head, [None] * len(head))  # 0..1999 again: skipped
    assert layer_contents(fast) == layer_contents(python)


def layer_files(store: NodeStore) -> dict[str, bytes]:
    """Every layer file of the store's timeline, by name (names carry key and LSN ranges)."""
    store.timeline.freeze_and_flush()
    return {x.path.name: x.path.read_bytes() for x in store.timeline.layer_map().layers()}


def in_memory_reads(store: NodeStore) -> list[object]:
    """What reads see in the in-memory layers (frozen and open, none flushed yet)."""
    timeline = store.timeline
    layers = [*timeline._frozen, *([timeline._open] if timeline._open is not None else [])]
    out: list[object] = []
    for layer in layers:
        groups = list(layer.iter_key_groups())
        out.append((type(layer) is ArenaLayer, layer.lsn_start, layer.lsn_end, len(layer),
                    layer.size, groups))  # fmt: skip
        top = layer.max_lsn
        for lsn in (layer.lsn_start, (layer.lsn_start + top) // 2, top):
            out.append(list(layer.newest_versions(FULL_KEYSPACE, lsn)))
            for key, _ in groups[:: max(1, len(groups) // 50)]:
                out.append((layer.collect(key, lsn, -1), layer.newest_lsn(key, lsn)))
    return out


@pytest.mark.usefixtures("c_extension")
def test_c_ingest_into_the_arena_equals_python_into_the_reference_layer(
    workload: Workload, stores: tuple[NodeStore, NodeStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole fast path (C ingest appending to `_inmem` arenas, L0 files packed in C)
    against the whole reference (WalIngest.ingest_record into the dict InMemoryLayer, L0
    files written per version in Python): the same reads from every in-memory layer and
    the same layer files."""
    require_c_extension(layers_native.inmem, "pageserver.storage.layers._inmem")
    python, fast = stores
    with monkeypatch.context() as m:
        m.setattr(layers_native, "inmem", None)  # new_layer makes the reference layer
        for i in range(0, len(workload.records), 500):
            python.ingest_batch(
                workload.records[i : i + 500], [r.data for r in workload.raws[i : i + 500]]
            )
        python_reads = in_memory_reads(python)
        python_files = layer_files(python)
    for i in range(0, len(workload.records), 500):
        fast.ingest_batch(
            workload.records[i : i + 500], [r.data for r in workload.raws[i : i + 500]]
        )
    fast_reads = in_memory_reads(fast)
    assert len(python.timeline._frozen) == 0 and len(fast.timeline._frozen) > 2
    assert next(x for x in fast_reads if isinstance(x, tuple) and len(x) == 6)[0] is True
    assert [x[1:] if isinstance(x, tuple) and len(x) == 6 else x for x in fast_reads] == [
        x[1:] if isinstance(x, tuple) and len(x) == 6 else x for x in python_reads
    ]
    assert layer_files(fast) == python_files
    assert len(python_files) > 3


def test_malformed_runs_are_refused_or_left_to_python(c_extension: None) -> None:
    """Safety review of `_walingest`: a negative start read the list before its first item,
    and records not shaped as the decoder makes them (a block that is not a BlockRef, an
    image that is not a BlockImage, main data that is not bytes) were read with unchecked
    tuple accesses; they are now an IndexError, or left to Python with nothing put.
    index_entries' distance from a very negative last sample no longer overflows."""
    assert native.walingest is not None and layers_native.inmem is not None
    arena = layers_native.inmem.Arena()
    context = (arena, set(), {}, {}, 0, 1 << 20, 1000, set(), {}, 0)
    with pytest.raises(IndexError, match="negative start"):
        native.walingest.ingest_run([], [], -1, context)
    heap, xact = 10, 1
    block = ("not", "a", "block", "ref", 0, None, b"")
    odd = [
        DecodedRecord(100, 200, 64, 0, 0, 0, heap, ("x",), b""),  # type: ignore[arg-type]
        DecodedRecord(100, 200, 64, 0, 0, 0, heap, (block[:3],), b""),  # type: ignore[arg-type]
        DecodedRecord(100, 200, 64, 0, 0, 0, heap, ((*block[:5], ("i",), b""),), b""),  # type: ignore[arg-type]
        DecodedRecord(100, 200, 64, 0, 0, 0, heap, [], b""),  # type: ignore[arg-type]
        DecodedRecord(100, 200, 64, 0, 0, 0, xact, (), memoryview(b"\0" * 64)),  # type: ignore[arg-type]
    ]
    for record in odd:
        assert native.walingest.ingest_run([record], [b"raw"], 0, context) == (0, 0, 0, None, None)
    assert arena.key_groups() == []
    other = DecodedRecord(2**62 - 64, 2**62, 64, 0, 0, 0, heap, (), b"")
    reached, last, sample, *_ = native.walingest.index_entries(
        [other], 0, 1, -1, -(2**63), None, 1 << 20
    )
    assert (reached, last, sample) == (1, 2**62, 2**62)


def test_a_failing_run_leaves_the_layer_and_the_size_cache_as_they_were(
    c_extension: None,
) -> None:
    """Timeline.put_records accounts nothing of a run that raises (no size, no last record
    LSN), so the run must leave nothing behind: the versions of the records it had already
    put leave the arena, and the fork sizes it grew are not written into the cache (they
    were: a retry would then skip the size puts, and the layer held unaccounted versions)."""
    assert native.walingest is not None and layers_native.inmem is not None
    arena = layers_native.inmem.Arena()
    rnode = RelFileNode(1663, 5, 16384)
    heap = DecodedRecord(
        1000, 1064, 64, 0, 0, 0, 10, (BlockRef(0, rnode, 0, 3, 0, None, b"d"),), b""
    )
    sizes = {(1663, 5, 16384, 0): 2}
    context = (arena, {(1663, 5)}, {(1663, 5): {(16384, 0)}}, sizes, 0, 1 << 20, 2048, set(), {}, 0)
    ok = native.walingest.ingest_run([heap], [b"raw"], 0, context)
    assert (
        ok == (1, (48 + 1 + 8 + 3) + (48 + 1 + 4), 2, 1064, 1000)
        and sizes[(1663, 5, 16384, 0)] == 4
    )
    arena, sizes = layers_native.inmem.Arena(), {(1663, 5, 16384, 0): 2}
    context = (arena, {(1663, 5)}, {(1663, 5): {(16384, 0)}}, sizes, 0, 1 << 20, 2048, set(), {}, 0)
    bad = DecodedRecord(1064, 1128, 64, "not an xid", 0, 0, 10, (), b"")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        native.walingest.ingest_run([heap, bad], [b"raw", b"raw"], 0, context)
    assert arena.key_groups() == [] and arena.pack(8192, 0, 2000)[5] == 0
    assert sizes == {(1663, 5, 16384, 0): 2}
    assert native.walingest.ingest_run([heap], [b"raw"], 0, context) == ok
    assert len(arena.key_groups()) == 2 and sizes[(1663, 5, 16384, 0)] == 4


def reference_ingest(store: NodeStore, raws: list[RawRecord]) -> None:
    """The reference: each record decoded and ingested on its own (decode_record raises on
    a bad one, after the records before it are ingested)."""
    for raw in raws:
        store.ingest(decode_record(raw), raw.data)


@pytest.mark.parametrize("fused", [True, False], ids=["fused-c", "no-c-extension"])
def test_fused_raw_ingest_writes_the_same_layers_and_index_as_python(
    workload: Workload,
    stores: tuple[NodeStore, NodeStore],
    monkeypatch: pytest.MonkeyPatch,
    fused: bool,
) -> None:
    """NodeStore.ingest_raw_batch (the reader's records, decoded and ingested in one C call
    where it can, _walingest.ingest_raw_run) against the record-by-record reference, on real
    WAL: the same layers (cut at the same LSNs), the same last and previous record LSN and
    the same LSN index file; the C path takes nearly every record. Without the extension
    (as with NEON_PURE_PYTHON=1) the same call decodes and ingests in Python."""
    if fused:
        require_c_extension(native.walingest, "pageserver.ingest._walingest")
    python, fast = stores
    reference_ingest(python, workload.raws)
    taken = 0
    ingest_native_raw = WalIngest.ingest_native_raw

    def counting(self: WalIngest, batch: list[RawRecord], start: int) -> int:
        nonlocal taken
        reached = ingest_native_raw(self, batch, start)
        taken += reached - start
        return reached

    monkeypatch.setattr(WalIngest, "ingest_native_raw", counting)
    in_python: list[DecodedRecord] = []
    ingest_record = WalIngest.ingest_record

    def noting(self: WalIngest, record: DecodedRecord, raw: bytes | None = None) -> bool:
        in_python.append(record)
        return ingest_record(self, record, raw)

    monkeypatch.setattr(WalIngest, "ingest_record", noting)
    if not fused:
        monkeypatch.setattr(native, "walingest", None)
    for i in range(0, len(workload.raws), 500):  # the decode loop's batches
        fast.ingest_raw_batch(workload.raws[i : i + 500])

    assert fast.timeline.last_record_lsn == python.timeline.last_record_lsn
    assert fast.timeline.prev_record_lsn == python.timeline.prev_record_lsn
    assert len(layer_contents(python)) > 2
    assert layer_contents(fast) == layer_contents(python)
    python.index.flush()
    fast.index.flush()
    assert fast.index.path.read_bytes() == python.index.path.read_bytes()
    if fused:
        assert taken > 0.9 * len(workload.raws), (taken, len(workload.raws))
        # full-page images of index builds (XLOG_FPI, info 0xB0) are taken in C too (but
        # the first of a relation fork whose size is not cached yet)
        fpis = [r for r in workload.records if r.rmgr_id == 0 and r.info & 0xF0 == 0xB0]
        left = [r for r in in_python if r.rmgr_id == 0 and r.info & 0xF0 == 0xB0]
        assert len(fpis) > 10 and len(left) < 0.2 * len(fpis), (len(left), len(fpis))
    else:
        assert taken == 0


def damaged(raw: RawRecord) -> RawRecord:
    """The record with its first block reference's id made 33 (past XLR_MAX_BLOCK_ID): a
    record the CRC would let through if it had been written so, which the decoder refuses."""
    data = bytearray(raw.data)
    assert data[24] <= 32  # the first block header (SizeOfXLogRecord = 24)
    data[24] = 33
    return RawRecord(raw.lsn, raw.end_lsn, bytes(data))


@pytest.mark.usefixtures("c_extension")
def test_fused_raw_ingest_of_a_bad_record_raises_the_decoders_error(
    workload: Workload, stores: tuple[NodeStore, NodeStore]
) -> None:
    """A record the fused C code cannot lay out goes to the Python decoder, which raises
    the same typed error as decoding alone; the records before it are ingested and nothing
    of it or after it (the same state as the reference that stops there)."""
    python, fast = stores
    at = next(i for i, r in enumerate(workload.records[:5000]) if r.rmgr_id == 10 and r.blocks)
    at += 700  # inside the second batch of 500
    while not (workload.records[at].rmgr_id == 10 and workload.records[at].blocks):
        at += 1
    raws = [*workload.raws[:at], damaged(workload.raws[at]), *workload.raws[at + 1 : at + 50]]
    with pytest.raises(RecordDecodeError) as expected:
        reference_ingest(python, raws)
    with pytest.raises(RecordDecodeError) as got:
        for i in range(0, len(raws), 500):
            fast.ingest_raw_batch(raws[i : i + 500])
    assert str(got.value) == str(expected.value)
    assert fast.timeline.last_record_lsn == python.timeline.last_record_lsn
    assert fast.timeline.last_record_lsn == workload.raws[at - 1].end_lsn
    assert layer_contents(fast) == layer_contents(python)


def test_raw_runs_leave_what_they_cannot_lay_out_to_python(c_extension: None) -> None:
    """ingest_raw_run refuses or leaves (nothing put) what is not a RawRecord with a
    well-formed heap record: wrong shapes, a too short record, a length that is not
    xl_tot_len, a truncated block header."""
    assert native.walingest is not None and layers_native.inmem is not None
    arena = layers_native.inmem.Arena()
    rnode = (1663, 5, 16384)
    sizes = {(*rnode, 0): 2}
    context = (arena, {rnode[:2]}, {rnode[:2]: {(rnode[2], 0)}}, sizes, 0, 1 << 20, 2048,
               set(), {}, 0)  # fmt: skip
    # XLogRecord (xl_tot_len, xl_xid, xl_prev, xl_info, xl_rmid = heap, pad, xl_crc), then
    # block 0: fork_flags 0x20 (HAS_DATA), data_len 1, RelFileNode, blkno 3; its data byte
    body = bytes([0, 0x20, 1, 0]) + struct.pack("<IIII", *rnode, 3) + b"d"
    good = struct.pack("<IIQBBxxI", 24 + len(body), 0, 0, 0, 10, 0) + body
    odd: list[object] = [
        ("not", "a", "record"),
        (1000, 1064),
        (1000, 1064, bytearray(good)),
        RawRecord(1000, 1064, good[:20]),
        RawRecord(1000, 1064, good + b"x"),
        RawRecord(1000, 1064, struct.pack("<I", 24 + 3) + good[4:27]),
    ]
    for record in odd:
        assert native.walingest.ingest_raw_run([record], 0, context) == (0, 0, 0, None, None)
    assert arena.key_groups() == []
    with pytest.raises(IndexError, match="negative start"):
        native.walingest.ingest_raw_run([], -1, context)
    ok = native.walingest.ingest_raw_run([RawRecord(1000, 1064, good)], 0, context)
    assert ok == (1, (48 + 1 + 8 + len(good)) + (48 + 1 + 4), 2, 1064, 1000)
    assert sizes[(*rnode, 0)] == 4


def test_the_followers_decode_loop_ingests_up_to_a_bad_record(
    workload: Workload, stores: tuple[NodeStore, NodeStore]
) -> None:
    """NodeFollower._decode over real WAL with one heap record made undecodable (block id 33,
    its CRC recomputed so the reader passes it): the records before it are ingested through
    the fused path, the follower's decoded LSN and record count stop there, and the decoder's
    error is the follower's decode error."""
    python, fast = stores
    at = next(  # a heap record on one WAL page, after batches the C path took
        i
        for i, r in enumerate(workload.records)
        if i > 3000 and r.rmgr_id == 10 and r.blocks and r.lsn // 8192 == (r.end_lsn - 1) // 8192
    )
    bad = workload.raws[at]
    data = bytearray()  # the WAL from the import's checkpoint to the end of bad's segment
    for segno in range(workload.start // SEG, bad.lsn // SEG + 1):
        data += (workload.wal_dir / segment_file_name(1, segno, SEG)).read_bytes()
    del data[: workload.start % SEG]
    damaged_data = bytearray(damaged(bad).data)
    damaged_data[20:24] = struct.pack("<I", record_crc(bytes(damaged_data)))
    record = bytes(damaged_data)
    offset = bad.lsn - workload.start
    data[offset : offset + len(record)] = record
    with pytest.raises(RecordDecodeError) as expected:
        reference_ingest(
            python, [*workload.raws[:at], RawRecord(bad.lsn, bad.end_lsn, bytes(record))]
        )

    node = FollowedNode("c", "127.0.0.1", 1, "u", "p")
    follower = NodeFollower(node, fast, Metrics())
    follower._decode(WalChunk(1, workload.start, bytes(data)))
    assert follower.decode_error == str(expected.value)
    assert follower.decoded_lsn == workload.raws[at - 1].end_lsn
    assert fast.timeline.last_record_lsn == python.timeline.last_record_lsn
    assert layer_contents(fast) == layer_contents(python)
