"""Fidelity checks run once more with every C fast path off (NEON_PURE_PYTHON=1), over the
same real WAL and the same PostgreSQL oracle.

The switch is read at import (pg15/native.py: each module binds its extension, or None, when
it is imported), so the Python references can only run in a fresh interpreter. A fidelity
test makes its expensive part once (a real PostgreSQL writing WAL, the oracle's pages, dumps
or recovery) and runs its check twice: in-process with the C paths, and through `run_pure`
in a child with NEON_PURE_PYTHON=1, which fails if any extension was loaded there. CLI and
daemon checks run `neon` with `PURE_ENV`; `mapped_extensions` shows what a process loaded.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

PURE_ENV = {"NEON_PURE_PYTHON": "1"}

EXTENSIONS = (
    "pg15._walscan",
    "pageserver.ingest._walingest",
    "pageserver.redo._redo",
    "pageserver.storage.layers._blockpack",
    "pageserver.storage.layers._inmem",
)
"""Every C fast path (setup.py's extensions)."""

ROOT = Path(__file__).resolve().parent.parent


def pure_env() -> dict[str, str]:
    """This process's environment with every C fast path switched off."""
    return {**os.environ, **PURE_ENV}


def run_pure(function: Callable[..., T], *args: Any, timeout: float = 900) -> T:
    """`function(*args)` in a child interpreter with NEON_PURE_PYTHON=1: its result (pickled
    back), or an AssertionError with the child's traceback. `function` is a module-level
    function of an importable module; its arguments and result pickle."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "tests.pure_python"],
        input=pickle.dumps((function, args)),
        capture_output=True,
        env=pure_env(),
        cwd=ROOT,
        timeout=timeout,
        check=False,
    )
    name = getattr(function, "__qualname__", repr(function))
    if proc.returncode != 0:
        raise AssertionError(
            f"{name} with NEON_PURE_PYTHON=1 failed:\n{proc.stderr.decode(errors='replace')}"
        )
    sys.stderr.write(proc.stderr.decode(errors="replace"))  # its prints (shown by -rP)
    print(f"{name} with NEON_PURE_PYTHON=1: {time.monotonic() - started:.1f} s", file=sys.stderr)
    result: T = pickle.loads(proc.stdout)
    return result


def mapped_extensions(pid: int) -> set[str]:
    """The C fast paths process `pid` has loaded (its /proc/PID/maps)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {name for name in EXTENSIONS if f"/{name.rsplit('.', 1)[1]}." in maps}


def _child() -> None:
    """run_pure's child: call the function, check no extension was loaded, send the result."""
    function, args = pickle.load(sys.stdin.buffer)
    out, sys.stdout = sys.stdout.buffer, sys.stderr  # the function's prints go to stderr
    result = function(*args)
    loaded = sorted(name for name in EXTENSIONS if name in sys.modules)
    assert not loaded, f"NEON_PURE_PYTHON=1, yet C extensions were loaded: {loaded}"
    out.write(pickle.dumps(result))
    out.flush()


if __name__ == "__main__":
    _child()
