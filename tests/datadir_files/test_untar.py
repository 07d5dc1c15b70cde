"""The extractor's tablespace links: with `tablespace_links`, only a symlink member exactly
`pg_tblspc/OID` is recorded (never created); every other link stays refused."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import io
import mmap
import os
import platform
import subprocess
import sys
import tarfile
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

import datadir_files.untar
from datadir_files.tar_reader import MemberStart
from datadir_files.untar import UnsafeArchive, extract_basebackup, extract_chunks, extract_stream
from pageserver.basebackup.tar_stream import tar_header
from proto.errors import CorruptData
from tests.fifo import raised_within


def one_file_tar(name: str, payload: bytes) -> bytes:
    return files_tar((name, payload))


def files_tar(*files: tuple[str, bytes]) -> bytes:
    """A tar of regular files (name, data), in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in files:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def tar_with_link(name: str, target: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ok = tarfile.TarInfo("PG_VERSION")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"15\n"))
        for d in ("pg_tblspc", "base"):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        link = tarfile.TarInfo(name)
        link.type, link.linkname = tarfile.SYMTYPE, target
        tar.addfile(link)
    return buf.getvalue()


def test_tablespace_links_are_recorded_not_created(tmp_path: Path) -> None:
    links: dict[int, str] = {}
    data = tar_with_link("./pg_tblspc/16385", "/srv/far")
    extract_basebackup(io.BytesIO(data), tmp_path / "pgdata", links)
    assert links == {16385: "/srv/far"}
    assert list((tmp_path / "pgdata" / "pg_tblspc").iterdir()) == []
    # Without the caller asking, the same member is refused like any link.
    with pytest.raises(UnsafeArchive, match="symbolic link"):
        extract_basebackup(io.BytesIO(data), tmp_path / "other")


@pytest.mark.parametrize("name", ["pg_tblspc/16385/x", "base/16385", "pg_tblspc/ts", "16385"])
def test_other_links_stay_refused(tmp_path: Path, name: str) -> None:
    links: dict[int, str] = {}
    with pytest.raises(UnsafeArchive, match="symbolic link"):
        extract_basebackup(io.BytesIO(tar_with_link(name, "/etc")), tmp_path / "pgdata", links)
    assert links == {} and list(tmp_path.iterdir()) == []


def test_gzip_archives_are_read_and_cut_ones_refused(tmp_path: Path) -> None:
    """pg_basebackup -Ft -z writes base.tar.gz: recognised by its magic number; a cut gzip
    stream is one clear error and leaves nothing."""
    buf = io.BytesIO()
    payload = bytes(range(256)) * 20000  # 5 MiB: several MiB-sized pieces out of zlib
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("base/1/1259")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    extract_basebackup(io.BytesIO(buf.getvalue()), tmp_path / "pgdata")
    assert (tmp_path / "pgdata" / "base" / "1" / "1259").read_bytes() == payload
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(CorruptData, match="cut off"):
        extract_basebackup(io.BytesIO(buf.getvalue()[:-30]), work / "pgdata")
    assert list(work.iterdir()) == []


def test_extract_stream_abandons_the_extraction_when_its_source_fails(tmp_path: Path) -> None:
    """The whole tar arrived, then the source failed (a .neon file's checksums did not match):
    nothing is put in place."""
    data = tar_with_link("base/x", "/etc")[:1024] + bytes(1024)  # PG_VERSION and the end

    async def chunks() -> AsyncIterator[bytes]:
        yield data
        raise CorruptData("checksums.json does not match")

    with pytest.raises(CorruptData, match="checksums"):
        asyncio.run(extract_stream(chunks(), tmp_path / "pgdata"))
    assert list(tmp_path.iterdir()) == []


def test_extract_stream_stops_reading_after_a_hostile_member(tmp_path: Path) -> None:
    taken = 0

    async def chunks() -> AsyncIterator[bytes]:
        nonlocal taken
        yield tar_with_link("base/x", "/etc")
        for _ in range(10_000):  # 10 GiB that must not all be read
            taken += 1
            yield bytes(1 << 20)
            await asyncio.sleep(0)

    with pytest.raises(UnsafeArchive, match="symbolic link"):
        asyncio.run(extract_stream(chunks(), tmp_path / "pgdata"))
    assert taken < 100 and list(tmp_path.iterdir()) == []


class _GatedStream(io.BytesIO):
    """A stream that says when it has been read to its end."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.drained = threading.Event()

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        if not data:
            self.drained.set()
        return data


def test_extract_basebackup_reads_on_while_files_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream is read while the files are written (a pipe's writer, the pageserver, is not
    held up by the disk): here the writing of the first MiB waits until the whole 5 MiB
    stream was read, which reading and writing in turns would never reach."""
    payload = bytes(range(256)) * 20000  # 5 MiB: several reads
    stream = _GatedStream(one_file_tar("base/1/1259", payload))
    feed = datadir_files.untar._Extractor.feed
    waited: list[bool] = []

    def held_feed(self: datadir_files.untar._Extractor, data: bytes) -> None:
        if not waited:
            waited.append(stream.drained.wait(10))
        feed(self, data)

    monkeypatch.setattr(datadir_files.untar._Extractor, "feed", held_feed)
    extract_basebackup(stream, tmp_path / "pgdata")
    assert waited == [True]
    assert (tmp_path / "pgdata" / "base" / "1" / "1259").read_bytes() == payload


def test_extract_basebackup_stops_reading_after_a_hostile_member(tmp_path: Path) -> None:
    class Endless(io.RawIOBase):
        taken = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
            if self.taken == 0:
                data = tar_with_link("base/x", "/etc")
            else:
                data = bytes(min(len(b), 1 << 20))  # 10 GiB that must not all be read
                if self.taken > 10_000:
                    return 0
            self.taken += 1
            n = min(len(b), len(data))
            b[:n] = data[:n]
            return n

    source = Endless()
    with pytest.raises(UnsafeArchive, match="symbolic link"):
        extract_basebackup(io.BufferedReader(source), tmp_path / "pgdata")
    assert source.taken < 200 and list(tmp_path.iterdir()) == []


def test_a_fifo_put_at_a_members_name_fails_the_stream_not_blocks_it(tmp_path: Path) -> None:
    """The streamed extraction's staged directory is PostgreSQL's account's too: a FIFO it
    puts at the name of a member still to come is refused (O_EXCL: the directory is new),
    not opened (the writer blocked for good on it)."""
    target = tmp_path / "pgdata"

    async def chunks() -> AsyncIterator[bytes]:
        yield tar_header("a", 1, 0) + b"x".ljust(512, b"\0")
        for _ in range(3000):  # the writer's thread makes it as it starts
            if staged := list(tmp_path.glob("pgdata.tmp-*")):
                break
            await asyncio.sleep(0.01)
        os.mkfifo(staged[0] / "b")
        yield tar_header("b", 1 << 20, 0) + bytes(1 << 20) + bytes(1024)

    def run() -> None:
        asyncio.run(extract_stream(chunks(), target))

    error = raised_within(run, tmp_path)
    assert isinstance(error, UnsafeArchive) and "'b'" in str(error)
    assert not list(tmp_path.iterdir())  # the staged directory removed


def test_consume_in_thread_takes_the_next_chunks_while_one_is_consumed() -> None:
    """The consumer works on a chunk while the next ones arrive (a checkout in place applies
    on its own thread while the pageserver sends on): here the first chunk's consumption
    waits until the source gave its third, which taking chunks and consuming them in turns
    never reaches."""
    produced = threading.Event()
    got: list[bytes] = []
    waited: list[bool] = []

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(3):
            yield bytes([i]) * (datadir_files.untar._QUEUE_BATCH)
        produced.set()

    def consume(received: Iterator[bytes]) -> None:
        for chunk in received:
            if not waited:
                waited.append(produced.wait(10))
            got.append(chunk[:1])

    asyncio.run(datadir_files.untar.consume_in_thread(chunks(), consume))
    assert waited == [True] and got == [b"\0", b"\1", b"\2"]


def test_consume_in_thread_raises_either_sides_error_once_both_ended() -> None:
    """The source's error reaches the consumer as an abort (it stops, unfinished) and is
    raised; the consumer's error is raised and the source is read no further."""
    ended: list[str] = []

    async def failing() -> AsyncIterator[bytes]:
        yield b"x" * datadir_files.untar._QUEUE_BATCH
        raise CorruptData("cut off")

    def consume(received: Iterator[bytes]) -> None:
        try:
            for _ in received:
                pass
            ended.append("finished")
        except BaseException:
            ended.append("aborted")
            raise

    with pytest.raises(CorruptData, match="cut off"):
        asyncio.run(datadir_files.untar.consume_in_thread(failing(), consume))
    assert ended == ["aborted"]

    taken = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal taken
        while True:
            taken += 1
            yield bytes(1 << 20)
            await asyncio.sleep(0)

    def refuse(received: Iterator[bytes]) -> None:
        next(received)
        raise UnsafeArchive("no")

    with pytest.raises(UnsafeArchive, match="no"):
        asyncio.run(datadir_files.untar.consume_in_thread(endless(), refuse))
    assert taken < 100


_KEPT_TOP = """
import ctypes, sys
from pathlib import Path
from datadir_files.untar import extract_basebackup

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
        "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

extract_basebackup(sys.stdin.buffer, Path(sys.argv[1]))
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.free(libc.malloc(2 << 20))
print(int(libc.mallinfo2().keepcost >= 2 << 20))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_extract_basebackup_keeps_the_freed_heap_for_the_next_reads(tmp_path: Path) -> None:
    """Each MiB read from the stream is a new buffer freed once written: by default glibc
    gives the heap's top back after it and faults it in again for the next (a 1 GiB
    basebackup from a pipe: 26-74k page faults, 6k with the stream settings). After an
    extraction a freed 2 MiB block stays at the top of the heap: without the settings, the
    1 MiB reads raised the mmap threshold to 1 MiB only, and the block was mapped."""
    payload = bytes(range(256)) * 16384  # 4 MiB: several reads
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUN"))}
    out = subprocess.run(
        [sys.executable, "-c", _KEPT_TOP, str(tmp_path / "pgdata")],
        input=one_file_tar("base/1/1259", payload), capture_output=True, check=True, env=env,
    ).stdout  # fmt: skip
    assert out.split() == [b"1"]
    assert (tmp_path / "pgdata" / "base" / "1" / "1259").read_bytes() == payload


def test_a_file_extraction_does_without_asyncio() -> None:
    """`extract_basebackup` of a file or pipe (snapshot import from a file, bench.extract's
    unpacking process) needs no event loop: importing the module leaves asyncio out (~20 ms
    of a fresh process's start, more on a loaded box)."""
    probe = "import sys, datadir_files.untar; print('asyncio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, check=True).stdout
    assert out.split() == [b"False"]


def resident_pages(path: Path) -> int:
    """How many of the file's pages are in the page cache (mincore on a private mapping,
    whose untouched pages are the file's)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = path.stat().st_size
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        start = ctypes.c_char.from_buffer(mm)
        try:
            if libc.mincore(ctypes.byref(start), ctypes.c_size_t(size), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore")
        finally:
            del start
    return sum(v & 1 for v in vec)


@pytest.mark.parametrize("direct", ["1", None])
def test_large_files_are_written_past_the_page_cache_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: str | None
) -> None:
    """With NEON_DIRECT_WRITES=1 a file of whole 4 KiB blocks, 1 MiB or more (relation
    segments, WAL), is written with O_DIRECT: the same bytes, arriving in odd pieces, and
    none of its pages cached. By default (off: a slow volume would wait for the device at
    every MiB) every page just written is cached, as small files' always are."""
    if direct is None:
        monkeypatch.delenv(datadir_files.untar.DIRECT_WRITES_ENV, raising=False)
    else:
        monkeypatch.setenv(datadir_files.untar.DIRECT_WRITES_ENV, direct)
    big = os.urandom(3 << 20) + bytes(8192)
    small = b"15\n"
    raw = files_tar(("big", big), ("small", small))
    extract_chunks([raw[i : i + 100_003] for i in range(0, len(raw), 100_003)], tmp_path / "out")
    cached = resident_pages(tmp_path / "out/big")  # before reading it back
    if direct:
        assert cached == 0
    else:  # the kernel may reclaim a few under memory pressure on the shared box
        assert cached >= len(big) // mmap.PAGESIZE * 9 // 10
    assert resident_pages(tmp_path / "out/small") == 1
    assert (tmp_path / "out/big").read_bytes() == big
    assert (tmp_path / "out/small").read_bytes() == small


def test_a_refused_direct_write_goes_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device refusing O_DIRECT's alignment at the first write (EINVAL): that file is
    written through the page cache instead, whole."""
    real_write = os.write
    refused: list[int] = []

    def write(fd: int, data: Any) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(datadir_files.untar.os, "write", write)
    monkeypatch.setenv(datadir_files.untar.DIRECT_WRITES_ENV, "1")
    big = os.urandom(5 << 20)
    extract_chunks([one_file_tar("big", big)], tmp_path / "out")
    assert refused
    assert (tmp_path / "out/big").read_bytes() == big


def test_large_files_written_through_the_page_cache_get_their_blocks_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member of 1 MiB or more written through the page cache is preallocated at its
    start (fallocate: its whole size and blocks before its first data arrive), a smaller one
    is not; both come out whole."""
    monkeypatch.delenv(datadir_files.untar.DIRECT_WRITES_ENV, raising=False)
    big, small = os.urandom(3 << 20), os.urandom(200 << 10)
    seen: dict[str, tuple[int, int]] = {}
    out = tmp_path / "out"
    out.mkdir()
    raw = files_tar(("big", big), ("small", small))
    small_at = 512 + len(big) + 512  # its data: after big's header, data and its own header

    def batches() -> Iterator[list[bytes]]:
        # each member's header and first 100 kB: fed when the next batch is asked for
        yield [raw[: 512 + 100_000]]
        st = os.stat(out / "big")
        seen["big"] = (st.st_size, st.st_blocks * 512)
        yield [raw[512 + 100_000 : small_at + 100_000]]
        st = os.stat(out / "small")
        seen["small"] = (st.st_size, st.st_blocks * 512)
        yield [raw[small_at + 100_000 :]]

    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        datadir_files.untar.extract_into_dir_fd(batches(), fd)
    finally:
        os.close(fd)
    assert seen["big"][0] == len(big) and seen["big"][1] >= len(big)
    assert seen["small"][0] == 100_000
    assert (out / "big").read_bytes() == big
    assert (out / "small").read_bytes() == small


def test_preallocate_says_where_it_cannot() -> None:
    """A descriptor fallocate refuses (a pipe: ESPIPE) is left as it is: False."""
    r, w = os.pipe()
    try:
        assert datadir_files.untar.preallocate(w, 1 << 20) is False
    finally:
        os.close(r)
        os.close(w)


def test_preallocation_never_exceeds_the_largest_legitimate_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tar header declaring more than a relation segment (a hostile or damaged archive)
    reserves no more than PREALLOCATE_MAX_BYTES before its data arrive, and a stream cut
    short there leaves no more than what arrived plus that cap; a member above the cap still
    comes out whole. The cap is lowered to 4 MiB so that a 64 MiB claim shows it (the old
    code reserved all 64 MiB)."""
    assert datadir_files.untar.PREALLOCATE_MAX_BYTES == 1 << 30  # RELSEG_SIZE x BLCKSZ
    monkeypatch.delenv(datadir_files.untar.DIRECT_WRITES_ENV, raising=False)
    cap, claimed, arrived = 4 << 20, 64 << 20, 100_000
    monkeypatch.setattr(datadir_files.untar, "PREALLOCATE_MAX_BYTES", cap)

    def on_disk(path: Path) -> tuple[int, int]:
        st = os.stat(path)
        return st.st_size, st.st_blocks * 512

    info = tarfile.TarInfo("huge")
    info.size = claimed
    seen: list[tuple[int, int]] = []
    out = tmp_path / "cut"
    out.mkdir()

    def cut_short() -> Iterator[list[bytes]]:
        yield [info.tobuf(format=tarfile.GNU_FORMAT) + os.urandom(arrived)]
        seen.append(on_disk(out / "huge"))  # the stream then ends inside the member

    fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(CorruptData):
            datadir_files.untar.extract_into_dir_fd(cut_short(), fd)
    finally:
        os.close(fd)
    seen.append(on_disk(out / "huge"))
    for size, blocks in seen:
        assert size <= cap and blocks <= arrived + cap + (1 << 20), (size, blocks)
    assert seen[0][1] >= cap  # preallocated up to the cap: the test measures something

    above = os.urandom(cap + (2 << 20))  # written whole past its preallocated blocks
    extract_chunks([one_file_tar("above", above)], tmp_path / "whole")
    assert (tmp_path / "whole/above").read_bytes() == above


def written_bytes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the extractor's os.write calls from now on (in order)."""
    sizes: list[int] = []
    real_write = os.write

    def counting(fd: int, data: Any) -> int:
        n = real_write(fd, data)
        sizes.append(n)
        return n

    monkeypatch.setattr(datadir_files.untar.os, "write", counting)
    return sizes


def test_zeros_of_a_preallocated_file_are_not_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member allocated up front (fallocate: its blocks read as zeros) is written but for
    its pieces of zeros (a WAL segment: 16 MiB, its records in the first pages), and reads
    back whole: data, zeros, data again past them, zeros to its end."""
    monkeypatch.delenv(datadir_files.untar.DIRECT_WRITES_ENV, raising=False)
    piece = 1 << 20
    segment = bytearray(6 * piece)
    segment[:300] = os.urandom(300)  # its first records
    segment[3 * piece + 17 : 3 * piece + 4000] = os.urandom(4000 - 17)  # after skipped zeros
    raw = one_file_tar("000000010000000000000003", bytes(segment))
    sizes = written_bytes(monkeypatch)
    extract_chunks([raw[at : at + piece] for at in range(0, len(raw), piece)], tmp_path / "out")
    out = tmp_path / "out/000000010000000000000003"
    assert out.read_bytes() == segment
    assert sum(sizes) <= 3 * piece, sizes  # the two pieces holding data, not the four of zeros


def test_zeros_past_the_preallocated_blocks_are_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past what was allocated up front (a member above PREALLOCATE_MAX_BYTES, lowered here)
    every piece is written, zeros too: the file ends at its size."""
    monkeypatch.delenv(datadir_files.untar.DIRECT_WRITES_ENV, raising=False)
    monkeypatch.setattr(datadir_files.untar, "PREALLOCATE_MAX_BYTES", 2 << 20)
    data = os.urandom(100) + bytes((5 << 20) - 100)
    raw = one_file_tar("big", data)
    sizes = written_bytes(monkeypatch)
    extract_chunks([raw[at : at + (1 << 20)] for at in range(0, len(raw), 1 << 20)], tmp_path / "o")
    assert (tmp_path / "o/big").read_bytes() == data
    assert sum(sizes) >= len(data) - (2 << 20)


def reference_member_path(member: MemberStart) -> PurePosixPath | None:
    """member_path as it was, through PurePosixPath (the new one splits the name itself)."""
    name = member.name
    path = PurePosixPath(name)
    if "\0" in name or "\\" in name or path.is_absolute():
        raise UnsafeArchive(f"refusing tar member {name!r}: absolute or unusual path")
    parts = [p for p in path.parts if p != "."]
    if ".." in parts:
        raise UnsafeArchive(f"refusing tar member {name!r}: it leads outside the target")
    if member.kind not in ("file", "directory"):
        raise UnsafeArchive(f"refusing tar member {name!r}: it is a {member.kind}")
    return PurePosixPath(*parts) if parts else None


@pytest.mark.parametrize(
    "name",
    [
        "base/5/16384", "./base/5/16384", "base//5/./16384", "base/5/", ".", "./", "", "a/../b",
        "..", "/etc/passwd", "//x", "a\\b", "a\0b", "neon-delta/base/5/1259", "neon-delta",
        "neon-delta/", "./neon-delta/./global//1260", "x/./.", "....", "a/.../b", " / ",
    ],
)  # fmt: skip
@pytest.mark.parametrize("kind", ["file", "directory", "symbolic link"])
def test_member_path_is_pathlibs(name: str, kind: str) -> None:
    """The member's path, split without pathlib, is what PurePosixPath made of it (the same
    components, the same refusals)."""
    member = MemberStart(name, kind, 0, 0o600, "")
    try:
        expected: PurePosixPath | str | None = reference_member_path(member)
    except UnsafeArchive as exc:
        expected = exc.message
    try:
        got: PurePosixPath | str | None = datadir_files.untar.member_path(member)
    except UnsafeArchive as exc:
        got = exc.message
    assert got == expected
