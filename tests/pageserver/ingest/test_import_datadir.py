"""import_datadir streams a data directory into image layers in key order: memory stays about
one layer whatever the directory's size, the layers tile the keyspace, and every page and file
reads back as it was."""

from __future__ import annotations

import itertools
import random
import shutil
import tracemalloc
from pathlib import Path

import pytest
import zstandard

from pageserver.ingest.import_datadir import import_datadir
from pageserver.ingest.import_settings import IMPORT_BLOCK_SIZE, IMPORT_ZSTD_LEVEL
from pageserver.reconstruct.reads import get_rel_page, get_rel_size, list_dbs, list_rels
from pageserver.storage.keys import KEY_MAX, KEY_MIN
from pageserver.storage.layers import blocks
from pageserver.storage.layers.blocks import BlockCache, LayerFile
from pageserver.storage.layers.image import ImageLayer
from pageserver.storage.settings import StoreSettings
from pageserver.storage.timeline_store import TimelineStore
from pg15.constants import BLCKSZ, DEFAULTTABLESPACE_OID
from tests.pgtest import PgTestCluster

MiB = 1 << 20
BIG_RELNODE = 990001
BIG_PAGES = 4096  # 32 MiB of distinct pages
TARGET = 2 * MiB


@pytest.fixture(scope="module")
def datadir(pg_cluster_module: PgTestCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cleanly shut-down initdb'd directory with one extra 32 MiB relation file of random
    pages in the postgres database (import does not read the catalog)."""
    server = pg_cluster_module.create(start=False)
    copy = tmp_path_factory.mktemp("import") / "pgdata"
    shutil.copytree(server.datadir, copy, symlinks=True)
    db = big_db(copy)
    rng = random.Random(7)
    with open(copy / "base" / str(db) / str(BIG_RELNODE), "wb") as f:
        for _ in range(BIG_PAGES):
            f.write(rng.randbytes(BLCKSZ))
    return copy


def big_db(datadir: Path) -> int:
    return max(int(p.name) for p in (datadir / "base").iterdir() if p.name.isdigit())


def test_import_is_streamed_into_adjacent_image_layers(datadir: Path, tmp_path: Path) -> None:
    store = TimelineStore(tmp_path / "store", StoreSettings(image_layer_target_size=TARGET))
    try:
        timeline = store.create_timeline()
        tracemalloc.start()
        try:
            lsn = import_datadir(timeline, datadir)
            _size, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Before streaming, the whole import sat in one in-memory layer (> 32 MiB here);
        # now the peak (about 11 MiB: buffers of the layer writer) does not grow with the
        # directory (the same with 96 MiB of pages).
        assert peak < 16 * MiB, f"import peak {peak / MiB:.1f} MiB"
        timeline.freeze_and_flush()
        layers = sorted(timeline.layer_map().layers(), key=lambda x: x.name.key_range.start)
        assert all(isinstance(x, ImageLayer) and x.lsn == lsn for x in layers)
        assert len(layers) >= BIG_PAGES * BLCKSZ // TARGET
        assert layers[0].name.key_range.start == KEY_MIN
        assert layers[-1].name.key_range.end == KEY_MAX
        for before, after in itertools.pairwise(layers):
            assert before.name.key_range.end == after.name.key_range.start

        db = big_db(datadir)
        spc = DEFAULTTABLESPACE_OID
        assert (spc, db) in list_dbs(timeline, lsn)
        assert (BIG_RELNODE, 0) in list_rels(timeline, spc, db, lsn)
        assert get_rel_size(timeline, spc, db, BIG_RELNODE, 0, lsn) == BIG_PAGES
        raw = (datadir / "base" / str(db) / str(BIG_RELNODE)).read_bytes()
        for blkno in [*range(0, BIG_PAGES, 97), BIG_PAGES - 1]:
            page = get_rel_page(timeline, spc, db, BIG_RELNODE, 0, blkno, lsn)
            assert page == raw[blkno * BLCKSZ : (blkno + 1) * BLCKSZ], blkno
        # Every other relation's first page too (the catalogs).
        for rel, fork in list_rels(timeline, spc, db, lsn):
            path = datadir / "base" / str(db) / str(rel)
            if fork == 0 and path.stat().st_size:
                first = get_rel_page(timeline, spc, db, rel, 0, 0, lsn)
                assert first == path.read_bytes()[:BLCKSZ], rel
    finally:
        store.close()


@pytest.mark.parametrize("store_level", [3, -1])
def test_import_writes_bigger_blocks_compressed_faster(
    datadir: Path, tmp_path: Path, store_level: int
) -> None:
    """Its frames are IMPORT_ZSTD_LEVEL's (the store's when that is lower), not the store's:
    each equals a recompression of its block at that level; its blocks are up to
    IMPORT_BLOCK_SIZE, not the store's block_size."""
    settings = StoreSettings(
        image_layer_target_size=TARGET, zstd_level=store_level, block_size=32 * 1024
    )
    store = TimelineStore(tmp_path / "store", settings)
    level = min(store_level, IMPORT_ZSTD_LEVEL)
    try:
        timeline = store.create_timeline()
        import_datadir(timeline, datadir)
        layers = [x for x in timeline.layer_map().layers() if isinstance(x, ImageLayer)]
        compress = zstandard.ZstdCompressor(level=level).compress
        other = zstandard.ZstdCompressor(level=3 if level != 3 else 1).compress
        differs, sizes = 0, []
        for layer in layers:
            raw = layer.path.read_bytes()
            file = LayerFile(layer.path, BlockCache(0))
            for b in range(file.header.n_blocks):
                off, clen, ulen, _crc = blocks._BLOCK_ENTRY.unpack_from(
                    raw, file._blocks_at + b * blocks._BLOCK_ENTRY.size
                )
                data = file.read_block(b)
                assert raw[off : off + clen] == compress(data)
                differs += other(data) != compress(data)
                sizes.append(ulen)
            file.close()
        assert differs > 10  # the levels write different frames: the check can tell them
        assert settings.block_size < max(sizes) <= IMPORT_BLOCK_SIZE
        assert max(sizes) > IMPORT_BLOCK_SIZE - BLCKSZ - 1  # full blocks: 15 pages
    finally:
        store.close()


@pytest.mark.parametrize("read_size", [64 * 1024, 100, 7])
def test_the_checkpoint_record_is_found_however_the_segment_is_read(
    datadir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_size: int
) -> None:
    """The shutdown checkpoint record is read from its segment a piece at a time (not the
    segment's whole rest): the import LSN is its end however small the pieces, and a segment
    without it is refused as before."""
    import pageserver.ingest.import_datadir as imp
    from pg15.pg_control import read_control_file
    from pg15.rmgr.xlog import CHECKPOINT_RECORD_SIZE
    from proto.errors import CorruptData

    monkeypatch.setattr(imp, "_CHECKPOINT_READ", read_size)
    control = read_control_file(datadir)
    size = control.wal_segment_size
    end = imp.record_end_lsn(control.checkpoint_lsn, CHECKPOINT_RECORD_SIZE, size)
    assert imp.import_lsn_of(datadir) == end
    broken = tmp_path / "broken"
    shutil.copytree(datadir, broken, symlinks=True)
    segment = next(p for p in (broken / "pg_wal").iterdir() if len(p.name) == 24)
    with segment.open("r+b") as f:  # the record's bytes gone: zeros from it to the end
        offset = control.checkpoint_lsn % control.wal_segment_size
        f.seek(offset)
        f.write(bytes(control.wal_segment_size - offset))
    with pytest.raises(CorruptData, match="no checkpoint record"):
        imp.import_lsn_of(broken)
