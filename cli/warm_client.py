"""The launcher's side of the warm command server (cli/launch.py, cli/warm_server.py).

The exchange, one per connection, each message a 4-byte length and a `marshal`led dict
(`proto.unix_fds`; the peers are the same interpreter, see `Request.matches`):
  launcher -> server  the request (`request_of`), descriptors cwd, 0, 1, 2 attached
  server -> launcher  {"cold": why}: run it yourself (nothing was forked); or {"ready": 1}
  launcher -> server  {"go": 1}: from here on the command runs warm, whatever happens
  server -> launcher  {"pid": child}, later {"status": wait status}; or {"cold": why}
                      if it could not fork (the launcher runs the command itself)
  child -> launcher   {"status": wait status} once its command ended and every other
                      descriptor of it is closed, before its exit (perhaps before the pid);
                      the server's own report follows when it has reaped it, if at all
The extra round trip makes the fork the launcher's decision: a launcher that gave up
waiting (HANDSHAKE_TIMEOUT) and runs the command itself never has it run twice. The child
keeps a close-on-exec copy of the server's end, so a launcher whose server died (OOM
killer) sees the connection's end only once its command ended too: it waits for it, as a
cold command's shell would, and exits as the command did (the child's own report), or 1
where the child could not report (killed by a signal: its status went with the server).
Standard library only.
"""

from __future__ import annotations

import _signal as signal  # not signal, socket, contextlib: with what they import (enum,
import _socket  # selectors, collections...) this module took ~12 ms of CPU, now ~2
import marshal
import os
import struct
import sys

from cli.launch import FORWARDED_SIGNALS, HANDSHAKE_TIMEOUT, REQUEST_MAX
from proto.unix_fds import peer_uid, receive_with_fds, send_with_fds

TYPE_CHECKING = False
if TYPE_CHECKING:  # not typing itself: the launcher's every millisecond is every command's
    from types import FrameType
    from typing import Any

HEADER = struct.Struct(">I")
GROUP_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGSTOP, signal.SIGCONT)
"""Sent to the child's process group when this launcher is in the terminal's foreground
group (the terminal would have sent them to every process of a cold command's group)."""
LIMITS = (
    "RLIMIT_NOFILE",
    "RLIMIT_CORE",
    "RLIMIT_FSIZE",
    "RLIMIT_AS",
    "RLIMIT_DATA",
    "RLIMIT_STACK",
    "RLIMIT_NPROC",
    "RLIMIT_MEMLOCK",
    "RLIMIT_CPU",
)
"""The resource limits (`ulimit`) a warm command has as its launcher has them."""


def encode_message(message: dict[str, Any]) -> bytes:
    """A message's frame: its length (HEADER), then its marshal form."""
    body = marshal.dumps(message)
    return HEADER.pack(len(body)) + body


def send_message(
    sock: _socket.socket, message: dict[str, Any], fds: list[int] | None = None
) -> None:
    send_with_fds(sock, encode_message(message), fds or ())


def receive_message(sock: _socket.socket, max_fds: int = 0) -> tuple[dict[str, Any], list[int]]:
    """One message (and its descriptors); OSError (PeerClosed) if the peer closed first."""
    body, fds = receive_with_fds(sock, HEADER, REQUEST_MAX, max_fds)
    try:
        message = marshal.loads(body)
        if not isinstance(message, dict):
            raise ValueError("not a map")
    except (ValueError, EOFError, TypeError) as exc:
        for fd in fds:
            os.close(fd)
        raise OSError(f"a bad warm server message: {exc}") from None
    return message, fds


def _stream_spec(stream: Any) -> tuple[str, str, bool, bool]:
    """How this interpreter made sys.stdin/stdout/stderr, for the child to make them alike."""
    return (stream.encoding, stream.errors, stream.line_buffering, stream.write_through)


def request_of(argv: list[str]) -> dict[str, Any]:
    """What the child needs to run `ARGV` (sys.argv) as this process would have."""
    umask = os.umask(0o077)
    os.umask(umask)
    return {
        "argv": argv,
        "env": dict(os.environb),
        "umask": umask,
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "path": sys.path,
        "executable": sys.executable,
        "flags": tuple(sys.flags),
        "streams": [_stream_spec(s) for s in (sys.stdin, sys.stdout, sys.stderr)],
        "ignored": ignored_signals(),
        "limits": resource_limits(),
        "blocked": sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
    }


def resource_limits() -> dict[str, tuple[int, int]]:
    """This process's limits (`ulimit`) that the child takes on (LIMITS)."""
    import resource

    return {name: resource.getrlimit(getattr(resource, name)) for name in LIMITS}


def ignored_signals() -> list[int]:
    """The signals this process ignores (a background job of a script ignores SIGINT, and a
    Python started so keeps it ignored): the child ignores them too."""
    return [int(s) for s in signal.valid_signals() if signal.getsignal(s) == signal.SIG_IGN]


def in_foreground() -> bool:
    """Whether this process's group is its terminal's foreground group (the terminal's
    signals go to all of it), the terminal being whichever of descriptors 0-2 is one
    (`neon ... 2>log` at a prompt still gets Ctrl-C from it)."""
    for fd in (0, 1, 2):
        try:
            return os.tcgetpgrp(fd) == os.getpgrp()
        except OSError:  # not a terminal, or closed
            continue
    return False


class _Forwarder:
    """Signals that arrive before the child's pid is known are kept, then sent on."""

    def __init__(self) -> None:
        self.pid = 0
        self.pending: list[int] = []
        self.previous: dict[int, Any] = {}
        self.group = in_foreground()

    def install(self) -> None:
        for name in FORWARDED_SIGNALS:
            signum = getattr(signal, name)
            if signal.getsignal(signum) != signal.SIG_IGN:  # ignored by the child too
                self.previous[signum] = signal.signal(signum, self._handle)
        for signum in (signal.SIGTSTP, signal.SIGCONT):
            if signal.getsignal(signum) != signal.SIG_IGN:
                self.previous[signum] = signal.signal(signum, self._job_control)

    def _job_control(self, signum: int, _frame: FrameType | None) -> None:
        """Ctrl-Z (SIGTSTP) stops the child, then this process; the shell's `fg`/`bg`
        (SIGCONT) continues both. Both with SIGSTOP: the child's session has no terminal, so
        a SIGTSTP would be discarded there (an orphaned process group), and so would this
        process's own where its group is orphaned, leaving the child stopped for good."""
        if signum == signal.SIGTSTP:
            if self.pid:
                self.send(signal.SIGSTOP)
            os.kill(os.getpid(), signal.SIGSTOP)  # stopped here until a SIGCONT
        elif self.pid:
            self.send(signal.SIGCONT)

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.pid:
            self.send(signum)
        else:
            self.pending.append(signum)

    def send(self, signum: int) -> None:
        try:  # (contextlib is not imported here)
            if self.group and signum in GROUP_SIGNALS:
                try:
                    os.killpg(self.pid, signum)  # its group: the child's session's first act
                    return
                except ProcessLookupError:
                    pass
            os.kill(self.pid, signum)
        except ProcessLookupError:  # it has ended
            pass

    def started(self, pid: int) -> None:
        self.pid = pid
        for signum in self.pending:
            self.send(signum)
        self.pending.clear()


def run_warm(path: str) -> None:
    """Run `neon` with this process's arguments in the warm server at `path`; returns only
    if the command is to run in this process (nothing ran), else exits as the command did."""
    forwarder = _Forwarder()
    sock = _handshake(path, forwarder)
    if sock is not None:
        _finish(sock, forwarder)  # returns only if the server could not fork
    forwarder.restore()
    for signum in forwarder.pending:  # what came meanwhile, as if the command had it
        os.kill(os.getpid(), signum)


def _handshake(path: str, forwarder: _Forwarder) -> _socket.socket | None:
    """The connected, accepted request (the server forks on our "go"), or None: cold
    (a closed descriptor 0-2 too: the interpreter has no such sys.stdin/stdout/stderr)."""
    if sys.stdin is None or sys.stdout is None or sys.stderr is None:
        return None
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(HANDSHAKE_TIMEOUT)
        sock.connect(path)
        if peer_uid(sock) != os.geteuid():
            raise OSError("the warm server runs as another user")
        cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            send_message(sock, request_of(sys.argv), [cwd, 0, 1, 2])
        finally:
            os.close(cwd)
        answer, _ = receive_message(sock)
        if "ready" not in answer:
            raise OSError(f"the warm server answers {answer!r}")
        forwarder.install()
        send_message(sock, {"go": 1})
    except Exception:  # whatever it is, nothing was forked: the command runs here
        sock.close()
        return None
    return sock


def _finish(sock: _socket.socket, forwarder: _Forwarder) -> None:
    """Wait for the child's status and exit the same way; signals go on to the child.
    Returns if the server could not fork (nothing ran: the command runs here)."""
    sock.settimeout(None)
    status: int | None = None
    try:
        answer, _ = receive_message(sock)
        if "cold" in answer:
            sock.close()
            return
        if "status" not in answer:  # the child's own report may come first (warm_server)
            forwarder.started(int(answer["pid"]))
            answer, _ = receive_message(sock)
        status = int(answer["status"])
    except (OSError, KeyError, ValueError) as exc:
        # the connection ends once the server and the command (its copy) are gone
        print(
            f"neon: error: the warm command server went away ({exc}); the command has ended,"
            " with a status nobody kept",
            file=sys.stderr,
        )
        os._exit(1)
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        import resource

        # the child dumped its core (SIGQUIT, SIGABRT...) if it could: not this process too
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
        if signum not in (signal.SIGKILL, signal.SIGSTOP):  # theirs cannot be set (nor changed)
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
        os.kill(os.getpid(), signum)
        os._exit(128 + signum)  # a signal whose default is not to end the process
    os._exit(os.waitstatus_to_exitcode(status))
