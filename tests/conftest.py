"""Shared fixtures: real PostgreSQL servers (see tests/pgtest.py)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from tests.neoncli import NeonCli
from tests.pgtest import PgTestCluster, cluster_fixture, pg_reachable_tmpdir


@pytest.fixture
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgTestCluster]:
    """Function-scoped: servers created through it are stopped after the test."""
    yield from cluster_fixture(tmp_path_factory)


@pytest.fixture(scope="module")
def pg_cluster_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgTestCluster]:
    """Module-scoped variant for expensive shared workloads."""
    yield from cluster_fixture(tmp_path_factory)


@pytest.fixture
def neon() -> Iterator[NeonCli]:
    """The real `neon` CLI on a private NEON_HOME; nodes and daemon are stopped afterwards.

    The home is not under tmp_path: pytest keeps its directories 0700 (and a concurrent
    session resets them), while PostgreSQL's OS user must enter the home's parents.
    """
    base = pg_reachable_tmpdir("neon-home-")
    cli = NeonCli(base / "home", {})
    try:
        yield cli
    finally:
        cli.cleanup()
        shutil.rmtree(base, ignore_errors=True)
