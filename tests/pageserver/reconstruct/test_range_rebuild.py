"""Image creation's bulk rebuild (`range_rebuild.rebuild_range`, the C chain redo
`_redo.rebuild_page`) against the per-key reference path, on real WAL.

One server runs pgbench and the redo workload (every Heap, Heap2 and Btree record type, VM
bits set and cleared, a multixact); its WAL is ingested into a store imported from its
initdb'd directory, with image layers forced at a third of the way (so later chains start
from an image layer, not only from the import's) and small layers (many L0 layers). Then:

* at LSNs across the WAL, every key of every partition rebuilds to the reference's value
  (None included), with the reference called for almost no key and the Python redo for few;
* image layers written at the end with and without the bulk path are the same files, byte
  for byte, and so are those written by GC and those of partitions rebuilt at once;
* on a branch, keys whose chain goes into the ancestor take the reference path, equal values.

Hand-built chains cover what the workload rarely reaches (a prepared commit in a CLOG chain, a
tombstone, chains that fail: the same error as the reference).
"""

from __future__ import annotations

import itertools
import random
import shutil
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pageserver.ingest.import_datadir import import_datadir
from pageserver.ingest.walingest import WalIngest
from pageserver.reconstruct import range_rebuild
from pageserver.reconstruct.apply_delta import reconstruct
from pageserver.reconstruct.page_cache import PAGE_CACHE
from pageserver.reconstruct.range_rebuild import rebuild_keys, rebuild_range
from pageserver.reconstruct.value_format import encode_delta
from pageserver.redo.heap import XLH_UPDATE_PREFIX_FROM_OLD
from pageserver.redo.native import redo as native
from pageserver.storage import compaction
from pageserver.storage.compaction import (
    PAGE_SIZE_ESTIMATE,
    _partitions,
    compact_level0,
    create_image_layers,
)
from pageserver.storage.gc import GcSettings, gc_timeline
from pageserver.storage.keys import (
    FULL_KEYSPACE,
    Key,
    KeyRange,
    SlruKind,
    describe,
    key_successor,
    rel_block_key,
    slru_block_key,
)
from pageserver.storage.layers.blocks import LayerFile
from pageserver.storage.settings import StoreSettings
from pageserver.storage.timeline import Timeline
from pageserver.storage.timeline_store import TimelineStore
from pageserver.storage.values import TOMBSTONE, Image, Tombstone, WalDelta
from pg15.constants import RM_HEAP_ID, RM_XACT_ID, VISIBILITYMAP_FORKNUM
from pg15.lsn import DEFAULT_SEGMENT_SIZE, parse_lsn, segment_file_name
from pg15.records import decode_record
from pg15.rmgr.heap import XLOG_HEAP_INSERT, XLOG_HEAP_UPDATE
from pg15.rmgr.xact import (
    XACT_XINFO_HAS_SUBXACTS,
    XACT_XINFO_HAS_TWOPHASE,
    XLOG_XACT_ABORT,
    XLOG_XACT_COMMIT,
    XLOG_XACT_COMMIT_PREPARED,
    XLOG_XACT_HAS_INFO,
)
from pg15.xlog_reader import WalReader
from proto.errors import NeonError
from tests.native_ext import require_c_extension
from tests.pageserver.redo.test_verify import run_workload
from tests.pg15.test_records import build_record
from tests.pgtest import PgTestCluster

SETTINGS = StoreSettings(
    checkpoint_distance=512 * 1024,  # many L0 layers
    image_layer_target_size=1024 * 1024,  # many partitions
    compaction_threshold=1000,
)


@pytest.fixture
def c_extension() -> None:
    require_c_extension(native, "pageserver.redo._redo")


pytestmark = pytest.mark.usefixtures("c_extension")


@pytest.fixture(params=["c", "python"])
def walk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The layer walk in C (`_redo.rebuild_run`) or its Python reference."""
    assert range_rebuild._rebuild_run is not None, "pageserver.redo._redo lacks rebuild_run"
    if request.param == "python":
        monkeypatch.setattr(range_rebuild, "_rebuild_run", None)
    return str(request.param)


@dataclass(frozen=True)
class History:
    root: Path
    timeline_id: str
    start: int
    middle: int
    end: int


def _ingest(timeline: Timeline, wal_dir: Path, start: int, stop_after: int) -> int:
    """Ingest the WAL from the segment holding `start` (records ending after it) until the
    first record ending past `stop_after`, included; its end LSN (or where the WAL ends)."""
    ingest = WalIngest(timeline)
    seg = DEFAULT_SEGMENT_SIZE
    segno = start // seg
    reader = WalReader(segno * seg, seg, 1)
    end = start
    while (path := wal_dir / segment_file_name(1, segno, seg)).exists():
        reader.feed(path.read_bytes())
        for raw in reader.records():
            if raw.end_lsn <= start:
                continue
            ingest.ingest_record(decode_record(raw), raw.data)
            end = raw.end_lsn
            if end > stop_after:
                return end
        if reader.end_of_wal is not None:
            break
        segno += 1
    return end


@pytest.fixture(scope="module")
def history(
    pg_cluster_module: PgTestCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[History]:
    server = pg_cluster_module.create(
        {"wal_keep_size": "2GB", "max_wal_size": "2GB", "checkpoint_timeout": "1h",
         "autovacuum": "off"},
        start=False,
    )  # fmt: skip
    root = tmp_path_factory.mktemp("range-rebuild") / "store"
    store = TimelineStore(root, SETTINGS)
    timeline = store.create_timeline()
    start = import_datadir(timeline, server.datadir)
    timeline.freeze_and_flush()
    server.start()
    run_workload(server)
    written = parse_lsn(server.psql("SELECT pg_current_wal_insert_lsn()"))
    server.stop()
    # In two steps, with images forced in between.
    middle = _ingest(timeline, server.wal_dir, start, start + (written - start) // 3)
    timeline.freeze_and_flush()
    assert create_image_layers(timeline, reconstruct, force=True) > 0
    end = _ingest(timeline, server.wal_dir, middle, 1 << 62)
    timeline.freeze_and_flush()
    assert end > written
    tid = timeline.timeline_id
    store.close()
    yield History(root, tid, start, middle, end)


def _open(history: History, where: Path) -> tuple[TimelineStore, Timeline]:
    shutil.copytree(history.root, where)
    store = TimelineStore(where, SETTINGS)
    return store, store.get(history.timeline_id)


def _reference(timeline: Timeline, lsn: int) -> range_rebuild.Reference:
    def one(key: Key) -> bytes | None:
        data = timeline.get_reconstruct_data(key, lsn)
        if data.deltas:
            return reconstruct(key, lsn, data)
        return data.image[1] if data.image is not None else None

    return one


@dataclass
class Counts:
    keys: int = 0
    with_deltas: int = 0
    reference: int = 0
    handed_back: int = 0


def _compare_at(timeline: Timeline, lsn: int, counts: Counts) -> None:
    one = _reference(timeline, lsn)

    def counted(key: Key) -> bytes | None:
        counts.reference += 1
        return one(key)

    keys = timeline.get_keys(FULL_KEYSPACE, lsn)
    per = SETTINGS.image_layer_target_size // PAGE_SIZE_ESTIMATE
    for key_range, part_keys in _partitions(keys, per):
        got = list(rebuild_range(timeline, key_range, part_keys, lsn, counted))
        assert [k for k, _ in got] == part_keys
        for key, value in got:
            counts.keys += 1
            counts.with_deltas += bool(timeline.get_reconstruct_data(key, lsn).deltas)
            assert value == one(key), key.hex()


def test_every_key_equals_the_reference_across_the_wal(
    history: History, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, timeline = _open(history, tmp_path / "store")
    counts = Counts()
    handed = range_rebuild.continue_chain

    def counting(key: Key, page: bytes | None, deltas: list[tuple[int, WalDelta]]) -> bytes:
        counts.handed_back += 1
        return handed(key, page, deltas)

    monkeypatch.setattr(range_rebuild, "continue_chain", counting)
    span = history.end - history.start
    lsns = [history.start + span * i // 7 for i in range(1, 7)]
    for lsn in [*lsns, history.middle, history.middle + 1, history.end]:
        _compare_at(timeline, lsn, counts)
    store.close()
    assert counts.with_deltas > 1000
    # The C path did the work: the reference only for the rare keys it does not take
    # (multixact pages), the Python redo for the chains with a record it hands back.
    assert counts.reference < counts.with_deltas // 50, counts
    assert counts.handed_back < counts.with_deltas // 20, counts


@dataclass
class Walked:
    """What rebuild_range did for each key: its value, the keys it asked the reference for,
    those whose chain it handed to the Python redo, and the blocks it decompressed."""

    values: list[tuple[Key, bytes | None]]
    reference: list[Key]
    handed_back: list[Key]
    reads: list[tuple[str, int]]


def _walked(timeline: Timeline, lsn: int, monkeypatch: pytest.MonkeyPatch) -> Walked:
    walked = Walked([], [], [], [])
    one = _reference(timeline, lsn)
    handed = range_rebuild.continue_chain
    read_block = LayerFile.read_block

    def counted(key: Key) -> bytes | None:
        walked.reference.append(key)
        return one(key)

    def counting(key: Key, page: bytes | None, deltas: list[tuple[int, WalDelta]]) -> bytes:
        walked.handed_back.append(key)
        return handed(key, page, deltas)

    def reading(self: LayerFile, b: int) -> bytes:
        walked.reads.append((self.path.name, b))
        return read_block(self, b)

    with monkeypatch.context() as patched:
        patched.setattr(range_rebuild, "continue_chain", counting)
        patched.setattr(LayerFile, "read_block", reading)
        keys = timeline.get_keys(FULL_KEYSPACE, lsn)
        per = SETTINGS.image_layer_target_size // PAGE_SIZE_ESTIMATE
        for key_range, part_keys in _partitions(keys, per):
            walked.values += rebuild_range(timeline, key_range, part_keys, lsn, counted)
    return walked


def test_the_c_walk_equals_the_python_walk(
    history: History, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_redo.rebuild_run` against its reference, `_walk_python`, on real WAL, over L0 layers
    (format version 1 entries) and then L1 layers (narrow entries) and image layers: at LSNs
    across the WAL, the same values, the same keys sent to the reference and to the Python
    redo, the same blocks decompressed in the same order."""
    store, timeline = _open(history, tmp_path / "store")
    span = history.end - history.start
    lsns = [history.start + span * i // 5 for i in range(1, 5)]
    lsns += [history.middle, history.middle + 1, history.end]
    native = range_rebuild._rebuild_run
    assert native is not None, "pageserver.redo._redo lacks rebuild_run"
    for merged in (False, True):
        if merged:
            assert compact_level0(timeline, force=True)[1] > 0
            assert any(layer.file.narrow for layer in timeline.layer_map().deltas)
        for lsn in lsns:
            monkeypatch.setattr(range_rebuild, "_rebuild_run", None)
            python = _walked(timeline, lsn, monkeypatch)
            monkeypatch.setattr(range_rebuild, "_rebuild_run", native)
            c = _walked(timeline, lsn, monkeypatch)
            assert len(c.values) > 100
            assert c.values == python.values, hex(lsn)
            assert c.reference == python.reference, hex(lsn)
            assert c.handed_back == python.handed_back, hex(lsn)
            assert c.reads == python.reads, hex(lsn)
    store.close()


def test_a_run_redone_key_by_key_equals_the_python_walk(
    history: History, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rebuild_run` with its kept blocks bounded to a byte (`run_kept_bytes`): the redo
    without the GIL after every key gathered, the blocks released between, the same values
    as the Python walk, over L0 and L1 layers."""
    assert native is not None and range_rebuild._rebuild_run is not None
    store, timeline = _open(history, tmp_path / "store")
    before = native.run_kept_bytes(1)
    try:
        for merged in (False, True):
            if merged:
                assert compact_level0(timeline, force=True)[1] > 0
            for lsn in (history.middle, history.end):
                c = _walked(timeline, lsn, monkeypatch)
                monkeypatch.setattr(range_rebuild, "_rebuild_run", None)
                python = _walked(timeline, lsn, monkeypatch)
                monkeypatch.undo()
                assert len(c.values) > 100
                assert c.values == python.values, hex(lsn)
                assert c.handed_back == python.handed_back, hex(lsn)
    finally:
        assert native.run_kept_bytes(before) == 1
        store.close()


def _scattered_walk(
    timeline: Timeline, lsn: int, keys: list[Key], native_reads: bool, patched: pytest.MonkeyPatch
) -> tuple[list[tuple[Key, bytes | None]], list[tuple[str, int]]]:
    """rebuild_range of `keys` as scattered keys (blocks read in C) or not: the values and
    the blocks read through LayerFile.read_block."""
    reads: list[tuple[str, int]] = []
    read_block = LayerFile.read_block

    def reading(self: LayerFile, b: int) -> bytes:
        reads.append((self.path.name, b))
        return read_block(self, b)

    with patched.context() as inside:
        inside.setattr(LayerFile, "read_block", reading)
        span = KeyRange(keys[0], key_successor(keys[-1]))
        one = _reference(timeline, lsn)
        values = list(rebuild_range(timeline, span, keys, lsn, one, None, native_reads))
    return values, reads


def test_scattered_keys_read_in_c_equal_the_blocks_read_block_reads(
    history: History, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scattered read's blocks decompressed in C (`_redo.c` run_read_native, the block
    entry, CRC-32C, the thread's decompressor, the length) against read_block's, on real
    WAL over L0, L1 and image layers (those written with a dictionary): the same values, and
    no block through read_block where the C walk reads them."""
    assert range_rebuild._READS, "pageserver.redo._redo lacks REBUILD_RUN_READS"
    store, timeline = _open(history, tmp_path / "store")
    for merged in (False, True):
        if merged:
            assert compact_level0(timeline, force=True)[1] > 0
        for lsn in (history.middle, history.end):
            keys = timeline.get_keys(FULL_KEYSPACE, lsn)[::7]
            python, python_reads = _scattered_walk(timeline, lsn, keys, False, monkeypatch)
            c, c_reads = _scattered_walk(timeline, lsn, keys, True, monkeypatch)
            assert len(c) > 100 and len(python_reads) > 50
            assert c == python, hex(lsn)
            assert c_reads == [], hex(lsn)
    assert any(layer.file.dictionary for layer in timeline.layer_map().images)
    store.close()


def test_a_damaged_block_read_in_c_raises_the_files_error(
    history: History, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block whose bytes do not match their CRC-32C: the C read leaves it to read_block,
    which raises LayerCorrupt naming the file, as a read without it does."""
    where = tmp_path / "store"
    store, timeline = _open(history, where)
    lsn = history.end
    image = next(
        layer
        for layer in timeline.layer_map().images
        if layer.file.dictionary and layer.file.header.n_blocks > 4
    )
    f = image.file
    i = f.n_keys - 1  # in a block after the first: decompressed with the dictionary
    key = f.key_at(i)
    block = f.version_tuple(f._keys()[1][i + 1] - 1)[2]
    assert block > 0 and timeline.get_keys(KeyRange(key, key_successor(key)), lsn) == [key]
    entry_at, path = f._blocks_at + block * 20, image.path  # blocks.py _BLOCK_ENTRY
    store.close()
    off, clen = struct.unpack_from(">QI", path.read_bytes(), entry_at)
    with path.open("r+b") as damaged:  # a byte of its zstd data, past the frame header
        damaged.seek(off + clen // 2)
        byte = damaged.read(1)
        damaged.seek(off + clen // 2)
        damaged.write(bytes([byte[0] ^ 0x01]))
    store = TimelineStore(where, SETTINGS)
    timeline = store.get(history.timeline_id)
    with pytest.raises(NeonError, match=f"{path.name}.*checksum mismatch in value block"):
        _scattered_walk(timeline, lsn, [key], True, monkeypatch)
    store.close()


def test_prefetched_blocks_are_read_block_s_and_a_walk_goes_on_in_another_thread(
    history: History, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks being prefetched for read_block are taken there (not read twice in C); a
    scattered walk taken on by another thread reads with that thread's decompressors (its
    layers made again), with the same values."""
    store, timeline = _open(history, tmp_path / "store")
    lsn = history.end
    keys = timeline.get_keys(FULL_KEYSPACE, lsn)[::7]
    want, _ = _scattered_walk(timeline, lsn, keys, False, monkeypatch)
    files = [layer.file for layer in timeline.layer_map().layers()]
    started = {id(f): f.prefetch(range(f.header.n_blocks)) for f in files}
    try:
        got, reads = _scattered_walk(timeline, lsn, keys, True, monkeypatch)
    finally:
        for f in files:
            f.drop_prefetched(started[id(f)])
    assert got == want and len(reads) > 50
    monkeypatch.setattr(range_rebuild, "RUN_KEYS", 3)
    span = KeyRange(keys[0], key_successor(keys[-1]))
    walk = rebuild_range(timeline, span, keys, lsn, _reference(timeline, lsn), None, True)
    first = [next(walk)]
    rest: list[tuple[Key, bytes | None]] = []
    other = threading.Thread(target=lambda: rest.extend(walk))
    other.start()
    other.join(60)
    assert first + rest == want
    store.close()


def _layer_files(timeline: Timeline) -> dict[str, bytes]:
    return {layer.name.file_name: layer.path.read_bytes() for layer in timeline.layer_map().images}


def test_image_layers_are_the_same_bytes_with_and_without_the_bulk_path(
    history: History, tmp_path: Path
) -> None:
    written: list[dict[str, bytes]] = []
    for bulk in (False, True):
        store, timeline = _open(history, tmp_path / f"store-{bulk}")
        if bulk:
            n = create_image_layers(
                timeline, reconstruct, force=True, materialize_range=rebuild_range
            )
        else:
            n = create_image_layers(timeline, reconstruct, force=True)
        assert n > 3
        written.append(_layer_files(timeline))
        store.close()
    assert written[0].keys() == written[1].keys()
    for name, data in written[0].items():
        assert written[1][name] == data, name


def test_partitions_rebuilt_at_once_write_the_same_bytes_as_one_at_a_time(
    history: History, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two partitions at once (`compaction.image_workers`; the first two meet at a barrier,
    so they did run at once) write the files one worker writes, byte for byte."""
    write_image = compaction._write_image
    met = threading.Barrier(2, timeout=60)
    calls = itertools.count()

    def meeting(*args: Any, **kwargs: Any) -> Any:
        if next(calls) < 2:
            met.wait()  # BrokenBarrierError after the timeout: not rebuilt at once
        return write_image(*args, **kwargs)

    written: list[dict[str, bytes]] = []
    for workers in (1, 2):
        store, timeline = _open(history, tmp_path / f"store-{workers}")
        with monkeypatch.context() as patched:
            patched.setattr(compaction, "image_workers", itertools.repeat(workers).__next__)
            if workers > 1:
                patched.setattr(compaction, "_write_image", meeting)
            n = create_image_layers(
                timeline, reconstruct, force=True, materialize_range=rebuild_range
            )
        assert n > 3
        written.append(_layer_files(timeline))
        store.close()
    assert next(calls) > 3
    assert written[0] == written[1]


def test_gc_and_l1_layers_write_the_same_images(history: History, tmp_path: Path) -> None:
    """L0 merged into L1 layers first, then GC writes images at its horizon both ways."""
    written: list[dict[str, bytes]] = []
    for bulk in (False, True):
        store, timeline = _open(history, tmp_path / f"store-{bulk}")
        merged, l1 = compact_level0(timeline, force=True)
        assert merged > 2 and l1 > 0
        result = gc_timeline(
            timeline, [], None, materialize_range=rebuild_range if bulk else None,
            settings=GcSettings(min_gain_bytes=0, image_cost_ratio=0.0),
        )  # fmt: skip
        assert result.images_written > 0
        written.append(_layer_files(timeline))
        store.close()
    assert written[0] == written[1]


def test_on_a_branch_the_ancestors_chains_take_the_reference_path(
    history: History, tmp_path: Path
) -> None:
    store, timeline = _open(history, tmp_path / "store")
    child = store.branch(timeline.timeline_id, at_lsn=history.end)
    own = rel_block_key(1663, 5, 1259, 0, 0)
    child.put(own, history.end + 8, Image(bytes([7]) * 8192))
    child.advance_last_record_lsn(history.end + 8, history.end)
    child.freeze_and_flush()
    counts = Counts()
    _compare_at(child, history.end + 8, counts)
    assert counts.reference == counts.keys - 1  # all but the child's own page
    store.close()


# -- hand-built chains: what a workload rarely reaches ------------------------------------------

REL = (1663, 5, 16384)
TUP = struct.pack("<HHB", 2, 0x0802, 24) + b"\0" + b"a tuple"


def _heap_insert(offnum: int, *, init: bool = False, flags: int = 0, fork: int = 0) -> bytes:
    block = {"id": 0, "rnode": REL, "fork": fork, "blkno": 3, "data": TUP, "will_init": init}
    main = struct.pack("<HB", offnum, flags)
    return build_record(RM_HEAP_ID, XLOG_HEAP_INSERT | (0x80 if init else 0), xid=800,
                        blocks=[block], main=main)  # fmt: skip


def _xact(op: int, xid: int, subxacts: tuple[int, ...] = (), twophase: int | None = None) -> bytes:
    xinfo = (XACT_XINFO_HAS_SUBXACTS if subxacts else 0) | (
        XACT_XINFO_HAS_TWOPHASE if twophase is not None else 0
    )
    main = struct.pack("<q", 0)
    if xinfo:
        main += struct.pack("<I", xinfo)
    if subxacts:
        main += struct.pack(f"<i{len(subxacts)}I", len(subxacts), *subxacts)
    if twophase is not None:
        main += struct.pack("<I", twophase)
    return build_record(RM_XACT_ID, op | (XLOG_XACT_HAS_INFO if xinfo else 0), xid=xid, main=main)


def _outcome(fn: Callable[[], bytes | None]) -> tuple[object, ...]:
    try:
        return ("value", fn())
    except NeonError as exc:
        return ("error", type(exc), str(exc))


def _both(
    timeline: Timeline, key: Key, lsn: int, calls: list[Key]
) -> tuple[tuple[object, ...], tuple[object, ...]]:
    """(outcome of rebuild_range, of the reference) for one key; calls gets the key when
    rebuild_range called the reference."""
    one = _reference(timeline, lsn)

    def counted(k: Key) -> bytes | None:
        calls.append(k)
        return one(k)

    whole = KeyRange(key, key_successor(key))
    got = _outcome(lambda: dict(rebuild_range(timeline, whole, [key], lsn, counted))[key])
    return got, _outcome(lambda: one(key))


def test_hand_built_chains_equal_the_reference(tmp_path: Path, walk: str) -> None:
    """CLOG bits from no base (commit with subxacts, abort, a prepared commit handed back, an
    xid of another page), a heap page rebuilt from INSERT+INIT after a tombstone, a VM page
    whose bits a heap insert clears, chains above an image layer, and chains that fail: the
    same value or the same error, key by key, with the reference called only for those."""
    store = TimelineStore(tmp_path / "store", SETTINGS)
    tl = store.create_timeline()
    clog = slru_block_key(SlruKind.CLOG, 0, 0)
    heap = rel_block_key(*REL, 0, 3)
    vm = rel_block_key(*REL, VISIBILITYMAP_FORKNUM, 0)
    broken = rel_block_key(*REL, 0, 9)  # deltas without a base: ReconstructError
    garbage = rel_block_key(*REL, 0, 10)  # a record C and Python both reject
    lsn = 0x100000
    lsns: list[int] = []

    def put(key: Key, value: Image | WalDelta | Tombstone) -> None:
        nonlocal lsn
        tl.put(key, lsn, value)
        tl.advance_last_record_lsn(lsn, lsn - 8)
        lsns.append(lsn)
        lsn += 0x100

    def delta(key: Key, rec: bytes, init: bool = False) -> None:
        put(key, WalDelta(encode_delta(lsn - 0x40, rec), init))

    delta(clog, _xact(XLOG_XACT_COMMIT, 700, (701, 702)))
    delta(clog, _xact(XLOG_XACT_ABORT, 703))
    delta(clog, _xact(XLOG_XACT_COMMIT, 40000))  # on CLOG page 1: no change here
    put(heap, Image(bytes(8192)))
    put(heap, TOMBSTONE)
    delta(heap, _heap_insert(1, init=True), True)
    delta(vm, _heap_insert(1, flags=0x01, fork=VISIBILITYMAP_FORKNUM))
    tl.freeze_and_flush()
    assert create_image_layers(tl, reconstruct, force=True) > 0
    delta(broken, _heap_insert(2))
    delta(clog, _xact(XLOG_XACT_COMMIT_PREPARED, 0, (), twophase=705))
    delta(clog, _xact(XLOG_XACT_COMMIT, 706))
    delta(heap, _heap_insert(2))
    delta(garbage, _heap_insert(2)[:-3])
    tl.freeze_and_flush()

    calls: list[Key] = []
    for at in lsns:
        for key in (clog, heap, vm, broken, garbage):
            got, want = _both(tl, key, at, calls)
            assert got == want, (describe(key), hex(at))
    assert set(calls) <= {broken, garbage}, [describe(k) for k in set(calls)]
    page = dict(rebuild_range(tl, FULL_KEYSPACE, [clog], lsns[-1], _reference(tl, lsns[-1])))[clog]
    assert page is not None and page[700 // 4] >> (700 % 4 * 2) & 3 == 1
    store.close()


def test_open_layer_keys_of_a_bulk_rebuild_stay_out_of_the_page_cache(tmp_path: Path) -> None:
    """A key the open layer holds takes a bulk rebuild's per-key path (a delta's keys right
    after `snapshot create`): rebuilt once, never looked up again, so it neither goes into
    the page cache (1024 pages, GetPage's hot ones) nor through the chain digest that keys
    it. Fails where that path used the cached `reconstruct`: the cache then held the page."""
    store = TimelineStore(tmp_path / "store", SETTINGS)
    tl = store.create_timeline()
    heap = rel_block_key(*REL, 0, 3)
    lsn = 0x100000
    for rec, init in ((_heap_insert(1, init=True), True), (_heap_insert(2), False)):
        tl.put(heap, lsn, WalDelta(encode_delta(lsn - 0x40, rec), init))
        tl.advance_last_record_lsn(lsn, lsn - 8)
        lsn += 0x100
    last = lsn - 0x100
    view = tl.persistent_view(KeyRange(heap, key_successor(heap)), last)
    assert heap in view.in_memory
    PAGE_CACHE.clear()
    [page] = list(rebuild_keys(tl, last, view, [heap]))
    assert len(PAGE_CACHE) == 0
    assert page is not None and page == reconstruct(heap, last, tl.get_reconstruct_data(heap, last))
    assert len(PAGE_CACHE) == 1  # GetPage's path still caches it
    PAGE_CACHE.clear()
    store.close()


def _same_page_update_c_gives_up_on() -> bytes:
    """A heap UPDATE of tuple 1 into tuple 3 on its own page, the new tuple's prefix taken from
    the old one, whose logged t_hoff (22) is below a tuple header's size: the C redo marks the
    old tuple updated (in the page) before it gives the record up; Python redoes it."""
    main = struct.pack("<IHBBIH", 801, 1, 0, XLH_UPDATE_PREFIX_FROM_OLD, 0, 3)
    data = struct.pack("<H", 1) + struct.pack("<HHB", 2, 0x0802, 22) + b"\0new"
    block = {"id": 0, "rnode": REL, "fork": 0, "blkno": 3, "data": data}
    return build_record(RM_HEAP_ID, XLOG_HEAP_UPDATE, xid=801, blocks=[block], main=main)


def test_a_record_c_gives_up_on_midway_is_redone_from_the_page_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, walk: str
) -> None:
    """The C chain redo redoes a chain's records in place, in one page: where it gives up on
    a record after writing part of it there, the Python redo is handed the page as the
    records before left it (here after two inserts), not the half-redone one, and the value
    equals the reference's."""
    store = TimelineStore(tmp_path / "store", SETTINGS)
    tl = store.create_timeline()
    key = rel_block_key(*REL, 0, 3)
    lsn = 0x100000
    lsns: list[int] = []
    for rec, init in ((_heap_insert(1, init=True), True), (_heap_insert(2), False),
                      (_same_page_update_c_gives_up_on(), False)):  # fmt: skip
        tl.put(key, lsn, WalDelta(encode_delta(lsn - 0x40, rec), init))
        tl.advance_last_record_lsn(lsn, lsn - 8)
        lsns.append(lsn)
        lsn += 0x100
    tl.freeze_and_flush()
    handed: list[tuple[bytes | None, int]] = []
    go_on = range_rebuild.continue_chain

    def recording(k: Key, page: bytes | None, deltas: list[tuple[int, WalDelta]]) -> bytes:
        handed.append((page, deltas[0][0]))
        return go_on(k, page, deltas)

    monkeypatch.setattr(range_rebuild, "continue_chain", recording)
    got, want = _both(tl, key, lsns[2], [])
    assert want[0] == "value" and got == want
    before = _reference(tl, lsns[1])(key)
    assert handed == [(before, lsns[2])]
    store.close()


def test_versions_below_the_newest_chain_start_are_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, walk: str
) -> None:
    """A key's versions below the newest image, will_init delta or tombstone at or below the
    read LSN are never used: their blocks are not decompressed, in the layer holding it or in
    any older one (the image layer's included), and the value equals the reference's. Here
    an older layer holds 40 full-page images of the key (several value blocks) and a newer
    one an INSERT+INIT chain, then a tombstone and a last image."""
    store = TimelineStore(tmp_path / "store", SETTINGS)
    tl = store.create_timeline()
    key = rel_block_key(*REL, 0, 3)
    rng = random.Random(10)
    lsn = 0x100000
    lsns: list[int] = []

    def put(value: Image | WalDelta | Tombstone) -> None:
        nonlocal lsn
        tl.put(key, lsn, value)
        tl.advance_last_record_lsn(lsn, lsn - 8)
        lsns.append(lsn)
        lsn += 0x100

    put(Image(rng.randbytes(8192)))
    tl.freeze_and_flush()
    assert create_image_layers(tl, reconstruct, force=True) == 1
    for _ in range(40):
        put(Image(rng.randbytes(8192)))  # incompressible: 40 pages span 3 blocks of 128 KiB
    tl.freeze_and_flush()
    older_lsns = lsns[1:]
    put(WalDelta(encode_delta(lsn - 0x40, _heap_insert(1, init=True)), True))
    put(WalDelta(encode_delta(lsn - 0x40, _heap_insert(2)), False))
    put(TOMBSTONE)
    put(Image(rng.randbytes(8192)))
    tl.freeze_and_flush()
    newest, older = (layer.file for layer in tl.layer_map().deltas[:2])  # newest first
    assert older.header.n_blocks >= 3

    reads: list[tuple[object, int]] = []
    read_block = type(older).read_block

    def recording(self: object, b: int) -> bytes:
        reads.append((self, b))
        return read_block(self, b)  # type: ignore[arg-type]

    monkeypatch.setattr(type(older), "read_block", recording)
    for at in lsns:
        reads.clear()
        got, want = _both(tl, key, at, [])
        assert got == want, hex(at)
        if at in older_lsns:  # one of the 40 images: the one block holding it
            assert [f for f, _ in reads] == [older], hex(at)
        elif at > older_lsns[-1]:  # the chain starts in the newest layer: its one block
            assert [f for f, _ in reads] == [newest], hex(at)
    store.close()
