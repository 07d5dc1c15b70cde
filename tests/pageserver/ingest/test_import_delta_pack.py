"""A delta's fork members extracted into one pack file (snapfile/delta.py PACK_NAME) and read
from it by the pageserver's delta import, as they were from a file each.

An extracted delta of a pgbench database made ~760 files, ~720 of them a bare 16-byte fork
header, each created by the receiver, opened by the pageserver and removed afterwards: most
of a neon:// delta push's time on the receiving side for a change of a few pages (issue 12).
"""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from datadir_files.untar import UnsafeArchive, extract_stream
from pageserver.ingest.import_delta import READ_RECORDS, _add_member, _DeltaForks, _PackedForks
from pageserver.storage.keys import rel_block_key
from pg15.constants import BLCKSZ
from proto.errors import CorruptData
from snapfile.delta import (
    BLOCK_NUMBER,
    PACK_NAME,
    fork_header,
    pack_record_header,
    read_pack_index,
)

FORKS = {
    "global/1260": (3, [1]),  # fork path: (size in blocks, changed blocks)
    "base/5/16384": (10, [0, 7, 9]),
    "base/5/16384_fsm": (3, []),
    "base/5/16390": (0, []),
    "base/1/1259": (40, [39]),
}


def fork_member(nblocks: int, blocks: list[int]) -> bytes:
    body = b"".join(BLOCK_NUMBER.pack(b) + bytes([b % 251 + 1]) * BLCKSZ for b in blocks)
    return fork_header(nblocks) + body


def delta_tar(extra: dict[str, bytes] | None = None) -> bytes:
    """A delta's tar as the daemon writes one: whole files, then one member per fork."""
    members = {
        "PG_VERSION": b"15\n",
        "global/pg_control": b"c" * 8192,
        "base/5/PG_VERSION": b"15\n",
    }
    members |= {f"neon-delta/{path}": fork_member(*spec) for path, spec in FORKS.items()}
    members |= extra or {}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("base/", "base/5/", "neon-delta/", "neon-delta/base/"):
            info = tarfile.TarInfo(name.rstrip("/"))
            info.type, info.mode = tarfile.DIRTYPE, 0o700
            tar.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


async def pieces(data: bytes, size: int = 3000) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        yield data[at : at + size]


def extract(data: bytes, target: Path, pack: bool) -> None:
    asyncio.run(extract_stream(pieces(data), target, pack_deltas=pack))


def test_fork_members_go_into_one_pack_and_nothing_else(tmp_path: Path) -> None:
    target = tmp_path / "delta"
    extract(delta_tar(), target, pack=True)
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert files == ["PG_VERSION", "base/5/PG_VERSION", "global/pg_control", PACK_NAME]
    assert not (target / "neon-delta").exists()
    pack = (target / PACK_NAME).read_bytes()
    members = read_pack_index(lambda at, n: pack[at : at + n], len(pack))
    assert [m.fork_path for m in members] == list(FORKS)
    for member in members:
        data = pack[member.offset : member.offset + member.size]
        assert data == fork_member(*FORKS[member.fork_path])
    assert (target / PACK_NAME).stat().st_mode & 0o777 == 0o600


def test_the_pack_is_written_in_few_large_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delta of many forks with no page (most of a 1% delta's ~730) fills its pack in a
    few writes, not two per member (~1500 syscalls), with the same bytes."""
    import datadir_files.untar

    many = {f"neon-delta/base/5/{20000 + i}": fork_header(i % 7) for i in range(600)}
    pages = [(b, bytes([b + 1]) * BLCKSZ) for b in range(200)]
    big = fork_header(200) + b"".join(BLOCK_NUMBER.pack(b) + p for b, p in pages)
    target = tmp_path / "delta"
    pack_writes: list[int] = []
    real_write = os.write

    def counting(fd: int, data: bytes) -> int:
        n = real_write(fd, data)
        if os.readlink(f"/proc/self/fd/{fd}").endswith(PACK_NAME):
            pack_writes.append(n)
        return n

    monkeypatch.setattr(datadir_files.untar.os, "write", counting)
    extract(delta_tar({**many, "neon-delta/base/5/30000": big}), target, pack=True)
    pack = (target / PACK_NAME).read_bytes()
    members = read_pack_index(lambda at, n: pack[at : at + n], len(pack))
    assert len(members) == len(FORKS) + len(many) + 1
    for member in members:
        data = pack[member.offset : member.offset + member.size]
        path = "neon-delta/" + member.fork_path
        assert data == (fork_member(*FORKS[member.fork_path]) if member.fork_path in FORKS
                        else many.get(path, big))  # fmt: skip
    assert sum(pack_writes) == len(pack)
    assert len(pack_writes) <= 2 + len(pack) // (1 << 20), len(pack_writes)


def test_without_packing_each_member_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "delta"
    extract(delta_tar(), target, pack=False)
    assert not (target / PACK_NAME).exists()
    for path, spec in FORKS.items():
        assert (target / "neon-delta" / path).read_bytes() == fork_member(*spec)


def test_a_member_named_as_the_pack_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafeArchive, match=PACK_NAME):
        extract(delta_tar({PACK_NAME: b"x"}), tmp_path / "delta", pack=True)
    assert not (tmp_path / "delta").exists()


class Recorded:
    """An ImageSink that keeps what it is given, in order."""

    def __init__(self) -> None:
        self.values: list[tuple[bytes, bytes]] = []

    def add(self, key: bytes, data: bytes) -> None:
        self.values.append((bytes(key), bytes(data)))


def imported(forks: _DeltaForks | _PackedForks, datadir: Path) -> list[tuple[bytes, bytes]]:
    """What the delta import puts for the forks of global/, base/5 and base/1."""
    sink = Recorded()
    for spc, db, directory in ((1664, 0, "global"), (1663, 5, "base/5"), (1663, 1, "base/1")):
        found = forks.find(datadir / directory)
        for (rel, fork), what in sorted(found.items()):
            forks.add_fork(sink, spc, db, rel, fork, what)  # type: ignore[arg-type]
    return sink.values


def test_the_pack_imports_the_values_the_member_files_did(tmp_path: Path) -> None:
    packed, files = tmp_path / "packed", tmp_path / "files"
    extract(delta_tar(), packed, pack=True)
    extract(delta_tar(), files, pack=False)
    with _PackedForks(packed, packed / PACK_NAME) as forks:
        from_pack = imported(forks, packed)
    from_files = imported(_DeltaForks(files), files)
    pages = sum(len(blocks) for _, blocks in FORKS.values())
    assert len(from_pack) == pages + len(FORKS)  # every changed page and every fork's size
    assert from_pack == from_files


def test_a_damaged_pack_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "delta"
    extract(delta_tar(), target, pack=True)
    pack = target / PACK_NAME
    whole = pack.read_bytes()
    pack.write_bytes(whole[:-100])  # cut inside the last member
    with pytest.raises(CorruptData, match="cut short"):
        _PackedForks(target, pack)
    twice = pack_record_header("base/5/16384", 16) + fork_header(10)
    pack.write_bytes(whole + twice)
    with pytest.raises(CorruptData, match="twice"):
        _PackedForks(target, pack)
    cut_page = fork_header(10) + BLOCK_NUMBER.pack(3) + b"p" * 100
    pack.write_bytes(pack_record_header("base/5/16400", len(cut_page)) + cut_page)
    with _PackedForks(target, pack) as forks, pytest.raises(CorruptData, match="16400"):
        imported(forks, target)


def test_a_pack_that_is_a_link_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "delta"
    extract(delta_tar(), target, pack=True)
    elsewhere = tmp_path / "elsewhere.pack"
    os.rename(target / PACK_NAME, elsewhere)
    (target / PACK_NAME).symlink_to(elsewhere)
    with pytest.raises(OSError):
        _PackedForks(target, target / PACK_NAME)


def test_a_member_is_read_in_few_large_reads_and_a_cut_one_is_refused() -> None:
    """A fork member's records are read READ_RECORDS at a time (a read per block number and
    one per page were two system calls a page, half of a 1% delta's import); a member the
    file cuts short, inside a record or where one ends, is CorruptData naming it."""
    member = fork_member(600, list(range(0, 600, 2)))  # 300 pages
    reads: list[int] = []

    def read_from(data: bytes) -> Callable[[int], bytes]:
        source = io.BytesIO(data)

        def read(n: int) -> bytes:
            reads.append(n)
            return source.read(n)

        return read

    sink = Recorded()
    _add_member(sink, 1663, 5, 16384, 0, read_from(member), len(member), "m")
    assert len(sink.values) == 301 and len(reads) == 1 + -(-300 // READ_RECORDS)
    assert sink.values[1] == (rel_block_key(1663, 5, 16384, 0, 2), member[16 + 8196 + 4 :][:BLCKSZ])
    five = 16 + 5 * (4 + BLCKSZ)  # the header and five records: blocks 0 to 8
    cuts = {five: "after block 8", five + 2: "inside a block number", five + 99: "inside block 10",
            16: "after its header"}  # fmt: skip
    for cut, error in cuts.items():
        with pytest.raises(CorruptData, match=f"'m' ends {error}"):
            _add_member(Recorded(), 1663, 5, 16384, 0, read_from(member[:cut]), len(member), "m")


def test_a_delta_takes_its_wal_segment_sparse_and_nothing_else(tmp_path: Path) -> None:
    """A delta file's WAL segment is a sparse member (snapfile/manifest.py
    DELTA_FORMAT_VERSION), extracted whole; a sparse member under another name would make
    the receiver write up to 1 GiB of zeros for a few bytes pushed: refused."""
    from pageserver.basebackup.tar_stream import tar_sparse_file

    wal = "pg_wal/000000010000000000000001"
    for name in (wal, "global/pg_filenode.map"):
        sparse = b"".join(tar_sparse_file(name, 16 << 20, [(0, b"r" * 8192)], 1))
        members = delta_tar()
        with tarfile.open(fileobj=io.BytesIO(members)) as tar:
            last = tar.getmembers()[-1]
        end = last.offset_data + -(-last.size // 512) * 512  # where the end-of-archive begins
        archive = members[:end] + sparse + bytes(1024)
        target = tmp_path / name.replace("/", "-")
        if name != wal:
            with pytest.raises(CorruptData, match=r"'global/pg_filenode\.map' is a GNU sparse"):
                extract(archive, target, pack=True)
            continue
        extract(archive, target, pack=True)
        assert (target / wal).read_bytes() == b"r" * 8192 + bytes((16 << 20) - 8192)
