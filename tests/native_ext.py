"""The rule every test of a C fast path follows: fail, never skip silently, when it is missing.

setup.py builds the extensions as optional, so a test that skipped without them would let CI
pass without the fast paths it benchmarks; only an explicit NEON_PURE_PYTHON=1 (which also
switches them off) or NEON_ALLOW_PURE_PYTHON=1 lets the C tests skip.
"""

from __future__ import annotations

import os
from types import ModuleType

import pytest

PURE_PYTHON_ALLOWED = any(
    os.environ.get(name, "") not in ("", "0")
    for name in ("NEON_PURE_PYTHON", "NEON_ALLOW_PURE_PYTHON")
)


def require_c_extension(module: ModuleType | None, name: str) -> None:
    """Skip (when allowed) or fail the calling test if the extension `name` is not loaded."""
    if module is not None:
        return
    if PURE_PYTHON_ALLOWED:
        pytest.skip("C extension off or not built; allowed by NEON_(ALLOW_)PURE_PYTHON=1")
    pytest.fail(
        f"the C extension {name} is not built: install gcc and python3-dev and reinstall "
        "(`make setup`), or set NEON_ALLOW_PURE_PYTHON=1 to run the tests without it"
    )
