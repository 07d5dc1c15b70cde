"""`python -m bench.exchange --profile DIR`: this directory goes on PYTHONPATH of our CLI and
pageserver processes, so each of them runs under cProfile (its main thread) from start-up
and writes DIR/TAG-KIND-PID.prof when it exits (BENCH_PROFILE_DIR, BENCH_PROFILE_TAG: the
step of the benchmark; KIND: the module run with -m, pageserver.daemon, or the script and
its first two arguments, neon-snapshot-push). Nothing happens without BENCH_PROFILE_DIR.
"""

from __future__ import annotations

import atexit
import cProfile
import os
import sys

_DIR = os.environ.get("BENCH_PROFILE_DIR")


def _dump(profile: cProfile.Profile, directory: str) -> None:
    profile.disable()
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    script = [os.path.basename(sys.argv[0] or "python"), *sys.argv[1:3]]
    kind = spec.name if spec is not None else "-".join(script)
    tag = os.environ.get("BENCH_PROFILE_TAG", "run")
    profile.dump_stats(os.path.join(directory, f"{tag}-{kind}-{os.getpid()}.prof"))


if _DIR:
    _profile = cProfile.Profile()
    atexit.register(_dump, _profile, _DIR)
    _profile.enable()
