"""Where NEON_HOME is when nothing names it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli.home import ROOT_DEFAULT_HOME, NeonHome


def test_option_then_environment_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEON_HOME", "/srv/from-env")
    assert NeonHome.resolve(Path("/srv/from-option")).root == Path("/srv/from-option")
    assert NeonHome.resolve(None).root == Path("/srv/from-env")


def test_root_defaults_to_a_home_postgres_can_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    """root's own home is 0700 and pg-neon never opens a parent for PostgreSQL's account, so
    ~/.neon would refuse every node; root gets /var/lib/neon, like the container image."""
    monkeypatch.delenv("NEON_HOME", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert NeonHome.resolve(None).root == Path(ROOT_DEFAULT_HOME)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", "/home/someone")
    assert NeonHome.resolve(None).root == Path("/home/someone/.neon")
