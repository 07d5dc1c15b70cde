"""A FIFO put where a writer is about to open a file (PostgreSQL's account owns the
directories the CLI and the daemon write into): the writer must refuse it, not block."""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest


def raised_within(run: Callable[[], None], where: Path, seconds: float = 20.0) -> BaseException:
    """What `run` raised, on a thread of its own; the test fails if it raised nothing or
    did not end within `seconds` (blocked on a FIFO below `where`: each is then opened and
    read, which lets the writer go on, so that no thread stays blocked after the test)."""
    raised: list[BaseException] = []

    def target() -> None:
        try:
            run()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=target, name="fifo-writer", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        fifos = [p for p in where.rglob("*") if stat.S_ISFIFO(p.lstat().st_mode)]
        fds = [os.open(p, os.O_RDONLY | os.O_NONBLOCK) for p in fifos]
        try:
            while thread.is_alive():
                for fd in fds:
                    with contextlib.suppress(BlockingIOError):
                        os.read(fd, 1 << 20)
                thread.join(0.01)
        finally:
            for fd in fds:
                os.close(fd)
        pytest.fail(f"the writer blocked on a FIFO ({fifos}) for {seconds:.0f} s")
    if not raised:
        pytest.fail("the writer took a FIFO for a file")
    return raised[0]
