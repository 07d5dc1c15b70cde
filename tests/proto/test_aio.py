"""wait_event: an event wait with a time limit that never loses a cancellation."""

from __future__ import annotations

import asyncio

from proto.aio import wait_event


async def test_wait_event_says_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, event.set)
    assert await wait_event(event, 5) is True


async def test_a_cancel_in_the_turn_the_event_is_set_is_not_lost() -> None:
    """asyncio.wait_for on Python 3.11 returns the event's result here and drops the
    cancellation; the waiting task must end cancelled."""
    event = asyncio.Event()
    after: list[str] = []

    async def waiter() -> None:
        await wait_event(event, 10)
        after.append("went on")

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0.01)
    event.set()
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.cancelled() and after == []
