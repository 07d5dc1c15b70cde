"""How a whole `.neon` file reaches the pageserver that reads it (cli/neon_file_import.py):
a local file as it is (absolute); a remote one fetched byte for byte (through a cut
connection too) while the import reads it as it grows, a fetch that fails marked so that the
import ends too; a delta, or a path that is no file, left to the other way (None)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import cli.neon_file_import as nfi
from cli.neon_file_import import FETCHED_NAME, LocalNeonFile, import_whole_file
from cli.progress import Progress
from cli.transport import base
from pageserver.ingest.import_neon import NeonSource
from proto.errors import NeonError, Unavailable
from snapfile.manifest import origin_of
from snapfile.writer import write_snapshot_file
from tests.httpd import FileServer
from tests.snapfile.snapfile_helpers import generated_bytes, make_manifest, make_tar


def write_neon(path: Path, **changes: object) -> str:
    manifest = make_manifest(**changes)
    tar = make_tar({"base/1/1259": generated_bytes(600_000, 1)})
    with path.open("wb") as f:
        write_snapshot_file(f, manifest, [tar])
    return origin_of(manifest)


def read_as_the_pageserver(whole: LocalNeonFile) -> tuple[LocalNeonFile, bytes]:
    """What the pageserver's reader gets (pageserver/ingest/import_neon.py's NeonSource)."""

    async def read() -> bytes:
        source = NeonSource(whole.path, whole.label, whole.fetching)
        return b"".join([chunk async for chunk in source.chunks()])

    return whole, asyncio.run(read())


def imported(source: str, work: Path) -> tuple[LocalNeonFile, bytes] | None:
    return import_whole_file(source, work, Progress(False, "t"), read_as_the_pageserver)


def test_a_whole_local_file_is_given_as_it_is(
    remote_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = remote_dir / "x.neon"
    origin = write_neon(path)
    for source in (str(path), f"file://{path}"):
        got = imported(source, tmp_path)
        assert got is not None
        assert (got[0].path, got[0].origin, got[0].fetching) == (path, origin, False)
        assert got[1] == path.read_bytes()
    assert list(tmp_path.iterdir()) == []
    assert imported(str(remote_dir / "none.neon"), tmp_path) is None
    monkeypatch.chdir(remote_dir)  # the pageserver runs elsewhere: the path is absolute
    got = imported("x.neon", tmp_path)
    assert got is not None and got[0].path == path


def test_a_whole_remote_file_is_read_as_it_is_fetched(
    httpd: FileServer, remote_dir: Path, tmp_path: Path
) -> None:
    origin = write_neon(remote_dir / "x.neon")
    httpd.cut_gets.extend([100_000])  # resumed with Range after the cut
    got = imported(httpd.url("x.neon"), tmp_path)
    assert got is not None
    whole, read = got
    assert (whole.origin, whole.path, whole.fetching) == (origin, tmp_path / FETCHED_NAME, True)
    assert read == whole.path.read_bytes() == (remote_dir / "x.neon").read_bytes()
    assert whole.label == httpd.url("x.neon")


def test_a_fetch_that_fails_ends_the_import_too(
    httpd: FileServer, remote_dir: Path, tmp_path: Path
) -> None:
    write_neon(remote_dir / "x.neon")
    httpd.cut_gets.extend([100_000] + [10] * (base.REOPEN_ATTEMPTS + 1))
    seen: list[BaseException] = []

    def send(whole: LocalNeonFile) -> tuple[LocalNeonFile, bytes]:
        try:
            return read_as_the_pageserver(whole)
        except Unavailable as exc:
            seen.append(exc)
            raise

    with pytest.raises(NeonError) as raised:
        import_whole_file(httpd.url("x.neon"), tmp_path, Progress(False, "t"), send)
    assert "the download was cut" in str(raised.value)  # the fetch's own error
    assert [str(e) for e in seen] == [f"the fetch of {httpd.url('x.neon')} was given up"]


def test_a_delta_goes_the_other_way(httpd: FileServer, remote_dir: Path, tmp_path: Path) -> None:
    write_neon(remote_dir / "d.neon", parent="a@s1", parent_lsn=0x1000)
    for source in (str(remote_dir / "d.neon"), httpd.url("d.neon")):
        assert imported(source, tmp_path) is None
    assert list(tmp_path.iterdir()) == []


def test_the_spool_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """The file being written (a pushed or fetched database, whole) is the owner's only, as
    the extracted data directory's files were: its work directory is 0711 (PostgreSQL's
    account enters it), so a file of the umask's 0644 there was any local user's to read who
    found its name."""
    from cli.neon_file_import import GrowingFile

    seen: list[int] = []

    def send(whole: LocalNeonFile) -> bytes:
        seen.append(whole.path.stat().st_mode & 0o777)
        return read_as_the_pageserver(whole)[1]  # to its end (.done)

    async def spool() -> None:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"x" * 10

        async with GrowingFile(tmp_path / FETCHED_NAME, "t", "o", send) as growing:
            await growing.write(chunks())
            assert await asyncio.to_thread(growing.finish) == b"x" * 10

    old = os.umask(0o022)
    try:
        asyncio.run(spool())
    finally:
        os.umask(old)
    assert seen == [0o600]
    assert (tmp_path / FETCHED_NAME).stat().st_mode & 0o777 == 0o600


def test_the_disk_writes_leave_the_event_loop_free(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a pageserver or `neon snapshot recv` taking pushes, the loop writing the file serves
    every other connection: a slow disk (each write takes 0.2 s here) must not stop it. The
    chunks still land in order, the file ends with its `.done`, owner-only."""
    real_write = nfi._write_all

    def slow_disk(out: Any, data: bytes) -> None:
        time.sleep(0.2)
        real_write(out, data)

    monkeypatch.setattr(nfi, "_write_all", slow_disk)
    pieces = [bytes([i]) * (1000 + 37 * i) for i in range(5)]

    def send(whole: LocalNeonFile) -> bytes:
        return read_as_the_pageserver(whole)[1]

    async def spool() -> tuple[int, bytes]:
        ticks = 0

        async def heartbeat() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async def chunks() -> AsyncIterator[bytes]:
            for piece in pieces:
                yield piece

        beating = asyncio.ensure_future(heartbeat())
        await asyncio.sleep(0)
        async with nfi.GrowingFile(tmp_path / FETCHED_NAME, "t", "o", send) as growing:
            await growing.write(chunks())  # 1 s of writes
            during = ticks
            got = await asyncio.to_thread(growing.finish)
        beating.cancel()
        return during, got

    during, got = asyncio.run(spool())
    assert during >= 30, f"the loop ran {during} times in 1 s of disk writes"
    assert got == b"".join(pieces) == (tmp_path / FETCHED_NAME).read_bytes()
    assert (tmp_path / f"{FETCHED_NAME}.done").exists()
    assert (tmp_path / FETCHED_NAME).stat().st_mode & 0o777 == 0o600


def test_a_write_cancelled_midway_marks_the_file_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while a chunk is on the disk, the file is closed only once that write ended,
    and marked failed: the import ends with the fetch."""
    real_write = nfi._write_all
    writing = threading.Event()

    def slow_disk(out: Any, data: bytes) -> None:
        writing.set()
        time.sleep(0.3)
        real_write(out, data)  # the file is still open

    monkeypatch.setattr(nfi, "_write_all", slow_disk)
    seen: list[BaseException] = []

    def send(whole: LocalNeonFile) -> bytes:
        try:
            return read_as_the_pageserver(whole)[1]
        except Unavailable as exc:
            seen.append(exc)
            raise

    async def spool() -> None:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"a" * 100
            await asyncio.Event().wait()  # the sender stalls

        async with nfi.GrowingFile(tmp_path / FETCHED_NAME, "t", "o", send) as growing:
            task = asyncio.ensure_future(growing.write(chunks()))
            await asyncio.to_thread(writing.wait, 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(spool())
    assert (tmp_path / FETCHED_NAME).read_bytes() == b"a" * 100
    assert (tmp_path / f"{FETCHED_NAME}.failed").exists()
    assert [str(e) for e in seen] == ["the fetch of t was given up"]
