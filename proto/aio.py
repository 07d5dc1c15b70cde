"""asyncio helpers the daemon's and the walreceiver's loops share."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait for `event` at most `seconds`; whether it was set. Not `asyncio.wait_for`: on
    Python 3.11 a wait_for whose awaited event is set in the same loop turn as its task is
    cancelled returns the result and drops the cancellation (bpo-42130, fixed by 3.12's
    rewrite): a follower's task then went on into a paused node's `_active.wait()`, and
    `pg checkout`'s branch waited 120 s for it to stop. `asyncio.timeout` wraps no task, so
    a cancellation always reaches the waiting task."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
            return True
    return False
