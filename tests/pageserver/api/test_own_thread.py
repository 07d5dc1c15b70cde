"""Transfers (imports, basebackup producers) run on threads of their own: with more of them
stalled than the event loop's default executor has threads, a short request that needs a
worker thread still answers at once (pageserver/api/own_thread.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pageserver.api.own_thread import on_own_thread
from pageserver.api.proto_service import build_handlers
from pageserver.api.service import Pageserver
from pageserver.api.thread_chunks import chunks_in_thread
from pageserver.config import PageserverConfig
from pageserver_api import models as m
from pageserver_api.client import PageserverClient
from proto.errors import NotFound, Unavailable
from proto.server import ProtoServer

DEFAULT_EXECUTOR_THREADS = min(32, (os.cpu_count() or 1) + 4)
"""concurrent.futures.ThreadPoolExecutor's default size: what asyncio.to_thread runs on."""
PROMPT = 5.0


def test_a_short_request_answers_while_imports_stall(tmp_path: Path) -> None:
    (tmp_path / "ps").mkdir()
    ps = Pageserver(PageserverConfig(tmp_path / "ps"))
    storage = tmp_path / "storage"
    store_dir = storage / "pagestore"
    gone = threading.Event()
    stalled = DEFAULT_EXECUTOR_THREADS + 1

    async def run() -> tuple[float, list[BaseException | object]]:
        imports = []
        for i in range(stalled):
            work = storage / f"work{i}"
            work.mkdir(parents=True)
            (work / "fetched.neon").touch()  # its pusher sent nothing yet: the import waits
            neon = work / "fetched.neon"
            importing = ps.import_snapshot(
                f"pushed{i}", work / "pgdata", store_dir, gone.is_set,
                neon_file=neon, label=f"push {i}", fetching=True,
            )  # fmt: skip
            imports.append(asyncio.ensure_future(importing))
        try:
            await asyncio.sleep(0.5)  # every import reads its empty file, waiting for more
            assert not any(t.done() for t in imports)
            started = time.monotonic()
            with pytest.raises(NotFound):  # a short request on a worker thread
                await asyncio.wait_for(asyncio.to_thread(ps.destroy_snapshot, "nope@x"), PROMPT)
            took = time.monotonic() - started
        finally:
            gone.set()  # the pushers are gone: the imports end
        return took, await asyncio.gather(*imports, return_exceptions=True)

    took, results = asyncio.run(run())
    assert took < PROMPT
    assert all(isinstance(r, Unavailable) for r in results), results
    assert ps.list_snapshots() == []


def test_a_short_request_answers_while_streams_stall() -> None:
    """Basebackup producers whose readers stopped reading wait for a free slot (chunks
    ahead): the loop's default executor stays free."""

    def endless() -> Iterator[bytes]:
        while True:
            yield b"x" * 1024

    async def run() -> float:
        async with contextlib.AsyncExitStack() as streams:
            for _ in range(DEFAULT_EXECUTOR_THREADS):  # on that executor, they held it all
                stream = await streams.enter_async_context(
                    contextlib.aclosing(chunks_in_thread(endless(), ahead=2))
                )
                await anext(stream)  # then the reader stalls: the producer waits for a slot
            await asyncio.sleep(0.2)
            started = time.monotonic()
            assert await asyncio.wait_for(asyncio.to_thread(lambda: 42), PROMPT) == 42
            return time.monotonic() - started

    assert asyncio.run(run()) < PROMPT


def test_on_own_thread_returns_and_raises_from_a_new_thread() -> None:
    async def run() -> tuple[str, str]:
        name = await on_own_thread("job", lambda: threading.current_thread().name)
        with pytest.raises(ValueError, match="bad"):
            await on_own_thread("job", int, "bad")
        return name, threading.current_thread().name

    name, loop_thread = asyncio.run(run())
    assert name == "job" and name != loop_thread


async def test_bucket_requests_do_not_wait_for_the_default_executor(tmp_path: Path) -> None:
    """The handlers that may download from a bucket for as long as that takes (a snapshot's
    basebackup source, a PITR extraction or destroy, an attach) run on threads of their own:
    with the loop's default executor all taken, they still answer (here: nothing to find)."""
    (tmp_path / "ps").mkdir()
    ps = Pageserver(PageserverConfig(tmp_path / "ps"))
    server = ProtoServer(build_handlers(ps), token="t", server_name="test pageserver")
    await server.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    held = threading.Event()
    holders = [loop.run_in_executor(None, held.wait) for _ in range(DEFAULT_EXECUTOR_THREADS)]
    try:
        async with await PageserverClient.connect("127.0.0.1", server.port, token="t") as c:
            calls = [
                c.basebackup_plan(m.BasebackupPlanRequest(snapshot="nope")),
                c.pitr_extract(m.PitrExtractRequest("nope", lsn=0x1000)),
                c.pitr_destroy(m.PitrDestroyRequest("nope")),
            ]
            for call in calls:
                with pytest.raises(NotFound):
                    await asyncio.wait_for(call, PROMPT)
    finally:
        held.set()
        await asyncio.gather(*holders)
        await server.close()
        await ps.stop_following()
