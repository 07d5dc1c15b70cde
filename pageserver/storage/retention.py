"""What history must stay readable: snapshots, child branch points and the PITR window.

A PITR area is a retention policy over a node's WAL history: a TTL and/or a size limit,
each possibly infinite (`--ttl 30d --size-limit 10G`, `inf`). It becomes a window
[window_start, tip] of LSNs that stay readable; snapshots and child branch points add single
retained LSNs. `pageserver.storage.gc_policy` computes them (`area_window`, `plan_gc`); GC
(`pageserver.storage.gc`) removes whatever no read at those LSNs needs.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from fractions import Fraction

from proto.errors import InvalidArgument

INFINITE = "inf"
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])\Z")
_SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\Z")

MAX_TTL = "36500d"
"""The longest TTL a new area accepts (100 years; 'inf' keeps everything)."""
MAX_TTL_SECONDS = 36500 * 86400
MAX_SIZE_LIMIT = "1048576T"
"""The largest size limit a new area accepts (1 EiB)."""
MAX_SIZE_LIMIT_BYTES = 1 << 60


def parse_duration(text: str) -> float | None:
    """`30d`, `12h`, `90m`, `45s`, `2w` as seconds; `inf` as None (unbounded)."""
    value = text.strip().lower()
    if value in (INFINITE, "infinity"):
        return None
    m = _DURATION_RE.match(value)
    if not m:
        raise InvalidArgument(
            f"invalid duration {text!r}: expected a number with a unit s, m, h, d or w "
            "(e.g. 30d, 12h) or 'inf'"
        )
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if seconds <= 0:
        raise InvalidArgument(f"invalid duration {text!r}: it must be positive")
    return seconds


def parse_size(text: str) -> int | None:
    """`10G`, `500M`, `64k`, `1TiB`, `4096` (bytes; binary units) as bytes; `inf` as None."""
    value = text.strip().lower()
    if value in (INFINITE, "infinity"):
        return None
    m = _SIZE_RE.match(value)
    if not m:
        raise InvalidArgument(
            f"invalid size {text!r}: expected a number with an optional unit K, M, G or T "
            "(e.g. 10G, 500M) or 'inf'"
        )
    # Exact arithmetic: a float of a 400-digit number is infinite and floor() of it raises.
    size = math.floor(Fraction(m.group(1)) * _SIZE_UNITS[m.group(2)])
    if size <= 0:
        raise InvalidArgument(f"invalid size {text!r}: it must be positive")
    return size


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """A PITR area's limits; None means infinite."""

    ttl: float | None = None
    """Seconds of history to keep."""
    size_limit: int | None = None
    """Bytes of layer files holding the window's history."""

    def __post_init__(self) -> None:
        if self.ttl is not None and not self.ttl > 0:
            raise InvalidArgument("a PITR TTL must be positive (or infinite)")
        if self.size_limit is not None and self.size_limit <= 0:
            raise InvalidArgument("a PITR size limit must be positive (or infinite)")

    @staticmethod
    def parse(ttl: str = INFINITE, size_limit: str = INFINITE) -> RetentionPolicy:
        return RetentionPolicy(parse_duration(ttl), parse_size(size_limit))

    @staticmethod
    def parse_new(ttl: str = INFINITE, size_limit: str = INFINITE) -> RetentionPolicy:
        """The policy of a new area: parsed, and within MAX_TTL and MAX_SIZE_LIMIT."""
        policy = RetentionPolicy.parse(ttl, size_limit)
        if policy.ttl is not None and not policy.ttl <= MAX_TTL_SECONDS:
            raise InvalidArgument(
                f"TTL {ttl!r} is too long: the maximum is {MAX_TTL} (100 years); "
                "use --ttl inf to keep all history"
            )
        if policy.size_limit is not None and policy.size_limit > MAX_SIZE_LIMIT_BYTES:
            raise InvalidArgument(
                f"size limit {size_limit!r} is too large: the maximum is {MAX_SIZE_LIMIT} "
                "(1 EiB); use --size-limit inf for no limit"
            )
        return policy

    def ttl_cutoff(self, now: datetime) -> datetime | None:
        """now - ttl: the oldest time the TTL keeps; None when it keeps everything (no TTL,
        or one reaching before year 1, as an area stored before MAX_TTL existed may)."""
        if self.ttl is None:
            return None
        try:
            return now - timedelta(seconds=self.ttl)
        except OverflowError:
            return None


@dataclass(frozen=True, slots=True)
class Retention:
    """The reads GC must preserve on one timeline: at each retained LSN, at every LSN in
    [window_start, tip] (if there is a window), and at the tip and above."""

    retain_lsns: tuple[int, ...]
    """Sorted, distinct."""
    window_start: int | None
    tip: int

    def allows(self, lsn: int) -> bool:
        """True when a read at `lsn` is guaranteed to survive GC (reads elsewhere must be
        refused: GC may have removed what they need)."""
        if lsn >= self.tip or (self.window_start is not None and lsn >= self.window_start):
            return True
        i = bisect.bisect_left(self.retain_lsns, lsn)
        return i < len(self.retain_lsns) and self.retain_lsns[i] == lsn

    def first_at_or_above(self, lsn: int) -> int:
        """The smallest preserved read LSN >= lsn (what decides whether GC keeps a layer)."""
        if lsn >= self.tip:
            return lsn
        best = self.tip
        if self.window_start is not None:
            best = min(best, max(lsn, self.window_start))
        i = bisect.bisect_left(self.retain_lsns, lsn)
        if i < len(self.retain_lsns):
            best = min(best, self.retain_lsns[i])
        return best


def size_window_start(delta_sizes: Iterable[tuple[int, int]], size_limit: int, floor: int) -> int:
    """The lowest LSN >= floor above which the delta layers' history weighs <= size_limit.

    `delta_sizes` are the (lsn_end, file bytes) of the delta layers. A window starting at x
    needs the delta layers with versions above x (lsn_end - 1 > x), counted whole."""
    by_end: dict[int, int] = {}
    for lsn_end, size in delta_sizes:
        by_end[lsn_end - 1] = by_end.get(lsn_end - 1, 0) + size
    above = 0
    for end in sorted(by_end, reverse=True):
        above += by_end[end]
        if above > size_limit:
            return max(floor, end)  # the layers ending here no longer fit: start at them
    return floor
