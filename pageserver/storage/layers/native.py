"""The optional C fast paths of the layers: the layer writer's loop (`_blockpack.c`) and the
in-memory layer's storage (`_inmem.c`), each None when off or not built.

`blocks._pack_versions` and `inmemory.InMemoryLayer` are the references; NEON_PURE_PYTHON=1
switches the C code off (tests write layers both ways and fail when it is missing unless
NEON_PURE_PYTHON=1 or NEON_ALLOW_PURE_PYTHON=1 is set).
"""

from __future__ import annotations

from pg15.native import load_extension

blockpack = load_extension("pageserver.storage.layers._blockpack")

inmem = load_extension("pageserver.storage.layers._inmem")
