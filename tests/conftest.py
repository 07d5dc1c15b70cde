"""Shared fixtures: real PostgreSQL servers (see tests/pgtest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.neoncli import NeonCli, neon_home
from tests.pgtest import PgTestCluster, cluster_fixture


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
    """The real `neon` CLI on a private NEON_HOME (tests.neoncli.neon_home)."""
    yield from neon_home()
