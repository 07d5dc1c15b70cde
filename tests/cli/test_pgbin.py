"""Where the PostgreSQL binaries are found (cli/pgbin.py pg_bin_dir)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cli import pgbin


def _bin_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    for name in ("postgres", "initdb"):
        (path / name).write_text("")
    return path


def _pg_config(directory: Path, bindir: Path, ran: Path) -> None:
    """A pg_config on PATH that answers `bindir` and leaves `ran` behind when it runs."""
    directory.mkdir()
    script = directory / "pg_config"
    script.write_text(f"#!/bin/sh\n: > '{ran}'\necho '{bindir}'\n")
    script.chmod(0o755)


@pytest.fixture
def fresh() -> Iterator[None]:
    pgbin.pg_bin_dir.cache_clear()
    yield
    pgbin.pg_bin_dir.cache_clear()


def test_debians_directory_is_taken_without_running_pg_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: None
) -> None:
    debian = _bin_dir(tmp_path / "debian")
    ran = tmp_path / "pg_config_ran"
    _pg_config(tmp_path / "path", _bin_dir(tmp_path / "other"), ran)
    monkeypatch.delenv("NEON_PG_BIN", raising=False)
    monkeypatch.setattr(pgbin, "DEBIAN_BIN", debian)
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    assert pgbin.pg_bin_dir() == debian
    assert not ran.exists()


def test_pg_config_is_asked_when_debians_directory_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: None
) -> None:
    other = _bin_dir(tmp_path / "other")
    ran = tmp_path / "pg_config_ran"
    _pg_config(tmp_path / "path", other, ran)
    monkeypatch.delenv("NEON_PG_BIN", raising=False)
    monkeypatch.setattr(pgbin, "DEBIAN_BIN", tmp_path / "no-debian")
    monkeypatch.setenv("PATH", str(tmp_path / "path"))
    assert pgbin.pg_bin_dir() == other
    assert ran.exists()


def test_neon_pg_bin_wins_and_is_reported_when_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: None
) -> None:
    monkeypatch.setattr(pgbin, "DEBIAN_BIN", _bin_dir(tmp_path / "debian"))
    mine = _bin_dir(tmp_path / "mine")
    monkeypatch.setenv("NEON_PG_BIN", str(mine))
    assert pgbin.pg_bin_dir() == mine
    pgbin.pg_bin_dir.cache_clear()
    monkeypatch.setenv("NEON_PG_BIN", str(tmp_path / "empty"))
    with pytest.raises(pgbin.MissingBinaries, match="empty"):
        pgbin.pg_bin_dir()
