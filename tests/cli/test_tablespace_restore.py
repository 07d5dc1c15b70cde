"""`pg checkout` puts back at its location only a tablespace the node has there now
(cli/tablespace_restore.py); every other one stays in place and no other path is written."""

from __future__ import annotations

import os
from pathlib import Path

from cli.tablespace_restore import restore_own_locations
from pageserver_api.models import TablespaceLocation

VERSION = "PG_15_202209061"


def put(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_only_the_nodes_own_locations_are_restored(tmp_path: Path) -> None:
    own, other = tmp_path / "own", tmp_path / "other"
    current, rebuilt = tmp_path / "pgdata", tmp_path / "pgdata.checkout"
    put(own / VERSION / "5" / "16400", b"state being left")
    put(own / VERSION / "5" / "16401", b"a relation the snapshot does not have")
    put(other / VERSION / "5" / "16500", b"another server's")
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
