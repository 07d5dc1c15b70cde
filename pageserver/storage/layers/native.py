"""The optional C fast path of the layer writer (`_blockpack.c`), or None.

`blocks._pack_versions` is the reference; NEON_PURE_PYTHON=1 switches the C loop off (tests
write layers both ways and fail when it is missing unless NEON_PURE_PYTHON=1 or
NEON_ALLOW_PURE_PYTHON=1 is set).
"""

from __future__ import annotations

from types import ModuleType

from pg15.native import native_disabled


def _load() -> ModuleType | None:
    if native_disabled():
        return None
    try:
        from pageserver.storage.layers import _blockpack
    except ImportError:
        return None
    return _blockpack


blockpack = _load()
