"""A cancel landing in the loop turns around the one where an awaited thing completes.

Python 3.11's `asyncio.wait_for` returns the result of what it awaited to a task cancelled
in the turn that thing completed and drops the cancellation (bpo-42130): the task goes on as
if not cancelled. `cancel_missed` drives a coroutine through each of those turns with no
real sleep: what it awaits is a `Gate` the test opens, the cancel comes 0..TURNS loop turns
later, and every cancel that found the task still running must end it cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

T = TypeVar("T")

TURNS = 8
"""How many loop turns after the gate opens the cancel is tried at (wait_for's window is
within 4; a shield in between adds 2)."""

BOUND = 30.0
"""How long a cancelled task may take to end: never reached unless it hangs."""


class Gate(Generic[T]):
    """What a fake's awaited method waits on: `wait()` returns `value` once `open`ed."""

    def __init__(self, value: T) -> None:
        self.value = value
        self.entered = asyncio.Event()
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def wait(self) -> T:
        self.entered.set()
        await self._opened
        return self.value

    def open(self) -> None:
        self._opened.set_result(None)


async def cancel_missed(
    run: Callable[[Gate[T]], Coroutine[Any, Any, object]], value: T
) -> list[int]:
    """The turns (0: the turn the gate opens) at which a cancel of `run(gate)`, still running,
    did not end it cancelled (it returned or raised something else)."""
    missed = []
    for turns in range(TURNS):
        gate = Gate(value)
        task = asyncio.create_task(run(gate))
        await asyncio.wait_for(gate.entered.wait(), BOUND)
        gate.open()
        for _ in range(turns):
            await asyncio.sleep(0)
        if not task.cancel():
            continue  # done before the cancel: nothing to lose
        await asyncio.wait({task}, timeout=BOUND)
        assert task.done(), f"a task cancelled {turns} turns after its gate opened hangs"
        if not task.cancelled():
            missed.append(turns)
    return missed
