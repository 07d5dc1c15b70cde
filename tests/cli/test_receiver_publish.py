"""A receive's final step (cli/receiver.py, publish_once) is one step for cancellation: once
the snapshot is being made visible, it is made visible and its one-time token consumed, or
neither. Cancelled midway, the token stayed valid beside a snapshot it had admitted (a second
push with it made a second one), and the lock was let go while the import still ran."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cli.receiver import OneTimeTokens, publish_once
from proto.errors import AuthFailed, CorruptData

WAIT = 10.0


def test_a_final_step_cancelled_midway_still_consumes_the_token() -> None:
    tokens = OneTimeTokens("first")
    started, release = threading.Event(), threading.Event()
    published: list[str] = []

    def register() -> str:  # the pageserver naming the snapshot: not stopped by a cancel
        started.set()
        release.wait(WAIT)
        published.append("pushed")
        return "pushed"

    def second() -> str:
        published.append("again")
        return "again"

    async def run() -> BaseException | str:
        lock = asyncio.Lock()
        step = asyncio.ensure_future(publish_once(lock, tokens, "first", register))
        await asyncio.to_thread(started.wait, WAIT)
        step.cancel()  # the receiving side goes (its connection, a shutdown)
        await asyncio.sleep(0.05)
        again = asyncio.ensure_future(publish_once(lock, tokens, "first", second))
        await asyncio.sleep(0.05)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await step
        try:
            return (await again)[0]
        except AuthFailed as exc:
            return exc

    outcome = asyncio.run(run())
    assert published == ["pushed"]
    assert isinstance(outcome, AuthFailed) and "already used" in outcome.message
    with pytest.raises(AuthFailed, match="already used"):
        tokens.check("first")


def test_a_final_step_that_fails_keeps_the_token() -> None:
    """Refused at the end (a damaged file found by the import): the push can be run again."""
    tokens = OneTimeTokens("first")

    def register() -> str:
        raise CorruptData("the file's checksum differs")

    async def run() -> None:
        with pytest.raises(CorruptData):
            await publish_once(asyncio.Lock(), tokens, "first", register)
        assert await publish_once(asyncio.Lock(), tokens, "first", lambda: "ok") == (
            "ok",
            tokens.current,
        )

    asyncio.run(run())
    with pytest.raises(AuthFailed, match="already used"):
        tokens.check("first")


def test_a_cancel_before_the_step_began_leaves_nothing() -> None:
    """Cancelled while another push holds the lock: nothing is made visible, the token stays."""
    tokens = OneTimeTokens("first")
    published: list[str] = []

    async def run() -> None:
        lock = asyncio.Lock()
        async with lock:
            step = asyncio.ensure_future(
                publish_once(lock, tokens, "first", lambda: published.append("x"))
            )
            await asyncio.sleep(0.05)
            step.cancel()
            with pytest.raises(asyncio.CancelledError):
                await step

    asyncio.run(run())
    assert published == []
    tokens.check("first")  # still admits a push
