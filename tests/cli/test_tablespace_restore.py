"""`pg checkout` puts back at its location only a tablespace the node has there now
(cli/tablespace_restore.py); every other one stays in place and no other path is written.
Run as root, as CI is: a location is PostgreSQL's account's, as PostgreSQL requires."""

from __future__ import annotations

import os
from pathlib import Path

from cli.tablespace_restore import remove_left_locations, restore_own_locations
from datadir_files.pg_account import pg_os_user
from pageserver_api.models import TablespaceLocation

VERSION = "PG_15_202209061"


def put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def pg_owned(*locations: Path) -> None:
    """Locations as CREATE TABLESPACE needs them: PostgreSQL's account's."""
    user = pg_os_user()
    assert user is not None, "these tests run as root, as CI does"
    for location in locations:
        location.mkdir(parents=True, exist_ok=True)
        os.chown(location, user.uid, user.gid)


def test_only_the_nodes_own_locations_are_restored(tmp_path: Path) -> None:
    own, other = tmp_path / "own", tmp_path / "other"
    current, rebuilt = tmp_path / "pgdata", tmp_path / "pgdata.checkout"
    put(own / VERSION / "5" / "16400", b"state being left")
    put(own / VERSION / "5" / "16401", b"a relation the snapshot does not have")
    put(other / VERSION / "5" / "16500", b"another server's")
    pg_owned(own, other)
    (current / "pg_tblspc").mkdir(parents=True)
    os.symlink(own, current / "pg_tblspc" / "16385")
    os.symlink(tmp_path / "moved-since", current / "pg_tblspc" / "16387")
    for oid, rel in ((16385, "16400"), (16386, "16600"), (16387, "16500")):
        put(rebuilt / "pg_tblspc" / str(oid) / VERSION / "5" / rel, f"snapshot {oid}".encode())
    spaces = [
        TablespaceLocation(16385, str(own)),  # the node's own: back to its location
        TablespaceLocation(16386, ""),  # in place in the snapshot: stays in place
        TablespaceLocation(16387, str(other)),  # the node has it elsewhere now: in place
    ]
    assert restore_own_locations(rebuilt, current, spaces) == [16385]
    link = rebuilt / "pg_tblspc" / "16385"
    assert link.is_symlink() and os.readlink(link) == str(own)
    assert sorted(p.name for p in (own / VERSION / "5").iterdir()) == ["16400"]
    assert (own / VERSION / "5" / "16400").read_bytes() == b"snapshot 16385"
    for oid in (16386, 16387):
        path = rebuilt / "pg_tblspc" / str(oid)
        assert path.is_dir() and not path.is_symlink()
    assert (other / VERSION / "5" / "16500").read_bytes() == b"another server's"
    # Repeatable (a checkout's recovery redoes the rebuild): the same result again.
    os.unlink(link)
    put(rebuilt / "pg_tblspc" / "16385" / VERSION / "5" / "16400", b"snapshot again")
    assert restore_own_locations(rebuilt, current, spaces) == [16385]
    assert (own / VERSION / "5" / "16400").read_bytes() == b"snapshot again"


def test_a_mapped_tablespace_goes_back_to_the_nodes_own_location(tmp_path: Path) -> None:
    """A node made with --tablespace-mapping OLD=NEW links to NEW while the history records
    OLD: the checkout puts the tablespace back at NEW and never writes OLD."""
    old, new = tmp_path / "old", tmp_path / "new"
    current, rebuilt = tmp_path / "pgdata", tmp_path / "pgdata.checkout"
    put(old / VERSION / "5" / "16400", b"the source server's")
    put(new / VERSION / "5" / "16400", b"state being left")
    pg_owned(old, new)
    (current / "pg_tblspc").mkdir(parents=True)
    os.symlink(new, current / "pg_tblspc" / "16385")
    put(rebuilt / "pg_tblspc" / "16385" / VERSION / "5" / "16400", b"snapshot")
    assert restore_own_locations(rebuilt, current, [TablespaceLocation(16385, str(old))]) == [16385]
    assert os.readlink(rebuilt / "pg_tblspc" / "16385") == str(new)
    assert (new / VERSION / "5" / "16400").read_bytes() == b"snapshot"
    assert (old / VERSION / "5" / "16400").read_bytes() == b"the source server's"


def test_files_of_a_tablespace_the_node_left_are_removed(tmp_path: Path) -> None:
    """After the swap: the old directory links to a location the new one does not use (the
    snapshot predates the tablespace): its version directory goes, the location stays; a
    location both use and an in-place tablespace are untouched."""
    left, kept = tmp_path / "left", tmp_path / "kept"
    old, live = tmp_path / "pgdata.old", tmp_path / "pgdata"
    put(left / VERSION / "5" / "16400", b"left behind")
    put(kept / VERSION / "5" / "16500", b"still the node's")
    pg_owned(left, kept)
    for d in (old, live):
        (d / "pg_tblspc").mkdir(parents=True)
        os.symlink(kept, d / "pg_tblspc" / "16390")
    os.symlink(left, old / "pg_tblspc" / "16385")
    put(old / "pg_tblspc" / "16386" / VERSION / "1" / "1", b"in place")
    assert remove_left_locations(old, live) == [left / VERSION]
    assert left.is_dir() and not (left / VERSION).exists()
    assert (kept / VERSION / "5" / "16500").read_bytes() == b"still the node's"
    assert remove_left_locations(old, live) == []  # repeatable (a crash before the cleanup)


def test_a_destroyed_node_takes_its_tablespace_files(tmp_path: Path) -> None:
    """pg destroy (no new directory): every absolute tablespace of the node loses its
    version directory, the location stays; in-place ones go with the data directory."""
    loc = tmp_path / "loc"
    datadir = tmp_path / "pgdata"
    put(loc / VERSION / "5" / "16400", b"the node's")
    pg_owned(loc)
    (datadir / "pg_tblspc").mkdir(parents=True)
    os.symlink(loc, datadir / "pg_tblspc" / "16385")
    assert remove_left_locations(datadir, None) == [loc / VERSION]
    assert loc.is_dir() and not any(loc.iterdir())


def test_a_link_postgresqls_account_points_elsewhere_is_neither_written_nor_emptied(
    tmp_path: Path,
) -> None:
    """pg_tblspc/OID is PostgreSQL's account's to change (the CLI may be root): a location
    that account does not own (root's /etc, say), or whose version directory is a link, is
    neither written by a checkout nor emptied after it or by pg destroy."""
    roots = tmp_path / "roots"  # root's, with a directory of the version's name in it
    put(roots / VERSION / "secret", b"root's")
    theirs = tmp_path / "theirs"  # PostgreSQL's, its version directory a link to root's
    pg_owned(theirs)
    os.symlink(roots / VERSION, theirs / VERSION)
    current, rebuilt = tmp_path / "pgdata", tmp_path / "pgdata.checkout"
    (current / "pg_tblspc").mkdir(parents=True)
    os.symlink(roots, current / "pg_tblspc" / "16385")
    os.symlink(theirs, current / "pg_tblspc" / "16386")
    for oid in (16385, 16386):
        put(rebuilt / "pg_tblspc" / str(oid) / VERSION / "5" / "16400", b"snapshot")
    spaces = [TablespaceLocation(16385, str(roots)), TablespaceLocation(16386, str(theirs))]
    assert restore_own_locations(rebuilt, current, spaces) == []
    assert sorted(p.name for p in (roots / VERSION).iterdir()) == ["secret"]
    for oid in (16385, 16386):  # in place, as a tablespace with no location of its own
        assert (rebuilt / "pg_tblspc" / str(oid) / VERSION / "5" / "16400").is_file()
    assert remove_left_locations(current, None) == []
    assert (roots / VERSION / "secret").read_bytes() == b"root's"
