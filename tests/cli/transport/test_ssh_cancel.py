"""A push cancelled (Ctrl-C, its pageserver failed) while ssh.py waits with a time limit
ends cancelled, even when the cancel lands in the turn the awaited thing completes: through
Python 3.11's asyncio.wait_for it was dropped there (bpo-42130), and a commit whose
committer was being dismissed went on to publish the file (tests/cancel_race.py)."""

from __future__ import annotations

from typing import Any

from cli.transport import ssh
from tests.cancel_race import Gate, cancel_missed


class _Pipe:
    """A fake process's stdin, stdout or stderr."""

    def __init__(self) -> None:
        self.transport = self
        self.closed = False

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    async def read(self) -> bytes:
        return b""


class _Process:
    """An ssh session whose end (communicate, wait) is the gate's."""

    def __init__(self, gate: Gate[Any]) -> None:
        self.gate = gate
        self.returncode: int | None = None
        self.stdin, self.stdout, self.stderr = _Pipe(), _Pipe(), _Pipe()
        self.pid = 1 << 30

    async def communicate(self, data: bytes | None = None) -> tuple[bytes, bytes]:
        await self.gate.wait()
        self.returncode = 0
        return b"", b""

    async def wait(self) -> int:
        if self.returncode is None:
            await self.gate.wait()
            self.returncode = 0
        return self.returncode

    def kill(self) -> None:
        self.returncode = -9


class _Store:
    async def _run(self, *args: str, where: str) -> str:
        return ""


async def test_a_dismissed_session_ending_as_the_push_is_cancelled() -> None:
    """`_dismiss` (the shape `wait_for(coroutine, limit)`): a commit's committer started
    ahead is dismissed before the COMMIT script runs; cancelled as it ended, the commit ran
    on (the old code: missed at turn 0)."""

    async def run(gate: Gate[None]) -> None:
        await ssh._dismiss(_Process(gate))  # type: ignore[arg-type]

    assert await cancel_missed(run, None) == []


async def test_an_aborted_resumable_write_landing_as_it_is_cancelled() -> None:
    """`SshWriter.abort`'s landing wait (the shape `wait_for(shield(...), limit)`): a
    resumable write lets what was sent land before the abort goes on."""

    async def run(gate: Gate[None]) -> None:
        proc = _Process(gate)
        writer = ssh.SshWriter(
            _Store(),
            proc,
            "tmp",
            "final",
            "flag",
            resumable=True,  # type: ignore[arg-type]
        )
        await writer.abort()

    assert await cancel_missed(run, None) == []
