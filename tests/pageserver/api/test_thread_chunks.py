"""chunks_in_thread and chunks_ahead: a blocking producer run ahead of the event loop (of a
blocking consumer), in order, bounded, its errors raised to the consumer, and closed on its
own thread when the consumer stops early."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import pytest

from pageserver.api.thread_chunks import chunks_ahead, chunks_in_thread


class Producer:
    """A generator's stand-in that records how far it ran and where it was closed."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.fail_at = n, fail_at
        self.made = 0
        self.closed_on: str | None = None
        self.loop_thread = threading.current_thread().name

    def __iter__(self) -> Iterator[bytes]:
        return self.gen()

    def gen(self) -> Iterator[bytes]:
        try:
            for i in range(self.n):
                if i == self.fail_at:
                    raise OSError(f"layer unreadable at {i}")
                self.made += 1
                yield i.to_bytes(4, "big")
        finally:
            self.closed_on = threading.current_thread().name


def test_every_chunk_in_order_on_another_thread() -> None:
    producer = Producer(100)

    async def run() -> list[bytes]:
        return [c async for c in chunks_in_thread(iter(producer), ahead=3)]

    assert asyncio.run(run()) == [i.to_bytes(4, "big") for i in range(100)]
    assert producer.closed_on is not None and producer.closed_on != producer.loop_thread


def test_the_producer_stays_at_most_ahead_chunks_ahead() -> None:
    producer = Producer(1000)

    async def run() -> int:
        async with contextlib.aclosing(chunks_in_thread(iter(producer), ahead=4)) as chunks:
            await anext(chunks)
            await asyncio.sleep(0.3)  # the producer runs on while the consumer waits
            return producer.made

    made = asyncio.run(run())
    assert 2 <= made <= 1 + 4 + 1  # one taken, `ahead` queued, one made and waiting for a slot
    assert producer.closed_on is not None  # stopped early: closed, not left running
    assert producer.made < 1000


def test_an_error_of_the_producer_reaches_the_consumer() -> None:
    producer = Producer(50, fail_at=20)

    async def run() -> list[bytes]:
        got = []
        async for c in chunks_in_thread(iter(producer)):
            got.append(c)
        return got

    with pytest.raises(OSError, match="unreadable at 20"):
        asyncio.run(run())
    assert producer.made == 20 and producer.closed_on is not None


def test_a_cancelled_consumer_stops_the_producer() -> None:
    producer = Producer(10**6)

    async def consume() -> None:
        async for _c in chunks_in_thread(iter(producer), ahead=2):
            await asyncio.sleep(0.01)

    async def run() -> None:
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    made = producer.made
    time.sleep(0.1)
    assert producer.made == made < 10**6 and producer.closed_on is not None


def test_chunks_ahead_gives_every_chunk_in_order_made_on_another_thread() -> None:
    producer = Producer(100)
    assert list(chunks_ahead(iter(producer), ahead=3)) == [i.to_bytes(4, "big") for i in range(100)]
    assert producer.closed_on is not None and producer.closed_on != producer.loop_thread


def test_chunks_ahead_makes_chunks_while_the_consumer_is_blocked() -> None:
    """What a basebackup's writer gains: while it blocks (a full pipe), the next chunks are
    made. Consumed one by one on the caller's thread, none would be made meanwhile."""
    producer = Producer(1000)
    chunks = chunks_ahead(iter(producer), ahead=4)
    next(chunks)
    deadline = time.monotonic() + 10
    while producer.made < 1 + 4 and time.monotonic() < deadline:
        time.sleep(0.01)  # the consumer "blocked in a write"
    time.sleep(0.1)
    assert producer.made == 1 + 4 + 1  # one taken, `ahead` queued, one waiting for a slot
    chunks.close()
    assert producer.closed_on is not None and producer.made < 1000


def test_chunks_ahead_raises_the_producers_error_after_its_chunks() -> None:
    producer = Producer(50, fail_at=20)
    got: list[bytes] = []
    with pytest.raises(OSError, match="unreadable at 20"):
        for c in chunks_ahead(iter(producer)):
            got.append(c)
    assert len(got) == 20 and producer.closed_on is not None


def test_a_consumer_failing_stops_chunks_ahead() -> None:
    producer = Producer(10**6)
    with pytest.raises(BrokenPipeError):
        for _c in chunks_ahead(iter(producer), ahead=2):
            raise BrokenPipeError  # the pipe's reader is gone
    made = producer.made
    time.sleep(0.1)
    assert producer.made == made < 10 and producer.closed_on is not None
