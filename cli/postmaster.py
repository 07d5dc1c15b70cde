"""One PostgreSQL server process: initdb, configuration, start, stop, liveness.

The manager knows the postmaster PID it started (from postmaster.pid, checked against /proc)
and stops servers by that PID, never by name.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from stat import S_ISREG

from cli.pg_files import read_pg_file, write_pg_file
from cli.pgbin import pg_binary, popen_kwargs, run_pg
from datadir_files.pg_account import give_to_pg_user, make_pg_dir, pg_os_user
from proto.errors import CorruptData, ExternalCommandFailed, InvalidArgument

NEON_CONF = "neon.conf"
STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


def initdb(
    datadir: Path,
    *,
    superuser: str,
    password: str | None = None,
    extra_args: tuple[str, ...] = (),
) -> None:
    """Create a new cluster in an empty (or absent) directory."""
    if datadir.exists() and any(datadir.iterdir()):
        raise InvalidArgument(f"data directory {datadir} is not empty")
    make_pg_dir(datadir)
    args = [
        "-D",
        str(datadir),
        "-U",
        superuser,
        "--encoding=UTF8",
        "--locale=C.UTF-8",
        "--no-instructions",
        "-A",
        "trust",
        *extra_args,
    ]
    pwfile: Path | None = None
    if password is not None:
        pwfile = datadir.parent / f".{datadir.name}.initpw"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        give_to_pg_user(pwfile)
        args.append(f"--pwfile={pwfile}")
    try:
        run_pg("initdb", args, what=f"initdb of {datadir}")
    finally:
        if pwfile is not None:
            pwfile.unlink(missing_ok=True)


def quote_conf_value(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


def write_config(datadir: Path, settings: Mapping[str, object], hba_lines: list[str]) -> None:
    """Write our settings to neon.conf (included from postgresql.conf) and pg_hba.conf."""
    # A data directory rebuilt from page history has no configuration files of its own.
    # Read and written through cli/pg_files.py: the directory is PostgreSQL's account's.
    raw = read_pg_file(datadir, "postgresql.conf")
    text = "# written by neon\n" if raw is None else raw.decode()
    for name in ("pg_ident.conf", "postgresql.auto.conf"):
        if read_pg_file(datadir, name) is None:
            _write_pg_file(datadir, name, "")
    include = f"include_if_exists = '{NEON_CONF}'"
    if include not in text:
        text = text.rstrip("\n") + f"\n\n# settings managed by neon\n{include}\n"
        _write_pg_file(datadir, "postgresql.conf", text)
    body = "".join(f"{k} = {quote_conf_value(v)}\n" for k, v in settings.items())
    _write_changed(datadir, NEON_CONF, "# written by neon; edits are overwritten\n" + body)
    _write_changed(datadir, "pg_hba.conf", "# written by neon\n" + "\n".join(hba_lines) + "\n")


def _write_pg_file(datadir: Path, name: str, text: str) -> None:
    # Not fsynced, for the starts that rewrite it (a checkout's seal fsyncs its whole tree).
    write_pg_file(datadir, name, text.encode(), durable=False)


def _write_changed(datadir: Path, name: str, text: str) -> None:
    """`_write_pg_file` unless the file holds `text` already (a regular file of PostgreSQL's
    account: a link or another's file there is replaced as before). Every start writes the
    same configuration again, a checkout twice (its seal, then the start): each write was a
    new file the checkout's seal then fsynced, a journal commit of the file system each."""
    try:
        if read_pg_file(datadir, name) == text.encode():
            return
    except CorruptData:
        pass
    _write_pg_file(datadir, name, text)


def read_pid_file(datadir: Path) -> int | None:
    """The PID on postmaster.pid's first line, None without a usable one. Read through
    cli/pg_files.py (the CLI may be root, the directory PostgreSQL's account's): a link
    there to a FIFO hung the read, one to /dev/zero made it read until memory ran out."""
    return _lock_file_pid(datadir, "postmaster.pid")


PID_FILE_LIMIT = 4096
"""postmaster.pid holds eight short lines (PostgreSQL's miscadmin.h, LOCK_FILE_LINE_*)."""


def _lock_file_lines(directory: Path, name: str) -> list[str] | None:
    """The lines of a lock file PostgreSQL wrote (postmaster.pid, a socket's .lock: its
    CreateLockFile), None if it is missing or unreadable (see read_pid_file)."""
    try:
        # Any owner's: a cluster another account runs (snapshot import checks it is stopped).
        raw = read_pg_file(directory, name, limit=PID_FILE_LIMIT, any_owner=True)
        return None if raw is None else raw.decode().splitlines()
    except (OSError, CorruptData, UnicodeDecodeError):
        return None


def _lock_file_pid(directory: Path, name: str) -> int | None:
    lines = _lock_file_lines(directory, name)
    try:
        return None if not lines else int(lines[0].strip())
    except ValueError:
        return None


def _is_our_postmaster(pid: int, datadir: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # A zombie (state Z) is dead for our purposes.
    state = stat.rsplit(")", 1)[1].split()[0]
    if state == "Z":
        return False
    return any(part.endswith(b"postgres") for part in cmdline[:1]) and str(datadir).encode() in (
        b" ".join(cmdline)
    )


def running_pid(datadir: Path) -> int | None:
    """The PID of the live postmaster of this data directory, or None if it is not running."""
    pid = read_pid_file(datadir)
    if pid is None or not _is_our_postmaster(pid, datadir):
        return None
    return pid


READY_POLL_SECONDS = 0.005
"""How often a start looks whether the postmaster is ready (one read of postmaster.pid):
`pg_ctl start -w` looks every 100 ms (WAITS_PER_SEC, src/bin/pg_ctl/pg_ctl.c), half of
which every start paid on average, and a checkout starts the node once."""
READY_STATES = ("ready", "standby")
"""postmaster.pid's status line once connections are accepted (PM_STATUS_READY, and
PM_STATUS_STANDBY for a hot standby: src/include/utils/pidfile.h), as pg_ctl waits for."""
_PID_FILE_STATUS_LINE = 8  # LOCK_FILE_LINE_PM_STATUS (1-based), src/include/utils/pidfile.h
STOPPING_STATE = "stopping"
"""postmaster.pid's status line once a shutdown has begun (PM_STATUS_STOPPING)."""

_started: dict[int, subprocess.Popen[bytes]] = {}
"""Postmasters this process started, reaped once they are gone (stop, or a failed start)."""


def start(
    datadir: Path, logfile: Path, *, timeout: int = 60, server_log: Path | None = None
) -> int:
    """Start the server and wait until it accepts connections; return the postmaster PID.

    As `pg_ctl start -w -l logfile` does (src/bin/pg_ctl/pg_ctl.c start_postmaster and
    wait_for_postmaster_start): postgres in a session of its own (a terminal's Ctrl-C does not
    reach it), stdin from /dev/null, its output appended to `logfile`; ready when
    postmaster.pid names it and says "ready" (or "standby"), failed when it exits first. Run
    directly and polled every few milliseconds rather than through pg_ctl's 100 ms poll.
    `server_log`, if given, is where the logging collector writes (searched too for the
    reason of a failure).
    """
    what = f"starting PostgreSQL on {datadir}"
    _reap()
    started = time.time()
    out = _open_log(logfile)
    try:
        proc = subprocess.Popen(
            [pg_binary("postgres"), "-D", str(datadir)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
            **popen_kwargs(),  # type: ignore[call-overload]
        )
    finally:
        os.close(out)
    _started[proc.pid] = proc
    deadline = time.monotonic() + timeout
    while not _ready(datadir, proc.pid, started):
        if proc.poll() is not None:
            del _started[proc.pid]
            tail = _log_tail([logfile, *([server_log] if server_log else [])])
            raise ExternalCommandFailed(
                f"{what} failed: the server exited with code {proc.returncode}"
                + (f"; log: {tail}" if tail else f"; see {logfile}")
            )
        if time.monotonic() > deadline:
            raise ExternalCommandFailed(
                f"{what} timed out after {timeout}s (the server is still starting; see {logfile})"
            )
        time.sleep(READY_POLL_SECONDS)
    return proc.pid


def _open_log(logfile: Path) -> int:
    """`logfile` opened for appending by the server, as a file of its own. It lies in the
    node's log directory, which PostgreSQL's OS user owns (its logging collector writes
    there), and this process may be root: a symlink or a second name of another file put in
    its place by that user must not make root append to, or hand over, that file (pg_ctl, run
    as PostgreSQL's user, opened it with that user's rights). Such an entry is replaced; the
    file is created 0600 and handed to PostgreSQL's user through its descriptor."""
    logfile.parent.mkdir(parents=True, exist_ok=True)
    try:
        st = os.lstat(logfile)
    except FileNotFoundError:
        pass
    else:
        if not S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.unlink(logfile)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(logfile, flags | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ExternalCommandFailed(f"cannot open the server's log {logfile}: {exc}") from None
    st = os.fstat(fd)
    if not S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise ExternalCommandFailed(f"the server's log {logfile} is not a file of its own")
    os.set_blocking(fd, True)  # O_NONBLOCK only kept a FIFO from blocking the open
    user = pg_os_user()
    if user is not None:
        os.fchown(fd, user.uid, user.gid)
    return fd


_START_TIME_SLOP = 2
"""Seconds a postmaster.pid's start time may be before the start's (pg_ctl's allowance for
clock skew between processes, wait_for_postmaster_start)."""
_PID_FILE_START_LINE = 3  # LOCK_FILE_LINE_START_TIME (1-based), src/include/utils/pidfile.h


def _ready(datadir: Path, pid: int, started: float) -> bool:
    """Whether postmaster.pid says the postmaster `pid`, started at or after `started` (wall
    clock), accepts connections. The start time is checked as pg_ctl checks it: a stale file
    left by a killed server can name the same PID (a container's PIDs repeat after a
    restart), and its "ready" is not this server's (the new postmaster overwrites a lock
    file naming its own PID: CreateLockFile, src/backend/utils/init/miscinit.c)."""
    lines = _lock_file_lines(datadir, "postmaster.pid")
    if lines is None or len(lines) < _PID_FILE_STATUS_LINE or lines[0].strip() != str(pid):
        return False
    try:
        if int(lines[_PID_FILE_START_LINE - 1]) < int(started) - _START_TIME_SLOP:
            return False
    except ValueError:
        return False
    return lines[_PID_FILE_STATUS_LINE - 1].strip() in READY_STATES


def _reap() -> None:
    """Collect the exit status of started postmasters that are gone (no zombies kept)."""
    for pid, proc in list(_started.items()):
        if proc.poll() is not None:
            del _started[pid]


def _log_tail(logfiles: list[Path]) -> str:
    """The last FATAL/PANIC/ERROR line of the logs (else the last line), for error messages."""
    lines: list[str] = []
    for path in logfiles:
        try:
            lines += [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            continue
    errors = [ln for ln in lines if "FATAL" in ln or "ERROR" in ln or "PANIC" in ln]
    return (errors or lines or [""])[-1].strip()


def remove_stale_locks(datadir: Path, socket_dir: Path, port: int, dead_pid: int) -> None:
    """After a postmaster was killed, drop the lock files that still name its PID.

    PostgreSQL itself only checks that the PID is alive, and a killed postmaster can linger
    as a zombie under an init that reaps slowly.
    """
    for directory, name in ((datadir, "postmaster.pid"), (socket_dir, f".s.PGSQL.{port}.lock")):
        lock = directory / name
        owner = _lock_file_pid(directory, name)  # both are PostgreSQL's account's to write
        if owner == dead_pid and not _is_our_postmaster(dead_pid, datadir):
            lock.unlink(missing_ok=True)
            if lock.name.endswith(".lock"):
                (socket_dir / f".s.PGSQL.{port}").unlink(missing_ok=True)


STOP_POLL_SECONDS = 0.01
"""How often a stop looks whether the postmaster is gone (two reads in /proc) where no
process descriptor can be had (`_wait_gone`): a coarser poll added half its period on average."""


def stop(datadir: Path, mode: str = "fast", *, timeout: float = 60) -> bool:
    """Stop the server by its PID; return False if it was not running.

    The postmaster is signalled and waited for through a process descriptor opened before it
    is checked to be ours (pidfd_open: the signal cannot reach a process that took its PID
    meanwhile), and the wait ends when it exits, not at the next poll."""
    stopping = signal_stop(datadir, mode, timeout=timeout)
    if stopping is None:
        return False
    with contextlib.closing(stopping):
        stopping.wait()
    return True


class Stopping:
    """A postmaster signalled to stop (`signal_stop`), its exit waited for later (`wait`):
    what the caller does meanwhile overlaps PostgreSQL's last steps (a checkout names its
    HEAD and branches while the processes exit, cli/checkout.py). Closed (`close`) when
    done: it holds the process descriptor."""

    __slots__ = ("datadir", "fd", "mode", "pid", "signalled", "timeout")

    def __init__(self, datadir: Path, pid: int, mode: str, timeout: float, fd: int | None):
        self.datadir = datadir
        self.pid = pid
        self.mode = mode
        self.timeout = timeout
        """Seconds from the signal the postmaster has to exit in (`wait` raises after them)."""
        self.fd = fd
        """The process descriptor; None where the kernel gives none (the PID is polled)."""
        self.signalled = time.monotonic()

    def gone(self, wait: float = 0.0) -> bool:
        """Whether the postmaster has exited, waiting up to `wait` seconds for it."""
        return _wait_gone(self.fd, self.pid, self.datadir, wait)

    def wait(self) -> None:
        """Return once the postmaster has exited; ExternalCommandFailed once `timeout` seconds
        have passed since the signal."""
        if self.gone(max(0.0, self.signalled + self.timeout - time.monotonic())):
            _reap()
            return
        raise ExternalCommandFailed(
            f"PostgreSQL (pid {self.pid}) on {self.datadir} did not stop within "
            f"{self.timeout:.0f}s in {self.mode} mode; try `-m immediate`"
        )

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def signal_stop(datadir: Path, mode: str = "fast", *, timeout: float = 60) -> Stopping | None:
    """Signal the directory's postmaster to stop in `mode` (see `stop`), without waiting: the
    stop in progress, to wait for within `timeout` seconds; None if it was not running."""
    if mode not in STOP_SIGNALS:
        raise InvalidArgument(f"unknown stop mode {mode!r}: use smart, fast or immediate")
    pid = read_pid_file(datadir)
    if pid is None:
        return None
    fd = _process_fd(pid)
    stopping = Stopping(datadir, pid, mode, timeout, fd)
    try:
        if not _is_our_postmaster(pid, datadir):
            stopping.close()
            return None
        if fd is None:
            os.kill(pid, STOP_SIGNALS[mode])
        else:
            signal.pidfd_send_signal(fd, STOP_SIGNALS[mode])
    except ProcessLookupError:
        stopping.close()
        return None
    except BaseException:
        stopping.close()
        raise
    return stopping


def wait_exiting(datadir: Path, timeout: float = 60) -> None:
    """Until a postmaster shutting down on `datadir` (postmaster.pid says "stopping") has
    exited: a killed command's stop goes on without it, and the next command must not change
    the directory under it. InvalidArgument if one runs that is not stopping. The process
    descriptor is opened before the PID is checked (as in `signal_stop`): a PID reused after
    the check would otherwise be waited for."""
    pid = read_pid_file(datadir)
    if pid is None:
        return
    stopping = Stopping(datadir, pid, "fast", timeout, _process_fd(pid))
    with contextlib.closing(stopping):
        if not _is_our_postmaster(pid, datadir):
            return
        lines = _lock_file_lines(datadir, "postmaster.pid")
        if lines is None:  # gone meanwhile (it removes its lock file as it exits)
            return
        has_status = len(lines) >= _PID_FILE_STATUS_LINE
        status = lines[_PID_FILE_STATUS_LINE - 1].strip() if has_status else ""
        if status != STOPPING_STATE:
            raise InvalidArgument(f"postgres runs on {datadir}; stop it first")
        if stopping.gone(timeout):
            _reap()
            return
        raise ExternalCommandFailed(
            f"PostgreSQL (pid {pid}) on {datadir}, stopping since a killed checkout, is still "
            f"exiting after {timeout:.0f}s; retry once it has exited"
        )


def _process_fd(pid: int) -> int | None:
    """A descriptor of process `pid` (None where the kernel has none to give: then the PID
    is polled; a process already gone gives None too, and the caller's check says so)."""
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


def _wait_gone(pidfd: int | None, pid: int, datadir: Path, timeout: float) -> bool:
    """Whether the postmaster `pid` exited within `timeout` seconds: a process descriptor
    becomes readable when its process exits (a zombie is gone for our purposes, as in
    `_is_our_postmaster`)."""
    deadline = time.monotonic() + timeout
    if pidfd is not None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if poller.poll(max(0, int(left * 1000) + 1)):
                return True
            if left <= 0:
                return False
    while _is_our_postmaster(pid, datadir):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(STOP_POLL_SECONDS, left))
    return True
