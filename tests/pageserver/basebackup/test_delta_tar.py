"""delta_tar: its counting of tar bytes without building headers, and the pages it reads."""

from __future__ import annotations

import io
import os
import struct
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pageserver.basebackup import delta_tar
from pageserver.basebackup.delta_tar import DeltaForks, tar_header_size
from pageserver.basebackup.snapshot_file import TarCounter, snapshot_file_chunks
from pageserver.basebackup.sources import TimelineSource
from pageserver.basebackup.tar_stream import tar_bytes_of, tar_header
from pageserver.history.snapshot_diff import ReadPoint
from pageserver.reconstruct.apply_delta import reconstruct
from pageserver.reconstruct.value_format import encode_u32
from pageserver.redo.native import redo as native_redo
from pageserver.storage import keys as K
from pageserver.storage.compaction import create_image_layers
from pageserver.storage.timeline import Timeline
from pageserver.storage.timeline_store import TimelineStore
from pageserver.storage.values import TOMBSTONE, Image, Value
from pg15.constants import BLCKSZ
from snapfile.delta import (
    delta_member_name,
    fork_header,
    fork_member_size,
    fork_sizes_member,
    parse_fork_sizes,
)
from snapfile.reader import TarData, read_snapshot_file
from snapfile.writer import SnapshotFileWriter
from tests.native_ext import require_c_extension
from tests.pageserver.history.test_snapshot_diff import DB, SETTINGS, SPC
from tests.snapfile.snapfile_helpers import make_manifest

NAMES = [
    "base/16384/16397",
    "base/16384/16397_fsm.1",
    "pg_tblspc/16500/PG_15_202209061/16384/2619.delta",
    "x" * 99,
    "x" * 100,
    "x" * 101,  # past the ustar name field: a PAX header
    "base/16384/\u00e9t\u00e9",  # not ASCII: a PAX header
]
SIZES = [0, 8192, 1 << 30, 8**11 - 1, 8**11, 1 << 40]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mtime", [0, 1_700_000_000, 8**11])
def test_header_size_is_the_headers(name: str, size: int, mtime: int) -> None:
    assert tar_header_size(name, size, mtime) == len(tar_header(name, size, mtime))


def test_the_fast_path_is_taken_and_the_pax_path_too() -> None:
    """Both branches are exercised above: one plain block, and PAX ones larger than it."""
    assert tar_header_size("base/1/2", 8192, 0) == 512
    assert tar_header_size("x" * 101, 8192, 0) > 512
    assert tar_header_size("base/1/2", 8**11, 0) > 512


# -- the pages a delta carries ---------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TimelineStore]:
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    s = TimelineStore(tmp_path / "store", SETTINGS)
    yield s
    s.close()


def _page(lsn: int, fill: int) -> Image:
    return Image(struct.pack("<II", lsn >> 32, lsn & 0xFFFFFFFF) + bytes([fill]) * (BLCKSZ - 8))


def _record(tl: Timeline, lsn: int, *puts: tuple[K.Key, Value]) -> None:
    tl.put_batch([(key, lsn, value) for key, value in puts])
    tl.advance_last_record_lsn(lsn, tl.last_record_lsn)


def _block(rel: int, blkno: int) -> K.Key:
    return K.rel_block_key(SPC, DB, rel, 0, blkno)


def _size(rel: int, n: int) -> tuple[K.Key, Value]:
    return K.rel_size_key(SPC, DB, rel, 0), Image(encode_u32(n))


def _history(store: TimelineStore, both_at_start: bool = False) -> tuple[Timeline, Timeline]:
    """A parent at 16; after it, pages rewritten in delta layers, under and over image layers
    (compaction in the window), a block removed, a relation grown and one created (or, with
    `both_at_start`, made at 8 too: two forks at 16); a branch at 40 writing more, some of it
    still in its open in-memory layer."""
    tl = store.create_timeline()
    _record(tl, 8, _size(16384, 40), *((_block(16384, b), _page(8, b)) for b in range(40)))
    if both_at_start:
        _record(tl, 12, _size(16385, 3), *((_block(16385, b), _page(12, b)) for b in range(3)))
    _record(tl, 16, (_block(16384, 0), _page(16, 1)))
    tl.freeze_and_flush()
    _record(tl, 24, *((_block(16384, b), _page(24, 3)) for b in range(5, 15)))
    _record(tl, 32, _size(16384, 44), *((_block(16384, b), _page(32, 4)) for b in range(40, 44)))
    tl.freeze_and_flush()
    assert create_image_layers(tl, reconstruct, force=True) > 0
    _record(
        tl, 40, (_block(16384, 7), _page(40, 5)), (_block(16384, 20), TOMBSTONE),
        _size(16385, 3), *((_block(16385, b), _page(40, 6)) for b in range(3)),
    )  # fmt: skip
    tl.freeze_and_flush()
    child = store.branch(tl.timeline_id, 40)
    _record(child, 48, (_block(16384, 8), _page(48, 7)), (_block(16384, 39), _page(48, 8)))
    child.freeze_and_flush()
    _record(child, 56, (_block(16384, 9), _page(56, 9)), (_block(16385, 1), _page(56, 10)))
    return tl, child


def _members(forks: DeltaForks, nblocks: dict[int, int]) -> list[bytes]:
    return [
        b"".join(tar_bytes_of(forks.fork_members(f"base/{DB}/{rel}", SPC, DB, rel, 0, n, 0)))
        for rel, n in sorted(nblocks.items())
    ]


def test_the_delta_pages_read_in_bulk_are_the_per_key_reads(
    store: TimelineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pages of a delta are rebuilt from the layer files at once, without planning a read
    of the whole database (`plan_range_read`, `rel_pages`): the same member bytes as the
    per-key reference reads, at the snapshot's timeline and on a branch with an open layer."""
    require_c_extension(native_redo, "pageserver.redo._redo")  # the bulk path is the C redo's
    tl, child = _history(store)
    parent = ReadPoint(tl, 16)
    nblocks = {16384: 44, 16385: 3}
    planned: list[object] = []
    for timeline, lsn in ((tl, 40), (child, 56)):
        per_key = DeltaForks(TimelineSource(timeline, lsn, bulk=False), parent)
        reference = _members(per_key, nblocks)
        with monkeypatch.context() as m:
            m.setattr(Timeline, "plan_range_read", lambda *a: planned.append(a))
            m.setattr(TimelineSource, "rel_pages", lambda *a: planned.append(a))
            bulk = DeltaForks(TimelineSource(timeline, lsn), parent)
            assert _members(bulk, nblocks) == reference
        assert planned == []
        assert bulk.pages == per_key.pages > 10


def test_a_root_timelines_delta_pages_are_written_in_place(
    store: TimelineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a root timeline the C walk writes a delta's pages in place, a chunk of them at a
    time (`filled_records`), never a bytes object per page (`rebuilt_pages`); a branch, whose
    chains go on into its ancestor, takes the pages one by one. Both give the per-key reads'
    member bytes, holes (block 20, removed) included."""
    require_c_extension(native_redo, "pageserver.redo._redo")
    tl, child = _history(store)
    parent = ReadPoint(tl, 16)
    nblocks = {16384: 44, 16385: 3}
    one_by_one: list[object] = []
    rebuilt = delta_tar.rebuilt_pages

    def recorded(*args: Any) -> Iterator[bytes]:
        one_by_one.append(args)
        return rebuilt(*args)

    monkeypatch.setattr(delta_tar, "rebuilt_pages", recorded)
    for timeline, lsn, used in ((tl, 40, False), (child, 56, True)):
        one_by_one.clear()
        per_key = _members(DeltaForks(TimelineSource(timeline, lsn, bulk=False), parent), nblocks)
        assert one_by_one == []
        bulk = DeltaForks(TimelineSource(timeline, lsn), parent)
        assert _members(bulk, nblocks) == per_key
        assert bool(one_by_one) == used, (timeline.timeline_id, lsn)
        assert bulk.pages > 10


def test_a_fork_without_pages_is_one_chunk(store: TimelineStore) -> None:
    """A fork the delta sends no page of (most of them: ~720 of a pgbench database's ~730)
    is one chunk, the member's header, fork header and padding at once (three, through two
    generators, were each a step of the encoder's cut: a tenth of a 1% delta's tar making),
    with the bytes of the generic path's member."""
    tl, _child = _history(store)
    forks = DeltaForks(TimelineSource(tl, 40), ReadPoint(tl, 16))
    name = f"base/{DB}/16390"
    (chunk,) = forks.fork_members(name, SPC, DB, 16390, 0, 12, 7)
    size = fork_member_size(0)
    assert chunk == tar_header(delta_member_name(name), size, 7) + fork_header(12) + bytes(
        512 - size
    )
    assert forks.pages == 0 and forks.delta_tar_bytes == len(chunk)


def test_forks_without_pages_are_listed_once_a_directory(store: TimelineStore) -> None:
    """`fork_sizes` (a checkout's tar): a fork with no page makes no member; the directory's
    end lists them (name, blocks) in one FORK_SIZES member, which the applier reads back;
    a fork with pages is its member as before, and a directory with none listed adds
    nothing."""
    tl, _child = _history(store)
    forks = DeltaForks(TimelineSource(tl, 40), ReadPoint(tl, 16))
    forks.fork_sizes = True
    directory = f"base/{DB}"
    assert list(forks.fork_members(f"{directory}/16390", SPC, DB, 16390, 0, 12, 7)) == []
    assert list(forks.fork_members(f"{directory}/16391_vm", SPC, DB, 16391, 2, 0, 7)) == []
    with_pages = b"".join(
        tar_bytes_of(forks.fork_members(f"{directory}/16384", SPC, DB, 16384, 0, 44, 7))
    )
    assert delta_member_name(f"{directory}/16384").encode() in with_pages
    (member,) = read_members(b"".join(forks.directory_end(directory, 7)) + bytes(1024))
    assert member == (fork_sizes_member(directory), b"16390 12\n16391_vm 0\n")
    assert parse_fork_sizes(member[1], member[0]) == [("16390", 12), ("16391_vm", 0)]
    assert list(forks.directory_end(directory, 7)) == []  # sent once
    assert list(forks.directory_end("global", 7)) == []
    in_a_tablespace = "pg_tblspc/16500/PG_15_202209061/5/16390"  # not listed: as before
    (chunk,) = forks.fork_members(in_a_tablespace, 16500, DB, 16390, 0, 12, 7)
    assert chunk.startswith(tar_header(delta_member_name(in_a_tablespace), 16, 7))


def read_members(archive: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


def test_a_delta_file_compresses_its_chunks_where_they_lie(
    store: TimelineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delta `.neon` file's tar chunks are compressed where they lie, not copied first
    (no AlignedChunks: `snapshot_file_chunks` gives none back): safe because nothing the
    delta's tar maker hands on, its pages' bytearrays included, is written again; the file
    holds the very tar."""
    require_c_extension(native_redo, "pageserver.redo._redo")  # the records' bytearrays
    tl, _child = _history(store)
    forks = DeltaForks(TimelineSource(tl, 40), ReadPoint(tl, 16))
    handed: list[tuple[bytes | bytearray | memoryview, bytes]] = []

    def chunks() -> Iterator[bytes]:
        for rel, n in ((16384, 44), (16385, 3), (16390, 12)):
            members = forks.fork_members(f"base/{DB}/{rel}", SPC, DB, rel, 0, n, 0)
            for chunk in tar_bytes_of(members):
                handed.append((chunk, bytes(chunk)))
                yield chunk

    copies: list[bool] = []
    cut = SnapshotFileWriter.cut

    def recorded(self: SnapshotFileWriter, data: Any, *, copy: bool = True) -> Any:
        copies.append(copy)
        return cut(self, data, copy=copy)

    monkeypatch.setattr(SnapshotFileWriter, "cut", recorded)
    manifest = make_manifest(frame_size=3 * BLCKSZ)  # frames across chunks
    neon = b"".join(snapshot_file_chunks(manifest, TarCounter(chunks())))
    assert any(isinstance(chunk, bytearray) for chunk, _ in handed)
    assert copies and not any(copies)
    assert all(bytes(chunk) == made for chunk, made in handed)  # none written again
    read = read_snapshot_file(io.BytesIO(neon))
    tar = b"".join(e.data for e in read if isinstance(e, TarData))
    assert tar == b"".join(made for _, made in handed)
