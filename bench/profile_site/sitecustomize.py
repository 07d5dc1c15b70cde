"""`python -m bench.exchange --profile DIR`: this directory goes on PYTHONPATH of our CLI and
pageserver processes, so each of them runs under cProfile from start-up, every thread too
(the daemon does its heavy work in executor threads), and writes DIR/TAG-KIND-PID.prof when
it exits (BENCH_PROFILE_DIR, BENCH_PROFILE_TAG: the step of the benchmark; KIND: the module
run with -m, pageserver.daemon, or the script and its first two arguments,
neon-snapshot-push). Nothing happens without BENCH_PROFILE_DIR.
"""

from __future__ import annotations

import atexit
import cProfile
import os
import pstats
import sys
import threading

_DIR = os.environ.get("BENCH_PROFILE_DIR")
_threads: list[cProfile.Profile] = []  # of threads that ended (joined before atexit runs)


def _thread_run(self: threading.Thread) -> None:
    profile = cProfile.Profile()
    profile.enable()
    try:
        _plain_run(self)
    finally:
        profile.disable()
        _threads.append(profile)


def _dump(main: cProfile.Profile, directory: str) -> None:
    main.disable()
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    script = [os.path.basename(sys.argv[0] or "python"), *sys.argv[1:3]]
    kind = spec.name if spec is not None else "-".join(script)
    tag = os.environ.get("BENCH_PROFILE_TAG", "run")
    stats = pstats.Stats(main)
    for profile in _threads:
        stats.add(profile)
    stats.dump_stats(os.path.join(directory, f"{tag}-{kind}-{os.getpid()}.prof"))


if _DIR:
    _plain_run = threading.Thread.run
    threading.Thread.run = _thread_run  # type: ignore[method-assign]
    _main = cProfile.Profile()
    atexit.register(_dump, _main, _DIR)
    _main.enable()
