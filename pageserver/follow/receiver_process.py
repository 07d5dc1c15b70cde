"""A node's WalReceiver in a process of its own, supervised from the pageserver.

Receiving (socket reads, archive writes, fsyncs) and decoding both need the interpreter; in one
process they take turns under the GIL, so catch-up ran at the sum of their costs. In a child
process (`python -m walreceiver.receiver --supervised`) the receiver streams on one core while
the pageserver decodes on the other, like PostgreSQL's own walreceiver process. The archive on
disk is the hand-over: the child reports how far it is durable, the decoder reads from there.

The child gets the password on stdin (never in argv), reports progress as JSON lines, stops on
SIGTERM or when our end of its stdin closes (so it never outlives a killed pageserver),
skips a reconnect backoff on SIGUSR1 and, on SIGUSR2, finishes its stream without
reconnecting (`finish_stream`: the node is being stopped). `ReceiverProcess` mirrors its
state with the attributes of `WalReceiver` (state, timeline, received_lsn, flushed_lsn,
last_error).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from proto.aio import within
from proto.errors import NeonError
from walreceiver.receiver import PAUSED, ConnParams, ReceiverState

log = logging.getLogger(__name__)

STOP_TIMEOUT = 15.0


class ReceiverFailed(NeonError):
    """The receiver process stopped on an error it does not retry (or died)."""


class ReceiverProcess:
    def __init__(
        self,
        params: ConnParams,
        slot: str,
        archive_dir: Path,
        *,
        on_progress: Callable[[ReceiverProcess], None],
        create_slot: bool = True,
        max_backoff: float = 5.0,
        status_interval: float = 1.0,
    ) -> None:
        self.params = params
        self.slot = slot
        self.archive_dir = Path(archive_dir)
        self.on_progress = on_progress
        self.create_slot = create_slot
        self.max_backoff = max_backoff
        self.status_interval = status_interval
        self.state = ReceiverState.IDLE
        self.timeline = 0
        self.received_lsn = 0
        self.flushed_lsn = 0
        self.attempted_lsn = 0
        """The end of the WAL the child last tried to write to its archive."""
        self.segment_size = 0
        self.last_error: ReceiverFailed | None = None
        self.last_errno: int | None = None
        """The errno of last_error when the child failed on an OSError (its archive's)."""
        self.end_reason: str | None = None
        self.pid: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._ready = False
        self._finishing = False
        self._terminated: int | None = None
        """The PID of the child `stop_streaming` signalled."""

    @property
    def running(self) -> bool:
        """A child process runs (it may be connecting, streaming or backing off)."""
        return self._proc is not None

    def _argv(self) -> list[str]:
        p = self.params
        argv = [
            sys.executable,
            "-m",
            "walreceiver.receiver",
            "--supervised",
            "--host", p.host,
            "--port", str(p.port),
            "--user", p.user,
            "--application-name", p.application_name,
            "--slot", self.slot,
            "--archive", str(self.archive_dir),
            "--max-backoff", str(self.max_backoff),
            "--status-interval", str(self.status_interval),
        ]  # fmt: skip
        for method in sorted(p.auth_methods):
            argv += ["--auth-method", method.value]
        if p.socket_dir is not None:
            argv += ["--socket-dir", p.socket_dir]
        if self.create_slot:
            argv.append("--create-slot")
        return argv

    async def run(self) -> str:
        """Run the child until the server ends the stream (returns the reason); raise
        ReceiverFailed when it stops on an error. Cancelling stops the child."""
        self.end_reason = None
        self._finishing = False
        self.state = ReceiverState.CONNECTING
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._argv(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=None,  # its log lines go where ours go
                limit=1 << 20,
            )
        except BaseException as exc:
            # Not left CONNECTING: a pause (wait_connected) would wait its whole bound for a
            # child that never came, and the status would say connecting.
            if isinstance(exc, Exception):
                self.state = ReceiverState.FAILED
                self.last_error = ReceiverFailed(f"walreceiver process not started: {exc}")
                self.on_progress(self)
                raise self.last_error from exc
            self.state = ReceiverState.STOPPED
            raise
        self._proc, self.pid = proc, proc.pid
        self._ready = False
        failure: str | None = None
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write((self.params.password or "").encode() + b"\n")
            await proc.stdin.drain()  # stdin stays open: closing it stops the child
            async for line in proc.stdout:
                try:
                    event = json.loads(line)
                except ValueError:
                    log.warning("walreceiver %s: unexpected output %r", self.slot, line[:200])
                    continue
                if not self._ready:
                    self._ready = True  # its signal handlers are in place
                    if self._finishing:  # asked while it was starting: signalled now
                        self._signal_finish(proc)
                if "ended" in event:
                    self.end_reason = str(event["ended"])
                elif "failed" in event:
                    failure = str(event["failed"])
                    self.last_errno = _errno_of(event)
                else:
                    self._apply(event)
            code = await proc.wait()
        except BaseException:
            await self._stop_child(proc)
            self.state = ReceiverState.STOPPED
            raise
        finally:
            self._proc = None
            if proc.stdin is not None:
                proc.stdin.close()
        if self._finishing and failure is None:
            # However it ended (stream done, or stopped before it connected): as asked.
            self.state = ReceiverState.ENDED
            self.end_reason = PAUSED
            return PAUSED
        if code == 0 and self.end_reason is not None and self.end_reason != "stopped":
            self.state = ReceiverState.ENDED
            return self.end_reason
        self.state = ReceiverState.FAILED
        self.last_error = ReceiverFailed(
            failure or f"walreceiver process {proc.pid} exited with code {code}"
        )
        self.on_progress(self)
        raise self.last_error

    def _apply(self, event: dict[str, object]) -> None:
        self.state = ReceiverState(event["state"])
        # A new child reports zeros until it has connected: keep what the last one reached.
        self.timeline = int(event["timeline"]) or self.timeline  # type: ignore[call-overload]
        self.received_lsn = int(event["received"]) or self.received_lsn  # type: ignore[call-overload]
        self.flushed_lsn = int(event["flushed"]) or self.flushed_lsn  # type: ignore[call-overload]
        self.attempted_lsn = int(event.get("attempted") or 0) or self.attempted_lsn  # type: ignore[call-overload]
        self.segment_size = int(event["segment_size"]) or self.segment_size  # type: ignore[call-overload]
        error = event.get("error")
        self.last_error = ReceiverFailed(str(error)) if error else None
        self.last_errno = _errno_of(event) if error else None
        self.on_progress(self)

    def retry_now(self) -> None:
        """Make a child waiting out a reconnect backoff try again at once."""
        proc = self._proc
        # Before its first report the child may not handle SIGUSR1 yet (it would kill it);
        # a child that young has no backoff to skip anyway.
        if proc is not None and proc.returncode is None and self._ready:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGUSR1)

    def finish_stream(self) -> None:
        """Let the child finish the stream it is in (or the one it is connecting for) but
        connect no more; run() then returns PAUSED. A child that has not reported yet is
        signalled at its first report (before it, SIGUSR2 would kill it): stopped at once, as
        it used to be, it never received the WAL the node wrote since it was started, and a
        node stopped meanwhile never sent its shutdown checkpoint to anyone (a checkout then
        named HEAD{i} short of the node's last writes, after waiting 30 s for them)."""
        self._finishing = True
        if self.state == ReceiverState.BACKOFF:
            # The child tries once more at the signal (WalReceiver.finish_stream): a pause's
            # wait_connected waits for that try, not for the child's next report.
            self.state = ReceiverState.CONNECTING
        proc = self._proc
        if proc is not None and self._ready:
            self._signal_finish(proc)

    def stop_streaming(self) -> None:
        """End the child now (SIGTERM: it closes the archive and reports it ended): its
        server is gone, and what it had not written yet is taken from the server's pg_wal
        (NodeFollower.take_tail) faster than the child would drain it from its socket."""
        proc = self._proc
        if proc is not None and proc.returncode is None and self._terminated != proc.pid:
            # Once: a second SIGTERM would cancel its closing of the archive (and it would
            # report its end before it gave the archive's lock up).
            self._terminated = proc.pid
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the child: one that did not end when told (it may have been signalled
        before it had exec'd, and lost it); the archive it leaves resumes at its valid
        prefix (WalArchive.resume)."""
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    @property
    def archive_released(self) -> bool:
        """No child writes the archive: none runs, or the one running reported that it ended
        (after closing the archive and giving up its lock: walreceiver/receiver.py)."""
        return self._proc is None or self.end_reason is not None

    @staticmethod
    def _signal_finish(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGUSR2)

    async def wait_connected(self, timeout: float) -> None:
        """Until a child being started or connecting has connected (streaming), failed to
        (backing off, ended) or `timeout` passed: a node about to be stopped must not go down
        before the stream that takes its last WAL is open (a server shutting down accepts no
        new replication connection)."""
        deadline = asyncio.get_running_loop().time() + timeout
        # CONNECTING from run()'s start (the child being created too) until the child says
        # it streams or backs off, or run() ends.
        while self.state == ReceiverState.CONNECTING:
            if asyncio.get_running_loop().time() >= deadline:
                log.warning("walreceiver %s: not connected after %.0f s", self.slot, timeout)
                return
            await asyncio.sleep(0.02)

    @staticmethod
    async def _stop_child(proc: asyncio.subprocess.Process) -> None:
        """SIGTERM (it fsyncs and closes the archive), then SIGKILL; by PID, always reaped."""
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await within(proc.wait(), STOP_TIMEOUT)
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await asyncio.shield(proc.wait())


def _errno_of(event: dict[str, object]) -> int | None:
    value = event.get("errno")
    return value if isinstance(value, int) else None
