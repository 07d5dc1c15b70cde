"""tests/pure_python.py: the child really runs without the C fast paths, and says so when not."""

from __future__ import annotations

import importlib
import os

import pytest

import pg15.native
from tests.native_ext import require_c_extension
from tests.pure_python import mapped_extensions, run_pure


def _switch_seen() -> tuple[str | None, bool]:
    return os.environ.get("NEON_PURE_PYTHON"), pg15.native.walscan is None


def _loads_an_extension() -> None:
    importlib.import_module("pg15._walscan")


def test_the_child_runs_the_python_references() -> None:
    assert run_pure(_switch_seen) == ("1", True)


def test_an_extension_loaded_in_the_child_fails_the_check() -> None:
    with pytest.raises(AssertionError, match=r"C extensions were loaded: \['pg15._walscan'\]"):
        run_pure(_loads_an_extension)


def test_mapped_extensions_of_a_process_with_the_c_paths() -> None:
    require_c_extension(pg15.native.walscan, "pg15._walscan")
    assert "pg15._walscan" in mapped_extensions(os.getpid())
