"""Shared fixtures: real PostgreSQL servers (see tests/pgtest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.file_costs import costliest_first
from tests.neoncli import NeonCli, neon_home
from tests.pgtest import PgTestCluster, cluster_fixture


def pytest_configure(config: pytest.Config) -> None:
    """xdist hands files out in the collection's order (tests.file_costs), not most tests
    first."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items[:] = costliest_first(items)


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
