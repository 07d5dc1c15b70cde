"""A backup's tablespaces placed in place in the recovery directory, their source locations
kept (cli/backup_tablespaces.py), and what import_datadir then records for them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli.backup_tablespaces import (
    check_in_place,
    move_in_place,
    plain_tablespace_locations,
    tablespace_archive_oid,
    tablespace_archives,
    take_tablespace_map,
    write_tablespace_locations,
)
from pageserver.ingest.datadir_tablespaces import tablespace_locations
from proto.errors import CorruptData

VERSION = "PG_15_202209061"


def test_tablespace_archive_names() -> None:
    assert tablespace_archive_oid("16385.tar") == 16385
    assert tablespace_archive_oid("16385.tar.gz") == 16385
    assert tablespace_archive_oid("16385.tar.zst") == 16385
    for name in (
        "base.tar",
        "pg_wal.tar",
        "16385",
        "16385.tar.bz2",
        "x16385.tar",
        "backup_manifest",
    ):
        assert tablespace_archive_oid(name) is None, name


def test_archives_of_a_tar_backup(tmp_path: Path) -> None:
    for name in ("base.tar", "pg_wal.tar", "16385.tar", "16390.tar.zst", "backup_manifest"):
        (tmp_path / name).write_bytes(b"")
    assert tablespace_archives(tmp_path) == {
        16385: tmp_path / "16385.tar",
        16390: tmp_path / "16390.tar.zst",
    }
    (tmp_path / "16385.tar.gz").write_bytes(b"")
    with pytest.raises(CorruptData, match="two archives of tablespace 16385"):
        tablespace_archives(tmp_path)


def test_map_is_taken_out_before_recovery_and_written_back(tmp_path: Path) -> None:
    pgdata = tmp_path / "pgdata"
    (pgdata / "pg_tblspc").mkdir(parents=True)
    assert take_tablespace_map(pgdata) == {}
    (pgdata / "tablespace_map").write_bytes(b"16385 /srv/far\n")
    locations = take_tablespace_map(pgdata)
    assert locations == {16385: "/srv/far"} and not (pgdata / "tablespace_map").exists()
    with pytest.raises(CorruptData, match="16385 but their files are missing"):
        check_in_place(pgdata, locations)
    staged = tmp_path / "staged" / "16385"
    (staged / VERSION / "5").mkdir(parents=True)
    (staged / VERSION / "5" / "16400").write_bytes(bytes(8192))
    move_in_place(pgdata, {16385: staged})
    check_in_place(pgdata, locations)
    assert (pgdata / "pg_tblspc" / "16385" / VERSION / "5" / "16400").is_file()
    with pytest.raises(CorruptData, match="pg_tblspc/16385 and an archive"):
        (tmp_path / "again").mkdir()
        move_in_place(pgdata, {16385: tmp_path / "again"})
    write_tablespace_locations(pgdata, locations)
    # What import_datadir records: the source's location, not the in-place directory.
    assert tablespace_locations(pgdata) == {16385: "/srv/far"}


def test_locations_of_a_plain_backup(tmp_path: Path) -> None:
    pgdata, far = tmp_path / "pgdata", tmp_path / "far"
    (far / VERSION).mkdir(parents=True)
    (pgdata / "pg_tblspc" / "16390" / VERSION).mkdir(parents=True)  # in place: not listed
    os.symlink(far, pgdata / "pg_tblspc" / "16385")
    assert plain_tablespace_locations(pgdata) == {16385: str(far)}
