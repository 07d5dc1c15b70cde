"""The optional C fast path of WAL ingest (`pageserver/ingest/_walingest.c`), or None.

`WalIngest` is the reference; the C module ingests the Heap, Heap2 and Btree records whose
relations are cached and hands every other record back to it. Built by `pip install` when a C
compiler is present; NEON_PURE_PYTHON=1 switches it off (tests compare both ways and fail
when it is missing unless NEON_PURE_PYTHON=1 or NEON_ALLOW_PURE_PYTHON=1 is set).
"""

from __future__ import annotations

from pg15.native import load_extension

walingest = load_extension("pageserver.ingest._walingest")
