"""`--tablespace-mapping OLD=NEW` as pg_basebackup reads it (cli/tablespace_mapping.py): absolute
paths, `\\=` for an '=' in a path, canonical forms; every bad form is one InvalidArgument."""

from __future__ import annotations

import os
import shutil

import pytest

from cli.tablespace_mapping import (
    check_mapped,
    mapped,
    parse_mappings,
    place_mapped_tablespaces,
)
from datadir_files.pg_account import pg_os_user
from proto.errors import InvalidArgument
from tests.pgtest import pg_reachable_tmpdir

VERSION = "PG_15_202209061"


def test_mappings_are_parsed_as_pg_basebackup_does() -> None:
    assert parse_mappings(["/srv/ts1=/new/ts1", "/a\\=b/=/c//d/"]) == {
        "/srv/ts1": "/new/ts1",
        "/a=b": "/c/d",
    }
    assert parse_mappings(["/x=/y", "/x=/y"]) == {"/x": "/y"}  # the same mapping twice
    assert parse_mappings([]) == {}


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("/only/old", "no OLD=NEW"),
        ("=/new", "no OLD=NEW"),
        ("/old=", "no OLD=NEW"),
        ("/a=/b=/c", "multiple '=' signs"),
        ("relative=/new", "the old directory 'relative' is not an absolute path"),
        ("/old=new", "the new directory 'new' is not an absolute path"),
    ],
)
def test_bad_mappings_are_refused_by_name(spec: str, says: str) -> None:
    with pytest.raises(InvalidArgument, match="--tablespace-mapping") as err:
        parse_mappings([spec])
    assert says in str(err.value)


def test_conflicting_mappings_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="mapped twice"):
        parse_mappings(["/x=/y", "/x=/z"])
    with pytest.raises(InvalidArgument, match="same directory"):
        parse_mappings(["/x=/y", "/w=/y"])


def test_old_must_be_a_location_of_the_snapshot() -> None:
    check_mapped({"/srv/ts1": "/n"}, ["", "/srv/ts1/"], "snapshot s")
    with pytest.raises(InvalidArgument, match="/srv/ts2 is not a tablespace location of s"):
        check_mapped({"/srv/ts2": "/n"}, ["", "/srv/ts1"], "s")
    with pytest.raises(InvalidArgument, match="locations: none"):
        check_mapped({"/srv/ts2": "/n"}, [""], "s")
    assert mapped({"/srv/ts1": "/n"}, "/srv/ts1/") == "/n"
    assert mapped({"/srv/ts1": "/n"}, "") == ""  # in place stays in place
    assert mapped({"/srv/ts1": "/n"}, "/other") == "/other"


def test_placing_claims_every_new_first_and_undoes_a_refusal() -> None:
    """NEW directories are claimed before anything moves: a refusal (a NEW with files) leaves
    the rebuilt directory as it was and removes what it created for the other mapping; an
    existing empty NEW of ours is used, made enterable (never re-owned)."""
    base = pg_reachable_tmpdir("neon-tsmap-")
    try:
        datadir = base / "pgdata"
        for oid in (16385, 16386):
            rel = datadir / "pg_tblspc" / str(oid) / VERSION / "5" / "16400"
            rel.parent.mkdir(parents=True)
            rel.write_bytes(f"rel of {oid}".encode())
        busy, empty, fresh = base / "busy", base / "empty", base / "made" / "for" / "it"
        (busy / "PG_15_202209061").mkdir(parents=True)
        empty.mkdir()
        spaces = {16385: "/srv/a", 16386: "/srv/b"}
        with pytest.raises(InvalidArgument, match=f"--tablespace-mapping /srv/b={busy}: "):
            place_mapped_tablespaces(datadir, spaces, {"/srv/a": str(fresh), "/srv/b": str(busy)})
        assert not (base / "made").exists()
        assert all((datadir / "pg_tblspc" / str(oid) / VERSION).is_dir() for oid in spaces)

        place_mapped_tablespaces(datadir, spaces, {"/srv/a": str(fresh), "/srv/b": str(empty)})
        for oid, new in ((16385, fresh), (16386, empty)):
            assert os.readlink(datadir / "pg_tblspc" / str(oid)) == str(new)
            assert (new / VERSION / "5" / "16400").read_bytes() == f"rel of {oid}".encode()
        user = pg_os_user()
        if user is not None:  # as root: PostgreSQL's account owns what was made for it
            assert fresh.stat().st_uid == user.uid
            assert empty.stat().st_uid == os.getuid() and empty.stat().st_mode & 0o001
    finally:
        shutil.rmtree(base, ignore_errors=True)
