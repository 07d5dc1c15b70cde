"""A transport writer behind a plain blocking `write()`, for code that writes to a binary
file object from a thread (`neon snapshot export` writes the `.neon` bytes so).

The writer lives on an event loop of its own, in a thread: each `write` hands its chunk to
that loop and waits until the transport took it, so memory stays bounded by the transport's
own queue. Leaving the `with` block normally commits the object; leaving it by an exception
(SIGINT included) aborts it, and nothing appears at the destination. With `resume`, the write
is resumable (`Store.open_resumable`): an abort keeps what was sent for the next run, and
`bytes_skipped` says how much of what was written the destination already held.

The object is opened while the caller goes on: the first `write` (or the exit) waits for it.
A push sends its request to the pageserver right after, so opening (an s3 client and its
multipart upload, ssh sessions) overlaps the pageserver making the file, where it came
before it: a fixed cost of every incremental push. An error opening is raised by that
`write` (or by the exit).

With `deferred`, the `with` block only starts the loop: `run` runs coroutines on it (a push
asks the destination what it holds there, `Store.stat_for_write`, so that the store may keep
what it opened for the write on the same loop: ssh's session that appends), and `open`
opens the object. The store's `close` runs on the loop before it stops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

from cli.transport.base import Location, ObjectWriter

T = TypeVar("T")


class BlockingWriter:
    def __init__(
        self, location: Location, *, overwrite: bool,
        on_write: Callable[[bytes], None] | None = None, resume: bool = False,
        deferred: bool = False,
    ) -> None:  # fmt: skip
        self._location, self._overwrite, self._on_write = location, overwrite, on_write
        self._resume, self._deferred = resume, deferred
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="transport")
        self._opening: concurrent.futures.Future[ObjectWriter] | None = None
        self._writer: ObjectWriter | None = None
        self._pending: set[concurrent.futures.Future[Any]] = set()
        self._tar_total: int | None = None
        self.bytes_written = 0

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        self._pending.add(future)
        try:
            return future.result()
        finally:
            self._pending.discard(future)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """`coro`'s result, run on the writer's loop (inside the `with` block)."""
        return self._call(coro)

    def __enter__(self) -> BlockingWriter:
        self._thread.start()
        if not self._deferred:
            try:
                self.open()
            except BaseException:
                self._stop()
                raise
        return self

    def open(self, *, total_coming: bool = False) -> None:
        """Start opening the object (the first `write` waits for it), and its upload's
        request unless `total_coming`: then it goes with the first write, carrying the tar's
        size told meanwhile (`expect_tar`)."""
        self._opening = asyncio.run_coroutine_threadsafe(self._open(total_coming), self._loop)

    async def _open(self, total_coming: bool) -> ObjectWriter:
        store, name = self._location.store, self._location.object_name
        opening = store.open_resumable if self._resume else store.open_write
        writer = await opening(name, overwrite=self._overwrite)
        if not total_coming:
            writer.start_request()
        return writer

    def _opened(self) -> ObjectWriter:
        """The writer, once open (its error, if opening failed)."""
        if self._writer is None:
            assert self._opening is not None
            self._writer = self._opening.result()
        return self._writer

    def expect_tar(self, total: int) -> None:
        """The stream's tar size (`ObjectWriter.expect_tar`), told before the first `write`
        (from any thread): the writer gets it with that write."""
        self._tar_total = total

    def write(self, data: bytes | bytearray | memoryview) -> int:
        writer = self._opened()
        if self._tar_total is not None:
            writer.expect_tar(self._tar_total)  # read by the request the write below starts
            self._tar_total = None
        chunk = bytes(data)
        self._call(writer.write(chunk))
        self.bytes_written += len(chunk)
        if self._on_write is not None:
            self._on_write(chunk)
        return len(chunk)

    @property
    def bytes_skipped(self) -> int:
        """Of the bytes written, those a resumed write did not send (the far side had them)."""
        return 0 if self._writer is None else self._writer.bytes_skipped

    def flush(self) -> None:
        """Nothing is buffered here."""

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if self._opening is None:
                return  # never opened (a deferred open whose preparation failed)
            try:
                writer = self._opened()
            except BaseException:
                if exc is None:
                    raise
                return  # nothing was opened to abort; the block's exception goes on
            if exc is None:
                self._call(writer.commit())
            else:
                for future in list(self._pending):  # a write another thread still waits on
                    future.cancel()
                self._call(writer.abort())
        finally:
            self._stop()

    def _stop(self) -> None:
        async def drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):  # best effort: what it kept is idle
                await self._location.store.close()

        asyncio.run_coroutine_threadsafe(drain(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
