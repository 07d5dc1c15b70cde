"""The tablespaces of a data directory on disk and the locations import records for them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pageserver.ingest.datadir_tablespaces import tablespace_locations, tablespaces
from proto.errors import InvalidArgument

VERSION = "PG_15_202209061"


def test_symlinked_in_place_and_mapped_tablespaces(tmp_path: Path) -> None:
    pgdata, far = tmp_path / "pgdata", tmp_path / "far"
    (far / VERSION).mkdir(parents=True)
    (pgdata / "pg_tblspc" / "16390" / VERSION).mkdir(parents=True)  # in place
    (pgdata / "pg_tblspc" / "16391").mkdir()  # no PostgreSQL 15 files yet
    (pgdata / "pg_tblspc" / "not-an-oid").mkdir()
    os.symlink(far, pgdata / "pg_tblspc" / "16385")
    assert tablespace_locations(pgdata) == {16385: str(far), 16390: "", 16391: ""}
    assert tablespaces(pgdata) == {
        oid: pgdata / "pg_tblspc" / str(oid) / VERSION for oid in (16385, 16390, 16391)
    }
    # A tablespace_map names where a recovered backup's in-place tablespace came from.
    (pgdata / "tablespace_map").write_bytes(b"16390 /srv/source\n")
    assert tablespace_locations(pgdata)[16390] == "/srv/source"


@pytest.mark.parametrize("kind", ["dangling symlink", "file"])
def test_an_entry_without_its_files_is_refused(tmp_path: Path, kind: str) -> None:
    entry = tmp_path / "pgdata" / "pg_tblspc" / "16391"
    entry.parent.mkdir(parents=True)
    if kind == "file":
        entry.write_bytes(b"")
    else:
        os.symlink(tmp_path / "gone", entry)
    what = "a dangling symlink" if kind != "file" else "not a directory"
    with pytest.raises(InvalidArgument, match=f"16391 is {what}"):
        tablespaces(tmp_path / "pgdata")
