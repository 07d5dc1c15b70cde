"""`pg show` through the real CLI: the node's snapshots and PITR areas are listed whether or
not the pageserver is running, the same as `snapshot list` shows them."""

from __future__ import annotations

from tests.neoncli import NeonCli
from tests.pgtest import free_port


def test_pg_show_lists_history_while_the_pageserver_is_stopped(neon: NeonCli) -> None:
    neon.run("pg", "create", "-n", "main", "--port", str(free_port()))
    neon.run("snapshot", "create", "main@s1")
    neon.run("pitr", "create", "area", "--ttl", "inf")
    neon.run("pageserver", "stop")
    assert neon.run("pageserver", "status", check=False).returncode == 3  # not running
    history = neon.json("pg", "show", "main")["history"]
    assert [s["name"] for s in history["snapshots"]] == ["main@s1"]
    assert [a["name"] for a in history["pitr"]] == ["area"]
    assert "main@s1" in {s["name"] for s in neon.json("snapshot", "list")}
