"""Work that holds a thread for the length of a transfer runs on a thread of its own, never on
the event loop's default executor: an import reading a `.neon` file as its pusher sends it
(or a data directory of any size), a basebackup's producer waiting for a slow reader.

The default executor has min(32, cores + 4) threads (6 on 2 cores), shared by every request
that calls blocking code (`asyncio.to_thread`: a checkout's branch, a snapshot's destroy).
Six slow pushes or stalled streams held all six, and every such request waited behind them
for as long as those transfers lasted (helper-56's review). A thread per transfer costs its
start (tens of microseconds against a transfer's seconds); there are as many as transfers
in flight, each already holding a connection. The threads are not daemons: like the default
executor's, an import in flight is waited for at the interpreter's exit, not cut mid-write.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")


def start_own_thread(
    name: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> concurrent.futures.Future[T]:
    """Run `fn` on a new thread named `name` (in the caller's context variables, as
    `asyncio.to_thread` does); its result or error in the future returned."""
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    context = contextvars.copy_context()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = context.run(fn, *args, **kwargs)
        except BaseException as exc:  # handed to the awaiting side
            future.set_exception(exc)
        else:
            future.set_result(result)

    threading.Thread(target=run, name=name).start()
    return future


async def on_own_thread(name: str, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`asyncio.to_thread` on a thread of its own (see the module's note): for work that
    lasts as long as a transfer. Cancelled, the caller stops waiting; the thread runs on
    (as to_thread's would)."""
    return await asyncio.wrap_future(start_own_thread(name, fn, *args, **kwargs))
