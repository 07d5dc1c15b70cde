"""The order in which test files are handed to the xdist workers: the costliest first.

`-n 2 --dist loadfile` keeps a file on one worker and hands the next file to whichever
worker runs out; xdist's own order (most tests first) left files of a few long end-to-end
tests for the end, where one ran alone while the other worker idled. Handed out longest
first, the files last in the queue are short and the two workers end close together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

SECONDS: dict[str, float] = {
    "tests/pageserver/storage/test_merge_flush.py": 940,  # 1288 before 2d02485 (x 0.73)
    "tests/cli/test_nodes.py": 317,
    "tests/pg15/test_waldump_oracle.py": 309,
    "tests/e2e/test_snapshot_import.py": 308,
    "tests/e2e/test_tablespace_import.py": 277,
    "tests/pageserver/history/test_compaction_stop.py": 207,
    "tests/e2e/test_snapshots_checkout.py": 207,
    "tests/pageserver/redo/test_native_redo.py": 177,
    "tests/e2e/test_snapshot_recv.py": 170,  # 139 + its two disk-full tests (+22%: 33 of 152 s)
    "tests/e2e/test_snapshot_diff.py": 142,
    "tests/pageserver/ingest/test_import_neon.py": 140,
    "tests/pageserver/ingest/test_native_ingest.py": 122,
    "tests/pg15/test_native_walscan.py": 118,
    "tests/pageserver/ingest/test_live_import.py": 110,
    "tests/pageserver/reconstruct/test_range_rebuild.py": 74,
    "tests/pageserver/reconstruct/test_range_reads.py": 49,
    "tests/cli/test_push_guess.py": 43,
    "tests/pageserver/storage/layers/test_compaction_publish.py": 38,
    "tests/cli/test_lazy_imports.py": 37,
}
"""A file's seconds on two workers (its tests' setup, call and teardown, summed from
`--durations` and per-test clocks of two runs of session 24 at load 8-15: about twice a
quiet box's), for the files above their estimate."""

UNMEASURED_PER_TEST = 1.0
"""A file SECONDS does not name is taken to cost this many seconds a test..."""
UNMEASURED_E2E_PER_TEST = 20.0
"""...or this many, an end-to-end file (tests/e2e/: 8-28 s a test in the files measured)."""


class Item(Protocol):
    @property
    def nodeid(self) -> str: ...


T = TypeVar("T", bound=Item)


def file_of(item: Item) -> str:
    return item.nodeid.partition("::")[0]


def per_test(file: str) -> float:
    return UNMEASURED_E2E_PER_TEST if file.startswith("tests/e2e/") else UNMEASURED_PER_TEST


def costliest_first(items: Sequence[T]) -> list[T]:
    """The items, file by file, files by their seconds descending (SECONDS, else an
    estimate a test), equal ones as found; a file's tests in their own order."""
    counts: dict[str, int] = {}
    for item in items:
        counts[file_of(item)] = counts.get(file_of(item), 0) + 1
    first = {file: index for index, file in enumerate(counts)}

    def rank(item: T) -> tuple[float, int]:
        file = file_of(item)
        return (-SECONDS.get(file, counts[file] * per_test(file)), first[file])

    return sorted(items, key=rank)
