"""`make bench`: run every benchmark in turn with its defaults (by hand, never in CI)."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = (
    "bench.wal_catchup",
    "bench.ingest",
    "bench.redo",
    "bench.extract",
    "bench.import_export",
    "bench.checkout",
    "bench.exchange",
    "bench.remote",
)


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        print(f"=== {name}", file=sys.stderr, flush=True)
        module = importlib.import_module(name)
        code = module.main([])
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
