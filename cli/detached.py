"""Background processes the CLI starts and leaves running (the pageserver, a REST server)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def spawn_detached(
    cmd: list[str], log: Path, cwd: Path, *, append: bool
) -> subprocess.Popen[bytes]:
    """Start `cmd` in a session of its own (a terminal's ^C reaches only the CLI), with no
    stdin and its output in `log` (appended to, or replacing it)."""
    with open(log, "ab" if append else "wb") as out:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            cwd=str(cwd),
        )
