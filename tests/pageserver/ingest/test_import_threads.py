"""import_datadir by several threads (a run of image layers each over its own key range, cut
inside a relation file too): the same state as one thread (equal basebackup tars), layers
tiling the keyspace, and a failing range leaves nothing behind."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pageserver.basebackup.sources import TimelineSource
from pageserver.basebackup.tar_stream import basebackup_chunks
from pageserver.ingest import import_datadir as imp
from pageserver.storage.keys import KEY_MAX, KEY_MIN, rel_block_key
from pageserver.storage.layers.image import ImageLayer
from pageserver.storage.settings import StoreSettings
from pageserver.storage.timeline import Timeline
from pageserver.storage.timeline_store import TimelineStore
from pg15.constants import BLCKSZ, DEFAULTTABLESPACE_OID
from proto.errors import CorruptData
from tests.pgtest import PgTestCluster

BIG_RELNODE = 990002
BIG_PAGES = 4096  # 32 MiB, every fourth page all zeros (a hole)
SETTINGS = StoreSettings(image_layer_target_size=4 << 20)


@pytest.fixture(scope="module")
def datadir(pg_cluster_module: PgTestCluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cleanly shut-down initdb'd directory with one extra relation of random pages."""
    server = pg_cluster_module.create(start=False)
    copy = tmp_path_factory.mktemp("threads") / "pgdata"
    shutil.copytree(server.datadir, copy, symlinks=True)
    rng = random.Random(3)
    with open(big_file(copy), "wb") as f:
        for blk in range(BIG_PAGES):
            # pd_lsn 0: a basebackup refuses pages from after its WAL end
            f.write(bytes(BLCKSZ) if blk % 4 == 3 else bytes(8) + rng.randbytes(BLCKSZ - 8))
    return copy


def big_db(datadir: Path) -> int:
    return max(int(p.name) for p in (datadir / "base").iterdir() if p.name.isdigit())


def big_file(datadir: Path) -> Path:
    return datadir / "base" / str(big_db(datadir)) / str(BIG_RELNODE)


@contextlib.contextmanager
def new_timeline(store_dir: Path) -> Iterator[Timeline]:
    """A new root timeline in a store of its own at `store_dir` (SETTINGS), closed after."""
    store = TimelineStore(store_dir, SETTINGS)
    try:
        yield store.create_timeline()
    finally:
        store.close()


def imported_tar(datadir: Path, store_dir: Path, threads: int) -> tuple[str, int]:
    """SHA-256 of the basebackup tar of the import, and its number of layers (checked to
    tile the keyspace)."""
    with new_timeline(store_dir) as timeline:
        lsn = imp.import_datadir(timeline, datadir, threads=threads)
        layers = tiling_images(timeline)
        assert all(x.lsn == lsn for x in layers)
        return basebackup_digest(timeline, lsn), len(layers)


def tiling_images(timeline: Timeline) -> list[ImageLayer]:
    """The timeline's layers in key order, checked to be image layers tiling the keyspace."""
    layers = sorted(timeline.layer_map().layers(), key=lambda x: x.name.key_range.start)
    assert layers[0].name.key_range.start == KEY_MIN
    assert layers[-1].name.key_range.end == KEY_MAX
    for before, after in itertools.pairwise(layers):
        assert before.name.key_range.end == after.name.key_range.start
    images = [x for x in layers if isinstance(x, ImageLayer)]
    assert images == layers
    return images


def basebackup_digest(timeline: Timeline, lsn: int) -> str:
    """SHA-256 of the timeline's basebackup tar at `lsn`."""
    _info, chunks = basebackup_chunks(TimelineSource(timeline, lsn), lsn, now=0)
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.parametrize("threads", [2, 3, 7])
def test_threads_import_the_same_state(
    datadir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    monkeypatch.setattr(imp, "THREADED_BYTES", 0)
    ranges = imp._key_ranges(datadir, threads)
    assert len(ranges) == threads
    db = big_db(datadir)
    big = (
        rel_block_key(DEFAULTTABLESPACE_OID, db, BIG_RELNODE, 0, 0),
        rel_block_key(DEFAULTTABLESPACE_OID, db, BIG_RELNODE, 0, BIG_PAGES),
    )
    # The big relation is most of the bytes: some cut falls inside it, between two blocks.
    assert any(big[0] < r.start < big[1] for r in ranges)
    one, _ = imported_tar(datadir, tmp_path / "one", 1)
    several, n_layers = imported_tar(datadir, tmp_path / "several", threads)
    assert several == one
    assert n_layers >= threads


def test_a_small_directory_is_one_range(datadir: Path) -> None:
    files = [p for d in ("base", "global") for p in (datadir / d).rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < imp.THREADED_BYTES
    assert imp._key_ranges(datadir, 2) == [imp.FULL_KEYSPACE]


def test_a_failing_range_leaves_no_layer(
    datadir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A partial page at the end of the big relation (in the last range's part of it): the
    import raises CorruptData naming the file, and no layer file stays, of any range."""
    monkeypatch.setattr(imp, "THREADED_BYTES", 0)
    damaged = tmp_path / "pgdata"
    shutil.copytree(datadir, damaged, symlinks=True)
    with open(big_file(damaged), "ab") as f:
        f.write(b"x" * 100)
    with new_timeline(tmp_path / "store") as timeline:
        with pytest.raises(CorruptData, match=str(BIG_RELNODE)):
            imp.import_datadir(timeline, damaged, threads=2)
        assert not list(timeline.layer_map().layers())
        assert not [p for p in timeline.directory.iterdir() if "image" in p.name.lower()]
