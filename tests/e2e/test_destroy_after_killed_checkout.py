"""`pg destroy` of a node whose checkout was killed removes what the checkout left beside its
data directory (journal, state files, the old pg_wal set aside, rebuilt directories): a node
made later takes the same data directory name (pgdata1 again), and the leftovers were taken
for its own pending checkout (and the old pg_wal, a GiB after a load, stayed forever)."""

from __future__ import annotations

from pathlib import Path

from tests.neoncli import NeonCli, kill_when, psql


def test_destroy_removes_a_killed_checkouts_files(neon: NeonCli) -> None:
    neon.run("pg", "create")
    node = neon.json("pg", "show", "pgdata1")
    storage = Path(node["datadir"]).parent
    psql(
        node["connstr"],
        "CREATE TABLE t AS SELECT g AS a, repeat('p', 200) AS pad "
        "FROM generate_series(1, 100000) g",
    )
    neon.run("snapshot", "create", "pgdata1@s")
    psql(node["connstr"], "UPDATE t SET a = -a")
    aside = storage / "pgdata1.checkout.oldwal"
    kill_when(neon, aside.exists, "pg", "checkout", "pgdata1@s")

    neon.run("pg", "destroy", "--yes", "pgdata1")
    left = [p.name for p in storage.iterdir() if p.name.startswith(("pgdata1", ".pgdata1"))]
    assert left == []
    # A new node of that name is its own: no checkout of the old one is rolled forward on it.
    neon.run("pg", "create")
    again = neon.json("pg", "show", "pgdata1")
    assert psql(again["connstr"], "SELECT to_regclass('t') IS NULL") == "t"
    neon.run("pg", "stop", "pgdata1")
    neon.run("pg", "start", "pgdata1")
    assert psql(again["connstr"], "SELECT to_regclass('t') IS NULL") == "t"
