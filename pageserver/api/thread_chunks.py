"""A blocking producer of chunks (a basebackup's tar, a `.neon` file's frames) run on a thread
of its own, a few chunks ahead of the event loop that sends them (`chunks_in_thread`) or of a
blocking writer (`chunks_ahead`).

Pulled one `next()` per thread hop (`asyncio.to_thread(next, ...)`), the producer stood still
from each chunk's return until the event loop had sent it and scheduled the next hop: on a
busy machine the hops cost as much as the chunks (an export of a 1 GiB snapshot took 5 s
through the daemon and 2 s in one process). Here the producer runs on and only waits when
`ahead` chunks are queued for sending (memory stays that many chunks).
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncGenerator, Iterator
from typing import TypeVar, cast

from pageserver.api.own_thread import start_own_thread

T = TypeVar("T")

_END = object()


async def chunks_in_thread(chunks: Iterator[T], ahead: int = 4) -> AsyncGenerator[T, None]:
    """Yield what `chunks` yields, run on a thread of its own (not the loop's default
    executor: a stream stalled by a slow reader would hold that thread for its length,
    pageserver/api/own_thread.py) at most `ahead` items ahead of the consumer. Its errors
    are raised here; when the consumer stops early (close it, e.g. with
    `contextlib.aclosing`), the producer stops at its next item and `chunks` is closed on its
    thread (a generator's `finally` stops its own workers there)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[object, BaseException | None]] = asyncio.Queue()
    slots = threading.Semaphore(ahead)
    stop = threading.Event()

    def put(item: object, exc: BaseException | None = None) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, (item, exc))

    def produce() -> None:
        try:
            for item in chunks:
                slots.acquire()
                if stop.is_set():
                    return
                put(item)
            put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            put(_END, exc)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    producer = asyncio.wrap_future(start_own_thread("chunks-in-thread", produce))
    try:
        while True:
            item, exc = await queue.get()
            slots.release()
            if exc is not None:
                raise exc
            if item is _END:
                return
            yield cast(T, item)
    finally:
        stop.set()
        slots.release()  # a producer waiting for a slot sees `stop`
        await asyncio.shield(producer)


def chunks_ahead(chunks: Iterator[T], ahead: int = 4) -> Iterator[T]:
    """`chunks_in_thread` for a blocking consumer: yield what `chunks` yields, produced on a
    thread of its own at most `ahead` items ahead. A consumer writing to a pipe or socket
    blocks in the kernel with the GIL released, and the producer makes the next chunks
    meanwhile; consumed one by one, a basebackup's tar was made and written in turns (py-spy:
    its writer spent 38% of a 1 GiB extraction blocked on the pipe, the other end idle 78%).
    Errors are raised here; when the consumer stops early (closes this generator), the
    producer stops at its next item and `chunks` is closed on its thread."""
    items: queue.SimpleQueue[tuple[object, BaseException | None]] = queue.SimpleQueue()
    slots = threading.Semaphore(ahead)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in chunks:
                slots.acquire()
                if stop.is_set():
                    return
                items.put((item, None))
            items.put((_END, None))
        except BaseException as exc:  # handed to the consumer, raised there
            items.put((_END, exc))
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    producer = threading.Thread(target=produce, name="chunks-ahead", daemon=True)
    producer.start()
    try:
        while True:
            item, exc = items.get()
            slots.release()
            if exc is not None:
                raise exc
            if item is _END:
                return
            yield cast(T, item)
    finally:
        stop.set()
        slots.release()  # a producer waiting for a slot sees `stop`
        producer.join()
