"""A whole `.neon` file imported by the pageserver itself (pageserver/ingest/import_neon.py):
its big relation files go from the decompressed frames to image layers and are never written
as files. The state is a plain import's of the directory the file holds (equal basebackup
tars), pages cut across frames included; the big files are left holding no data; a damaged,
cut or hostile file, a big member twice or another manifest fail with no layer left."""

from __future__ import annotations

import asyncio
import io
import os
import random
import re
import tarfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pageserver.ingest import import_datadir as imp
from pageserver.ingest import live_journal
from pageserver.ingest.import_neon import DONE_SUFFIX, FAILED_SUFFIX, NeonSource, import_neon_file
from pg15.pg_control import read_control_file
from proto.errors import CorruptData, InvalidArgument, Unavailable
from snapfile import frame_buffers
from snapfile.manifest import Manifest, origin_of
from snapfile.verified import verified_tar, verified_tar_blocking
from snapfile.writer import write_snapshot_file
from tests.pageserver.ingest.test_import_threads import (
    BIG_PAGES,
    basebackup_digest,
    big_file,
    datadir,  # noqa: F401 (the fixture)
    imported_tar,
    new_timeline,
    tiling_images,
)
from tests.snapfile.snapfile_helpers import make_manifest

FRAME = 5 * 4096  # not whole pages: pages are cut across frames


def tar_of(root: Path, extra: list[tuple[str, bytes]] = ()) -> bytes:  # type: ignore[assignment]
    """The directory as a basebackup tar (relative names), then `extra` members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for path in sorted(root.rglob("*")):
            tar.add(path, str(path.relative_to(root)), recursive=False)
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def neon_file(root: Path, out: Path, tar: bytes | None = None) -> Manifest:
    """`out`: a `.neon` file of `tar` (default: `root`'s), its manifest `root`'s."""
    manifest = make_manifest(
        frame_size=FRAME,
        system_identifier=read_control_file(root).system_identifier,
        lsn=imp.import_lsn_of(root) - 0x1000,
    )
    with out.open("wb") as f:
        write_snapshot_file(f, manifest, [tar_of(root) if tar is None else tar])
    return manifest


@pytest.fixture(autouse=True)
def small_early_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Relation files from 64 KiB on go to layers: the big one and several catalogs."""
    monkeypatch.setattr(live_journal, "EARLY_BYTES", 64 * 1024)


def imported(
    path: Path, work: Path, origin: str | None, fetching: bool = False
) -> tuple[str, int, int]:
    """Import the file: its basebackup tar's SHA-256, the import LSN and how many layers
    lie below it (the diverted files')."""
    with new_timeline(work / "store") as timeline:
        source = NeonSource(path, str(path), fetching)
        lsn = import_neon_file(timeline, source, work / "pgdata", origin)
        layers = tiling_images(timeline)
        return basebackup_digest(timeline, lsn), lsn, len([x for x in layers if x.lsn < lsn])


def test_the_state_is_the_directorys_and_big_files_are_never_written(
    datadir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    path = tmp_path / "x.neon"
    manifest = neon_file(datadir, path)
    plain, _ = imported_tar(datadir, tmp_path / "plain", 1)
    work = tmp_path / "work"
    digest, lsn, early = imported(path, work, origin_of(manifest))
    assert digest == plain
    assert lsn == imp.import_lsn_of(datadir) and early >= 2
    left = big_file(work / "pgdata")  # its size, for the directory's sizes; no data
    assert left.stat().st_size == BIG_PAGES * 8192 and left.stat().st_blocks == 0


def test_frames_are_decompressed_into_buffers_the_extractor_gives_back(
    datadir: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new bytes object per frame was faulted in page by page again on the import's thread
    (the daemon's malloc settings unmap a freed 4 MiB block): the frames now go into a few
    buffers used again, each given back once the extractor wrote or packed its bytes, and
    the state is the same."""
    made: list[Counted] = []

    class Counted(frame_buffers.FrameBuffers):
        def __init__(self, pool: frame_buffers.BufferPool | None = None) -> None:
            super().__init__(pool)
            self.taken, self.given, self.buffers = 0, 0, set[int]()
            made.append(self)

        def take(self, size: int) -> memoryview:
            view = super().take(size)
            self.taken += 1
            self.buffers.add(id(view.obj))
            return view

        def give_back(self, chunk: object) -> None:
            self.given += isinstance(chunk, memoryview)
            super().give_back(chunk)

    monkeypatch.setattr(frame_buffers, "FrameBuffers", Counted)
    path = tmp_path / "x.neon"
    manifest = neon_file(datadir, path)
    plain, _ = imported_tar(datadir, tmp_path / "plain", 1)
    digest, _lsn, _early = imported(path, tmp_path / "work", origin_of(manifest))
    assert digest == plain
    [buffers] = made
    frames = len(tar_of(datadir)) // FRAME
    assert buffers.taken >= frames > 100
    assert buffers.given == buffers.taken  # all given back
    # those of one piece's frames (a 128 KiB piece of this file holds dozens of its 20 KiB
    # frames) and of the extractor's queue
    assert len(buffers.buffers) * 20 < frames


def layer_files(work: Path) -> list[Path]:
    return [p for p in (work / "store").rglob("*") if p.is_file() and "__" in p.name]


@pytest.mark.parametrize("case", ["twice", "hostile", "flipped", "cut", "origin"])
def test_a_bad_file_fails_and_leaves_no_layer(
    datadir: Path,  # noqa: F811
    tmp_path: Path,
    case: str,
) -> None:
    path = tmp_path / "x.neon"
    big = str(big_file(datadir).relative_to(datadir))
    extra = {
        "twice": [(big, bytes(BIG_PAGES * 8192))],
        "hostile": [("../escape", b"x")],
    }.get(case, [])
    manifest = neon_file(datadir, path, tar_of(datadir, extra))
    data = bytearray(path.read_bytes())
    if case == "flipped":
        data[len(data) * 3 // 4] ^= 0x20
    elif case == "cut":
        del data[len(data) * 3 // 4 :]
    path.write_bytes(data)
    origin = origin_of(manifest) if case != "origin" else origin_of(make_manifest())
    work = tmp_path / "work"
    expected = {
        # The extractor opens every member's file with O_EXCL (f350735) before the diverter
        # is asked: a repeat of a big relation file never reaches its layers.
        "twice": f"refusing tar member {big!r}: something is at its path already",
        "hostile": "refusing tar member '../escape'",
        "origin": "changed while it was read",
    }.get(case, str(path))
    with pytest.raises(CorruptData, match=re.escape(expected)):
        imported(path, work, origin)
    assert layer_files(work) == []
    assert not (work / "pgdata").exists()


def fetch_slowly(data: bytes, path: Path, end: str, stop_at: int | None = None) -> None:
    """Write `data` to `path` in pieces, as a fetch does, then the `end` marker beside it
    (`stop_at`: only that many bytes first)."""
    with path.open("wb", buffering=0) as f:
        for at in range(0, len(data) if stop_at is None else stop_at, 1 << 20):
            f.write(data[at : at + (1 << 20)])
            time.sleep(0.005)
    Path(f"{path}{end}").touch()


def test_a_file_being_fetched_is_read_as_it_grows(
    datadir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    whole = tmp_path / "whole.neon"
    manifest = neon_file(datadir, whole)
    plain, _ = imported_tar(datadir, tmp_path / "plain", 1)
    path = tmp_path / "x.neon"
    path.touch()
    writer = threading.Thread(target=fetch_slowly, args=(whole.read_bytes(), path, DONE_SUFFIX))
    writer.start()
    try:
        digest, _lsn, early = imported(path, tmp_path / "work", origin_of(manifest), True)
    finally:
        writer.join()
    assert digest == plain and early >= 2


def test_a_fetch_that_gives_up_fails_the_import_and_leaves_no_layer(
    datadir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    whole = tmp_path / "whole.neon"
    manifest = neon_file(datadir, whole)
    path = tmp_path / "x.neon"
    path.touch()
    data = whole.read_bytes()
    writer = threading.Thread(target=fetch_slowly, args=(data, path, FAILED_SUFFIX, len(data) // 2))
    writer.start()
    work = tmp_path / "work"
    try:
        with pytest.raises(Unavailable, match="given up"):
            imported(path, work, origin_of(manifest), True)
    finally:
        writer.join()
    assert layer_files(work) == []


def test_the_import_runs_on_the_callers_thread_with_no_event_loop(
    datadir: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No asyncio: each piece of the file used to be verified on a worker thread and
    handed back to a loop (~400 hops for 1 GiB of pgbench data, each waiting for the GIL in
    a loaded process); the state is the same."""
    path = tmp_path / "x.neon"
    manifest = neon_file(datadir, path)
    plain, _ = imported_tar(datadir, tmp_path / "plain", 1)

    def no_loop(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the import used asyncio")

    monkeypatch.setattr(asyncio, "run", no_loop)
    monkeypatch.setattr(asyncio, "to_thread", no_loop)
    digest, _lsn, early = imported(path, tmp_path / "work", origin_of(manifest))
    assert digest == plain and early >= 2


@pytest.mark.parametrize("damage", ["none", "flipped", "cut"])
def test_blocking_verified_tar_equals_the_async_one(
    datadir: Path,  # noqa: F811
    tmp_path: Path,
    damage: str,
) -> None:
    """verified_tar_blocking (the import's) gives verified_tar's bytes and errors, the
    file read in chunks of any size, also into buffers given back as used."""
    path = tmp_path / "x.neon"
    neon_file(datadir, path)
    data = bytearray(path.read_bytes())
    if damage == "flipped":
        data[len(data) // 2] ^= 0x20
    elif damage == "cut":
        del data[len(data) // 2 :]
    rng = random.Random(len(data))
    chunks, at = [], 0
    while at < len(data):
        take = rng.choice([1, 511, 4096, 70_000, 300_000])
        chunks.append(bytes(data[at : at + take]))
        at += take
    manifests: list[Manifest] = []

    async def async_tar() -> bytes:
        async def source() -> AsyncIterator[bytes]:
            for chunk in chunks:
                yield chunk

        return b"".join([x async for x in verified_tar(source(), "f", manifests.append)])

    def outcome(run: Callable[[], bytes]) -> tuple[str, bytes]:
        try:
            return "ok", run()
        except CorruptData as exc:
            return str(exc), b""

    def into_buffers() -> bytes:
        buffers, out = frame_buffers.FrameBuffers(), bytearray()
        for data in verified_tar_blocking(chunks, "f", manifests.append, buffers):
            out += data
            buffers.give_back(data)
        return bytes(out)

    blocking = outcome(lambda: b"".join(verified_tar_blocking(chunks, "f", manifests.append)))
    assert blocking == outcome(lambda: asyncio.run(async_tar()))
    assert blocking == outcome(into_buffers)
    assert (blocking[0] == "ok") == (damage == "none")
    assert blocking[1] == (tar_of(datadir) if damage == "none" else b"")
    assert len(manifests) == 3 and manifests[0] == manifests[1] == manifests[2]


@pytest.mark.parametrize("kind", ["fifo", "link"])
def test_a_name_swapped_after_the_check_is_refused_not_waited_on(
    kind: str,
    datadir: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The request checked the path; the name is swapped for a FIFO (whose plain open waits
    for a writer for ever) or a link before the import opens it: refused at once."""
    real = tmp_path / "x.neon"
    neon_file(datadir, real)
    path = tmp_path / "swapped.neon"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(real)
    source = NeonSource(path, str(path))
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(lambda: next(source.blocks()))
        try:
            with pytest.raises(InvalidArgument, match=r"swapped\.neon"):
                future.result(timeout=10)
        finally:
            if not future.done():  # the old code: blocked in open(); a writer releases it
                with open(path, "wb"):
                    pass
