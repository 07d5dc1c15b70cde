"""The optional C fast paths (`pg15/_walscan.c`), or None.

The pure-Python reader and decoder are the reference; the C module only speeds up their
common case and hands everything else back to them. It is built by `pip install` when a C
compiler is present; set NEON_PURE_PYTHON=1 to run without it (tests compare the two, and
fail when it is missing unless NEON_PURE_PYTHON=1 or NEON_ALLOW_PURE_PYTHON=1 is set).
"""

from __future__ import annotations

import os
from types import ModuleType


def native_disabled() -> bool:
    """NEON_PURE_PYTHON=1: every C fast path of the project is off (the Python references run)."""
    return os.environ.get("NEON_PURE_PYTHON", "") not in ("", "0")


def _load() -> ModuleType | None:
    if native_disabled():
        return None
    try:
        from pg15 import _walscan
    except ImportError:
        return None
    return _walscan


walscan = _load()
