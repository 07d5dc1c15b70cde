"""glibc malloc settings for the pageserver process, set before its threads start (and, for
a CLI receiving a large stream, `tune_malloc_for_streams`).

By default glibc gives each thread that allocates under contention an arena of its own (up to
8 per core) and raises its mmap threshold to the size of every large block freed (up to
32 MiB), so the daemon's large buffers (an in-memory layer's 32 MiB arena, a packed L1 piece,
a compaction's output) come from those arenas' heaps once the first one is freed, and freed
memory stays with the arena that held it. On `bench.checkout`'s loads (pgbench -i -s 30, a
checkout, pgbench -i -s 70; load 7-14) the daemon's peak RSS was 381-401 MiB by default,
307-381 with two arenas only, 259-269 with these settings, 237 with a 1 MiB threshold and
234-237 with 128 KiB, which maps every decompressed 128 KiB value block (page faults on each:
the daemon's CPU for the same work 24.9 s against 20.6-21.4 s). Blocks below the threshold
(value blocks, a tar's 1 MiB chunks) still come from the heap, reused without page faults:
up to DAEMON_TRIM_THRESHOLD free at a heap's top is kept for them.

A setting given in the environment (MALLOC_ARENA_MAX, MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_, or its GLIBC_TUNABLES name: glibc.malloc.arena_max,
glibc.malloc.mmap_threshold, glibc.malloc.trim_threshold) is left as it is.
Elsewhere than glibc (musl, macOS) nothing is done.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
"""mallopt parameters (glibc's malloc.h)."""

ARENAS = 2
MMAP_THRESHOLD = 4 << 20
"""Blocks of this many bytes or more are mapped on their own and unmapped when freed; a fixed
threshold (mallopt) also stops glibc from raising it."""

TRIM_THRESHOLD = 16 << 20
"""Free memory at the top of a heap kept for the next allocations up to this much (glibc
returns what is above it to the system, to be faulted in again when next used)."""

DAEMON_TRIM_THRESHOLD = MMAP_THRESHOLD
"""The daemon's: a fixed mmap threshold also fixes the trim threshold at glibc's 128 KiB, so
the heap's top was given back after nearly every decompressed 128 KiB value block freed and
faulted in again for the next: a 1 GiB extraction's tar maker took 41-82k page faults and
1.11-1.26 s of CPU, against 4-16k and 0.88-0.94 s with this (at most 4 MiB per arena kept)."""

_MMAP = (M_MMAP_THRESHOLD, MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold")
_TRIM_ENV = ("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold")
_SETTINGS = (
    (M_ARENA_MAX, ARENAS, "MALLOC_ARENA_MAX", "glibc.malloc.arena_max"),
    _MMAP,
    (M_TRIM_THRESHOLD, DAEMON_TRIM_THRESHOLD, *_TRIM_ENV),
)
_STREAM_SETTINGS = (_MMAP, (M_TRIM_THRESHOLD, TRIM_THRESHOLD, *_TRIM_ENV))


def _given(env: str, tunable: str) -> bool:
    """Whether the environment sets this malloc parameter itself (either way glibc reads)."""
    if env in os.environ:
        return True
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return any(part.split("=", 1)[0] == tunable for part in tunables.split(":"))


def tune_malloc() -> bool:
    """Apply the settings (see the module); whether glibc took every one it was given."""
    return _apply(_SETTINGS)


def tune_malloc_for_streams() -> bool:
    """For a CLI about to receive a stream of hundreds of MiB (a checkout's delta, a whole
    basebackup): every piece read from the socket is a new 256 KiB bytes object, freed once
    applied. By default glibc's threshold rises to that size, so the pieces come from the
    heap, but the heap's top above 2x that is given back after each free and faulted in
    again at the next piece: receiving 290 MB cost 0.20-0.22 s of CPU and 25-32k page
    faults, with this 4 MiB threshold and 16 MiB kept at the top 0.11-0.16 s and none
    (either setting alone: more faults than neither). Whether glibc took both."""
    return _apply(_STREAM_SETTINGS)


def _apply(settings: tuple[tuple[int, int, str, str], ...]) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    took = True
    for param, value, env, tunable in settings:
        if not _given(env, tunable):
            took = bool(mallopt(param, value)) and took
    return took
