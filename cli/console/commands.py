"""What the console runs: the `neon` command itself, as the page shows it.

Every page reads the `--json` output of a `neon` command and every action runs the command
line it shows, in a child process with the console's home: the console cannot do anything
the CLI would not, nor do it differently, and an error is the CLI's one line, never a
traceback. Actions run as jobs whose output lines stream to the page (server-sent events).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shlex
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli.output import human_size
from cli.progress import PROGRESS_ENV, ProgressReport
from pg15.lsn import format_lsn
from proto.aio import within

ERROR_PREFIX = "neon: error: "
JOBS_KEPT = 100
"""Finished jobs kept for their pages (the oldest are forgotten first)."""

_RUN_CLI = "from cli.main import main; main()"


def command_line(args: Sequence[str]) -> str:
    """The shell command line of `neon ARGS`, quoted so it can be pasted as is."""
    return shlex.join(["neon", *args])


def cli_argv(args: Sequence[str]) -> list[str]:
    """The argv that runs `neon ARGS` with this interpreter (the console's own install)."""
    return [sys.executable, "-c", _RUN_CLI, *args]


def error_line(output: str) -> str | None:
    """The CLI's one-line error (without its prefix), if it printed one."""
    for line in reversed(output.splitlines()):
        if line.startswith(ERROR_PREFIX):
            return line[len(ERROR_PREFIX) :]
    return None


def failure(output: str, returncode: int) -> str:
    """The one line a failed command is shown by: its error line; for a crash, the last
    line of its traceback (the exception); else its exit code."""
    found = error_line(output)
    if found is not None:
        return found
    lines = [line for line in output.splitlines() if line.strip()]
    if "Traceback (most recent call last):" in lines:
        return f"neon failed: {lines[-1]} (exit {returncode})"
    return f"exit {returncode}"


class CliFailed(Exception):
    """A `neon` command the console ran failed; the message is the CLI's own line."""

    def __init__(self, args: Sequence[str], message: str) -> None:
        super().__init__(message)
        self.command = command_line(args)
        self.message = message


@dataclass(frozen=True, slots=True)
class Cli:
    """Runs `neon` for one home."""

    home: Path

    def env(self) -> dict[str, str]:
        return {**os.environ, "NEON_HOME": str(self.home)}

    async def output(self, args: Sequence[str], timeout: float = 600) -> str:
        """stdout of `neon ARGS`; CliFailed with its error line if it fails."""
        proc = await asyncio.create_subprocess_exec(
            *cli_argv(args),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env(),
        )
        try:
            out, err = await within(proc.communicate(), timeout)
        except BaseException:  # timeout, or the request went away: the child goes too
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            raise
        if proc.returncode != 0:
            raise CliFailed(args, failure(err.decode(errors="replace"), proc.returncode or 1))
        return out.decode(errors="replace")

    async def json(self, args: Sequence[str]) -> Any:
        """The parsed output of `neon ARGS --json`."""
        return json.loads(await self.output([*args, "--json"]))


@dataclass(slots=True)
class Job:
    """One action: a `neon` command run in the background, its output kept line by line."""

    id: str
    args: tuple[str, ...]
    back: str
    """The page the action was started from."""
    lines: list[str] = field(default_factory=list)
    returncode: int | None = None
    pid: int | None = None
    progress: ProgressReport | None = None
    """The command's latest progress report (NEON_PROGRESS=json lines), if it made any."""
    _progress_count: int = 0
    _changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def command(self) -> str:
        return command_line(self.args)

    @property
    def done(self) -> bool:
        return self.returncode is not None

    @property
    def error(self) -> str | None:
        if self.returncode in (None, 0):
            return None
        return failure("\n".join(self.lines), self.returncode or 1)

    @property
    def crashed(self) -> bool:
        return "Traceback (most recent call last):" in self.lines

    async def follow(self) -> AsyncIterator[str | ProgressReport]:
        """Every output line, those already printed first, and the latest progress report
        whenever there is a newer one, until the command ends."""
        sent = reported = 0
        while True:
            async with self._changed:
                while (
                    len(self.lines) == sent and self._progress_count == reported and not self.done
                ):
                    await self._changed.wait()
                fresh, done = self.lines[sent:], self.done
                report = self.progress if self._progress_count != reported else None
                reported = self._progress_count
            if report is not None:
                yield report
            for line in fresh:
                yield line
            sent += len(fresh)
            if done and sent == len(self.lines):
                return

    async def _add(self, line: str) -> None:
        async with self._changed:
            report = ProgressReport.parse(line)
            if report is None:
                self.lines.append(line)
            else:
                self.progress = report
                self._progress_count += 1
            self._changed.notify_all()

    async def _finish(self, returncode: int) -> None:
        async with self._changed:
            self.returncode = returncode
            self._changed.notify_all()


class Jobs:
    """The actions this console started."""

    def __init__(self, cli: Cli) -> None:
        self._cli = cli
        self._jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def start(self, args: Sequence[str], back: str) -> Job:
        job = Job(str(next(self._ids)), tuple(args), back)
        self._jobs[job.id] = job
        while len(self._jobs) > JOBS_KEPT:
            oldest = next(iter(self._jobs.values()))
            if not oldest.done:
                break
            del self._jobs[oldest.id]
        task = asyncio.get_running_loop().create_task(self._run(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def _run(self, job: Job) -> None:
        try:
            proc = await asyncio.create_subprocess_exec(
                *cli_argv(job.args),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env={**self._cli.env(), PROGRESS_ENV: "json"},  # progress as parseable lines
            )
        except OSError as exc:
            await job._add(f"{ERROR_PREFIX}cannot run neon: {exc}")
            await job._finish(127)
            return
        job.pid = proc.pid
        assert proc.stdout is not None
        async for raw in _lines(proc.stdout):
            # A progress bar redraws with carriage returns: show its latest state.
            await job._add(raw.decode(errors="replace").rsplit("\r", 1)[-1])
        await job._finish(await proc.wait())

    async def stop_all(self, timeout: float = 30) -> None:
        """Interrupt the commands still running (as Ctrl-C would) and wait for them."""
        for job in self._jobs.values():
            if not job.done and job.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(job.pid, signal.SIGINT)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=timeout)


async def _lines(stream: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The stream's lines (without their newline), however long: iterated as lines, a
    StreamReader raises at a line past its 64 KiB limit, which ended the job's reading
    there: the job stayed 'running' for ever and its command blocked on the full pipe."""
    buf = bytearray()
    while chunk := await stream.read(1 << 16):
        start = len(buf)
        buf += chunk
        end = buf.rfind(b"\n", start)
        if end >= 0:
            for line in buf[:end].split(b"\n"):
                yield bytes(line)
            del buf[: end + 1]
    if buf:
        yield bytes(buf)


def progress_text(report: ProgressReport) -> str:
    """A progress report as the job page says it: `Pulling x: 42% (12M of 30M)`."""
    if report.percent is None:
        return f"{report.what}: {human_size(report.done)}"
    return (
        f"{report.what}: {report.percent:.0f}% "
        f"({human_size(report.done)} of {human_size(report.total)})"
    )


def lsn_argument(value: str) -> str:
    """An LSN from a form: the slider's integer or X/Y text, as the CLI takes it."""
    value = value.strip()
    return format_lsn(int(value)) if value.isdigit() else value
