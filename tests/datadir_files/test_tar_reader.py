"""The sans-I/O tar reader against archives written by Python's tarfile (ustar, GNU, pax) and
by GNU tar, fed in any chunking: the same members, kinds, sizes and bytes."""

from __future__ import annotations

import io
import random
import re
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from datadir_files.tar_reader import (
    ArchiveEnd,
    MemberData,
    MemberEnd,
    MemberStart,
    TarEvent,
    TarFormatError,
    TarReader,
)
from pg15.datadir_layout import WAL_SEGMENT_MEMBER

LONG = "base/16384/" + "d" * 120 + "/" + "f" * 90  # beyond ustar's 100 + 155 name fields


def make_archive(fmt: int, files: dict[str, bytes], *, link_to: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        info = tarfile.TarInfo("base")
        info.type = tarfile.DIRTYPE
        info.mode = 0o700
        tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o600
            tar.addfile(info, io.BytesIO(data))
        if link_to:
            info = tarfile.TarInfo("pg_tblspc/16500")
            info.type = tarfile.SYMTYPE
            info.linkname = link_to
            tar.addfile(info)
    return buf.getvalue()


def read_all(
    archive: bytes, sizes: list[int], *, sparse_up_to: int = 0,
    sparse_names: re.Pattern[str] | None = None,
) -> list[tuple[str, str, int, bytes, str]]:  # fmt: skip
    """(name, kind, size, data, linkname) per member, feeding `archive` in `sizes` pieces."""
    reader = TarReader(sparse_up_to=sparse_up_to, sparse_names=sparse_names)
    events: list[TarEvent] = []
    pos, i = 0, 0
    while pos < len(archive):
        n = max(1, sizes[i % len(sizes)]) if sizes else len(archive)
        events.extend(
            MemberData(bytes(e.data)) if isinstance(e, MemberData) else e  # type: ignore[arg-type]
            for e in reader.feed(archive[pos : pos + n])
        )
        pos, i = pos + n, i + 1
    events.extend(reader.finish())
    assert isinstance(events[-1], ArchiveEnd)
    members: list[tuple[str, str, int, bytes, str]] = []
    current: MemberStart | None = None
    data = bytearray()
    for event in events[:-1]:
        if isinstance(event, MemberStart):
            assert current is None
            current, data = event, bytearray()
        elif isinstance(event, MemberData):
            data += event.data
        else:
            assert isinstance(event, MemberEnd) and current is not None
            members.append(
                (current.name, current.kind, current.size, bytes(data), current.linkname)
            )
            current = None
    assert current is None
    return members


FILES = {
    "base/1/1259": bytes(range(256)) * 40,
    "global/pg_control": b"\x01" * 8192,
    "PG_VERSION": b"15\n",
    "empty": b"",
    "exact": b"x" * 512,
    LONG: b"long name\n",
}


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reads_what_tarfile_writes(fmt: int) -> None:
    files = dict(FILES)
    if fmt == tarfile.USTAR_FORMAT:
        files[LONG[:95] + "/" + "g" * 90] = files.pop(LONG)  # ustar splits it into prefix/name
    archive = make_archive(fmt, files, link_to="/srv/tblspc")
    got = read_all(archive, [])
    assert got[0] == ("base", "directory", 0, b"", "")
    assert got[1:-1] == [(n, "file", len(d), d, "") for n, d in files.items()]
    assert got[-1] == ("pg_tblspc/16500", "symbolic link", 0, b"", "/srv/tblspc")


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=6))
def test_any_chunking_gives_the_same_members(sizes: list[int]) -> None:
    archive = make_archive(tarfile.PAX_FORMAT, FILES)
    assert read_all(archive, sizes) == read_all(archive, [])


def test_reads_gnu_tar_output(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "base" / "5").mkdir(parents=True)
    data = random.Random(1).randbytes(70000)
    (src / "base" / "5" / "16384").write_bytes(data)
    (src / ("n" * 150)).write_bytes(b"gnu long name")
    archive = subprocess.run(
        ["tar", "-C", str(src), "-cf", "-", "--sort=name", "."], capture_output=True, check=True
    ).stdout
    got = {m[0]: m for m in read_all(archive, [4096])}
    assert got["./base/5/16384"][3] == data
    assert got["./" + "n" * 150][3] == b"gnu long name"


def test_a_cut_archive_is_refused_naming_the_member() -> None:
    archive = make_archive(tarfile.PAX_FORMAT, {"base/1/1259": b"a" * 5000})
    # Blocks: the directory's header, the file's header, 10 blocks of data, the end.
    for cut in (100, 1024 + 10, 1024 + 5120):  # in a header, in the data, before the end
        reader = TarReader()
        with pytest.raises(TarFormatError, match="cut off"):
            list(reader.feed(archive[:cut]))
            list(reader.finish())
    reader = TarReader()
    list(reader.feed(archive[: 1024 + 10]))
    with pytest.raises(TarFormatError, match="inside member 'base/1/1259'"):
        list(reader.finish())


def test_a_damaged_header_is_refused() -> None:
    archive = bytearray(make_archive(tarfile.USTAR_FORMAT, {"a": b"x"}))
    archive[10] ^= 0x20  # a name byte of the first member's header
    with pytest.raises(TarFormatError, match="offset 0 has a bad checksum"):
        list(TarReader().feed(bytes(archive)))


def test_data_after_the_end_block_is_not_read() -> None:
    archive = make_archive(tarfile.USTAR_FORMAT, {"a": b"x"}) + b"garbage" * 100
    assert [m[0] for m in read_all(archive, [700])] == ["base", "a"]


def sparse_archive(name: str, size: int, regions: list[tuple[int, bytes]]) -> bytes:
    """A GNU sparse member (format 1.0) as a checkout's delta carries its WAL segment, then
    a plain member and the end."""
    from pageserver.basebackup.tar_stream import tar_file, tar_sparse_file

    parts = [*tar_sparse_file(name, size, regions, 1), *tar_file("after", 3, [b"abc"], 1)]
    return b"".join(parts) + bytes(1024)


def with_regions(size: int, regions: list[tuple[int, bytes]]) -> bytes:
    data = bytearray(size)
    for offset, part in regions:
        data[offset : offset + len(part)] = part
    return bytes(data)


SPARSE_REGIONS = [(0, b"a" * 8192), (5 * 8192, b"b" * 8192), (3 << 20, b"c" * 100)]


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 70000), min_size=1, max_size=6))
def test_a_sparse_member_reads_as_its_bytes(sizes: list[int]) -> None:
    """Its holes come as zeros, in any chunking; tarfile extracts the same bytes (so GNU
    tar's readers and ours agree on what the writer means)."""
    size = 4 << 20
    archive = sparse_archive("pg_wal/000000010000000000000001", size, SPARSE_REGIONS)
    want = with_regions(size, SPARSE_REGIONS)
    assert read_all(archive, sizes, sparse_up_to=size) == [
        ("pg_wal/000000010000000000000001", "file", size, want, ""),
        ("after", "file", 3, b"abc", ""),
    ]
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        extracted = tar.extractfile("pg_wal/000000010000000000000001")
        assert extracted is not None and extracted.read() == want


def test_reads_gnu_tar_sparse_output(tmp_path: Path) -> None:
    """GNU tar's own sparse files (format 1.0 under --format=pax), a hole at the end too."""
    path = tmp_path / "f"
    with path.open("wb") as f:
        f.truncate(3 << 20)
        f.seek(1 << 20)
        f.write(b"z" * 5000)
    archive = subprocess.run(
        ["tar", "--sparse", "--format=pax", "-C", str(tmp_path), "-cf", "-", "f"],
        capture_output=True,
        check=True,
    ).stdout
    got = read_all(archive, [4096], sparse_up_to=3 << 20)
    assert got == [("f", "file", 3 << 20, path.read_bytes(), "")]


def _pax_member(records: dict[str, str], stored: bytes) -> bytes:
    info = tarfile.TarInfo("GNUSparseFile.0/f")
    info.size = len(stored)
    info.pax_headers = records
    head = info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="strict")
    return head + stored + bytes(-len(stored) % 512) + bytes(1024)


SPARSE_1_0 = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "f"}


@pytest.mark.parametrize(
    ("records", "sparse_map", "data", "why"),
    [
        ({"GNU.sparse.map": "0,10", "GNU.sparse.size": "10"}, b"", b"x" * 10, "format not read"),
        ({**SPARSE_1_0, "GNU.sparse.realsize": "x"}, b"1\n0\n1\n", b"x", "bad sparse header"),
        ({**SPARSE_1_0, "GNU.sparse.realsize": "100"}, b"2\n50\n5\n0\n5\n", b"x" * 10,
         "out of order"),
        ({**SPARSE_1_0, "GNU.sparse.realsize": "100"}, b"1\n98\n5\n", b"x" * 5, "past its end"),
        ({**SPARSE_1_0, "GNU.sparse.realsize": "100"}, b"1\n0\n5\n", b"x" * 6, "does not match"),
        ({**SPARSE_1_0, "GNU.sparse.realsize": "100"}, b"1\n0\nfive\n", b"x", "not decimal"),
        ({**SPARSE_1_0, "GNU.sparse.realsize": "100"}, b"1\n0\n" + b"0" * 508, b"",
         "cut off"),
    ],
)  # fmt: skip
def test_a_bad_sparse_member_is_refused(
    records: dict[str, str], sparse_map: bytes, data: bytes, why: str
) -> None:
    stored = sparse_map.ljust(512, b"\0") + data if sparse_map else data
    with pytest.raises(TarFormatError, match=why):
        read_all(_pax_member(records, stored), [], sparse_up_to=1 << 30)


def test_a_sparse_member_is_refused_where_not_asked_for() -> None:
    """Only a checkout's stream carries one (its WAL segment): anywhere else a few KiB of
    archive would stand for up to 2^63 bytes of zeros written out."""
    archive = sparse_archive("pg_wal/000000010000000000000001", 4 << 20, SPARSE_REGIONS)
    with pytest.raises(TarFormatError, match="'pg_wal/000000010000000000000001' is a GNU sparse"):
        read_all(archive, [])
    with pytest.raises(TarFormatError, match="larger than"):  # asked for, but not as large
        read_all(archive, [], sparse_up_to=(4 << 20) - 1)


def test_a_huge_sparse_size_is_refused() -> None:
    """A 3 KiB archive declaring 2^50 bytes and no region was a 2^50-byte member of zeros."""
    records = {**SPARSE_1_0, "GNU.sparse.realsize": str(1 << 50)}
    with pytest.raises(TarFormatError, match="'f' is a GNU sparse file larger than"):
        read_all(_pax_member(records, b"0\n".ljust(512, b"\0")), [], sparse_up_to=1 << 30)


@pytest.mark.parametrize(
    ("records", "sparse_map"),
    [
        ({**SPARSE_1_0, "GNU.sparse.realsize": "9" * 5000}, b"0\n"),
        ({**SPARSE_1_0, "GNU.sparse.realsize": "100"}, b"1\n" + b"0" * 5000 + b"\n5\n"),
        ({**SPARSE_1_0, "GNU.sparse.realsize": "100"}, b"1\n0\n" + b"0" * 5000 + b"5\n"),
        ({**SPARSE_1_0, "GNU.sparse.realsize": "100"}, b"0" * 5000 + b"1\n0\n5\n"),
        ({**SPARSE_1_0, "GNU.sparse.realsize": "\u00b2"}, b"0\n"),  # str.isdigit() holds
        ({"size": "9" * 5000}, b""),
        ({"size": "\u00b2"}, b""),
    ],
)
def test_an_overlong_or_odd_number_is_a_format_error(
    records: dict[str, str], sparse_map: bytes
) -> None:
    """Not int()'s ValueError (over 4,300 digits, or a digit that is no ASCII one): a
    traceback, where a bad archive is refused."""
    stored = sparse_map.ljust(512 * (len(sparse_map) // 512 + 1), b"\0") + b"x" * 5
    with pytest.raises(TarFormatError) as caught:
        read_all(_pax_member(records, stored), [], sparse_up_to=1 << 30)
    assert type(caught.value) is TarFormatError


def test_sparse_names_read_one_sparse_member_so_named() -> None:
    """A delta's reader takes one sparse member, its WAL segment: a few bytes of archive
    declaring 1 GiB of zeros under any other name, or a second one, are refused."""
    wal = "pg_wal/000000010000000000000001"
    archive = sparse_archive(wal, 4 << 20, SPARSE_REGIONS)
    got = read_all(archive, [], sparse_up_to=1 << 30, sparse_names=WAL_SEGMENT_MEMBER)
    assert got[0][0] == wal and got[0][3] == with_regions(4 << 20, SPARSE_REGIONS)
    other = sparse_archive("global/pg_filenode.map", 4 << 20, SPARSE_REGIONS)
    with pytest.raises(
        TarFormatError, match=r"'global/pg_filenode\.map' is a GNU sparse file, not"
    ):
        read_all(other, [], sparse_up_to=1 << 30, sparse_names=WAL_SEGMENT_MEMBER)
    twice = archive[: -1024 - 1024] + archive  # the sparse member, then all of it again
    with pytest.raises(TarFormatError, match="second GNU sparse file"):
        read_all(twice, [], sparse_up_to=1 << 30, sparse_names=WAL_SEGMENT_MEMBER)
