"""A walreceiver stopped as its replication connection opens ends stopped: through Python
3.11's asyncio.wait_for a cancel landing as the connection opened was dropped (bpo-42130)
and `connect` went on to log in (tests/cancel_race.py)."""

from __future__ import annotations

import asyncio

import pytest

from tests.cancel_race import Gate, cancel_missed
from walreceiver import replication


class _Writer:
    """A connection's writing end that takes everything and closes."""

    def __init__(self) -> None:
        self.closed = False
        self.transport = self

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        pass


async def test_a_stop_landing_as_the_connection_opens(monkeypatch: pytest.MonkeyPatch) -> None:
    """`connect`'s opening under its time limit (the coroutine shape: the login's is the
    same): the server's side is at its end at once, so a connect that went on fails its
    login instead of ending cancelled (the old code: missed at turns 0-5, the opening's and
    the login's wait_for)."""
    gates: list[Gate[None]] = []

    async def opened(*args: object) -> tuple[asyncio.StreamReader, _Writer]:
        await gates[-1].wait()
        reader = asyncio.StreamReader()
        reader.feed_eof()
        return reader, _Writer()

    monkeypatch.setattr(replication, "open_streams", opened)

    async def run(gate: Gate[None]) -> None:
        gates.append(gate)
        await replication.connect("127.0.0.1", 1, "u", timeout=30)

    assert await cancel_missed(run, None) == []
