"""The extractor's tablespace links: with `tablespace_links`, only a symlink member exactly
`pg_tblspc/OID` is recorded (never created); every other link stays refused."""

from __future__ import annotations

import asyncio
import io
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cli.untar import UnsafeArchive, extract_basebackup, extract_stream
from proto.errors import CorruptData


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
