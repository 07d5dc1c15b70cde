"""asyncio helpers the daemon's, the walreceiver's and the CLI's loops share."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float) -> T:
    """`awaitable`'s result, or TimeoutError once `seconds` passed (it is cancelled then).

    Not `asyncio.wait_for`: on Python 3.11 (bpo-42130, fixed by 3.12's rewrite) a wait_for
    whose task is cancelled in the loop turns where what it awaits completes returns that
    result and drops the cancellation, and the task goes on as if not cancelled: a
    follower's task went on into a paused node's `_active.wait()` and `pg checkout`'s
    branch waited 120 s for it to stop; a cancelled ssh push went on to its COMMIT.
    `asyncio.timeout` wraps no task: the awaitable runs in the caller's, which a
    cancellation always reaches (ruff's TID251 refuses wait_for outside tests)."""
    async with asyncio.timeout(seconds):
        return await awaitable


async def wait_event(event: asyncio.Event, seconds: float) -> bool:
    """Wait for `event` at most `seconds`; whether it was set (`within`: never a lost
    cancellation)."""
    with contextlib.suppress(TimeoutError):
        return await within(event.wait(), seconds)
    return False
