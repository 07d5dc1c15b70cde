"""The warm command server (cli/warm_server.py) through the real `neon` launcher and daemon:
warm commands print and exit as cold ones, signals reach them, anything that could make a
warm command differ makes it cold, and the server goes with its daemon."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cli.launch import HANDSHAKE_TIMEOUT, SOCKET_NAME
from cli.warm_server import (
    IMPORT_TIME_ENV,
    IMPORT_TIME_ENV_PREFIXES,
    LATER_HINT,
    LATER_HINT_SECONDS,
    LATER_SECONDS,
    Scheduling,
    _ioprio,
    _Modules,
    _Server,
    _version,
    capable,
    scheduling,
    socket_path,
)
from proto.unix_fds import SUN_PATH_MAX
from tests.neoncli import NEON, NeonCli

WAIT = 20.0


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _ended(pid: int) -> bool:
    """Gone, or a zombie its parent (stopped, or init) did not reap yet."""
    try:
        return not Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return True


def _daemon_pid(neon: NeonCli) -> int:
    return int((neon.home / "pageserver" / "pageserver.pid").read_text())


def _until(what: str, check: object, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"not {what} after {timeout:g} s"
        time.sleep(0.05)


def _server_pid(neon: NeonCli) -> int:
    """The daemon's warm server, once it listens."""
    found: list[int] = []

    def listening() -> bool:
        found[:] = [p for p in _children(_daemon_pid(neon)) if "cli.warm_server" in _cmdline(p)]
        return bool(found) and (neon.home / "pageserver" / SOCKET_NAME).exists()

    _until("a warm server listening", listening)
    return found[0]


@pytest.fixture
def warm(neon: NeonCli) -> Iterator[NeonCli]:
    neon.run("pageserver", "start")
    _server_pid(neon)
    yield neon


def _env(neon: NeonCli, warm: bool, **extra: str) -> dict[str, str]:
    return {**neon.env(), "NEON_WARM": "1" if warm else "0", **extra}


@contextlib.contextmanager
def _daemon_stopped(neon: NeonCli) -> Iterator[None]:
    """`pg list` waits on the daemon while it is stopped: a command that runs until told."""
    pid = _daemon_pid(neon)
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _blocked_pg_list(
    neon: NeonCli, env: dict[str, str], preexec: Callable[[], None] | None = None
) -> tuple[subprocess.Popen[str], int]:
    """`neon pg list` started and waiting on the stopped daemon; the warm server's child
    running it (0: it runs cold, in the launcher)."""
    server = _server_pid(neon)
    before = set(_children(server))
    proc = subprocess.Popen(
        [NEON, "pg", "list"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=preexec,
    )

    def waiting() -> bool:  # the launcher's imports done, or the child's start
        assert proc.poll() is None, proc.communicate()
        return any(_connected(p) for p in [proc.pid, *(set(_children(server)) - before)])

    try:
        _until("pg list connected to the daemon", waiting)
    except BaseException:
        proc.kill()  # and the warm child with it (the server's _launcher_gone)
        proc.communicate(timeout=WAIT)
        raise
    children = set(_children(server)) - before
    assert len(children) <= 1
    return proc, children.pop() if children else 0


def _connected(pid: int) -> bool:
    """Whether process `pid` has an established TCP connection (`neon`'s to its daemon)."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        tables = [Path(f"/proc/{pid}/net/{t}").read_text() for t in ("tcp", "tcp6")]
    except OSError:  # gone, or a descriptor closed meanwhile: not yet
        return False
    sockets = {link[len("socket:[") : -1] for link in links if link.startswith("socket:[")}
    rows = [line.split() for table in tables for line in table.splitlines()[1:]]
    return any(row[3] == "01" and row[9] in sockets for row in rows)  # 01: ESTABLISHED


def _children_faults(pid: int) -> int:
    """cminflt of /proc/PID/stat: the minor page faults of its reaped children (a forked
    child that ran a command has many: the server's pages it wrote to were copied)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[8])


def _interrupted(neon: NeonCli, warm: bool, **extra: str) -> tuple[int, str, str, bool]:
    with _daemon_stopped(neon):
        proc, child = _blocked_pg_list(neon, _env(neon, warm, **extra))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=WAIT)
    if child:
        _until("the warm child reaped", lambda: not Path(f"/proc/{child}").exists())
    return proc.returncode, out, err, bool(child)


def test_warm_and_cold_commands_print_and_exit_alike(warm: NeonCli) -> None:
    for args in (
        ("pg", "list"),
        ("pg", "list", "--json"),
        ("pg", "show", "nosuch"),
        ("snapshot", "list"),
        ("storage", "list"),
        ("pg", "checkout", "nosuch@s"),
    ):
        server = _server_pid(warm)
        faults = _children_faults(server)
        got = [
            subprocess.run(
                [NEON, *args], env=_env(warm, w), capture_output=True, text=True, check=False
            )
            for w in (True, False)
        ]
        assert _children_faults(server) > faults, f"{args} ran in a child of the server"
        assert (got[0].returncode, got[0].stdout, got[0].stderr) == (
            got[1].returncode,
            got[1].stdout,
            got[1].stderr,
        ), args
    assert got[0].returncode != 0 and got[0].stderr.startswith("neon: error: ")


def test_sigint_ends_a_warm_command_as_a_cold_one(warm: NeonCli) -> None:
    hot = _interrupted(warm, True)
    cold = _interrupted(warm, False)
    assert hot[3] and not cold[3], "the first ran in the server's child, the second cold"
    assert hot[:3] == cold[:3] == (130, "", "neon: interrupted\n")


def test_sigusr1_stacks_and_sigterm_reach_the_warm_child(warm: NeonCli) -> None:
    with _daemon_stopped(warm):
        proc, child = _blocked_pg_list(warm, _env(warm, True))
        assert child
        warm.dump_stacks([proc.pid])  # SIGUSR1 to the `neon` pid, as a stuck test does
        assert proc.poll() is None, "the launcher survives SIGUSR1"
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=WAIT)
    assert "most recent call first" in err and "in main" in err, err
    assert proc.returncode == -signal.SIGTERM


def test_the_child_has_the_launchers_cwd_and_limits(warm: NeonCli, tmp_path: Path) -> None:
    def launcher() -> None:
        os.chdir(tmp_path)
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 300))

    with _daemon_stopped(warm):
        proc, child = _blocked_pg_list(warm, _env(warm, True), launcher)
        try:
            assert child
            limits = Path(f"/proc/{child}/limits").read_text()
            cwd = os.readlink(f"/proc/{child}/cwd")
        finally:
            proc.kill()
            proc.communicate(timeout=WAIT)
    assert cwd == str(tmp_path)
    assert any(line.split()[3:5] == ["200", "300"] for line in limits.splitlines()
               if line.startswith("Max open files")), limits  # fmt: skip


def test_sigkill_of_the_launcher_ends_its_child(warm: NeonCli) -> None:
    with _daemon_stopped(warm):
        proc, child = _blocked_pg_list(warm, _env(warm, True))
        assert child
        proc.kill()
        proc.communicate(timeout=WAIT)
        _until("the child killed", lambda: not Path(f"/proc/{child}").exists())


def _state(pid: int) -> str:
    """R, S, T (stopped)...: /proc/PID/stat's third field (after the command's name)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_ctrl_z_stops_the_warm_child_and_sigcont_continues_it(warm: NeonCli) -> None:
    """SIGTSTP stops a cold command; a warm one's launcher stops its child too (with SIGSTOP:
    a terminal-less session discards SIGTSTP) and SIGCONT (`fg`, `bg`) continues both."""
    with _daemon_stopped(warm):
        proc, child = _blocked_pg_list(warm, _env(warm, True))
        try:
            assert child
            proc.send_signal(signal.SIGTSTP)
            _until("both stopped", lambda: _state(proc.pid) == _state(child) == "T")
            proc.send_signal(signal.SIGCONT)
            _until("both going again", lambda: "T" not in (_state(proc.pid), _state(child)))
        except BaseException:
            proc.kill()
            proc.send_signal(signal.SIGCONT)
            raise
    out, err = proc.communicate(timeout=WAIT)
    assert (proc.returncode, err) == (0, ""), out


def test_an_import_time_variable_that_differs_runs_cold(warm: NeonCli) -> None:
    assert not _interrupted(warm, True, NEON_S3_PART_SIZE="123456")[3]
    assert not _interrupted(warm, True, PYTHONWARNINGS="ignore")[3]
    assert not _interrupted(warm, True, SSL_CERT_FILE="/nonexistent")[3]  # OpenSSL's own
    assert _interrupted(warm, True)[3]


def test_a_changed_module_makes_the_next_command_cold(neon: NeonCli, tmp_path: Path) -> None:
    """A module the server imported (sitecustomize, on PYTHONPATH for this home's daemon and
    commands) changes: that command runs cold, the server exits, the daemon starts a fresh
    one, which runs the next warm."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("")
    neon.env_extra["PYTHONPATH"] = str(site)
    neon.run("pageserver", "start")
    first = _server_pid(neon)
    assert _interrupted(neon, True)[3]
    module = site / "sitecustomize.py"
    stat = module.stat()
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert not _interrupted(neon, True)[3], "the changed module: cold"
    _until("the stale server gone", lambda: not Path(f"/proc/{first}").exists())
    second = _server_pid(neon)
    assert second != first
    assert _interrupted(neon, True)[3], "the fresh server serves warm again"


def test_a_peer_of_another_user_is_refused(warm: NeonCli) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user")  # CI runs as root
    path = warm.home / "pageserver" / SOCKET_NAME
    modes = [(p, p.stat().st_mode & 0o7777) for p in (warm.home, path.parent, path)]
    read, write = os.pipe()
    try:
        for p, mode in modes:
            p.chmod(mode | 0o007)
        pid = os.fork()
        if pid == 0:  # connect as nobody; what the server answers goes to the pipe
            try:
                os.setgid(65534)
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.settimeout(WAIT)
                    sock.connect(str(path))
                    while chunk := sock.recv(4096):
                        os.write(write, chunk)
            except BaseException as exc:
                os.write(write, repr(exc).encode())
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as answer:
            got = answer.read()
        os.waitpid(pid, 0)
    finally:
        for p, mode in modes:
            p.chmod(mode)
    assert b"refused: the warm server serves its own user only" in got, got


def _no_new_privs() -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def _no_mknod() -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(24, 27, 0, 0, 0) != 0:  # PR_CAPBSET_DROP MKNOD
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _own_uts_namespace() -> None:
    if ctypes.CDLL(None, use_errno=True).unshare(0x04000000) != 0:  # CLONE_NEWUTS
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUTS)")


@pytest.mark.parametrize("confine", [None, _no_new_privs, _no_mknod, _own_uts_namespace])
def test_a_launcher_confined_otherwise_runs_cold(
    warm: NeonCli, confine: Callable[[], None] | None
) -> None:
    """A launcher in a sandbox (no_new_privs, a capability dropped, another namespace) has
    its command run cold: the server's child would run outside the sandbox."""
    if confine is not None and confine is not _no_new_privs and os.geteuid() != 0:
        pytest.skip("needs root to drop a capability or unshare")  # CI runs as root
    with _daemon_stopped(warm):
        proc, child = _blocked_pg_list(warm, _env(warm, True), confine)
        proc.kill()
        proc.communicate(timeout=WAIT)
    assert bool(child) == (confine is None)


def test_a_closed_stdin_runs_cold(warm: NeonCli) -> None:
    """`neon pg list <&-`: the launcher has no sys.stdin to describe; the command runs as a
    cold one does (before: an AttributeError's traceback, exit 1)."""
    got = [
        subprocess.run(
            ["bash", "-c", f"exec {NEON} pg list --json <&-"],
            env=_env(warm, w),
            capture_output=True,
            text=True,
            check=False,
        )
        for w in (True, False)
    ]
    assert (got[0].returncode, got[0].stdout, got[0].stderr) == (0, "[]\n", "")
    assert (got[1].returncode, got[1].stdout, got[1].stderr) == (0, "[]\n", "")


_FORKLESS_SERVER = """
import errno, os, sys
from cli import warm_server

def fork() -> int:
    raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

os.fork = fork
sys.exit(warm_server.main([sys.argv[1], str(os.getppid())]))
"""


def test_a_server_that_cannot_fork_has_the_launcher_run_the_command(warm: NeonCli) -> None:
    """fork fails (EAGAIN under RLIMIT_NPROC, ENOMEM) after the launcher's "go": the server
    answers cold and the launcher runs the command (before: "went away", exit 1, not run)."""
    path = warm.home / "pageserver" / SOCKET_NAME
    first = path.stat().st_ino
    env = _env(warm, True)
    server = subprocess.Popen(
        [sys.executable, "-c", _FORKLESS_SERVER, str(path.parent)],
        env=env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _until("the fork-less server listening", lambda: path.stat().st_ino != first)
        got = subprocess.run(
            [NEON, "pg", "list", "--json"], env=env, capture_output=True, text=True, check=False
        )
    finally:
        server.terminate()
        _out, log = server.communicate(timeout=WAIT)
    assert "warm server: cannot fork" in log, log
    assert (got.returncode, got.stdout, got.stderr) == (0, "[]\n", "")


def test_a_server_that_never_answers_leaves_the_command_to_the_launcher(
    warm: NeonCli, tmp_path: Path
) -> None:
    """A stuck server (it accepts, it never answers): after HANDSHAKE_TIMEOUT the launcher
    runs the command itself, as a cold one."""
    path = warm.home / "pageserver" / SOCKET_NAME
    path.unlink()  # the real server's socket: it goes on listening, unreachable
    out, err = tmp_path / "out", tmp_path / "err"
    with socket.socket(socket.AF_UNIX) as stuck, out.open("w") as stdout, err.open("w") as stderr:
        stuck.bind(str(path))
        stuck.listen(4)
        try:  # files, not pipes: the request never accepted holds the launcher's 0-2
            start = time.monotonic()
            code = subprocess.call(
                [NEON, "pg", "list", "--json"],
                env=_env(warm, True),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                timeout=WAIT + HANDSHAKE_TIMEOUT,
            )
            took = time.monotonic() - start
        finally:
            path.unlink()
    assert (code, out.read_text(), err.read_text()) == (0, "[]\n", "")
    assert HANDSHAKE_TIMEOUT <= took < 1.5 * HANDSHAKE_TIMEOUT  # one wait, not one a launcher


def test_a_dead_server_leaves_the_launcher_waiting_for_its_command(warm: NeonCli) -> None:
    """The server dies (OOM killer) while a command runs: its launcher waits for the command
    (Ctrl-C still reaches it), then exits as it did: the child reports its own status
    (exit_as_the_interpreter; before: exit 1, the status lost with the server, and before
    that exit 1 at once, the command running on unseen)."""
    server = _server_pid(warm)
    with _daemon_stopped(warm):
        proc, child = _blocked_pg_list(warm, _env(warm, True))
        try:
            assert child
            os.kill(server, signal.SIGKILL)
            _until("the server gone", lambda: _ended(server))
            time.sleep(0.5)
            assert proc.poll() is None, proc.communicate()
            assert Path(f"/proc/{child}").exists()
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=WAIT)
        except BaseException:
            proc.kill()
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
            raise
    assert (proc.returncode, err) == (130, "neon: interrupted\n")
    _until("the warm child gone", lambda: _ended(child))


_STREAMS = """
import json, sys
from cli.warm_client import _stream_spec
from cli.warm_server import std_streams

def described(streams):
    return [(type(s.buffer).__name__, s.line_buffering, s.write_through) for s in streams]

own = [sys.stdin, sys.stdout, sys.stderr]
print(json.dumps([described(own), described(std_streams([_stream_spec(s) for s in own]))]))
"""


@pytest.mark.parametrize("flags", [[], ["-u"]])
def test_the_childs_streams_are_buffered_as_the_launchers(flags: list[str]) -> None:
    """`python -u`, PYTHONUNBUFFERED: stdout and stderr on unbuffered files (write_through
    alone left a block buffer that nothing flushed: warm output came in blocks)."""
    own, made = json.loads(
        subprocess.run(
            [sys.executable, *flags, "-c", _STREAMS],
            env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert made == own
    assert own[1][0] == ("FileIO" if flags else "BufferedWriter")


_FOREGROUND = "from cli.warm_client import in_foreground; print(in_foreground())"


def test_the_terminal_may_be_stdin_when_stderr_is_redirected() -> None:
    """`neon pg list 2>log` at a prompt: the launcher is still in the terminal's foreground
    group (its Ctrl-C goes to the whole group of the command: so must the launcher's)."""
    leader, terminal = os.openpty()

    def own_terminal() -> None:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        got = [
            subprocess.run(
                [sys.executable, "-c", _FOREGROUND],
                stdin=stdin,
                capture_output=True,
                text=True,
                check=True,
                preexec_fn=own_terminal if stdin == terminal else None,
            ).stdout
            for stdin in (terminal, subprocess.DEVNULL)
        ]
    finally:
        os.close(terminal)
        os.close(leader)
    assert got == ["True\n", "False\n"]


def test_a_launcher_ended_by_its_childs_core_dumping_signal_dumps_no_core(
    warm: NeonCli, tmp_path: Path
) -> None:
    """SIGQUIT: the warm child dumps its core (core_pattern permitting); the launcher, which
    then ends by the same signal, writes none over it."""

    def launcher() -> None:
        os.chdir(tmp_path)
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,) * 2)

    with _daemon_stopped(warm):
        proc, child = _blocked_pg_list(warm, _env(warm, True), launcher)
        assert child
        proc.send_signal(signal.SIGQUIT)
        _pid, status = os.waitpid(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        proc.communicate(timeout=WAIT)
    for core in tmp_path.glob("core*"):  # the child's (tens of MiB)
        core.unlink()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGQUIT
    assert not os.WCOREDUMP(status)


def test_the_socket_path_leaves_room_for_the_name_bound_first(tmp_path: Path) -> None:
    """The server binds the socket's name + ".tmp", then renames it: that must fit too
    (before: paths of 104-107 bytes made the server fail at every daemon start)."""
    room = SUN_PATH_MAX - len(os.fsencode(tmp_path / "a" / SOCKET_NAME)) - len(".tmp")
    fits = tmp_path / ("a" * (1 + room))
    assert socket_path(fits) is not None
    assert socket_path(tmp_path / ("a" * (2 + room))) is None
    fits.mkdir()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(fits / (SOCKET_NAME + ".tmp")))


def test_a_module_rewritten_with_its_old_time_is_changed(tmp_path: Path) -> None:
    """A source file rewritten or replaced keeping its modification time (`cp -p`, a
    checkout's restore) is a change: its size or inode differ."""
    module = tmp_path / "m.py"
    module.write_text("A = 1\n")
    mtime = module.stat().st_mtime_ns
    modules = _Modules({"m": (str(module), _version(str(module)))})
    assert modules.changed() is None
    module.write_text("A = 12\n")
    os.utime(module, ns=(mtime, mtime))
    assert modules.changed() == str(module)


def test_the_server_goes_with_its_daemon(warm: NeonCli) -> None:
    server = _server_pid(warm)
    daemon = _daemon_pid(warm)
    os.kill(daemon, signal.SIGKILL)
    _until("the server gone", lambda: not Path(f"/proc/{server}").exists())
    assert not (warm.home / "pageserver" / SOCKET_NAME).exists()
    # the next command finds no server: it runs (and starts a daemon) cold
    assert json.loads(warm.run("pg", "list", "--json").stdout) == []


_TRACE = """
import json, os
read = set()
recording = True
original = os._Environ.__getitem__  # under .get(), `in`, getenv(), for environ and environb


def traced(self, key):
    if recording:
        read.add(key.decode() if isinstance(key, bytes) else key)
    return original(self, key)


os._Environ.__getitem__ = traced
from pathlib import Path
from cli.warm_server import LATER_PRELOAD, PRELOAD, _Server

recording = False  # the server's own copy of the environment reads every name
server = _Server(Path("/nonexistent"), 0)
recording = True
server.preload(PRELOAD + LATER_PRELOAD)
print(json.dumps(sorted(read)))
"""


def test_every_import_time_environment_read_is_listed() -> None:
    """Every variable read while the server imports its modules (traced: module-level reads,
    functions run at import, sitecustomize) is in IMPORT_TIME_ENV or has one of its
    prefixes: a new one would let a command run warm with what another environment set."""
    read = json.loads(
        subprocess.run(
            [sys.executable, "-c", _TRACE], capture_output=True, text=True, check=True
        ).stdout
    )
    unlisted = [
        name
        for name in read
        if name not in IMPORT_TIME_ENV and not name.startswith(IMPORT_TIME_ENV_PREFIXES)
    ]
    assert not unlisted, unlisted
    # the trace sees cli.transport.s3's module-level read and botocore's in a function
    assert {"NEON_S3_PART_SIZE", "AWS_NEW_RETRIES_2026"} <= set(read), read


def _maps_aiohttp(pid: int) -> bool:
    """aiohttp's C parser is mapped: the server has imported LATER_PRELOAD."""
    return "aiohttp/_http_parser" in Path(f"/proc/{pid}/maps").read_text()


def _preloaded_at_start(pid: int) -> bool | None:
    """Whether server `pid` loaded LATER_PRELOAD at its start; None if it has been up so
    long (a loaded box) that its idle preload may have come first."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    age = float(Path("/proc/uptime").read_text().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    loaded = _maps_aiohttp(pid)
    return loaded if age < LATER_SECONDS - 1 else None


def test_a_daemon_whose_warm_command_used_s3_preloads_it_at_the_next_start(
    warm: NeonCli,
) -> None:
    """A warm command that imported the S3 client itself leaves LATER_HINT, and the next
    server preloads it (and S3's models) before it listens: bench.exchange's incremental s3
    push met a fresh daemon whose server would load it only after 5 s idle, so the command
    paid ~0.3 s for it as a cold one does; a home that never used S3 pays nothing at start."""
    hint = warm.home / "pageserver" / LATER_HINT
    assert not hint.exists()
    from tests.s3d import moto_s3

    # moto first (its start takes seconds on a loaded box): the pull must come before the
    # new server's idle preload (LATER_SECONDS), or its child imports nothing and no hint.
    with moto_s3() as s3:
        bucket = s3.new_bucket()
        env = {**warm.env(), **s3.env(), "NEON_WARM": "1"}
        warm.run("pageserver", "stop")
        warm.run("pageserver", "start")
        assert _preloaded_at_start(_server_pid(warm)) in (False, None)  # no hint: not at start
        pull = subprocess.run(
            [NEON, "snapshot", "pull", "--from", f"s3://{bucket}/p/x.neon"],
            env=env, capture_output=True, text=True, timeout=WAIT,
        )  # fmt: skip
    assert pull.returncode != 0 and "x.neon" in pull.stderr, pull.stderr
    assert hint.exists()  # the child imported aiobotocore (the server had not yet)
    warm.run("pageserver", "stop")
    warm.run("pageserver", "start")
    server = _server_pid(warm)
    assert _maps_aiohttp(server)  # loaded before the socket was there
    os.utime(hint, (time.time() - LATER_HINT_SECONDS - 60,) * 2)
    warm.run("pageserver", "stop")
    warm.run("pageserver", "start")
    assert _preloaded_at_start(_server_pid(warm)) in (False, None)  # an old hint: as none


def test_the_child_has_the_launchers_cpus_io_priority_and_oom_score_adj(
    warm: NeonCli,
) -> None:
    """taskset, ionice and choom apply to a warm command as to a cold one: the forked child
    had the server's (review finding 6, left by session 20)."""

    cpu = max(os.sched_getaffinity(0))  # one of two or more: not the server's set

    def launcher() -> None:
        os.sched_setaffinity(0, {cpu})
        _ioprio(0, (3 << 13) | 7)  # ionice -c 3 (idle)
        Path("/proc/self/oom_score_adj").write_text("500")

    with _daemon_stopped(warm):
        proc, child = _blocked_pg_list(warm, _env(warm, True), launcher)
        try:
            assert child
            got = scheduling(child)
        finally:
            proc.kill()
            proc.communicate(timeout=WAIT)
    assert got == Scheduling(frozenset({cpu}), (3 << 13) | 7, 500), got


def test_a_launcher_scheduled_beyond_the_servers_rights_runs_cold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lower oom_score_adj or a real-time I/O class than the server's needs a capability
    (CAP_SYS_RESOURCE, CAP_SYS_ADMIN; root in a container may lack the first): a server
    without it answers cold, as the child could not take them; with it, the request carries
    the launcher's scheduling."""
    import cli.warm_server as warm_server

    own = Scheduling(frozenset({0}), (2 << 13) | 4, 100)
    launchers = {
        "oom_score_adj": Scheduling(frozenset({0}), (2 << 13) | 4, 0),
        "real-time": Scheduling(frozenset({0}), (1 << 13) | 4, 100),
    }
    server = _Server(Path("/nonexistent"), 0)
    for why, launcher in launchers.items():
        seen = {0: own, 1234: launcher}
        monkeypatch.setattr(warm_server, "scheduling", seen.__getitem__)
        monkeypatch.setattr(warm_server, "capable", lambda _capability: False)
        request: dict[str, object] = {}
        assert why in (server._unschedulable(1234, request) or ""), why
        assert "scheduling" not in request
        monkeypatch.setattr(warm_server, "capable", lambda _capability: True)
        assert server._unschedulable(1234, request) is None
        assert request["scheduling"] == launcher
    assert capable(21) == bool(
        int(Path("/proc/self/status").read_text().split("CapEff:")[1].split()[0], 16) & 1 << 21
    )


_EXIT = """
import os, sys, types
from pathlib import Path
from cli.warm_server import _Server


class Noisy:
    def __init__(self, what):
        self.what = what

    def __del__(self):
        os.write(1, self.what.encode())


module = sys.modules["made_by_the_server"] = types.ModuleType("made_by_the_server")
module.noisy = Noisy("server's freed;")
_Server(Path("/nonexistent"), 0).preload(())
pid = os.fork()
if pid == 0:
    module.own = Noisy("command's freed;")
    sys.exit(0)
os.waitpid(pid, 0)
os._exit(0)
"""


def test_a_childs_exit_frees_what_the_command_made_not_what_the_server_did() -> None:
    """A warm child's exit clears the modules as a cold command's exit does, but objects the
    server made before forking are not freed there: the child would walk (and copy, page by
    page) the server's heap for nothing (~18 ms of each warm command's CPU, ~45 ms once the
    S3 client and its models are loaded). What the command made is freed (its __del__ run)."""
    out = subprocess.run(
        [sys.executable, "-c", _EXIT], capture_output=True, text=True, check=True, timeout=WAIT
    ).stdout
    assert out == "command's freed;", out


_INTERPRETERS_EXIT = """
import atexit, marshal, os, socket, sys, threading, time, types
from pathlib import Path
from cli.warm_server import Launcher, _Server, exit_as_the_interpreter


class Noisy:
    def __init__(self, what):
        self.what = what

    def __del__(self):
        sys.stdout.write(self.what)


server = sys.modules["made_by_the_server"] = types.ModuleType("made_by_the_server")
server.noisy = Noisy("server's finalized;")
atexit.register(sys.stdout.write, "server's atexit;")
_Server(Path("/nonexistent"), 0).preload(())
sys.stdout.flush()
launcher, connection = socket.socketpair()
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    command = sys.modules["made_by_the_command"] = types.ModuleType("made_by_the_command")
    command.text = open(sys.argv[1], "w")
    command.text.write("written through three layers")
    server.rebound = Noisy("rebound finalized;")


    def generator():
        try:
            yield 1
        finally:
            sys.stdout.write("generator closed;")


    command.suspended = generator()
    next(command.suspended)
    command.noisy = Noisy("command's finalized;")
    atexit.register(sys.stdout.write, "command's atexit;")
    threading.Thread(target=lambda: (time.sleep(0.2), sys.stdout.write("thread joined;"))).start()
    sys.stdout.write("unflushed;")
    exit_as_the_interpreter(int(sys.argv[2]), Launcher.of(connection.detach()))
connection.close()
os.close(write)
report = launcher.recv(1024)  # before the child's exit: its descriptors closed by then
os.set_blocking(read, False)
sys.stdout.write(f"reported {marshal.loads(report[4:])['status'] >> 8}, ")
sys.stdout.write(f"the pipe at its end {os.read(read, 1) == b''};")
_, status = os.waitpid(pid, 0)
sys.stdout.write(f"exit {os.waitstatus_to_exitcode(status)}")
os._exit(0)
"""


def test_a_warm_childs_exit_is_the_interpreters_without_its_teardown(tmp_path: Path) -> None:
    """exit_as_the_interpreter (a warm command's end): threads joined, then every atexit
    function (the command's, then the server's), stdout flushed, then what the command made
    finalized (a generator closed, objects' __del__, a text file flushed into its buffer and
    that into the file, not the other way round), never what the server made; the exit code
    is the command's, told to the launcher by the child once every other descriptor of it is
    closed (a pipe it held is at its end). Not the modules' teardown, which writes to every
    page of the server's heap (copy on write) to free nothing but what the command made."""
    for code in (0, 3):
        out = subprocess.run(
            [sys.executable, "-c", _INTERPRETERS_EXIT, str(tmp_path / "text"), str(code)],
            capture_output=True, text=True, check=True, timeout=WAIT,
        ).stdout  # fmt: skip
        assert out.startswith("unflushed;thread joined;command's atexit;server's atexit;"), out
        finalized = out.split(";")[4:-2]
        assert sorted(finalized) == sorted(
            ["generator closed", "command's finalized", "rebound finalized"]
        ), out
        assert out.endswith(f";reported {code}, the pipe at its end True;exit {code}"), out
        assert (tmp_path / "text").read_text() == "written through three layers"


_FULL_STDOUT = """
import os, sys
from pathlib import Path
from cli.warm_server import _Server, exit_as_the_interpreter

_Server(Path("/nonexistent"), 0).preload(())
pid = os.fork()
if pid == 0:
    sys.stdout.write("left in the buffer")
    exit_as_the_interpreter(0)
os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_a_failing_flush_at_a_warm_childs_exit_is_the_interpreters() -> None:
    """A flush of stdout that fails at the exit (a full device, a reader gone) is left to
    the interpreter: the same message and exit code (120) as a cold command's."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    got = []
    for script in (_FULL_STDOUT, "import sys; sys.stdout.write('left in the buffer')"):
        with open("/dev/full", "w") as full:
            proc = subprocess.run(
                [sys.executable, "-c", script], stdout=full, stderr=subprocess.PIPE, text=True,
                check=False, timeout=WAIT, env=env,
            )  # fmt: skip
        got.append((proc.returncode, proc.stderr))
    assert got[0] == got[1], got
    assert got[0][0] == 120 and "No space left on device" in got[0][1], got


_FINALIZER_WRITES = """
import os, sys
from pathlib import Path
from cli.warm_client import _stream_spec
from cli.warm_server import _Server, exit_as_the_interpreter, std_streams

_Server(Path("/nonexistent"), 0).preload(())
pid = os.fork()
if pid == 0:
    own = [sys.stdin, sys.stdout, sys.stderr]
    sys.stdin, sys.stdout, sys.stderr = std_streams([_stream_spec(s) for s in own])

    def lines():
        try:
            yield
        finally:
            print("written by a finalizer")
            print("to stderr too", file=sys.stderr)

    left_open = lines()
    next(left_open)
    print("the command's output")
    exit_as_the_interpreter(0)
os._exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_what_a_finalizer_writes_at_a_warm_childs_exit_is_output() -> None:
    """The child's standard streams, made after the fork (std_streams), block-buffered (no
    PYTHONUNBUFFERED, stdout a pipe): what a generator's `finally` prints at the exit comes
    out, as a cold command's does. The streams' byte buffers and files were finalized with
    the command's files, before the text in the streams was flushed into them: lost, exit
    0."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    proc = subprocess.run(
        [sys.executable, "-c", _FINALIZER_WRITES],
        capture_output=True, text=True, check=False, timeout=WAIT, env=env,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        0, "the command's output\nwritten by a finalizer\n", "to stderr too\n"
    ), proc  # fmt: skip


_FINALIZABLE_AT_MODULE_LEVEL = """
import json, sys, types
from pathlib import Path
from cli.warm_server import PRELOAD, _Server

server = _Server(Path("/nonexistent"), 0)
if sys.argv[1] == "planted":
    planted = sys.modules["planted"] = types.ModuleType("planted")
    planted.registry = {"log": [open("/dev/null", "w")]}
server.preload(PRELOAD)
server.preload_later()
skip = (types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.MethodType,
        str, bytes, int, float)
streams = {id(s) for s in (sys.stdin, sys.stdout, sys.stderr,
                           sys.__stdin__, sys.__stdout__, sys.__stderr__)}
found, seen = [], set(streams)
for name, module in list(sys.modules.items()):
    if module is None:
        continue
    stack = [(f"{name}.{key}", value, 0) for key, value in list(vars(module).items())]
    while stack:
        path, obj, depth = stack.pop()
        if isinstance(obj, skip) or id(obj) in seen:
            continue
        seen.add(id(obj))
        if not isinstance(obj, type) and getattr(type(obj), "__del__", None) is not None:
            found.append(f"{path}: {type(obj).__module__}.{type(obj).__qualname__}")
        if depth < 3:
            if isinstance(obj, dict):
                inner = list(obj.values())
            elif isinstance(obj, (list, tuple, set, frozenset)):
                inner = list(obj)
            else:  # a class's or an object's attributes
                try:
                    namespace = getattr(obj, "__dict__", None)
                except Exception:
                    namespace = None
                mapping = (dict, types.MappingProxyType)
                inner = list(namespace.values()) if isinstance(namespace, mapping) else []
            stack.extend((f"{path}.{i}", child, depth + 1) for i, child in enumerate(inner))
print(json.dumps(sorted(found)))
"""


def test_preloaded_modules_keep_nothing_that_needs_finalizing() -> None:
    """The rule of a preloaded module (`_outlive_the_exit`): no object that needs
    finalizing (an open file, a socket, a generator, anything with `__del__`) in its
    globals or within three levels of its containers, classes and objects. The server made
    it, so no warm child ever finalizes it (it is frozen, and outlives every exit): what a
    command writes to such a file would stay in a buffer the child never flushes, where a
    cold command's exit flushes it. A planted one is found (the check can fail)."""
    got = {}
    for case in ("as is", "planted"):
        out = subprocess.run(
            [sys.executable, "-c", _FINALIZABLE_AT_MODULE_LEVEL, case],
            capture_output=True, text=True, check=True, timeout=120,
        ).stdout  # fmt: skip
        got[case] = json.loads(out)
    assert got["as is"] == [], got["as is"]
    assert [f for f in got["planted"] if f.startswith("planted.registry")], got["planted"]


_STATUS_FIRST = """
import marshal, os, socket, struct, sys
from cli.warm_client import _finish, _Forwarder

launcher, server = socket.socketpair()
for message in ({"status": 3 << 8}, {"pid": 1}, {"status": 0}):
    body = marshal.dumps(message)
    server.sendall(struct.pack(">I", len(body)) + body)
_finish(launcher, _Forwarder())
"""


def test_the_childs_own_report_may_come_before_the_servers_pid() -> None:
    """The child tells the launcher its status itself (exit_as_the_interpreter), which may
    come before the server's {"pid"} on a busy box: the launcher exits with it."""
    proc = subprocess.run(
        [sys.executable, "-c", _STATUS_FIRST], capture_output=True, text=True, timeout=WAIT
    )
    assert (proc.returncode, proc.stderr) == (3, ""), proc


_NOT_OURS = """
import marshal, os, socket, sys
from cli.warm_server import Launcher, exit_as_the_interpreter

launcher, connection = socket.socketpair()
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    ours = Launcher.of(connection.detach())
    grandchild = os.fork()
    if grandchild == 0:  # a process the command forked, ending through the same code
        exit_as_the_interpreter(5, ours)
    os.waitpid(grandchild, 0)
    os.dup2(write, ours.fd)  # the command closed it and the number went to a pipe
    exit_as_the_interpreter(7, ours)
connection.close()
os.close(write)
launcher.settimeout(30)
sys.stdout.write(repr(launcher.recv(1024)))
sys.stdout.write(f" exit {os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}")
sys.stdout.write(f" pipe {os.read(read, 1024)!r}")
"""


_DAEMON_THREAD = """
import os, socket, sys, threading, time
from cli.warm_server import Launcher, exit_as_the_interpreter

launcher, connection = socket.socketpair()
pid = os.fork()
if pid == 0:
    ours = Launcher.of(connection.detach())
    threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    exit_as_the_interpreter(4, ours)
connection.close()
launcher.settimeout(30)
sys.stdout.write(repr(launcher.recv(1024)))
sys.stdout.write(f" exit {os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])}")
"""


def test_a_daemon_thread_still_running_leaves_the_exit_to_the_interpreter() -> None:
    """A daemon thread alive at the end may still use what the command made: the
    interpreter's exit stops it before it finalizes anything, so the child ends that way
    (no report of its own: the server's comes once it is reaped), with the command's code."""
    out = subprocess.run(
        [sys.executable, "-c", _DAEMON_THREAD], capture_output=True, text=True, check=True,
        timeout=WAIT,
    ).stdout  # fmt: skip
    assert out == "b'' exit 4", out


def test_only_the_warm_child_reports_and_only_on_its_connection() -> None:
    """A process the command forked that ends through exit_as_the_interpreter reports
    nothing (its status is not the command's), nor does a child whose connection's number
    the command closed and reused: the launcher then hears from the server."""
    out = subprocess.run(
        [sys.executable, "-c", _NOT_OURS], capture_output=True, text=True, check=True,
        timeout=WAIT,
    ).stdout  # fmt: skip
    assert out == "b'' exit 7 pipe b''", out
