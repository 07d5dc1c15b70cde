"""One name rule for every command, through the real CLI: a node is named by its ID or its data
directory name, snapshots PGDATA@TAG by either, and a data directory name that could be taken
for a node ID is refused."""

from __future__ import annotations

import sqlite3

from tests.neoncli import NeonCli, free_port, psql


def test_names_resolve_alike_everywhere_and_id_like_names_are_refused(neon: NeonCli) -> None:
    neon.run("pg", "create", "--port", str(free_port()))
    for taken in ("primary4", "primary1", "PRIMARY7"):
        line = neon.fail("pg", "create", "-n", taken, "--no-start")
        assert f"data directory name {taken!r} looks like a node ID" in line
    assert "already exists" in neon.fail("pg", "create", "-n", "pgdata1", "--no-start")
    assert [n["id"] for n in neon.json("pg", "list")] == ["primary1"]

    # A snapshot named through the ID is the data directory's snapshot, for every command.
    c = neon.json("pg", "show", "primary1")["connstr"]
    psql(c, "CREATE TABLE t AS SELECT generate_series(1, 10) a")
    neon.run("snapshot", "create", "primary1@x")
    psql(c, "INSERT INTO t VALUES (11)")
    assert "pgdata1@x" in [s["name"] for s in neon.json("snapshot", "list")]
    out = neon.run("pg", "checkout", "primary1@x").stdout
    assert "Rolling back pgdata1@CURRENT to pgdata1@x." in out
    assert psql(c, "SELECT count(*) FROM t") == "10"
    ro = neon.run("snapshot", "start", "primary1@x").stdout.strip()
    try:
        assert psql(ro, "SELECT count(*) FROM t") == "10"
        assert "read-only server runs over pgdata1@x" in neon.fail(
            "snapshot", "destroy", "pgdata1@x"
        )
    finally:
        neon.run("snapshot", "stop", "primary1@x")
    assert neon.run("snapshot", "destroy", "primary1@x").stdout.strip() == "Ok"
    assert "does not exist" in neon.fail("snapshot", "destroy", "pgdata1@x")


def test_an_older_homes_id_like_name_never_becomes_another_nodes_id(neon: NeonCli) -> None:
    """A home where an older version let `pg create -n primary2` through: the next node must
    not get the ID primary2, or `pg destroy primary2` could hit either node."""
    neon.run("pg", "create", "--no-start", "-n", "legacy", "--port", str(free_port()))
    with sqlite3.connect(neon.home / "registry.db") as db:
        db.execute("UPDATE nodes SET pgdata = 'primary2' WHERE id = 'primary1'")
    neon.run("pg", "create", "--no-start", "--port", str(free_port()))
    listed = [(n["id"], n["pgdata"]) for n in neon.json("pg", "list")]
    assert listed == [("primary1", "primary2"), ("primary3", "pgdata3")]
