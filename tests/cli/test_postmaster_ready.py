"""postmaster.start's readiness check against postmaster.pid (src/include/utils/pidfile.h):
a stale file left by a killed server that names the new postmaster's PID (a container's PIDs
repeat after a restart) is not taken for the new server's, as pg_ctl does not take it."""

from __future__ import annotations

import os
import time
from pathlib import Path

from cli.postmaster import _ready


def _pid_file(datadir: Path, pid: int, start_time: int, status: str) -> None:
    lines = [str(pid), str(datadir), str(start_time), "5432", "/tmp", "127.0.0.1", "0 0", status]
    (datadir / "postmaster.pid").write_text("\n".join(lines) + "\n")


def test_a_stale_ready_pid_file_with_the_new_pid_is_not_ready(tmp_path: Path) -> None:
    started = time.time()
    pid = os.getpid()
    _pid_file(tmp_path, pid, int(started) - 3600, "ready")  # the killed server's, an hour ago
    assert not _ready(tmp_path, pid, started)
    _pid_file(tmp_path, pid, int(started), "starting")  # the new server's, overwritten
    assert not _ready(tmp_path, pid, started)
    _pid_file(tmp_path, pid, int(started) - 1, "ready")  # clock skew within pg_ctl's slop
    assert _ready(tmp_path, pid, started)
    _pid_file(tmp_path, pid + 1, int(started), "ready")  # another postmaster's
    assert not _ready(tmp_path, pid, started)
