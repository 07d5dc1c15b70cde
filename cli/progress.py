"""Progress bars for long work, on a terminal only (scripts and --json get none), or as JSON
lines for a program that asks for them (`NEON_PROGRESS=json`: the web console)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

PROGRESS_ENV = "NEON_PROGRESS"
"""`NEON_PROGRESS=json`: every progress bar is written as JSON lines on stderr instead, with
or without a terminal or --json (stdout stays the command's own)."""
JSON_INTERVAL = 0.5
"""Seconds between two JSON progress lines of one bar (the last state is always written)."""

KNOWN_TOTAL = "{desc} [{bar:10}] {percentage:3.0f}% | {rate_fmt} | ETA {remaining}"
UNKNOWN_TOTAL = "{desc} {n_fmt}B | {rate_fmt} | {elapsed}"


@dataclass(frozen=True, slots=True)
class ProgressReport:
    """One JSON progress line: `{"progress": WHAT, "done": BYTES, "total": BYTES|null}`."""

    what: str
    done: int
    total: int | None

    @property
    def percent(self) -> float | None:
        """How far, when the total is known."""
        if not self.total:
            return None
        return min(100.0, 100.0 * self.done / self.total)

    def line(self) -> str:
        return json.dumps({"progress": self.what, "done": self.done, "total": self.total})

    @classmethod
    def parse(cls, line: str) -> ProgressReport | None:
        """The report a line holds, or None for any other line."""
        if not line.startswith('{"progress": '):
            return None
        try:
            raw = json.loads(line)
            what, done, total = raw["progress"], raw["done"], raw["total"]
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(what, str) or not isinstance(done, int):
            return None
        return cls(what, done, total if isinstance(total, int) else None)


class Progress:
    """A `[=====-----] 60% | 20MB/s` bar with ETA on a TTY; nothing otherwise; JSON lines
    under NEON_PROGRESS=json."""

    def __init__(self, enabled: bool, what: str, *, transient: bool = False) -> None:
        self._bar: tqdm[Any] | None = None
        self._enabled = enabled
        self._what = what
        self._transient = transient  # erased when done (a line printed after replaces it)
        self._json = os.environ.get(PROGRESS_ENV) == "json"
        self._last: ProgressReport | None = None
        self._written: ProgressReport | None = None
        self._written_at = 0.0

    @property
    def shown(self) -> bool:
        """Whether updates go anywhere (a bar, or JSON lines): worth a total's cost."""
        return self._enabled or self._json

    def _report(self, done: int, total: int | None, *, final: bool = False) -> None:
        """Write the state as a JSON line: at most every JSON_INTERVAL seconds, and the last."""
        report = self._last = ProgressReport(self._what, done, total)
        now = time.monotonic()
        complete = total is not None and done >= total
        if report == self._written or not (
            final or complete or now - self._written_at >= JSON_INTERVAL
        ):
            return
        print(report.line(), file=sys.stderr, flush=True)
        self._written, self._written_at = report, now

    def update(self, done: int, total: int | None) -> None:
        if self._json:
            known = self._last.total if self._last is not None else None
            if known is not None:  # as the bar's: a total only grows
                total = known if total is None else max(total, known)
            self._report(done, total)
            return
        if not self._enabled:
            return
        bar = self._bar
        if bar is None:
            # Imported here: only a terminal shows a bar, and every command imports this module.
            from tqdm import tqdm

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
        if self._json and self._last is not None:
            self._report(self._last.done, self._last.total, final=True)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
