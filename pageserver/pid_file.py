"""The pageserver's pid file and process liveness, apart from the daemon so that the CLI can
check a pageserver (or any pid) without importing the whole server."""

from __future__ import annotations

import os
from pathlib import Path

from proto.errors import Conflict


def pid_alive(pid: int) -> bool:
    """Whether a process runs (a zombie, waiting to be reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def acquire_pid_file(path: Path) -> None:
    """Refuse to run twice on one workdir; replace a pidfile left by a dead process."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            try:
                other = int(path.read_text().strip() or "0")
            except (OSError, ValueError):
                other = 0
            if other and other != os.getpid() and pid_alive(other):
                raise Conflict(
                    f"a pageserver (pid {other}) already runs on {path.parent}; "
                    "stop it with `neon pageserver stop`"
                ) from None
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return
    raise Conflict(f"could not take the pid file {path}")
