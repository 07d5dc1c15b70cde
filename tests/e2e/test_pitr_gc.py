"""PITR areas against GC through the real CLI: every area's window survives `pitr gc`, and an
LSN whose history is gone is refused at extraction, not later at `pg create --snapshot`."""

from __future__ import annotations

import time

from tests.neoncli import NeonCli, pgbench, psql
from tests.pgtest import free_port


def create_node(neon: NeonCli, name: str, *snapshot: str) -> str:
    """Create a node (on a free port: tests run side by side); its connection string."""
    neon.run("pg", "create", "-n", name, "--port", str(free_port()), *snapshot)
    return str(neon.json("pg", "show", name)["connstr"])


def write_history(neon: NeonCli, c: str) -> str:
    """A marker table, then enough pgbench history for GC to write images and drop layers;
    returns the flush LSN right after the marker."""
    psql(c, "CREATE TABLE marker AS SELECT generate_series(1, 100) a")
    early = psql(c, "SELECT pg_current_wal_flush_lsn()")
    pgbench(c, "-i", "-q", "-s", "2")
    pgbench(c, "-t", "1500", "-c", "2")
    neon.run("snapshot", "create", "main@sync")  # waits until ingest reached the flush LSN
    neon.run("snapshot", "destroy", "main@sync")
    time.sleep(1.2)  # older than a 1s TTL
    return early


def test_two_areas_on_one_node_keep_the_longer_window(neon: NeonCli) -> None:
    c = create_node(neon, "main")
    neon.run("pitr", "create", "long", "--ttl", "inf")
    neon.run("pitr", "create", "short", "--ttl", "1s")
    early = write_history(neon, c)
    neon.run("pitr", "gc", "short")
    neon.run("pitr", "gc", "long")
    neon.run("pitr", "extract-snapshot", "long", "--lsn", early, "--as", "old")
    old = create_node(neon, "old", "--snapshot", "main@old")
    assert psql(old, "SELECT count(*) FROM marker") == "100"
    assert psql(old, "SELECT count(*) FROM pg_class WHERE relname = 'pgbench_accounts'") == "0"


def test_extracting_collected_history_fails_at_extraction(neon: NeonCli) -> None:
    # GC removes whole layer files: the history at `early` goes only if no delta layer holding
    # it spans the GC horizon. Small flushes and no L0 merges (whose L1 layers span every
    # merged L0, possibly past the horizon) make sure of that whatever the timing.
    neon.env_extra.update(
        NEON_STORE_CHECKPOINT_DISTANCE=str(1024 * 1024), NEON_STORE_COMPACTION_THRESHOLD="1000"
    )
    c = create_node(neon, "main")
    neon.run("pitr", "create", "short", "--ttl", "1s")
    early = write_history(neon, c)
    neon.run("pitr", "gc", "short")
    # An area created now advertises the node's whole history, but GC already took it.
    neon.run("pitr", "create", "late", "--ttl", "inf")
    error = neon.fail("pitr", "extract-snapshot", "late", "--lsn", early, "--as", "old")
    assert "garbage-collected" in error and "'late'" in error
    assert "main@old" not in neon.run("snapshot", "list").stdout
