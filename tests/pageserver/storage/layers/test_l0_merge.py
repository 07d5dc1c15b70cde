"""The L0 merge in C (`_blockpack.Merge`, compaction._merge_level0_native) against its Python
reference (compaction._merge_level0_python), on the L0 layers of real WAL.

The real server's WAL (tests/pageserver/ingest/test_native_ingest.py's workload: pgbench,
updates, deletes, VACUUM, index builds, full-page images) is ingested into many small L0
layers. Both merges must write the same L1 files, byte for byte and cut at the same keys,
reads through them must equal reads through the L0 layers, and a damaged input must fail
both alike, with no file left behind.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pageserver.history.node_store import NodeStore, StorageHistory
from pageserver.storage import compaction
from pageserver.storage.layers import blocks, native
from pageserver.storage.layers.blocks import LayerCorrupt
from pageserver.storage.layers.delta import DeltaLayer
from pageserver.storage.settings import StoreSettings
from pageserver.storage.timeline import Timeline
from tests.native_ext import require_c_extension
from tests.pageserver.history.test_compaction_stop import check_directory, read_all
from tests.pageserver.ingest.test_native_ingest import Workload, workload  # noqa: F401

KiB = 1024
SETTINGS = StoreSettings(
    checkpoint_distance=512 * KiB,
    compaction_threshold=1000,
    compaction_target_size=384 * KiB,
    image_creation_threshold=1000,
    image_creation_delta_percent=1_000_000,
    block_size=8 * KiB,
)
"""Many L0 layers, none merged nor imaged while ingesting; small L1 targets and blocks, so
the merge cuts many layers and blocks (keys and values straddle both boundaries)."""

Merge = Callable[[Timeline, list[DeltaLayer], compaction.Cancelled | None], list[DeltaLayer]]


@pytest.fixture
def c_extension() -> None:
    require_c_extension(native.blockpack, "pageserver.storage.layers._blockpack")


def ingest_workload(store: NodeStore, workload: Workload) -> None:  # noqa: F811
    """The workload's base imported and its records ingested 500 at a time, flushed as
    due, then made durable: L0 layers only (SETTINGS' threshold merges none, and the
    catch-up's merged flushes are off)."""
    store.merge_flushes = False
    store.import_datadir(workload.base)
    for i in range(0, len(workload.records), 500):
        store.ingest_batch(
            workload.records[i : i + 500], [r.data for r in workload.raws[i : i + 500]]
        )
        store.maybe_flush()
    store.make_durable()


@pytest.fixture(scope="module")
def level0_store(
    workload: Workload,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A store holding the workload in L0 layers only (its history directory)."""
    root = tmp_path_factory.mktemp("l0") / "history"
    store = NodeStore(StorageHistory(root, SETTINGS), "n")
    ingest_workload(store, workload)
    store.close()
    store.history.close()
    return root


def opened(level0_store: Path, tmp_path: Path, name: str) -> NodeStore:
    root = tmp_path / name
    shutil.copytree(level0_store, root)
    return NodeStore(StorageHistory(root, SETTINGS), "n")


def merged_files(store: NodeStore, merge: Merge) -> dict[str, bytes]:
    timeline = store.timeline
    level0 = timeline.layer_map().level0()
    outputs = merge(timeline, level0, None)
    files = {x.path.name: x.path.read_bytes() for x in outputs}
    for layer in outputs:
        layer.close()
    return files


@pytest.mark.usefixtures("c_extension")
def test_c_merge_writes_the_reference_files(level0_store: Path, tmp_path: Path) -> None:
    reference = opened(level0_store, tmp_path, "python")
    fast = opened(level0_store, tmp_path, "c")
    try:
        assert len(reference.timeline.layer_map().level0()) > 10
        expected = merged_files(reference, compaction._merge_level0_python)
        got = merged_files(fast, compaction._merge_level0_native)
        assert len(expected) > 5  # cut at several keys
        assert sorted(got) == sorted(expected)  # the same key and LSN ranges
        for name, data in expected.items():
            assert got[name] == data, name
    finally:
        for store in (reference, fast):
            store.close()
            store.history.close()


@pytest.mark.usefixtures("c_extension")
def test_reads_through_the_c_merge_equal_reads_through_l0(
    level0_store: Path, tmp_path: Path
) -> None:
    store = opened(level0_store, tmp_path, "c")
    timeline = store.timeline
    lsn = timeline.last_record_lsn
    middle = (timeline.layer_map().level0()[0].lsn_end + lsn) // 2
    before = read_all(timeline, lsn), read_all(timeline, middle)
    merged, written = compaction.compact_level0(timeline, force=True)
    assert merged > 10 and written > 5
    assert not timeline.layer_map().level0()
    assert (read_all(timeline, lsn), read_all(timeline, middle)) == before
    store.close()
    store.history.close()
    reopened = NodeStore(StorageHistory(tmp_path / "c", SETTINGS), "n")
    assert read_all(reopened.timeline, lsn) == before[0]
    reopened.history.close()


@pytest.mark.parametrize("path", ["c", "python"])
def test_a_damaged_l0_block_fails_the_merge_and_leaves_no_file(
    level0_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    if path == "c":
        require_c_extension(native.blockpack, "pageserver.storage.layers._blockpack")
    else:
        monkeypatch.setattr(native, "blockpack", None)
    store = opened(level0_store, tmp_path, path)
    timeline = store.timeline
    level0 = timeline.layer_map().level0()
    victim = level0[len(level0) // 2]
    off, clen, _, _ = blocks._BLOCK_ENTRY.unpack_from(
        victim.file._map, victim.file._blocks_at + 2 * blocks._BLOCK_ENTRY.size
    )
    names = sorted(p.name for p in timeline.directory.iterdir())
    store.close()
    store.history.close()
    with open(timeline.directory / victim.path.name, "r+b") as f:  # a bit flips in block 2
        f.seek(off + clen // 2)
        byte = f.read(1)[0]
        f.seek(off + clen // 2)
        f.write(bytes([byte ^ 0x10]))

    store = NodeStore(StorageHistory(tmp_path / path, SETTINGS), "n")
    with pytest.raises(
        LayerCorrupt, match=f"{victim.path.name}.*checksum mismatch in value block 2"
    ):
        compaction.compact_level0(store.timeline, force=True)
    # Nothing published, nothing left: the L0 layers stay as they were.
    assert sorted(p.name for p in store.timeline.directory.iterdir()) == names
    assert len(store.timeline.layer_map().level0()) == len(level0)
    store.history.close()


KILLED_MERGE = """
import sys, time
from pathlib import Path
from pageserver.history.node_store import NodeStore, StorageHistory
from pageserver.storage import compaction
from pageserver.storage.layers import blocks
from pageserver.storage.layers.delta import DeltaLayerWriter
from tests.pageserver.storage.layers.test_l0_merge import SETTINGS

blocks.MERGE_MAX_KEYS = 50
add_merged, calls = DeltaLayerWriter.add_merged, [0]

def adding(self, *args):
    calls[0] += 1
    if calls[0] == 40:  # L1 layers published, one being written
        print("merging", flush=True)
        time.sleep(600)
    return add_merged(self, *args)

DeltaLayerWriter.add_merged = adding
store = NodeStore(StorageHistory(Path(sys.argv[1]), SETTINGS), "n")
compaction.compact_level0(store.timeline, force=True)
"""


@pytest.mark.usefixtures("c_extension")
def test_a_killed_c_merge_leaves_the_l0_store_readable(level0_store: Path, tmp_path: Path) -> None:
    """SIGKILL in the middle of the C merge (some L1 layers published, one half written):
    the next open names and reads exactly the L0 layers, and the merge then completes."""
    root = tmp_path / "killed"
    shutil.copytree(level0_store, root)
    store = NodeStore(StorageHistory(root, SETTINGS), "n")
    timeline = store.timeline
    lsn, level0 = timeline.last_record_lsn, [x.path.name for x in timeline.layer_map().level0()]
    before = read_all(timeline, lsn)
    directory = timeline.directory
    store.history.close()

    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_MERGE, str(root)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[4],  # the repository: `tests` imports
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "merging\n"
        written = [p.name for p in directory.iterdir() if p.name not in level0]
        assert len(written) > 2  # the manifest, L1 layers published, one being written
    finally:
        child.kill()
        child.wait()

    store = NodeStore(StorageHistory(root, SETTINGS), "n")
    timeline = store.timeline
    check_directory(directory)  # the unnamed L1 files are gone
    assert [x.path.name for x in timeline.layer_map().level0()] == level0
    assert read_all(timeline, lsn) == before
    assert compaction.compact_level0(timeline, force=True)[0] == len(level0)
    assert read_all(timeline, lsn) == before
    store.history.close()
