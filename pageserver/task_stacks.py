"""Every asyncio task of the pageserver with the chain of coroutines it waits in, for `kill
-USR1` (pageserver/daemon.py). faulthandler's dump (the threads' stacks) shows an idle event
loop as one frame in `select`, whatever request waits: a request stuck in an `await` (a
follower that does not stop, a wait for ingest) is seen only in its task's chain. asyncio's
own `Task.print_stack` shows a task's outermost coroutine only."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from types import FrameType
from typing import Any


def _awaited(coro: Any) -> Iterator[tuple[str, FrameType | None]]:
    """(name, frame) of a coroutine and of each it awaits in turn (async generators and
    plain generators too), innermost last."""
    seen = 0
    while coro is not None and seen < 100:  # a cycle cannot be built, but stay bounded
        seen += 1
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        frame = frame or getattr(coro, "ag_frame", None)
        yield getattr(coro, "__qualname__", type(coro).__name__), frame
        coro = (
            getattr(coro, "cr_await", None)
            or getattr(coro, "gi_yieldfrom", None)
            or getattr(coro, "ag_await", None)
        )


def format_task_stacks(loop: asyncio.AbstractEventLoop | None = None) -> str:
    """One block per task: its name, then `file:line in function` per coroutine it waits
    in, outermost first (a future it waits on last)."""
    tasks = asyncio.all_tasks(loop)
    lines = [f"asyncio tasks ({len(tasks)}), the coroutines each waits in, innermost last:"]
    for task in sorted(tasks, key=lambda t: t.get_name()):
        lines.append(f"Task {task.get_name()!r}:")
        for name, frame in _awaited(task.get_coro()):
            where = (
                f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "(done)"
            )
            lines.append(f"  {where} in {name}")
    return "\n".join(lines) + "\n"
