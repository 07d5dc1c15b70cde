"""The optional C fast paths (`pg15/_walscan.c`), or None.

The pure-Python reader and decoder are the reference; the C module only speeds up their
common case and hands everything else back to them. It is built by `pip install` when a C
compiler is present; set NEON_PURE_PYTHON=1 to run without it (tests compare the two, and
fail when it is missing unless NEON_PURE_PYTHON=1 or NEON_ALLOW_PURE_PYTHON=1 is set).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def native_disabled() -> bool:
    """NEON_PURE_PYTHON=1: every C fast path of the project is off (the Python references run)."""
    return os.environ.get("NEON_PURE_PYTHON", "") not in ("", "0")


def load_extension(name: str) -> ModuleType | None:
    """The C extension module `name` (e.g. "pg15._walscan"), or None when it is switched off
    (NEON_PURE_PYTHON=1) or was not built (the Python reference then does the work)."""
    if native_disabled():
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


walscan = load_extension("pg15._walscan")
