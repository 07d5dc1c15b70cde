"""Progress bars for long work, on a terminal only (scripts and --json get none)."""

from __future__ import annotations

import shutil
import sys
from typing import Any

from tqdm import tqdm

KNOWN_TOTAL = "{desc} [{bar:10}] {percentage:3.0f}% | {rate_fmt} | ETA {remaining}"
UNKNOWN_TOTAL = "{desc} {n_fmt}B | {rate_fmt} | {elapsed}"


class Progress:
    """A `[=====-----] 60% | 20MB/s` bar with ETA on a TTY; nothing otherwise."""

    def __init__(self, enabled: bool, what: str, *, transient: bool = False) -> None:
        self._bar: tqdm[Any] | None = None
        self._enabled = enabled
        self._what = what
        self._transient = transient  # erased when done (a line printed after replaces it)

    def update(self, done: int, total: int | None) -> None:
        if not self._enabled:
            return
        bar = self._bar
        if bar is None:
            bar = self._bar = tqdm(
                total=total,
                desc=self._what,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                ascii="-=",
                # An unknown total (a compressed stream's size): bytes so far and the rate.
                bar_format=KNOWN_TOTAL if total is not None else UNKNOWN_TOTAL,
                file=sys.stderr,
                leave=not self._transient,
                # A terminal that reports no size (0x0) gets 80x24: tqdm would show nothing.
                ncols=shutil.get_terminal_size().columns,
                nrows=shutil.get_terminal_size().lines,
            )
        if total is not None and total > (bar.total or 0):
            bar.total = total
        bar.update(done - bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
