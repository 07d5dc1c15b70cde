"""The blocking facade the export writes through: chunks written from a worker thread reach
the transport in order; the object appears on a clean exit only."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from pathlib import Path

import pytest

from cli.transport import parse_location
from cli.transport.base import Location, ObjectInfo, ObjectWriter
from cli.transport.blocking import BlockingWriter
from cli.transport.file import FileStore
from proto.errors import AlreadyExists
from tests.cli.transport.conftest import entries


def test_writes_from_a_thread_then_commits(tmp_path: Path) -> None:
    seen: list[bytes] = []
    chunks = [bytes([i]) * (100_000 + i) for i in range(20)]
    with BlockingWriter(
        parse_location(str(tmp_path / "x.neon")), overwrite=False, on_write=seen.append
    ) as out:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            for chunk in chunks:
                pool.submit(out.write, memoryview(chunk)).result()
        assert entries(tmp_path)[0].startswith(".x.neon.")  # not visible yet
    assert (tmp_path / "x.neon").read_bytes() == b"".join(chunks)
    assert seen == chunks and out.bytes_written == sum(map(len, chunks))
    assert entries(tmp_path) == ["x.neon"]


def test_exception_aborts_and_refusal_is_raised(tmp_path: Path) -> None:
    with (
        pytest.raises(KeyboardInterrupt),
        BlockingWriter(parse_location(str(tmp_path / "x.neon")), overwrite=False) as out,
    ):
        out.write(b"partial")
        raise KeyboardInterrupt
    assert entries(tmp_path) == []
    (tmp_path / "x.neon").write_bytes(b"kept")
    with (
        pytest.raises(AlreadyExists),
        BlockingWriter(parse_location(str(tmp_path / "x.neon")), overwrite=False) as out,
    ):
        out.write(b"new")
    assert entries(tmp_path) == ["x.neon"] and (tmp_path / "x.neon").read_bytes() == b"kept"


class _GatedStore(FileStore):
    """A directory whose opens wait until the test lets them (a slow s3 or ssh open)."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.gate = threading.Event()

    async def open_write(self, name: str, *, overwrite: bool) -> ObjectWriter:
        await asyncio.to_thread(self.gate.wait, 10)
        if not self.gate.is_set():
            raise TimeoutError("the opening was never let through")
        return await super().open_write(name, overwrite=overwrite)


def test_the_object_opens_while_the_caller_goes_on(tmp_path: Path) -> None:
    """`with` returns before the object is open (a push asks the pageserver meanwhile); the
    first write waits for it."""
    store = _GatedStore(tmp_path)
    location = Location(store, "x.neon")
    with BlockingWriter(location, overwrite=False) as out:
        assert out.bytes_written == 0 and entries(tmp_path) == []  # not open yet
        store.gate.set()
        out.write(b"data")
    assert (tmp_path / "x.neon").read_bytes() == b"data"


def test_an_exception_before_the_open_ends_waits_for_it_and_aborts(tmp_path: Path) -> None:
    store = _GatedStore(tmp_path)
    location = Location(store, "x.neon")
    with pytest.raises(KeyboardInterrupt), BlockingWriter(location, overwrite=False):
        store.gate.set()
        raise KeyboardInterrupt
    assert entries(tmp_path) == []


class _LoopRecordingStore(FileStore):
    """A directory that records the loop of each `stat_for_write` and `close`."""

    loops: list[tuple[str, asyncio.AbstractEventLoop]]

    async def stat_for_write(self, name: str) -> ObjectInfo | None:
        self.loops.append(("stat", asyncio.get_running_loop()))
        return await super().stat_for_write(name)

    async def close(self) -> None:
        self.loops.append(("close", asyncio.get_running_loop()))


def test_a_deferred_writer_runs_the_preparation_on_its_loop_and_closes_the_store(
    tmp_path: Path,
) -> None:
    """With `deferred`, `run` runs on the writer's loop before `open` (a push's stat, whose
    ssh session then appends), and the store's `close` runs on that loop at the exit, also
    when nothing was opened; the object appears on a clean exit only."""
    store = _LoopRecordingStore(tmp_path)
    store.loops = []
    location = Location(store, "x.neon")
    with BlockingWriter(location, overwrite=False, deferred=True) as out:
        assert out.run(store.stat_for_write("x.neon")) is None
        assert entries(tmp_path) == []
        out.open()
        out.write(b"data")
    assert (tmp_path / "x.neon").read_bytes() == b"data"
    assert [kind for kind, _ in store.loops] == ["stat", "close"]
    assert store.loops[0][1] is store.loops[1][1]
    store.loops = []
    with (
        pytest.raises(AlreadyExists),
        BlockingWriter(location, overwrite=False, deferred=True) as out,
    ):
        if out.run(store.stat_for_write("x.neon")) is not None:
            raise AlreadyExists("x.neon exists")
    assert [kind for kind, _ in store.loops] == ["stat", "close"]
    assert (tmp_path / "x.neon").read_bytes() == b"data"
