"""The warm command server: a process with the CLI's modules imported that forks a child per
`neon` command (cli/launch.py says which commands and why; cli/warm_client.py the exchange).

The home's pageserver daemon starts it (`python -m cli.warm_server`, a new process of the
same interpreter, never a fork of the threaded daemon) once it serves, and stops it by PID
at its shutdown. It is single-threaded and must stay so (it forks). It serves only a peer
of its own user id (SO_PEERCRED) on a socket in the daemon's working directory (private to
that user), and runs a command warm only for a launcher confined as the server is (`_confinement`:
the same namespaces, root directory, cgroup, capabilities, no_new_privs, seccomp mode and
groups), so that a child does nothing its launcher could not do itself; a launcher in a
sandbox or another container sharing the home runs its command cold.

Per command, before the fork: "cold" if a module it imported changed on disk since (the
server then closes its socket and exits once its children ended; the daemon starts a
fresh one), if an environment variable a preloaded module reads at import time
(IMPORT_TIME_ENV) or the interpreter's differ from its own, or if the command asks for a
lower niceness, oom_score_adj or a real-time I/O class than it can give. The child then
takes the launcher's session-less place: a session of its own (the launcher forwards the
terminal's signals to its group), the launcher's descriptors 0-2, working directory, umask,
environment, niceness, CPU affinity, I/O priority, oom_score_adj, resource limits, sys.path and
argv, signal handlers as a new interpreter has them, sys.stdin/stdout/stderr made as the
launcher's interpreter made them; it runs `cli.main.main()` at the top of this module's
stack and ends as the interpreter's own exit would (threads joined, atexit, streams flushed,
the exit code of a SystemExit: `exit_as_the_interpreter`, without the modules' teardown),
or through that exit itself (sys.exit("message"), an uncaught exception, an uncaught
KeyboardInterrupt's SIGINT), as the cold command's. The server reaps it and sends the
launcher its wait status (the child keeps a close-on-exec copy of the connection: a
launcher sees its end only once both are gone). A launcher that disappears (SIGKILL)
takes its child with it (SIGKILL), as a cold command would have gone.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import gc
import importlib
import io
import os
import resource
import select
import signal
import socket
import stat
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TextIO

from cli.launch import SOCKET_NAME
from cli.warm_client import encode_message, receive_message, send_message
from cli.warm_native import completed
from proto.unix_fds import SUN_PATH_MAX, peer_credentials

PRELOAD = (
    "cli.main",
    "cli.context",
    "cli.pg_commands",
    "cli.snapshot_group",
    "cli.snapshot_commands",
    "cli.snapshot_transfer",
    "cli.pitr_commands",
    "cli.storage_commands",
    "cli.checkout",
    "cli.checkout_delta",
    "cli.extract",
    "cli.transport.file",
    "cli.transport.neon",
    "cli.transport.ssh",
    "cli.transport.s3",
)
"""What the allowed commands import (a module not here is imported by the child: slower,
never wrong)."""
LATER_PRELOAD = ("aiobotocore.session",)
"""An s3 push's client library: ~0.23 s of CPU and ~20 MiB (with S3's models parsed,
`cli.transport.s3.preload_models`), imported at the server's start where a warm command of
this daemon needed it within LATER_HINT_SECONDS (the LATER_HINT file), else only once the
server has been idle LATER_SECONDS since its start and its last command (tests and benchmarks
start many short-lived daemons that never push to S3: it would compete with their next
command)."""
LATER_SECONDS = 5.0
LATER_HINT = "warm-later"
"""Beside the socket: touched by a warm command that imported LATER_PRELOAD itself."""
LATER_HINT_SECONDS = 7 * 86400.0
IMPORT_TIME_ENV = frozenset(
    {
        "NEON_S3_PART_SIZE",  # cli.transport.s3
        "NEON_PURE_PYTHON",  # the native modules' fallbacks
        "NEON_ALLOW_PURE_PYTHON",
        "AIOHTTP_NO_EXTENSIONS",
        "YARL_NO_EXTENSIONS",
        "MULTIDICT_NO_EXTENSIONS",
        "FROZENLIST_NO_EXTENSIONS",
        "PROPCACHE_NO_EXTENSIONS",
        "MSGPACK_PUREPYTHON",
        "BOTO_DISABLE_CRT",  # botocore.compat
        "WRAPT_DISABLE_EXTENSIONS",  # wrapt (aiobotocore)
        "LANG",  # the interpreter's locale, UTF-8 mode and file system encoding; gettext
        "LANGUAGE",  # gettext (argparse, optparse: translations looked up at import)
        "AWS_NEW_RETRIES_2026",  # botocore's retry mode, read by a function run at import
        "SSLKEYLOGFILE",  # ssl's default contexts (aiohttp.connector's, built at import)
        "TZ",
        "TMPDIR",  # tempfile's directory, computed once
        "HOME",
        "GLIBC_TUNABLES",  # read by the C library at the process's start
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
    }
)
"""Environment variables read while the server imports (tests/e2e/test_warm_commands.py
traces every os.environ read of importing PRELOAD and LATER_PRELOAD and checks it is here),
and what the interpreter and the C library read at the process's start. Also every name
starting with IMPORT_TIME_ENV_PREFIXES."""
IMPORT_TIME_ENV_PREFIXES = ("PYTHON", "MALLOC_", "LC_", "SSL_", "OPENSSL_")
"""The interpreter's, the C allocator's, the locale's, and OpenSSL's own (SSL_CERT_FILE,
SSL_CERT_DIR, OPENSSL_CONF: read in C, where no trace sees them, when aiohttp.connector
makes its verifying context at import: a warm https push would trust the server's CAs)."""
STALE_EXIT = 75
"""The exit code of a server that found a module changed: the daemon starts a fresh one."""
_POLL_MS = 1000  # the daemon's death is noticed within a second
_REQUEST_TIMEOUT = 10.0


_CONFINING_STATUS = (b"CapEff", b"CapBnd", b"NoNewPrivs", b"Seccomp", b"Groups")
"""The lines of /proc/PID/status that limit what a process may do (see `_confinement`)."""


def _confinement(pid: int) -> tuple[object, ...]:
    """What confines process `pid`: its namespaces, root directory, cgroup, and the
    capabilities, no_new_privs, seccomp mode and groups of its status (OSError if it is
    gone or not ours to read). ~0.1 ms of /proc reads."""
    proc = f"/proc/{pid}"
    names = sorted(os.listdir(f"{proc}/ns"))
    root = os.stat(f"{proc}/root")
    with open(f"{proc}/cgroup", "rb") as cgroup, open(f"{proc}/status", "rb") as status:
        return (
            [(name, os.readlink(f"{proc}/ns/{name}")) for name in names],
            (root.st_dev, root.st_ino),
            cgroup.read(),
            [line for line in status.read().splitlines()
             if line.partition(b":")[0] in _CONFINING_STATUS],
        )  # fmt: skip


IOPRIO_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31)}
"""ioprio_set and ioprio_get by machine (no Python wrapper): elsewhere a child keeps the
server's I/O priority."""
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_RT = 1
_IOPRIO_CLASS_SHIFT = 13


@dataclass(frozen=True, slots=True)
class Scheduling:
    """What the kernel runs a process by besides its niceness and limits: its CPUs (taskset),
    I/O priority (ionice; None where unknown) and oom_score_adj (choom). A forked child has
    the server's; it takes the launcher's (`_become_command`)."""

    cpus: frozenset[int]
    ioprio: int | None
    oom_score_adj: int


def scheduling(pid: int) -> Scheduling:
    """Process `pid`'s (0: this one's); OSError if it is gone."""
    with open(f"/proc/{pid or 'self'}/oom_score_adj", "rb") as oom:
        return Scheduling(frozenset(os.sched_getaffinity(pid)), _ioprio(pid), int(oom.read()))


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _ioprio(pid: int, value: int | None = None) -> int | None:
    """ioprio_get of `pid`, or with `value` ioprio_set (None: not on this machine)."""
    calls = IOPRIO_SYSCALLS.get(os.uname().machine)
    if calls is None:
        return None
    libc = _libc()
    args = (
        (calls[1], _IOPRIO_WHO_PROCESS, pid)
        if value is None
        else (calls[0], _IOPRIO_WHO_PROCESS, pid, value)
    )
    result = int(libc.syscall(*args))
    if result < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return result


_CAP_SYS_ADMIN = 21  # a real-time I/O class
_CAP_SYS_RESOURCE = 24  # a lower oom_score_adj (root in a container often lacks it)


def capable(capability: int) -> bool:
    """Whether this process has `capability` in effect (CapEff of its status)."""
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"CapEff:"):
                return bool(int(line.split()[1], 16) >> capability & 1)
    return False


_BINDING = ".tmp"
"""The suffix of the name the server binds before renaming it to its socket's (`listen`)."""


def socket_path(workdir: Path) -> Path | None:
    """The server's socket for the daemon of `workdir`; None if the path (or the one bound
    first, with _BINDING) is too long."""
    path = workdir / SOCKET_NAME
    return path if len(os.fsencode(path)) + len(_BINDING) <= SUN_PATH_MAX else None


def import_time_env(env: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """The variables of `env` whose values the preloaded modules saw at import."""
    names = {name.encode() for name in IMPORT_TIME_ENV}
    prefixes = tuple(p.encode() for p in IMPORT_TIME_ENV_PREFIXES)
    return {k: v for k, v in env.items() if k in names or k.startswith(prefixes)}


@dataclass(slots=True)
class _Modules:
    """The source files of what is imported, as they were when imported: modification time,
    size and inode (a file replaced or rewritten keeping its time, as a checkout or `cp -p`
    can, differs in one of the others)."""

    seen: dict[str, tuple[str, tuple[int, int, int]]] = field(default_factory=dict)

    def record(self) -> None:
        import site

        user = [site.getusersitepackages()] if site.ENABLE_USER_SITE else []
        for directory in [*site.getsitepackages(), *user]:
            # a .pth file added or removed: another sys.path (the native launcher's request
            # takes this server's, cli/warm_native.py)
            with contextlib.suppress(OSError):
                self.seen.setdefault(f"site:{directory}", (directory, _version(directory)))
        for name, module in list(sys.modules.items()):
            path = getattr(module, "__file__", None)
            if name in self.seen or not isinstance(path, str):
                continue
            with contextlib.suppress(OSError):
                self.seen[name] = (path, _version(path))

    def changed(self) -> str | None:
        for path, version in self.seen.values():
            try:
                if _version(path) != version:
                    return path
            except OSError:
                return path
        return None


def _version(path: str) -> tuple[int, int, int]:
    stat = os.stat(path)
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


@dataclass(slots=True)
class _Command:
    conn: socket.socket
    pid: int


class _Server:
    def __init__(self, path: Path, parent: int) -> None:
        self.path = path
        self.parent = parent
        self.pid = os.getpid()
        self.modules = _Modules()
        self.env = import_time_env(dict(os.environb))
        self.confinement = _confinement(self.pid)
        self.running: dict[int, _Command] = {}  # by the child's pid
        self.listener: socket.socket | None = None
        self.inode = 0
        self.stale = False
        self.stopping = False
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.later = time.monotonic() + LATER_SECONDS
        self.logged: set[str] = set()  # companion.stderr: each reason to run cold once

    def preload_commands(self) -> None:
        """PRELOAD, and the field types of every model they define resolved (each command's
        decoding would resolve its models' again: a child's cache is its own)."""
        self.preload(PRELOAD, "pageserver_api.models.resolve_all_hints")

    def preload_later(self) -> None:
        """LATER_PRELOAD, and S3's models parsed for the children's clients."""
        self.later = float("inf")
        self.preload(LATER_PRELOAD, "cli.transport.s3.preload_models")

    def hinted(self) -> bool:
        """A warm command of this daemon needed LATER_PRELOAD lately (LATER_HINT)."""
        try:
            age = time.time() - os.stat(self.path.with_name(LATER_HINT)).st_mtime
        except OSError:
            return False
        return age < LATER_HINT_SECONDS

    def preload(self, names: tuple[str, ...], then: str | None = None) -> None:
        """Import `names`, then call the function `then` names (module.function)."""
        for name in names:
            try:
                importlib.import_module(name)
            except Exception as exc:  # an optional module missing: its commands import it
                print(f"warm server: cannot preload {name}: {exc}", file=sys.stderr)
        if then is not None:
            module, _, function = then.rpartition(".")
            try:
                getattr(importlib.import_module(module), function)()
            except Exception as exc:  # its commands do without
                print(f"warm server: {then} failed: {exc}", file=sys.stderr)
        if sys.modules.get("threading") and sys.modules["threading"].active_count() > 1:
            # a fork copies one thread and whatever locks the others held: never serve then
            raise SystemExit(f"warm server: preloading {names} started a thread")
        self.modules.record()
        gc.collect()
        _outlive_the_exit()
        gc.freeze()  # a child's collections never touch (and copy) the server's objects

    def listen(self) -> None:
        self.path.unlink(missing_ok=True)  # a crashed server's
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = self.path.with_name(self.path.name + _BINDING)
        tmp.unlink(missing_ok=True)
        listener.bind(str(tmp))
        os.chmod(tmp, 0o600)
        listener.listen(64)
        self.inode = os.stat(tmp).st_ino
        os.rename(tmp, self.path)  # whole: a launcher never finds a socket not listening
        self.listener = listener
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._signalled)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    def _signalled(self, signum: int, _frame: Any) -> None:
        if signum != signal.SIGCHLD:
            self.stopping = True

    def stop_listening(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            with contextlib.suppress(OSError):  # not a successor's (its daemon was killed)
                if os.stat(self.path).st_ino == self.inode:
                    self.path.unlink()

    def serve(self) -> dict[str, Any] | None:
        """Serve until told to stop and every child ended; in a child, its request."""
        while True:
            if self.stopping or self.stale or os.getppid() != self.parent:
                self.stop_listening()
                if not self.running:
                    return None
            if self.running:  # idle is counted from the last command's end
                self.later = max(self.later, time.monotonic() + LATER_SECONDS)
            elif self.listener is not None and time.monotonic() > self.later:
                self.preload_later()
            poller = select.poll()
            poller.register(self.wake_r, select.POLLIN)
            if self.listener is not None:
                poller.register(self.listener, select.POLLIN)
            for command in self.running.values():
                poller.register(command.conn, select.POLLIN | select.POLLRDHUP)
            timeout = _POLL_MS if self.later == float("inf") else min(_POLL_MS, 200)
            for fd, _events in poller.poll(timeout):
                if fd == self.wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self.wake_r, 512)
                elif self.listener is not None and fd == self.listener.fileno():
                    request = self._accept()
                    if request is not None:
                        return request  # in the child
                else:
                    self._launcher_gone(fd)
            self._reap()

    def _accept(self) -> dict[str, Any] | None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return None
        try:
            return self._answer(conn)
        except (OSError, KeyError, ValueError, TypeError) as exc:
            if os.getpid() != self.pid:
                raise
            print(f"warm server: a request failed: {exc!r}", file=sys.stderr)
            conn.close()
            return None

    def _answer(self, conn: socket.socket) -> dict[str, Any] | None:
        """Check and fork; the child's request in the child, None in the server."""
        conn.settimeout(_REQUEST_TIMEOUT)
        peer, uid, _gid = peer_credentials(conn)
        if uid != os.geteuid():
            send_message(conn, {"cold": "refused: the warm server serves its own user only"})
            conn.close()
            return None
        request, fds = receive_message(conn, max_fds=4)
        try:
            cold = (
                self._native(request, fds)
                or self._cold(request, fds)
                or self._confined_otherwise(peer)
                or self._unschedulable(peer, request)
            )
            if cold is not None:
                if cold not in self.logged:
                    self.logged.add(cold)
                    print(f"warm server: a command runs cold: {cold}", file=sys.stderr, flush=True)
                send_message(conn, {"cold": cold})
                conn.close()
                return None
            send_message(conn, {"ready": 1})
            go, _ = receive_message(conn)
            if "go" not in go:
                conn.close()
                return None
            try:
                pid = os.fork()
            except OSError as exc:  # EAGAIN (RLIMIT_NPROC), ENOMEM: the launcher runs it
                print(f"warm server: cannot fork: {exc}", file=sys.stderr, flush=True)
                send_message(conn, {"cold": f"the warm server cannot fork: {exc}"})
                conn.close()
                return None
            if pid == 0:
                request["fds"] = fds
                request["conn"] = conn
                return request
        finally:
            if os.getpid() == self.pid:
                for fd in fds:
                    os.close(fd)
        conn.settimeout(None)
        self.running[pid] = _Command(conn, pid)  # reaped and its connection closed in _reap
        try:
            send_message(conn, {"pid": pid})
        except OSError:  # the launcher has gone: so does its command
            os.kill(pid, signal.SIGKILL)
        return None

    @staticmethod
    def _native(request: dict[str, Any], fds: list[int]) -> str | None:
        """A native launcher's request (cli/neon_launcher.c) made the Python launcher's, in
        place (cli/warm_native.py); why it cannot be, or None."""
        if not request.get("native"):
            return None
        try:
            python_request = completed(request, fds)
        except (ValueError, KeyError, TypeError) as exc:
            return f"a native launcher's request: {exc}"
        request.clear()
        request.update(python_request)
        return None

    def _cold(self, request: dict[str, Any], fds: list[int]) -> str | None:
        """Why this request must run in its launcher, or None."""
        if len(fds) != 4:
            return f"{len(fds)} descriptors, not 4"
        changed = self.modules.changed()
        if changed is not None:
            self.stale = True
            return f"{changed} changed since the server imported it"
        if import_time_env(request["env"]) != self.env:
            return "an environment variable read at import time differs"
        if (request["executable"], request["flags"]) != (sys.executable, tuple(sys.flags)):
            return "another interpreter"
        if request["path"][1:] != sys.path[1:]:
            return "another sys.path"
        if request["nice"] < os.getpriority(os.PRIO_PROCESS, 0):
            return "a lower niceness than the server's"
        if os.geteuid() != 0:
            for name, (_soft, hard) in request["limits"].items():
                own = resource.getrlimit(getattr(resource, name))[1]
                if own != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > own):
                    return f"a higher {name} than the server's"
        return None

    def _confined_otherwise(self, peer: int) -> str | None:
        """Why the launcher `peer` (its pid, 0 if not in our pid namespace) may not have its
        command run here: the child would escape the launcher's sandbox or container."""
        if peer == 0:
            return "a launcher in another pid namespace"
        try:
            confinement = _confinement(peer)
        except OSError as exc:
            return f"the launcher's confinement is unknown: {exc}"
        if confinement != self.confinement:
            return "a launcher confined otherwise (namespaces, root, cgroup, capabilities, ...)"
        return None

    def _unschedulable(self, peer: int, request: dict[str, Any]) -> str | None:
        """Why the child could not take the launcher's Scheduling (a lower oom_score_adj or a
        real-time I/O class need privileges the server may lack), or None: then the request
        carries it."""
        try:
            wanted, own = scheduling(peer), scheduling(0)
        except OSError as exc:
            return f"the launcher's scheduling is unknown: {exc}"
        if wanted.oom_score_adj < own.oom_score_adj and not capable(_CAP_SYS_RESOURCE):
            return "a lower oom_score_adj than the server's"
        if (
            wanted.ioprio is not None
            and wanted.ioprio != own.ioprio
            and wanted.ioprio >> _IOPRIO_CLASS_SHIFT == _IOPRIO_CLASS_RT
            and not capable(_CAP_SYS_ADMIN)
        ):
            return "a real-time I/O priority"
        request["scheduling"] = wanted
        return None

    def _launcher_gone(self, fd: int) -> None:
        """The launcher of a running command closed its end: it was killed (SIGKILL; other
        signals it forwards): so is its command."""
        for command in self.running.values():
            if command.conn.fileno() == fd:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(command.pid, signal.SIGKILL)

    def _reap(self) -> None:
        while self.running:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            command = self.running.pop(pid, None)
            if command is None:
                continue
            with contextlib.suppress(OSError):
                send_message(command.conn, {"status": status})
            command.conn.close()


def _outlive_the_exit() -> None:
    """Copies of every module's namespace in a cycle that nothing else refers to, frozen with
    the rest (`gc.freeze`, which the collector never looks at again): a child's exit clears
    the modules as a cold command's does, but what the server made stays referenced, so the
    child does not walk its heap to free it, copying each page it writes a reference count
    on (the child's exit: ~18 ms of CPU, ~45 ms with the S3 client and its models loaded).
    What the command itself made is freed (its files flushed, its __del__ run) as before,
    unless it is kept in a container the server made (a preloaded module's dict, list, cache
    or class attribute): that outlives the interpreter's exit unfinalized (the usual end,
    `exit_as_the_interpreter`, finalizes it wherever it is). What the server made is never
    finalized in a child, so a preloaded module keeps nothing that needs finalizing (an open
    buffered file, a socket, a generator) in its globals or containers: it closes or flushes
    it itself, or leaves it to atexit (checked: tests/e2e/test_warm_commands.py)."""
    namespaces: list[object] = [
        dict(vars(module)) for module in list(sys.modules.values()) if module is not None
    ]
    namespaces.append(namespaces)


def _become_command(request: dict[str, Any]) -> None:
    """In the child: take the launcher's place (see the module's note)."""
    os.setsid()
    signal.set_wakeup_fd(-1)
    for signum in signal.valid_signals():  # as the launcher has them, not the server
        with contextlib.suppress(OSError, ValueError):
            signal.signal(signum, signal.SIG_DFL)
    for signum in request["ignored"]:
        signal.signal(signum, signal.SIG_IGN)
    if signal.getsignal(signal.SIGINT) == signal.SIG_DFL:  # as the interpreter's start does
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, request["blocked"])
    cwd, *stdio = request["fds"]
    for target, fd in enumerate(stdio):
        os.dup2(fd, target, inheritable=True)
        os.close(fd)
    os.fchdir(cwd)
    os.close(cwd)
    os.umask(request["umask"])
    for name, limits in request["limits"].items():
        resource.setrlimit(getattr(resource, name), limits)
    if request["nice"] != os.getpriority(os.PRIO_PROCESS, 0):
        os.setpriority(os.PRIO_PROCESS, 0, request["nice"])
    _schedule(request["scheduling"])
    os.environb.clear()
    # (a name the C library cannot set, such as the empty one of an "=x" entry, is left out)
    os.environb.update({k: v for k, v in request["env"].items() if k and b"=" not in k})
    sys.path[:] = request["path"]
    sys.argv[:] = request["argv"]
    sys.stdin, sys.stdout, sys.stderr = std_streams(request["streams"])
    request.clear()


def _schedule(wanted: Scheduling) -> None:
    """This process (the child) scheduled as `wanted` (its launcher's)."""
    own = scheduling(0)
    if wanted.cpus != own.cpus:
        os.sched_setaffinity(0, wanted.cpus)
    if wanted.ioprio is not None and wanted.ioprio != own.ioprio:
        _ioprio(0, wanted.ioprio)
    if wanted.oom_score_adj != own.oom_score_adj:
        with open("/proc/self/oom_score_adj", "w") as oom:
            oom.write(str(wanted.oom_score_adj))


def std_streams(specs: list[tuple[str, str, bool, bool]]) -> list[TextIO]:
    """sys.stdin, stdout and stderr on descriptors 0-2 as the launcher's interpreter made
    them (warm_client._stream_spec): write_through is its unbuffered output (-u,
    PYTHONUNBUFFERED), on an unbuffered file as CPython's start makes it."""
    streams: list[TextIO] = []
    for fd, (encoding, errors, line_buffering, write_through) in enumerate(specs):
        unbuffered = fd != 0 and write_through
        binary = open(fd, "rb" if fd == 0 else "wb", 0 if unbuffered else -1, closefd=False)  # noqa: SIM115
        streams.append(
            io.TextIOWrapper(
                binary,
                encoding=encoding,
                errors=errors,
                newline="\n",
                line_buffering=line_buffering,
                write_through=write_through,
            )
        )
    return streams


def _close_server_fds(server: _Server) -> None:
    with contextlib.suppress(OSError):
        os.close(server.wake_r)
        os.close(server.wake_w)
    if server.listener is not None:
        server.listener.close()  # the child's copy: the server's stays
    for command in server.running.values():
        command.conn.close()


def main(argv: list[str] | None = None) -> int:
    """`python -m cli.warm_server WORKDIR PARENT_PID`."""
    workdir, parent = argv if argv is not None else sys.argv[1:]
    path = socket_path(Path(workdir))
    if path is None:
        return 0
    server = _Server(path, int(parent))
    if os.getppid() != server.parent:
        return 0
    server.preload_commands()
    if server.hinted():
        server.preload_later()
    server.listen()
    request = server.serve()
    if request is None:
        server.stop_listening()
        return STALE_EXIT if server.stale else 0
    later = server.later == float("inf")  # the hint's path is absolute: the child moves
    hint = None if later else Path(os.path.abspath(server.path.with_name(LATER_HINT)))
    # kept open (close-on-exec) until the command's end: a launcher whose server died
    # waits for it (warm_client's note); the child tells it its exit status on it
    connection = Launcher.of(request.pop("conn").detach())
    _close_server_fds(server)
    # `server` stays referenced: once _become_command resets the signal handlers (bound
    # methods of it) nothing else would hold it, and freeing it and all it holds (the stat of
    # every loaded file...) wrote to the server's pages: ~350-750 copy-on-write faults, 1-2.5
    # ms of every warm command, in the scratch loop's timeline
    _become_command(request)
    from cli.main import main as command

    code = 0
    try:
        command()
    except SystemExit as exc:
        if isinstance(exc.code, int) and -(2**31) <= exc.code < 2**31:
            code = int(exc.code)  # passed to exit() as it is (True is 1)
        elif exc.code is not None:
            raise  # sys.exit("message"): the interpreter prints it
    finally:
        if hint is not None:
            note_later_use(hint)
    exit_as_the_interpreter(code, connection)


def exit_as_the_interpreter(code: int, launcher: Launcher | None = None) -> NoReturn:
    """End this process (a warm child whose command ended with exit code `code`) as the
    interpreter's own exit would, in its order, without its teardown of the modules: that
    writes a reference count on every object the server made (a copy-on-write fault per
    page: ~13 ms of CPU, ~25 with the S3 client loaded, on each warm command) and frees
    nothing the launcher could see. Threads joined, atexit functions run, stdout and stderr
    flushed (a flush that fails, or a daemon thread still running, leaves the rest to the
    interpreter: its message and exit code 120; its stop of the thread),
    garbage collected (the command's cycles finalized), then what the command made that is
    still reachable and has a finalizer (`__del__`: open files flushed and closed,
    generators closed, temporary files removed...) finalized, newest first, as the teardown
    of the modules would have; the server's objects (frozen, `gc.freeze`) are never listed.
    Then the C library's streams flushed (`exit` does that), and with a `launcher`
    connection, every other descriptor closed (files, pipes and the locks on them released
    as the exit releases them) and the exit status sent to the launcher before `os._exit`:
    it need not wait for the kernel to take the process's memory down, nor for the server
    to reap it (~5 ms); the server's own report comes later, to nobody."""
    threading = sys.modules.get("threading")
    if threading is not None:
        threading._shutdown()
    atexit._run_exitfuncs()  # and cleared: never run twice
    if not _flushed() or (threading is not None and threading.active_count() > 1):
        raise SystemExit(code)  # the interpreter's exit (which also stops daemon threads
        # before it finalizes what they may still be using)
    for signum in signal.valid_signals():  # as the interpreter's exit resets them
        with contextlib.suppress(OSError, ValueError):
            if callable(signal.getsignal(signum)):
                signal.signal(signum, signal.SIG_DFL)
    if gc.isenabled():
        gc.collect()
    _finalize_what_the_command_left()
    code = code if _flushed() or code else 120
    _libc().fflush(None)
    if launcher is not None and launcher.still_ours():
        _report_the_exit(code, launcher.fd)
    os._exit(code)


@dataclass(frozen=True, slots=True)
class Launcher:
    """A warm child's connection to its launcher, as it was before the command ran: the
    child reports its exit on it only from that process and on that very socket (a command
    may close the number and open something else on it, or fork a process that ends
    through `exit_as_the_interpreter` too)."""

    fd: int
    inode: int
    pid: int

    @classmethod
    def of(cls, fd: int) -> Launcher:
        return cls(fd, os.fstat(fd).st_ino, os.getpid())

    def still_ours(self) -> bool:
        try:
            now = os.fstat(self.fd)
        except OSError:
            return False
        return os.getpid() == self.pid and stat.S_ISSOCK(now.st_mode) and now.st_ino == self.inode


def _report_the_exit(code: int, launcher: int) -> None:
    """Close every descriptor but the connection `launcher`, then send on it the wait status
    of an exit with `code` (a failed send leaves it to the server's report)."""
    for name in os.listdir("/proc/self/fd"):  # not closerange: without close_range (an old
        if int(name) != launcher:  # kernel, a seccomp filter) it closes every number in turn
            with contextlib.suppress(OSError):  # (the listing's own is gone)
                os.close(int(name))
    with contextlib.suppress(OSError):
        os.write(launcher, encode_message({"status": (code & 0xFF) << 8}))


def _flushed() -> bool:
    """sys.stdout, then sys.stderr flushed as the interpreter's exit flushes them."""
    for stream in (sys.stdout, sys.stderr):
        if stream is None or getattr(stream, "closed", True):
            continue
        try:
            stream.flush()
        except Exception:
            return False
    return True


def _finalize_what_the_command_left() -> None:
    """Call the finalizer of each object the command made that is still reachable (the
    server's are frozen: `gc.get_objects` does not list them), newest first, in layers as
    freeing a module's globals would reach them: first all but files (a generator's
    `finally` or an object's `__del__` may still write to one), then text files, their
    buffers, their raw files. The standard streams, their buffers and raw files are left to
    the end (`_flushed`): a finalizer's output is still in the text stream when the files
    would be closed (the child's streams are made after the fork: std_streams)."""
    streams: set[int] = set()
    std = (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__)
    for stream in std:
        layer: object = stream
        while layer is not None:  # the text stream, its buffer, its raw file
            streams.add(id(layer))
            try:
                layer = getattr(layer, "buffer", None) or getattr(layer, "raw", None)
            except ValueError:  # detached
                break
    layers: tuple[list[object], ...] = ([], [], [], [])
    for obj in reversed(gc.get_objects()):
        if getattr(type(obj), "__del__", None) is None or id(obj) in streams:
            continue
        if not isinstance(obj, io.IOBase):
            layers[0].append(obj)
        elif isinstance(obj, io.TextIOBase):
            layers[1].append(obj)
        else:
            layers[2 if isinstance(obj, io.BufferedIOBase) else 3].append(obj)
    for layer in layers:
        for obj in layer:
            if gc.is_finalized(obj):
                continue
            try:
                type(obj).__del__(obj)  # type: ignore[attr-defined]
            except Exception as exc:  # as the interpreter reports a finalizer's exception
                print(f"Exception ignored in: {obj!r}", file=sys.stderr)
                traceback.print_exception(exc)


def note_later_use(hint: Path) -> None:
    """In a child that imported LATER_PRELOAD itself: touch `hint`, so that the next server
    of this daemon's directory preloads it at its start (a home that pushes to S3)."""
    if any(name in sys.modules for name in LATER_PRELOAD):
        with contextlib.suppress(OSError):
            hint.touch()


if __name__ == "__main__":
    sys.exit(main())
