"""The pageserver's task dump (kill -USR1): each task with the coroutines it waits in."""

from __future__ import annotations

import asyncio

from pageserver.task_stacks import format_task_stacks
from tests.neoncli import NeonCli


async def _inner(ready: asyncio.Event) -> None:
    ready.set()
    await asyncio.sleep(3600)


async def _middle(ready: asyncio.Event) -> None:
    await _inner(ready)


async def test_a_task_is_shown_with_every_coroutine_it_waits_in() -> None:
    ready = asyncio.Event()
    task = asyncio.create_task(_middle(ready), name="stuck-request")
    await ready.wait()
    try:
        dump = format_task_stacks()
    finally:
        task.cancel()
    lines = dump.splitlines()
    at = lines.index("Task 'stuck-request':")
    chain = lines[at + 1 : at + 3]
    assert chain[0].endswith(" in _middle") and "test_task_stacks.py:" in chain[0], dump
    assert chain[1].endswith(" in _inner"), dump  # the innermost, not only the outermost
    assert lines[0].startswith("asyncio tasks (")


def test_kill_usr1_dumps_the_daemons_threads_and_tasks(neon: NeonCli) -> None:
    """The running pageserver writes both to pageserver.stderr, each time, and goes on: the
    threads' stacks (faulthandler, at the signal) and the tasks' chains (from the loop),
    e.g. its GC loop waiting in asyncio.sleep (the task dump replaced the threads' until
    faulthandler was registered again after the loop's handler)."""
    neon.run("pageserver", "start")
    for times in (1, 2):
        out = neon.dump_stacks([])
        assert out.count("Current thread 0x") == times, out
        assert out.count("Task 'gc':") == times, out
        gc_chain = out.split("Task 'gc':")[-1].splitlines()[1:3]
        assert gc_chain[0].endswith(" in _gc_loop") and gc_chain[1].endswith(" in sleep"), out
    assert neon.run("pageserver", "status").returncode == 0
