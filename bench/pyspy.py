"""py-spy sampling around a benchmark's steps: the daemon by its PID, a CLI command wrapped.

cProfile (bench/profile_site) counts Python calls only and slows the C paths' callers; py-spy
samples the real stacks from outside (`pip install py-spy` into .venv; it needs ptrace, which
root has), so a step's wall time splits into where each thread was. Raw (collapsed) output:
one line per distinct stack, `frame;frame;... count`; `summary` ranks the functions by the
samples whose stack holds them (inclusive) and by those where they are on top (self).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RATE = int(os.environ.get("PYSPY_RATE", "50"))
"""Samples per second: enough for steps of seconds, little load on a 2-core box (PYSPY_RATE=250
for steps of a tenth of a second: a small `bench.checkout --scale 10` run's fixed costs)."""


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(__file__).parents[1] / ".venv/bin/py-spy")
    if not Path(found).exists():
        raise RuntimeError("py-spy is not installed: .venv/bin/pip install py-spy")
    return found


def wrapped(cmd: list[str], out: Path) -> list[str]:
    """`cmd` run under py-spy, its samples into `out`; idle stacks too, so the main thread's
    samples split the command's wall time (waits for the daemon or PostgreSQL included)."""
    return [py_spy(), "record", "--format", "raw", "--nonblocking", "--idle", "--rate",
            str(RATE), "-o", str(out), "--", *cmd]  # fmt: skip


@contextmanager
def recording(pid: int, out: Path) -> Iterator[None]:
    """Sample process `pid` (all its threads) while the block runs."""
    proc = subprocess.Popen(
        [py_spy(), "record", "--pid", str(pid), "--format", "raw", "--nonblocking",
         "--rate", str(RATE), "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(0.3)  # attached before the step begins
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _frame_name(frame: str) -> str:
    """`func (path/to/module.py:123)` -> `module.py:func` (lines differ within a function)."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{Path(path).name}:{name}" if path else name


def summary(path: Path, top: int = 15, within: str | None = None) -> str:
    """The `top` functions by inclusive and by self samples, in % of all samples (of the
    stacks holding a frame named `within` only, e.g. a script's main thread)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    if not path.exists():
        return f"{path.name}: no samples (py-spy wrote nothing)"
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if within is not None and within not in frames:
            continue
        total += n
        for name in set(frames):
            inclusive[name] += n
        if frames:
            own[frames[-1]] += n
    if not total:
        return f"{path.name}: no samples"
    what = "busy thread time" if within is None else f"wall time of {within}"
    lines = [f"{path.name}: {total} samples ({total / RATE:.1f} s of {what})"]
    lines.append("  inclusive:")
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    lines.append("  self:")
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in own.most_common(top)]
    return "\n".join(lines)
