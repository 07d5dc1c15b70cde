"""Layer format version 2 (narrow version entries, blocks.py): written where the entries fit,
version 1 otherwise and for L0 layers; both read the same, in C and in Python; other
versions are refused naming the version."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import crc32c
import pytest

from pageserver.history.node_store import NodeStore, StorageHistory
from pageserver.storage import compaction
from pageserver.storage import keys as K
from pageserver.storage import timeline as timeline_module
from pageserver.storage.layers import native
from pageserver.storage.layers.blocks import (
    _NARROW_ENTRY,
    _VERSION_ENTRY,
    FORMAT_NARROW,
    FORMAT_VERSION,
    HEADER_SIZE,
    BlockCache,
    LayerCorrupt,
    LayerFile,
    _parse_header,
    narrow_versions_python,
    widen_versions_python,
)
from pageserver.storage.layers.delta import DeltaLayer, DeltaLayerWriter
from pageserver.storage.layers.image import ImageLayer, ImageLayerWriter
from pageserver.storage.settings import StoreSettings
from pageserver.storage.values import TAG_DELTA, Image, Value, WalDelta, encode_value
from proto.errors import InvalidArgument
from tests.native_ext import require_c_extension
from tests.pageserver.ingest.test_native_ingest import Workload, workload  # noqa: F401
from tests.pageserver.storage.layers.test_l0_merge import SETTINGS as L0_SETTINGS
from tests.pageserver.storage.layers.test_l0_merge import (  # noqa: F401 (a fixture)
    ingest_workload,
    level0_store,
    merged_files,
    opened,
)
from tests.pageserver.storage.layers.test_layers import SETTINGS, rel_key, sample_versions

GiB4 = 1 << 32


@pytest.fixture
def c_extension() -> None:
    require_c_extension(native.blockpack, "pageserver.storage.layers._blockpack")


def write(
    directory: Path,
    versions: list[tuple[K.Key, int, Value]],
    *,
    level0: bool,
    lsns: tuple[int, int] = (100, 200),
    settings: StoreSettings = SETTINGS,
) -> DeltaLayer:
    directory.mkdir(exist_ok=True)
    writer = DeltaLayerWriter(directory, *lsns, settings, level0=level0)
    for key, lsn, value in versions:
        writer.add(key, lsn, encode_value(value))
    return writer.finish(K.KeyRange(rel_key(0), rel_key(10_000)), BlockCache(1 << 20))


def reads(layer: DeltaLayer) -> list[object]:
    """Every read a layer answers, through every path that decodes version entries."""
    f = layer.file
    out: list[object] = [list(layer.iter_encoded())]
    out.append(list(f.newest_of_keys(0, K.KEY_MAX)))
    out.append(list(f.newest_of_keys_python(0, K.KEY_MAX)))
    out.append(list(f.iter_newest(K.FULL_KEYSPACE)))
    for i in range(f.n_keys):
        versions = f.versions_of(i)
        out.append([f.version_tuple(v) for v in versions])
        out.append([f.version_lsn(v) for v in versions])
        for lsn in range(95, 206, 3):
            out.append(f.last_at_or_below(versions, lsn))
            out.append(list(f.chain_newest_first(versions, lsn, 101)))
            out.append(f.key_versions_raw(i, 102, lsn))
        out.append(f.key_versions_raw(i))
        key = f.key_at(i)
        out.append(layer.collect(key, 199, 0))
    return out


@pytest.mark.parametrize("pure_python", [False, True])
def test_narrow_and_wide_files_answer_every_read_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pure_python: bool
) -> None:
    if pure_python:
        monkeypatch.setattr(native, "blockpack", None)
    else:
        require_c_extension(native.blockpack, "pageserver.storage.layers._blockpack")
    versions = sample_versions(seed=3, n_keys=40)
    narrow = write(tmp_path / "narrow", versions, level0=False)
    wide = write(tmp_path / "wide", versions, level0=True)
    assert narrow.file.header.version == FORMAT_NARROW
    assert wide.file.header.version == FORMAT_VERSION
    saved = len(versions) * (_VERSION_ENTRY.size - _NARROW_ENTRY.size)
    assert wide.file_size - narrow.file_size == saved
    assert reads(narrow) == reads(wide)
    # the C chain redo's input is version 1's layout either way
    raw, _, _ = narrow.file.key_versions_raw(0)
    assert len(raw) % _VERSION_ENTRY.size == 0 and len(raw) > 0


def test_c_narrowing_equals_the_python_reference(c_extension: None) -> None:
    assert native.blockpack is not None
    rng = random.Random(4)
    base = 0x1_0000_0000 + 77
    edges = [(0, 0, 0, 0, 1), (GiB4 - 1, 255, 0xFFFF, 2**32 - 1, 0xFFFF)]
    for _ in range(50):
        n = rng.randrange(0, 40)
        fields = edges + [
            (rng.randrange(GiB4), rng.randrange(256), rng.randrange(1 << 16),
             rng.randrange(1 << 32), rng.randrange(1 << 16))
            for _ in range(n)
        ]  # fmt: skip
        wide = b"".join(_VERSION_ENTRY.pack(base + d, t, b, o, ln) for d, t, b, o, ln in fields)
        got = native.blockpack.narrow_versions(wide, base)
        assert got == narrow_versions_python(wide, base)
        assert got is not None and len(got) == len(fields) * _NARROW_ENTRY.size
        assert native.blockpack.widen_versions(got, base) == wide
        assert widen_versions_python(got, base) == wide
    for bad in (
        (base - 1, 1, 0, 0, 1),  # LSN below the layer's start
        (base + GiB4, 1, 0, 0, 1),  # 4 GiB above it
        (base, 1, 0x10000, 0, 1),  # block number
        (base, 1, 0, 0, 0x10000),  # length
    ):
        wide = _VERSION_ENTRY.pack(base, 1, 0, 0, 1) + _VERSION_ENTRY.pack(*bad)
        assert native.blockpack.narrow_versions(wide, base) is None
        assert narrow_versions_python(wide, base) is None


def test_entries_that_do_not_fit_keep_version_1(tmp_path: Path) -> None:
    """A layer spanning more than 4 GiB of WAL with a version that far up, or a value longer
    than 65535 bytes, is written (and read) in version 1."""
    far = [(rel_key(1), 100, Image(b"a")), (rel_key(2), 100 + GiB4, WalDelta(b"b", False))]
    layer = write(tmp_path / "far", far, level0=False, lsns=(100, 101 + GiB4))
    assert layer.file.header.version == FORMAT_VERSION
    assert [lsn for _, lsn, _ in layer.iter_encoded()] == [100, 100 + GiB4]
    near = write(tmp_path / "near", far[:1], level0=False, lsns=(100, 101 + GiB4))
    assert near.file.header.version == FORMAT_NARROW  # the span alone does not matter
    big = [(rel_key(1), 120, WalDelta(b"x" * 70_000, False))]
    layer = write(tmp_path / "big", big, level0=False)
    assert layer.file.header.version == FORMAT_VERSION
    assert list(layer.iter_encoded()) == [(rel_key(1), 120, encode_value(big[0][2]))]


def test_image_layers_are_narrow(tmp_path: Path) -> None:
    writer = ImageLayerWriter(tmp_path, K.FULL_KEYSPACE, 150, SETTINGS)
    for blk in range(30):
        writer.add(rel_key(blk), bytes([blk]) * 100)
    layer = writer.finish(BlockCache(1 << 20))
    assert isinstance(layer, ImageLayer)
    assert layer.file.header.version == FORMAT_NARROW
    got = list(layer.file.iter_newest(K.FULL_KEYSPACE))
    assert got == [(rel_key(b), 1, bytes([b]) * 100) for b in range(30)]


def test_other_format_versions_are_refused_naming_them(tmp_path: Path) -> None:
    layer = write(tmp_path / "d", sample_versions(seed=2), level0=False)
    path, header = layer.path, layer.file.header
    layer.close()
    data = bytearray(path.read_bytes())
    for version in (0, 5, 7):
        data[:HEADER_SIZE] = dataclasses.replace(header, version=version).pack()
        path.write_bytes(bytes(data))
        with pytest.raises(LayerCorrupt, match=f"format version {version} is not supported"):
            LayerFile(path, BlockCache(1 << 20))
    assert _parse_header(path, header.pack()).version == FORMAT_NARROW


def test_damaged_narrow_value_references_raise_layer_corrupt(tmp_path: Path) -> None:
    """A narrow entry pointing past its block (a re-signed index) fails the read."""
    layer = write(tmp_path / "d", [(rel_key(1), 150, WalDelta(b"abc", False))], level0=False)
    path, header = layer.path, layer.file.header
    layer.close()
    data = bytearray(path.read_bytes())
    at = header.file_size - _NARROW_ENTRY.size
    data[at:] = _NARROW_ENTRY.pack(50, TAG_DELTA, 0, 9999, 4)
    index = bytes(data[header.index_offset :])
    data[:HEADER_SIZE] = dataclasses.replace(header, index_crc=crc32c.crc32c(index)).pack()
    path.write_bytes(bytes(data))
    reopened = DeltaLayer(tmp_path / "d", layer.name, BlockCache(1 << 20))
    with pytest.raises(LayerCorrupt, match="value reference"):
        list(reopened.iter_encoded())
    reopened.close()


def test_narrow_files_whose_lsns_would_pass_64_bits_are_refused(tmp_path: Path) -> None:
    """A narrow file's LSNs are lsn_start plus 32 bits: a header (re-signed) whose lsn_start
    leaves no room for them is refused on open (the C readers wrapped them to small LSNs,
    Python's returned LSNs above 2^64); the writer keeps version 1 for such a start."""
    top = (1 << 64) - 1
    layer = write(tmp_path / "top", [(rel_key(1), top - 50, Image(b"a"))], level0=False,
                  lsns=(top - 100, top))  # fmt: skip
    assert layer.file.header.version == FORMAT_VERSION
    assert [lsn for _, lsn, _ in layer.iter_encoded()] == [top - 50]
    layer = write(tmp_path / "d", [(rel_key(1), 150, Image(b"a"))], level0=False)
    path, header = layer.path, layer.file.header
    assert header.version == FORMAT_NARROW
    layer.close()
    data = bytearray(path.read_bytes())
    data[:HEADER_SIZE] = dataclasses.replace(header, lsn_start=top - 100, lsn_end=top).pack()
    path.write_bytes(bytes(data))
    with pytest.raises(LayerCorrupt, match="narrow version entries above LSN"):
        LayerFile(path, BlockCache(1 << 20))


class NarrowL0Writer(DeltaLayerWriter):
    """A flush that writes its L0 layers in version 2 (none does: a file is untrusted)."""

    def __init__(self, *args: Any, level0: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)


@pytest.mark.usefixtures("c_extension")
def test_l0_layers_stay_wide_and_narrow_l0_inputs_merge_in_python(
    level0_store: Path,  # noqa: F811
    workload: Workload,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Flushed L0 layers are version 1 (the C merge reads them) and the L1 layers of their
    merge version 2; L0 inputs in version 2 are merged by the Python reference (the C merge
    refuses them) into the same L1 files as version 1 inputs."""
    reference = opened(level0_store, tmp_path, "wide")
    try:
        level0 = reference.timeline.layer_map().level0()
        assert level0 and all(x.file.header.version == FORMAT_VERSION for x in level0)
        expected = merged_files(reference, compaction._merge_level0_native)
        assert all(data[4:6] == FORMAT_NARROW.to_bytes(2) for data in expected.values())
    finally:
        reference.close()
        reference.history.close()
    monkeypatch.setattr(timeline_module, "DeltaLayerWriter", NarrowL0Writer)
    store = NodeStore(StorageHistory(tmp_path / "narrow", L0_SETTINGS), "n")
    try:
        ingest_workload(store, workload)
        level0 = store.timeline.layer_map().level0()
        assert len(level0) > 10 and all(x.file.narrow for x in level0)
        with pytest.raises(InvalidArgument, match="format version 1 only"):
            level0[0].file.merge_input()
        directory = store.timeline.directory
        merged, written = compaction.compact_level0(store.timeline, force=True)
        assert merged == len(level0) and written == len(expected)
        got = {name: (directory / name).read_bytes() for name in expected}
        assert got == expected
    finally:
        store.close()
        store.history.close()
