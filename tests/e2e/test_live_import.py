"""A live import through the real CLI and pageserver (pageserver/ingest/live_import.py): a
database with a relation file over the early-import size, imported from a running server over
BASE_BACKUP and from the `.neon` file exported of it, gets image layers at two LSNs (the big
file's, written while the rest arrived, and the rest at the import LSN), and a node created
from each snapshot dumps as the source does."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pageserver.ingest.live_journal import EARLY_BYTES
from tests.e2e.test_snapshot_import import dump, dumped, url
from tests.neoncli import NeonCli, neon_home
from tests.pgtest import PgTestCluster, PgTestServer, free_port, pg_reachable_tmpdir


@pytest.fixture(scope="module")
def source(pg_cluster_module: PgTestCluster) -> PgTestServer:
    """A server whose pgbench_accounts file is over EARLY_BYTES; no writes after."""
    server = pg_cluster_module.create({"checkpoint_timeout": "1h"})
    server.psql("CREATE DATABASE app")
    server.run("pgbench", "-i", "-s", "7", "-q", "app")
    size = int(server.psql("SELECT pg_relation_size('pgbench_accounts')", dbname="app"))
    assert size > EARLY_BYTES
    return server


@pytest.fixture(scope="module")
def home() -> Iterator[NeonCli]:
    yield from neon_home()


def layer_lsns(neon: NeonCli, before: set[Path]) -> set[str]:
    """The LSNs of the image layers written since `before` was listed."""
    now = set((neon.home / "storage").rglob("*__*"))
    return {p.name.rpartition("__")[2] for p in now - before if "-" not in p.name[-17:]}


def check_node_equals_source(neon: NeonCli, source: PgTestServer, snapshot: str) -> None:
    node = neon.json(
        "pg", "create", "--snapshot", snapshot, "-n", f"n-{snapshot}", "--port", str(free_port())
    )["pgdata"]
    connstr = neon.json("pg", "show", node)["connstr"]
    try:
        assert dumped(connstr, "app") == dump(source, "app")
    finally:
        neon.run("pg", "destroy", "--yes", node)


def test_big_files_are_imported_live_from_a_server_and_a_file(
    home: NeonCli, source: PgTestServer
) -> None:
    before = set((home.home / "storage").rglob("*__*"))
    home.run("snapshot", "import", f"--from={url(source)}", "live")
    assert len(layer_lsns(home, before)) == 2
    check_node_equals_source(home, source, "live")

    base = pg_reachable_tmpdir("neon-live-")
    try:
        path = base / "live.neon"
        home.run("snapshot", "export", "live", "-o", str(path))
        before = set((home.home / "storage").rglob("*__*"))
        home.run("snapshot", "import", "--from", str(path), "livefile")
        assert len(layer_lsns(home, before)) == 2
        check_node_equals_source(home, source, "livefile")
    finally:
        shutil.rmtree(base, ignore_errors=True)
