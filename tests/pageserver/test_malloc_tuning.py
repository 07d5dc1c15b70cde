"""pageserver/malloc_tuning.py: glibc's mmap threshold fixed, so large freed blocks go back to
the system instead of raising the threshold (and staying in an arena's heap); a setting from
the environment wins. Each case runs in a fresh interpreter: the settings are per process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from pageserver.malloc_tuning import MMAP_THRESHOLD

# After a 16 MiB block is freed, glibc's dynamic threshold is 16 MiB: a block of twice
# MMAP_THRESHOLD then comes from the heap unless the threshold was fixed (mallinfo2's hblks
# counts the mapped blocks).
PROBE = f"""
import ctypes, sys
from pageserver.malloc_tuning import tune_malloc, tune_malloc_for_streams

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
        "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
tune = {{"tuned": tune_malloc, "streams": tune_malloc_for_streams, "top": tune_malloc}}.get(
    sys.argv[1])
took = None if tune is None else tune()
if sys.argv[1] in ("streams", "top"):  # a heap block below the threshold, freed at the top
    libc.free(libc.malloc({MMAP_THRESHOLD // 2}))
    print(took, int(libc.mallinfo2().keepcost >= {MMAP_THRESHOLD // 2}))
    sys.exit()
libc.free(libc.malloc(16 << 20))
before = libc.mallinfo2().hblks
block = libc.malloc({2 * MMAP_THRESHOLD})
print(took, libc.mallinfo2().hblks - before)
libc.free(block)
"""

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")


def _probe(mode: str, **env: str) -> tuple[str, int]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env={**clean, **env}, check=True,
        capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    return out[0], int(out[1])


def test_large_blocks_are_mapped_after_tuning() -> None:
    assert _probe("untuned") == ("None", 0)  # the dynamic threshold kept it in the heap
    assert _probe("tuned") == ("True", 1)


def test_a_threshold_from_the_environment_is_kept() -> None:
    assert _probe("tuned", MALLOC_MMAP_THRESHOLD_=str(32 << 20)) == ("True", 0)


def test_a_threshold_from_glibc_tunables_is_kept() -> None:
    tunables = f"glibc.malloc.check=0:glibc.malloc.mmap_threshold={32 << 20}"
    assert _probe("tuned", GLIBC_TUNABLES=tunables) == ("True", 0)


def test_streams_keep_the_freed_top_of_the_heap() -> None:
    """A freed block at the heap's top stays for the next one (not given back and faulted
    in again); a trim threshold from the environment wins."""
    assert _probe("streams") == ("True", 1)
    assert _probe("streams", MALLOC_TRIM_THRESHOLD_=str(128 << 10)) == ("True", 0)


def test_the_daemon_keeps_the_freed_top_of_the_heap() -> None:
    """The daemon's fixed mmap threshold left glibc's trim threshold at 128 KiB: the top of
    the heap went back to the system after each freed value block and was faulted in again
    (a 1 GiB extraction: 41-82k page faults). A block below the threshold freed at the top
    stays; a trim threshold from the environment wins."""
    assert _probe("top") == ("True", 1)
    assert _probe("top", MALLOC_TRIM_THRESHOLD_=str(128 << 10)) == ("True", 0)
