"""The optional C fast path of the layer writer (`_blockpack.c`), or None.

`blocks._pack_versions` is the reference; NEON_PURE_PYTHON=1 switches the C loop off (tests
write layers both ways and fail when it is missing unless NEON_PURE_PYTHON=1 or
NEON_ALLOW_PURE_PYTHON=1 is set).
"""

from __future__ import annotations

from pg15.native import load_extension

blockpack = load_extension("pageserver.storage.layers._blockpack")
