"""A basebackup whose pages needing redo are rebuilt in bulk (`range_rebuild.rebuild_keys`:
each layer file scanned once per run of blocks, the chains redone in C) against the per-page
reference (`get_page` block by block), on real WAL: the tars are the same bytes.

One server runs pgbench and the redo workload (every Heap, Heap2 and Btree record type, VM
bits set and cleared, a multixact). Its WAL is ingested into a store imported from its
initdb'd directory, in small layers, with image layers forced at a third of the way (later
pages rebuild from an image layer, earlier ones from the import's) and the last part left in
the open in-memory layer (the keys it holds take the per-key path). A branch made at the
middle ingests the rest of the same WAL on its own: its tars equal its reference's and the
parent's at the same LSNs, the keys it holds nothing of rebuilt in bulk in the parent.
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pageserver.basebackup import tar_stream
from pageserver.basebackup.snapshot_file import TarCounter, snapshot_file_chunks
from pageserver.basebackup.sources import (
    TimelineSource,
    pages_one_by_one,
    sizes_one_by_one,
    slru_pages_one_by_one,
)
from pageserver.basebackup.tar_stream import AlignedChunks, basebackup, basebackup_chunks
from pageserver.ingest.import_datadir import import_datadir
from pageserver.ingest.walingest import WalIngest
from pageserver.reconstruct import range_rebuild
from pageserver.reconstruct.apply_delta import reconstruct
from pageserver.reconstruct.range_reads import ForkSpan
from pageserver.redo.native import redo as native
from pageserver.storage.compaction import create_image_layers
from pageserver.storage.keys import Key, SlruKind
from pageserver.storage.layers import native as layers_native
from pageserver.storage.settings import StoreSettings
from pageserver.storage.timeline import Timeline
from pageserver.storage.timeline_store import TimelineStore
from pageserver.storage.values import ReconstructData
from pg15.constants import BLCKSZ
from pg15.lsn import DEFAULT_SEGMENT_SIZE, parse_lsn, segment_file_name
from pg15.records import decode_record
from pg15.xlog_reader import WalReader
from snapfile.reader import TarData, read_snapshot_file
from tests.native_ext import require_c_extension
from tests.pageserver.redo.test_verify import run_workload
from tests.pgtest import PgTestCluster
from tests.snapfile.snapfile_helpers import make_manifest

pytestmark = pytest.mark.slow

SETTINGS = StoreSettings(
    checkpoint_distance=512 * 1024,  # many L0 layers
    image_layer_target_size=1024 * 1024,  # many partitions
    compaction_threshold=1000,
)
NOW = 1_700_000_000  # the tars' mtime, so two tars compare byte for byte


@pytest.fixture
def c_extension() -> None:
    require_c_extension(native, "pageserver.redo._redo")


@dataclass(frozen=True)
class History:
    root: Path  # a closed store holding the import, flushed
    timeline_id: str
    start: int
    wal_dir: Path


@pytest.fixture(scope="module")
def history(
    pg_cluster_module: PgTestCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[History]:
    server = pg_cluster_module.create(
        {"wal_keep_size": "2GB", "max_wal_size": "2GB", "checkpoint_timeout": "1h",
         "autovacuum": "off"},
        start=False,
    )  # fmt: skip
    root = tmp_path_factory.mktemp("bulk-basebackup") / "store"
    store = TimelineStore(root, SETTINGS)
    timeline = store.create_timeline()
    start = import_datadir(timeline, server.datadir)
    timeline.freeze_and_flush()
    tid = timeline.timeline_id
    store.close()
    server.start()
    run_workload(server)
    server.stop()
    yield History(root, tid, start, server.wal_dir)


def _ingest(timeline: Timeline, wal_dir: Path, start: int, stop_after: int) -> list[int]:
    """Ingest the records ending after `start` up to the first one ending past `stop_after`;
    their end LSNs."""
    ingest = WalIngest(timeline)
    seg = DEFAULT_SEGMENT_SIZE
    segno = start // seg
    reader = WalReader(segno * seg, seg, 1)
    ends: list[int] = []
    while (path := wal_dir / segment_file_name(1, segno, seg)).exists():
        reader.feed(path.read_bytes())
        for raw in reader.records():
            if raw.end_lsn <= start:
                continue
            ingest.ingest_record(decode_record(raw), raw.data)
            ends.append(raw.end_lsn)
            if raw.end_lsn > stop_after:
                return ends
        if reader.end_of_wal is not None:
            break
        segno += 1
    return ends


@dataclass(frozen=True, slots=True)
class PerPage(TimelineSource):
    """The reference: every relation and SLRU page through get_page / get_slru_page
    (materialize), one by one."""

    def rel_sizes(self, spc: int, db: int, forks: list[tuple[int, int]]) -> list[int]:
        return sizes_one_by_one(self, spc, db, forks)

    def rel_pages(
        self, spc: int, db: int, rel: int, fork: int, first: int, count: int
    ) -> Iterator[bytes]:
        return pages_one_by_one(self, spc, db, rel, fork, first, count)

    def slru_pages(self, kind: SlruKind, segno: int, count: int) -> Iterator[bytes]:
        return slru_pages_one_by_one(self, kind, segno, count)


def _tar(source: TimelineSource) -> bytes:
    out = io.BytesIO()
    basebackup(source, source.lsn, out=out, include_vm=True, now=NOW)
    return out.getvalue()


def _aligned_tar(source: TimelineSource) -> bytes:
    """The tar as the daemon writes it into a directory: pages in AlignedChunks' buffers
    (on a root timeline the C walk writes them there: `TimelineSource.rel_chunks`), each
    given back once taken, with few buffers, so that they are reused and some chunks are
    bytearrays."""
    aligned = AlignedChunks(count=2)
    _info, chunks = basebackup_chunks(source, source.lsn, include_vm=True, now=NOW, aligned=aligned)
    out = bytearray()
    for chunk in chunks:
        out += chunk
        aligned.release(chunk)
    return bytes(out)


def _aligned_neon_tar(source: TimelineSource) -> bytes:
    """The tar inside a whole `.neon` file as the daemon sends it: the pages in
    AlignedChunks' buffers, compressed where they lie (frames of 1.5 buffers: frames span
    buffers and buffers frames), each buffer given back once its frames are; all of them
    back at the end."""
    aligned = AlignedChunks(count=3)
    _info, chunks = basebackup_chunks(source, source.lsn, include_vm=True, now=NOW, aligned=aligned)
    manifest = make_manifest(frame_size=3 * AlignedChunks.PAGES * BLCKSZ // 2)
    neon = b"".join(snapshot_file_chunks(manifest, TarCounter(chunks), aligned))
    assert all(isinstance(aligned.take(AlignedChunks.PAGES), memoryview) for _ in range(3))
    return b"".join(e.data for e in read_snapshot_file(io.BytesIO(neon)) if isinstance(e, TarData))


@dataclass
class Counts:
    bulk_keys: int = 0
    reference: int = 0
    filled: int = 0
    lsns: list[int] = field(default_factory=list)


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Counts:
    """Keys that went through rebuild_range, and those of them it read key by key."""
    counted = Counts()
    rebuild, one = range_rebuild.rebuild_range, range_rebuild.reconstruct_uncached

    def counting_rebuild(*args: object, **kwargs: object) -> Iterator[tuple[Key, bytes | None]]:
        for item in rebuild(*args, **kwargs):  # type: ignore[arg-type]
            counted.bulk_keys += 1
            yield item

    def counting_reference(key: Key, lsn: int, data: ReconstructData) -> bytes | None:
        counted.reference += 1
        return one(key, lsn, data)

    into = range_rebuild.PageFill.into

    def counting_into(
        fill: range_rebuild.PageFill,
        keys: list[Key],
        out: memoryview | bytearray,
        stride: int = BLCKSZ,
    ) -> list[tuple[int, bytes | None]]:
        left = into(fill, keys, out, stride)
        counted.filled += len(keys) - len(left)
        return left

    monkeypatch.setattr(range_rebuild, "rebuild_range", counting_rebuild)
    monkeypatch.setattr(range_rebuild.PageFill, "into", counting_into)
    monkeypatch.setattr(range_rebuild, "reconstruct_uncached", counting_reference)
    return counted


def _same_tar(timeline: Timeline, lsn: int) -> bytes:
    bulk = _tar(TimelineSource(timeline, lsn))
    assert bulk == _tar(PerPage(timeline, lsn, bulk=False)), lsn
    assert _aligned_tar(TimelineSource(timeline, lsn)) == bulk, lsn
    assert _aligned_neon_tar(TimelineSource(timeline, lsn)) == bulk, lsn
    return bulk


def _open(history: History, where: Path) -> tuple[TimelineStore, Timeline]:
    shutil.copytree(history.root, where)
    store = TimelineStore(where, SETTINGS)
    return store, store.get(history.timeline_id)


@pytest.mark.usefixtures("c_extension")
def test_bulk_tars_equal_the_per_page_tars(
    history: History, tmp_path: Path, counts: Counts
) -> None:
    store, timeline = _open(history, tmp_path / "store")
    try:
        wal_end = parse_lsn("FFFFFFFF/0")
        first = _ingest(timeline, history.wal_dir, history.start, history.start + 6_000_000)
        timeline.freeze_and_flush()
        assert create_image_layers(timeline, reconstruct, force=True) > 0
        second = _ingest(timeline, history.wal_dir, first[-1], history.start + 20_000_000)
        timeline.freeze_and_flush()
        rest = _ingest(timeline, history.wal_dir, second[-1], wal_end)
        assert timeline.persistent_map(rest[0]) is None  # the last records are in memory
        flushed = first + second
        picks = [flushed[len(flushed) * i // 5] for i in range(1, 5)] + [first[-1], second[-1]]
        for lsn in picks:
            _same_tar(timeline, lsn)
        # The C path rebuilt the pages; the per-key path took few (multixact pages).
        assert counts.bulk_keys > 3000, counts
        assert counts.filled > 3000, counts  # the aligned tars' pages, written in place
        assert counts.reference < counts.bulk_keys // 20, counts
        # Above the flushed layers: the keys of the in-memory layers go key by key.
        for lsn in (rest[len(rest) // 2], rest[-1]):
            _same_tar(timeline, lsn)
        assert counts.reference > 0
    finally:
        store.close()


@pytest.mark.usefixtures("c_extension")
def test_a_branch_tars_equal_the_reference_and_the_parent(
    history: History, tmp_path: Path, counts: Counts
) -> None:
    store, timeline = _open(history, tmp_path / "store")
    try:
        wal_end = parse_lsn("FFFFFFFF/0")
        first = _ingest(timeline, history.wal_dir, history.start, history.start + 6_000_000)
        branch_lsn = first[-1]
        child = store.branch(timeline.timeline_id, at_lsn=branch_lsn)
        rest = _ingest(timeline, history.wal_dir, branch_lsn, wal_end)
        timeline.freeze_and_flush()
        own = _ingest(child, history.wal_dir, branch_lsn, wal_end)
        assert own == rest
        child.freeze_and_flush()
        for lsn in (branch_lsn, rest[len(rest) // 3], rest[-1]):
            assert _same_tar(child, lsn) == _tar(TimelineSource(timeline, lsn)), lsn
        # Pages the child holds nothing of rebuild in bulk in the ancestor, those it
        # re-initialized in the child; chains going on into the ancestor take the per-key path.
        assert counts.bulk_keys > 5000, counts
        assert counts.reference < counts.bulk_keys // 10, counts
    finally:
        store.close()


def test_without_the_c_extension_the_per_key_path_gives_the_same_tar(
    history: History, tmp_path: Path, counts: Counts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NEON_PURE_PYTHON=1: no bulk rebuild; the image scan and the per-key path remain."""
    from pageserver.basebackup import sources

    store, timeline = _open(history, tmp_path / "store")
    try:
        ends = _ingest(timeline, history.wal_dir, history.start, history.start + 3_000_000)
        timeline.freeze_and_flush()
        want = _tar(PerPage(timeline, ends[-1], bulk=False))
        monkeypatch.setattr(sources, "native_redo", None)
        assert _tar(TimelineSource(timeline, ends[-1])) == want
        assert counts.bulk_keys == 0
    finally:
        store.close()


@pytest.mark.usefixtures("c_extension")
def test_slru_pages_are_rebuilt_in_bulk(history: History, tmp_path: Path, counts: Counts) -> None:
    """pg_xact and the multixact SLRUs: every page of every segment through the bulk rebuild
    equals the per-key read, at LSNs below an image layer, above it and in the open layer."""
    store, timeline = _open(history, tmp_path / "store")
    try:
        first = _ingest(timeline, history.wal_dir, history.start, history.start + 6_000_000)
        timeline.freeze_and_flush()
        assert create_image_layers(timeline, reconstruct, force=True) > 0
        second = _ingest(timeline, history.wal_dir, first[-1], history.start + 20_000_000)
        timeline.freeze_and_flush()
        rest = _ingest(timeline, history.wal_dir, second[-1], parse_lsn("FFFFFFFF/0"))
        assert timeline.persistent_map(rest[0]) is None  # the last records are in memory
        pages = 0
        for lsn in (first[len(first) // 2], first[-1], second[-1], rest[-1]):
            bulk, reference = TimelineSource(timeline, lsn), PerPage(timeline, lsn, bulk=False)
            for kind in SlruKind:
                for segno in bulk.list_slru_segments(kind):
                    size = bulk.get_slru_segment_size(kind, segno)
                    got = list(bulk.slru_pages(kind, segno, size))
                    assert got == list(reference.slru_pages(kind, segno, size)), (lsn, kind)
                    pages += size
        assert pages > 0
        assert counts.bulk_keys >= pages  # every page went through rebuild_range
    finally:
        store.close()


def test_page_checks_in_c_equal_the_python_reference(
    history: History, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_blockpack.first_bad_page` against `tar_stream._first_bad_page_python` on the real
    pages of every fork, 32 at a time as the tar maker checks them, at limits below and at
    their page LSNs and with a page cut short; the tars made with either are the same."""
    blockpack = layers_native.blockpack
    require_c_extension(blockpack, "pageserver.storage.layers._blockpack")
    assert blockpack is not None
    first_bad_page = blockpack.first_bad_page
    store, timeline = _open(history, tmp_path / "store")
    try:
        ends = _ingest(timeline, history.wal_dir, history.start, parse_lsn("FFFFFFFF/0"))
        timeline.freeze_and_flush()
        lsn = ends[len(ends) // 2]
        source = TimelineSource(timeline, lsn)
        checked = found = 0
        for spc, db in source.list_dbs():
            forks = list(source.list_rels(spc, db))
            for (rel, fork), nblocks in zip(forks, source.rel_sizes(spc, db, forks), strict=True):
                pages = list(source.rel_pages(spc, db, rel, fork, 0, nblocks))
                for at in range(0, len(pages), 32):
                    batch = pages[at : at + 32]
                    lsns = sorted({int.from_bytes(p[:4], "little") << 32
                                   | int.from_bytes(p[4:8], "little") for p in batch})  # fmt: skip
                    limits = {lsn, lsns[-1], lsns[-1] - 1, lsns[len(lsns) // 2] - 1, 0}
                    for limit in sorted(x for x in limits if x >= 0):
                        expected = tar_stream._first_bad_page_python(batch, limit)
                        assert first_bad_page(batch, BLCKSZ, limit) == expected, (rel, at, limit)
                        checked += 1
                        found += expected >= 0
                    cut = [*batch[:-1], batch[-1][:-1]]
                    assert first_bad_page(cut, BLCKSZ, lsn) == len(cut) - 1
                    assert tar_stream._first_bad_page_python(cut, lsn) == len(cut) - 1
        assert checked > 1000 and found > 100, (checked, found)
        with_c = _tar(TimelineSource(timeline, lsn))
        monkeypatch.setattr(tar_stream, "blockpack", None)
        assert _tar(TimelineSource(timeline, lsn)) == with_c
    finally:
        store.close()


class ReadOnlyBuffers:
    """Buffers the C walk cannot write into (read-only: `_rebuild_run` raises BufferError),
    each recorded as lent and as given back."""

    def __init__(self) -> None:
        self.lent: list[object] = []
        self.released: list[object] = []

    def take(self, pages: int) -> memoryview:
        buffer = memoryview(bytes(pages * BLCKSZ))
        self.lent.append(buffer)
        return buffer

    def release(self, chunk: object) -> None:
        self.released.append(chunk)


@pytest.mark.usefixtures("c_extension")
def test_a_buffer_whose_fill_fails_is_given_back(history: History, tmp_path: Path) -> None:
    """A chunk `rel_chunks` took and could not fill is released before the error goes on:
    never handed on, nobody else would give its AlignedChunks slot back."""
    store, timeline = _open(history, tmp_path / "store")
    try:
        source = TimelineSource(timeline, history.start)
        spc, db = next((spc, db) for spc, db in source.list_dbs() if spc == 1663)
        rel, fork = source.list_rels(spc, db)[0]
        buffers = ReadOnlyBuffers()
        chunks = source.rel_chunks(ForkSpan(spc, db, rel, fork, 0, 1), buffers, AlignedChunks.PAGES)
        assert chunks is not None  # a root timeline: the C walk fills
        with pytest.raises(BufferError):
            next(chunks)
        assert len(buffers.lent) == 1 and buffers.released == buffers.lent
    finally:
        store.close()
