"""A follower's stop() must end its streaming task: `pg checkout`'s branch replaces the
node's follower (Pageserver._refollow awaits the old one's stop), and a checkout hung 120 s in
`node_branch` on a task that had lost its cancellation, sitting in the paused node's
`_active.wait()`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from pageserver.api.metrics import Metrics
from pageserver.follow.followed_nodes import FollowedNode
from pageserver.follow.node_follower import NodeFollower
from pageserver.history.node_store import NodeStore, StorageHistory


@contextlib.asynccontextmanager
async def follower_streaming_by(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, run: Callable[[], Awaitable[str]]
) -> AsyncIterator[NodeFollower]:
    """A started follower of a node nothing listens for (port 1) whose receiver's run() is
    `run`; stopped and its store closed afterwards, its task cancelled if still running."""
    store = NodeStore(StorageHistory(tmp_path / "history"), "n")
    follower = NodeFollower(FollowedNode("n", "127.0.0.1", 1, "u", "p"), store, Metrics())
    monkeypatch.setattr(follower.receiver, "run", run)
    follower.start()
    task = follower._task
    try:
        yield follower
    finally:
        if task is not None and not task.done():
            task.cancel()
        await follower.stop()
        store.close()


async def test_stop_ends_a_streaming_task_that_lost_its_cancellation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    streaming = asyncio.Event()

    async def run_losing_its_cancellation() -> str:
        """A stream that ends when cancelled, as if the server had ended it then: the
        cancellation goes no further (however it is lost, stop() must still end)."""
        streaming.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        return "paused"

    async with follower_streaming_by(tmp_path, monkeypatch, run_losing_its_cancellation) as f:
        task = f._task
        await asyncio.wait_for(streaming.wait(), 10)
        await f.pause()  # the checkout stops the node first
        stopping = asyncio.ensure_future(f.stop())
        # Not wait_for: cancelling stop() cancels the task it awaits once more, which ends it.
        done, _ = await asyncio.wait({stopping}, timeout=10)
        assert done, "stop() did not end: its task waits in _active.wait()"  # the old code
        assert task is not None and task.done()


async def test_stop_cancels_a_task_waiting_to_retry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() wakes the retry wait (`_wake`) and cancels in the same loop turn: through
    `asyncio.wait_for` (Python 3.11) that cancellation was lost, the task left only by the
    flag; it must end cancelled."""
    ended = asyncio.Event()

    async def stream_ended_at_once() -> str:
        ended.set()
        return "stopped"

    async with follower_streaming_by(tmp_path, monkeypatch, stream_ended_at_once) as f:
        task = f._task
        await asyncio.wait_for(ended.wait(), 10)
        await asyncio.sleep(0.05)  # in the retry wait (ENDED_RETRY_SECONDS) now
        await f.stop()
        assert task is not None and task.cancelled()
