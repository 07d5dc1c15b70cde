"""The extractor's tablespace links: with `tablespace_links`, only a symlink member exactly
`pg_tblspc/OID` is recorded (never created); every other link stays refused."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from cli.untar import UnsafeArchive, extract_basebackup


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
