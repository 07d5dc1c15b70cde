"""`pg destroy` deletes the node's timelines (and snapshots), except those another node's
branch still reads through (issue 16 item 12: they stayed on disk forever)."""

from __future__ import annotations

import re

from tests.neoncli import NeonCli, psql
from tests.pgtest import free_port


def timelines(neon: NeonCli) -> set[str]:
    root = neon.home / "storage" / "local" / "pagestore" / "timelines"
    return {p.name for p in root.iterdir() if re.fullmatch(r"[0-9a-f]{32}", p.name)}


def test_destroy_keeps_only_timelines_other_nodes_need(neon: NeonCli) -> None:
    neon.run("pageserver", "start", "--port", "0", "--http-port", "0")
    neon.run("pg", "create", "--port", str(free_port()))
    c = neon.json("pg", "show", "pgdata1")["connstr"]
    psql(c, "CREATE TABLE t AS SELECT generate_series(1, 100) a")
    neon.run("snapshot", "create", "pgdata1@s1")
    first = timelines(neon)
    assert len(first) == 1
    # primary2 branches from primary1's snapshot; primary3 is independent.
    neon.run("pg", "create", "--no-start", "-n", "copy", "--snapshot", "pgdata1@s1")
    branch = timelines(neon) - first
    neon.run("pg", "create", "--no-start", "--port", str(free_port()))
    assert len(branch) == 1 and len(timelines(neon)) == 3

    neon.run("pg", "destroy", "pgdata3", "--yes")
    assert timelines(neon) == first | branch
    neon.run("pg", "destroy", "pgdata1", "--yes")
    # primary2's timeline reads through primary1's: that one stays, its snapshot goes.
    assert timelines(neon) == first | branch
    assert [r["name"] for r in neon.json("snapshot", "list")] == ["copy@CURRENT"]
    neon.run("pg", "destroy", "copy", "--yes")
    assert timelines(neon) == set()
