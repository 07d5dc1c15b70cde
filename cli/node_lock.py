"""One state-changing command at a time on a node.

`pg create/start/stop/destroy/checkout`, `snapshot create/destroy` and `pitr extract-snapshot`
hold an exclusive flock on NEON_HOME/locks/<node id>.lock for their whole run. Two checkouts of
one node started together used to interleave their renames (tracebacks, and once a command
that reported one state while the node held the other).

A second command waits rather than fails: what it asks for is still meaningful once the
first is done (two checkouts end in the later one's state, as if typed one after the other),
and scripts need no retry loop. It says what it waits for, and gives up after
LOCK_WAIT_SECONDS with one line naming the operation in progress, so a stuck command cannot
hang every other one forever. The kernel drops an flock when its holder dies, so a killed
command never leaves a node locked. Lock files are never deleted, not even by `pg destroy`: a
waiter holds the old file open, and a third command would lock a new file beside it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Callable, Iterator

from cli.context import App
from cli.home import NeonHome
from cli.registry import NodeRow
from proto.errors import Conflict, NotFound

LOCK_WAIT_SECONDS = 600.0
_POLL_SECONDS = 0.1


def _to_stderr(message: str) -> None:
    print(f"neon: {message}", file=sys.stderr, flush=True)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(fd: int, node_id: str) -> str:
    """What holds the lock, as its holder wrote it (it may not have written it yet)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0))
        return f"`{info['operation']}` on {node_id} (pid {int(info['pid'])})"
    except (ValueError, KeyError, TypeError):
        return f"another command on {node_id}"


@contextlib.contextmanager
def node_lock(
    home: NeonHome,
    node_id: str,
    operation: str,
    *,
    wait: float = LOCK_WAIT_SECONDS,
    notify: Callable[[str], None] = _to_stderr,
) -> Iterator[None]:
    """Hold node `node_id`'s lock for `operation` (e.g. "pg checkout"), waiting up to `wait`
    seconds for a command that holds it; Conflict naming that command after that."""
    home.locks_dir.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(home.locks_dir / f"{node_id}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if not _try_lock(fd):
            holder = _holder(fd, node_id)
            notify(f"waiting for {holder} to finish...")
            deadline = time.monotonic() + wait
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    raise Conflict(
                        f"{_holder(fd, node_id)} is still running after {wait:g} s; "
                        "try again once it has finished"
                    )
                time.sleep(_POLL_SECONDS)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"operation": operation, "pid": os.getpid()}).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def locked_node(app: App, ref: str, operation: str) -> Iterator[NodeRow]:
    """The node `ref` (ID or data directory name) under its lock, read again once the lock is
    held: a command it waited for may have changed or destroyed it."""
    node = app.registry.get_node(ref)
    with node_lock(app.home, node.id, operation):
        now = app.registry.find_node(node.id)
        if now is None or now.created_at != node.created_at:
            raise NotFound(f"node {ref!r} was destroyed while this command waited for it")
        yield now
