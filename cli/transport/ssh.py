"""`ssh://[USER@]HOST[:PORT]/PATH`: objects are files on a host reached with the system
OpenSSH client.

Why the system `ssh` running POSIX commands (`cat`, `tail -c`, `wc -c`, `ln`, `mv`, `rm`) on
the far side: it works against any host with sshd (a NAS, a backup box) with nothing of
pg-neon installed there, and it authenticates exactly as the user's `ssh` does (keys, agent,
~/.ssh/config, known_hosts, jump hosts), which a library such as asyncssh would each have to
re-implement. `BatchMode=yes` makes every question (a password, an unknown host key) a
failure instead of a prompt, so nothing hangs a script; host keys are checked as ssh checks
them (StrictHostKeyChecking is left to the user's config, whose default refuses unknown keys
in batch mode). `NEON_SSH_COMMAND` replaces the `ssh` program and its first options, as
GIT_SSH_COMMAND does for git (`NEON_SSH_COMMAND="ssh -i key -F config"`).

Each operation is one `sh -c SCRIPT sh ARG...` on the far side: the scripts are constants and
every path is one quoted argument, so no path is ever parsed as shell. A write streams into
a hidden temporary file (`.NAME.XXXX.partial`) with `cat`; a second command checks its size
against the bytes sent and only then links (or, with `overwrite`, renames) it to its name.
A killed push leaves the temporary file, never a file at the name: the remote `cat` sees
end-of-file, but nothing renames what it wrote (a small resumable write, sent at its commit
with its size first, is not published when cut short either). A resumable write
(cli/transport/resume.py) keeps `.NAME.partial`: the far side sends the SHA-256 of each of
its blocks (`sha256sum`, else `shasum -a 256` or `openssl dgst`; with none of them it starts
afresh), `dd` cuts it where the regenerated stream first differs, and `cat >>` appends the
rest.

One connection per host serves a whole command: every `ssh` of this process runs as a client
of a shared OpenSSH ControlMaster (ControlMaster=auto), so the steps of a push or pull (stat,
digests, write, commit, index) pay for one key exchange and login, not one each (each cost a
new TCP connection and handshake).

A `neon` command also leaves its connection open for the next one, as Ansible does by default
(ControlPersist): the master exits NEON_SSH_PERSIST seconds (DEFAULT_PERSIST, 60) after its
last session, so a push after a push, or a pull after it, within that time logs in no more
(the handshake was a third of an incremental push over ssh). Its control socket is in the
home's `ssh/` directory (0700, checked to be this user's and private before each use; a short
private `neon-sshc-*` directory of the temp dir when the home's path is too long for a socket),
named by a hash of the ssh program line (NEON_SSH_COMMAND: another key or config never shares
a connection) and the destination; OpenSSH's master serves only clients of its own user. It
holds no secret of ours; what it allows for those seconds is what the user's keys allow their
own processes anyway, without asking again (an agent's confirmation or a security key's touch
included: NEON_SSH_PERSIST=0 then). `stop_kept_connections` asks a home's masters to exit.
With NEON_SSH_PERSIST=0, or outside a command (the library in-process), the socket is in a
private 0700 directory of the process, the master is asked to exit when the process ends
(`close_connections`, run at exit) and the directory is removed; if the process is killed,
the master still exits MUX_PERSIST seconds after its last session, and the directory (its
name carries the PID) is removed by the next command that opens one, once that PID is gone.
Options in NEON_SSH_COMMAND come first and win (`-o ControlMaster=no`: no shared connection).

Round trips: each remote command costs a session on the shared connection (a channel, a
login shell: ~10 ms on loopback, 0.1-0.25 s on a loaded box or where the far shell's startup
files are heavy), so a push asks one PROBE where it needed four: `stat` of
its target also lists the directory with the head of each `.neon` file (its manifest) and the
digests of the target's partial file, kept for the `list`, the head reads and the
`open_resumable` that follow (each used once; anything unparsable: none kept, the commands run
as before). The append is started ahead (it waits for a first line on stdin: where to cut),
so its session opens while the snapshot is being made; a push's stat (`stat_for_write`) is
that very session (PROBE_THEN_APPEND: the PROBE, then the append waiting). A small file
(SMALL_WRITE: a delta) is held and sent whole at the commit, its size on that line, and the
append session checks and publishes it too: one session in all. A bigger one streams, and
its commit is a session started once the held bytes would pass SMALL_WRITE, and it waits for
the size written.

Paths: `ssh://host/abs/dir/x.neon` is absolute, `ssh://host/~/dir/x.neon` is relative to the
login directory (as in git), `ssh://host` is the login directory; a URL ending in '/' names a
directory.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import os
import re
import secrets
import shlex
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cli.home import NeonHome, current_home, private_dir
from cli.storages import mask_url
from cli.transport.base import (
    CHUNK,
    HeadReader,
    Location,
    ObjectInfo,
    ObjectReader,
    ObjectWriter,
    Store,
    StreamCut,
    already_exists,
    check_object_name,
)
from cli.transport.resume import (
    NO_PARTIAL,
    RESUME_BLOCK,
    Partial,
    PartialAppender,
    ResumingWriter,
    partial_name,
)
from pageserver.pid_file import pid_alive
from proto.aio import within
from proto.errors import AuthFailed, Conflict, InvalidArgument, NeonError, NotFound, Unavailable

URL_FORM = "ssh://[USER@]HOST[:PORT]/PATH"
SSH_COMMAND_ENV = "NEON_SSH_COMMAND"
SSH_OPTIONS = (
    "-T",  # no terminal: a binary stream
    "-a",  # no agent forwarding
    "-x",  # no X11 forwarding
    "-o",
    "ConnectTimeout=30",
    "-o",
    "ServerAliveInterval=15",  # a dead link fails in about a minute instead of hanging
    "-o",
    "ServerAliveCountMax=4",
)
MUX_DIR_PREFIX = "neon-ssh-"  # then the PID and mkdtemp's random part
MUX_PERSIST = 10  # seconds an idle shared connection outlives its last session
MUX_SOCKET_MAX = 100  # a unix socket path is at most 107 bytes; %C expands to 40
_UNSAFE_IN_OPTION = re.compile(r'[\s"\'%\\]')
"""What `-o ControlPath=...` cannot carry as it is: ssh splits option values at blanks and
quotes and expands `%` tokens."""
_VERBOSE = re.compile(r"(?:^|\s)-[46AaCfGgKkMNnqsTtXxYy]*v|LogLevel", re.IGNORECASE)
"""An ssh program line that asks for debug output (-v, -vvv, -Cv, -o LogLevel=...)."""
PERSIST_ENV = "NEON_SSH_PERSIST"
DEFAULT_PERSIST = 60  # seconds a command's connection stays open for the next command
KEPT_DIR_PREFIX = "neon-sshc-"  # then a hash of the home: its kept sockets when its path is long
KEPT_NAME_LEN = 24  # hex digits of a kept connection's socket name
KEPT_SOCKET_MAX = 90  # ssh binds a new master's socket as PATH.<16 random> first: 107 at most
CLEANUP_TIMEOUT = 30  # seconds for removing an aborted write's temporary file
LANDING_TIMEOUT = 5  # seconds for an aborted resumable write's bytes to reach its file
WRITE_BUFFER = 4 * 1024 * 1024
"""Bytes a write may queue for `ssh` before it waits: with asyncio's default (64 KiB), each
chunk of the snapshot waited for ssh to take it, and the export behind it stalled meanwhile."""
GATHER_SECONDS = 0.02
"""How long a read waits for a whole CHUNK before it hands on what came (`_gathered`)."""
SMALL_WRITE = 4 * 1024 * 1024
"""Bytes of a resumable write held and sent at its commit, with its size (SshAppender)."""

# Exit statuses of the scripts (ssh itself exits 255).
NOT_FOUND, EXISTS, SHORT, NO_DIR, IS_DIR, NO_CUT = 3, 4, 5, 6, 7, 8

# $1 directory, $2 temporary file, $3 final name, $4 1 to overwrite.
WRITE = (
    '[ -d "$1" ] || exit 6; [ -d "$3" ] && exit 7; '
    '[ "$4" = 1 ] || { [ ! -e "$3" ] && [ ! -L "$3" ]; } || exit 4; '
    'set -C; exec cat > "$2"'
)
# $1 temporary file, $2 final name, $3 expected size, $4 1 to overwrite. `ln` never
# replaces; where the filesystem has no hard links, a check then `mv`.
_PUBLISH = (
    'sync -- "$1" 2>/dev/null; '
    '[ "$4" = 1 ] && exec mv -f -- "$1" "$2"; '
    'ln -- "$1" "$2" 2>/dev/null && exec rm -f -- "$1"; '
    'if [ -e "$2" ] || [ -L "$2" ]; then rm -f -- "$1"; exit 4; fi; '
    'exec mv -f -- "$1" "$2"'
)
COMMIT = 'n=$(wc -c < "$1") || exit 3; [ $n -eq "$3" ] || { rm -f -- "$1"; exit 5; }; ' + _PUBLISH
_CHECK_TARGET = (
    '[ -d "$1" ] || exit 6; [ -d "$3" ] && exit 7; '
    '[ "$4" = 1 ] || { [ ! -e "$3" ] && [ ! -L "$3" ]; } || exit 4; '
)
# $1 directory, $2 partial file, $3 final name, $4 1 to overwrite, $5 block size: the
# partial file's size on a line (0: none, or no SHA-256 tool), then one digest per block.
DIGESTS = _CHECK_TARGET + (
    '[ -f "$2" ] && [ ! -L "$2" ] || { echo 0; exit 0; }; '
    "if command -v sha256sum >/dev/null 2>&1; then h=sha256sum; "
    'elif command -v shasum >/dev/null 2>&1; then h="shasum -a 256"; '
    'elif command -v openssl >/dev/null 2>&1; then h="openssl dgst -sha256 -r"; '
    "else echo 0; exit 0; fi; "
    'n=$(wc -c < "$2") || exit 3; echo $n; i=0; '
    "while [ $((i * $5)) -lt $n ]; do "
    'dd if="$2" bs="$5" skip=$i count=1 2>/dev/null | $h || exit 9; i=$((i + 1)); done'
)
# As WRITE, into the partial file cut to its first $5 bytes (POSIX dd truncates its output
# at `seek` when it copies nothing; to none, the shell's own `>`: one program less to start
# on the far side of every fresh push, ~1 ms).
_CUT = (
    '[ -L "$2" ] && exit 8; if [ "$5" = 0 ]; then : > "$2" || exit 8; '
    'else dd if=/dev/null of="$2" bs=1 seek="$5" 2>/dev/null || exit 8; fi; '
)
APPEND = _CHECK_TARGET + _CUT + 'exec cat >> "$2"'
# Started ahead: they wait for their argument on the first line of stdin (`read` takes no byte
# past the newline from a pipe, so `cat` gets the rest); stdin closed before it: nothing done.
# The append's line is `KEEP -` (append only; COMMIT_WAITING commits), or `KEEP SIZE` for a
# small write sent whole at its commit: the file must then hold SIZE bytes once stdin ends,
# and is published here, in the same session (a cut stream leaves it, short, to resume).
APPEND_WAITING = (
    'read keep size || exit 0; case $keep in ""|*[!0-9]*) exit 8;; esac; '
    'case $size in -) ;; ""|*[!0-9]*) exit 5;; esac; set -- "$@" "$keep"; '
    + _CHECK_TARGET
    + _CUT
    + '[ "$size" = - ] && exec cat >> "$2"; cat >> "$2" || exit 9; '
    'n=$(wc -c < "$2") || exit 3; [ $n -eq "$size" ] || exit 5; '
    'set -- "$2" "$3" "$size" "$4"; ' + _PUBLISH
)
COMMIT_WAITING = (
    'read size || exit 0; case $size in ""|*[!0-9]*) exit 5;; esac; '
    'set -- "$1" "$2" "$size" "$3"; ' + COMMIT
)
REMOVE_EMPTY = '[ -s "$1" ] || rm -f -- "$1"'
# $1 file, $2 first byte (1-based): its size on a line, then its bytes from there.
READ = '[ -f "$1" ] || exit 3; wc -c < "$1" || exit 3; exec tail -c +"$2" -- "$1"'
STAT = '[ -f "$1" ] || exit 3; exec wc -c < "$1"'
# $1 directory: "SIZE NAME\0" per visible regular file.
LIST = (
    'cd -- "$1" 2>/dev/null || exit 6; for f in *; do if [ -f "$f" ]; then '
    'n=$(wc -c < "$f") && printf \'%s %s\\000\' $n "$f"; fi; done; exit 0'
)
DELETE = '[ -e "$1" ] || [ -L "$1" ] || exit 3; exec rm -f -- "$1"'
# $1 directory, $2 object, $3 its partial file, $4 block size, $5 head bytes: records ending
# in NUL. `S SIZE` (or `S -`: no such file) and `T dir|exists|none` for the object; `P SIZE`
# for the partial file, then its digests (DIGESTS' lines) and a NUL; then `L SIZE NAME` per
# visible regular file, each `.neon` one followed by `H COUNT NAME` and its first COUNT bytes;
# `D -` instead when the directory is missing.
PROBE = (
    'if [ -f "$2" ]; then printf "S %s\\000" $(wc -c < "$2"); else printf "S -\\000"; fi; '
    'if [ -d "$2" ]; then t=dir; elif [ -e "$2" ] || [ -L "$2" ]; then t=exists; else t=none; fi; '
    'printf "T %s\\000" $t; h=; '
    "if command -v sha256sum >/dev/null 2>&1; then h=sha256sum; "
    'elif command -v shasum >/dev/null 2>&1; then h="shasum -a 256"; '
    'elif command -v openssl >/dev/null 2>&1; then h="openssl dgst -sha256 -r"; fi; '
    'n=0; if [ -n "$h" ] && [ -f "$3" ] && [ ! -L "$3" ]; then n=$(wc -c < "$3") || n=0; fi; '
    'printf "P %s\\000" $n; i=0; '
    'while [ $((i * $4)) -lt $n ]; do dd if="$3" bs="$4" skip=$i count=1 2>/dev/null | $h; '
    "i=$((i + 1)); done; printf '\\000'; "
    "cd -- \"$1\" 2>/dev/null || { printf 'D -\\000'; exit 0; }; "
    'for f in *; do if [ -f "$f" ]; then n=$(wc -c < "$f") || continue; '
    "printf 'L %s %s\\000' $n \"$f\"; case $f in *.neon) c=$n; [ $c -gt $5 ] && c=$5; "
    'printf \'H %s %s\\000\' $c "$f"; dd if="$f" bs=$c count=1 2>/dev/null;; esac; fi; '
    "done; exit 0"
)
HEAD_BYTES = 4096  # of each `.neon` file in a PROBE: its manifest (a few hundred bytes)
# A push's one session: PROBE ($1-$5) in a subshell, then $6 between NULs (the client reads
# up to it), then APPEND_WAITING ($7 directory, $8 partial file, $9 object, ${10} 0: no
# overwrite), which waits for its first line.
PROBE_THEN_APPEND = "(" + PROBE + "); printf '\\000%s\\000' \"$6\"; shift 6; " + APPEND_WAITING


def parse_location(url: str) -> Location:
    shown = mask_url(url)
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise InvalidArgument(f"invalid ssh URL {shown}: bad port; expected {URL_FORM}") from None
    host = parts.hostname
    if not host or host.startswith("-"):
        raise InvalidArgument(f"invalid ssh URL {shown}: no host; expected {URL_FORM}")
    if parts.password is not None:
        raise InvalidArgument(
            f"invalid ssh URL {shown}: ssh:// takes no password (ssh authenticates with keys "
            "or its agent); remove it from the URL"
        )
    if parts.query or parts.fragment:
        raise InvalidArgument(f"invalid ssh URL {shown}: it has a query or fragment")
    user = unquote(parts.username) if parts.username else None
    if user is not None and (not user or user.startswith("-")):
        raise InvalidArgument(f"invalid ssh URL {shown}: bad user name")
    path = unquote(parts.path)
    if "\0" in path or "\n" in path:
        raise InvalidArgument(f"invalid ssh URL {shown}: bad path")
    if path in ("", "/~", "/~/"):
        directory, name = ".", None
    else:
        if path.startswith("/~/"):
            path = path[3:]  # relative to the login directory
        elif path.startswith("/~"):
            raise InvalidArgument(
                f"invalid ssh URL {shown}: /~USER paths are not supported; use /~/PATH (the "
                "login directory) or an absolute path"
            )
        if path.endswith("/"):
            directory, name = path.rstrip("/") or "/", None
        else:
            head, _, name = path.rpartition("/")
            directory = head or ("/" if path.startswith("/") else ".")
    store = SshStore(host, port, user, directory)
    if name is not None:
        check_object_name(name, shown)
    return Location(store, name)


def _ssh_program() -> list[str]:
    custom = os.environ.get(SSH_COMMAND_ENV)
    words = shlex.split(custom) if custom else ["ssh"]
    if not words:
        raise InvalidArgument(f"{SSH_COMMAND_ENV} is empty; unset it or name an ssh program")
    # The first value of an option wins in ssh: batch mode before anything the user adds.
    return [words[0], "-o", "BatchMode=yes", *words[1:], *SSH_OPTIONS]


_MUX_DIRS: dict[tuple[str, ...], str] = {}
"""The control-socket directory of each ssh program line (NEON_SSH_COMMAND) this process
used: a different program (another config or key) never shares another's connection."""


def persist_seconds() -> int:
    """NEON_SSH_PERSIST: how long a command's connection waits for the next command."""
    raw = os.environ.get(PERSIST_ENV, "").strip()
    if not raw:
        return DEFAULT_PERSIST
    if not raw.isdigit():
        raise InvalidArgument(
            f"{PERSIST_ENV}={raw!r}: expected seconds (0: close each command's ssh connection "
            "when it ends)"
        )
    return int(raw)


def kept_dir(home: NeonHome) -> Path:
    """Where `home`'s kept connections have their control sockets (module docstring): the
    temp dir's when the home's path is too long for a socket, or holds what ssh's option
    parser splits at or expands (a space, a quote, `%` tokens)."""
    path = str(home.ssh_dir)
    if len(path) + 1 + KEPT_NAME_LEN <= KEPT_SOCKET_MAX and not _UNSAFE_IN_OPTION.search(path):
        return home.ssh_dir
    digest = hashlib.sha256(str(home.root).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"{KEPT_DIR_PREFIX}{digest}"


def _kept(program: list[str], destination: str) -> list[str] | None:
    """`program` as a client of the connection to `destination` kept between commands of
    this home; None when none is kept (no home, NEON_SSH_PERSIST=0, a directory not private,
    a verbose ssh: a master started with -v keeps the command's stderr open, so the command
    reading it to its end waited ControlPersist's seconds)."""
    home = current_home()
    seconds = persist_seconds()
    if home is None or seconds == 0 or _VERBOSE.search(" ".join(program)):
        return None
    directory = kept_dir(home)
    if not private_dir(directory):
        return None
    name = hashlib.sha256("\0".join([*program, destination]).encode()).hexdigest()
    return [
        *program, "-o", "ControlMaster=auto", "-o",
        f"ControlPath={directory}/{name[:KEPT_NAME_LEN]}", "-o", f"ControlPersist={seconds}",
    ]  # fmt: skip


def stop_kept_connections(home: NeonHome) -> list[str]:
    """Ask every connection `home` keeps open to end now (`ssh -O exit`); their sockets."""
    directory = kept_dir(home)
    stopped: list[str] = []
    if not directory.is_dir() or not private_dir(directory):
        return stopped  # nothing of ours is kept there (another user's directory: not probed)
    with contextlib.suppress(OSError):
        for sock in sorted(directory.iterdir()):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    ["ssh", "-F", "/dev/null", "-o", f"ControlPath={sock}", "-O", "exit",
                     "--", "neon-mux"],
                    stdin=subprocess.DEVNULL, capture_output=True, timeout=CLEANUP_TIMEOUT,
                )  # fmt: skip
                stopped.append(str(sock))
    return stopped


def _multiplexed(program: list[str], destination: str) -> list[str]:
    """`program` as a client of the connection to `destination` kept by this home, else of
    this process's shared connection to the host (module docstring); as it is when no short
    enough private directory can be had."""
    kept = _kept(program, destination)
    if kept is not None:
        return kept
    key = tuple(program)
    directory = _MUX_DIRS.get(key)
    if directory is None:
        if not _MUX_DIRS:
            sweep_dead_mux_dirs()
        # mode 0700: only we reach it; the PID in the name tells a later command it is litter
        directory = tempfile.mkdtemp(prefix=f"{MUX_DIR_PREFIX}{os.getpid()}-")
        if len(directory) + 41 > MUX_SOCKET_MAX:
            os.rmdir(directory)
            return program
        if not _MUX_DIRS:
            atexit.register(close_connections)
        _MUX_DIRS[key] = directory
    return [
        *program, "-o", "ControlMaster=auto", "-o", f"ControlPath={directory}/%C",
        "-o", f"ControlPersist={MUX_PERSIST}",
    ]  # fmt: skip


def sweep_dead_mux_dirs(parent: str | None = None) -> list[str]:
    """Remove the socket directories that killed commands of this user left in `parent`
    (the temp directory): a `neon-ssh-PID-*` directory of ours whose PID no longer runs.
    Their masters have exited (MUX_PERSIST) or will, their sockets unused. Returns them."""
    parent = parent or tempfile.gettempdir()
    removed = []
    with contextlib.suppress(OSError), os.scandir(parent) as entries:
        for entry in entries:
            pid_text = entry.name.removeprefix(MUX_DIR_PREFIX).partition("-")[0]
            if not entry.name.startswith(MUX_DIR_PREFIX) or not pid_text.isdigit():
                continue
            with contextlib.suppress(OSError):
                info = entry.stat(follow_symlinks=False)
                if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
                    continue
                if pid_alive(int(pid_text)):
                    continue
                shutil.rmtree(entry.path)
                removed.append(entry.path)
    return removed


def close_connections() -> None:
    """Ask every shared connection's master to exit and remove the socket directories
    (at exit; blocking, a few milliseconds per host)."""
    while _MUX_DIRS:
        program, directory = _MUX_DIRS.popitem()
        for sock in Path(directory).iterdir():
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(
                    [*program, "-o", f"ControlPath={sock}", "-O", "exit", "--", "neon-mux"],
                    stdin=subprocess.DEVNULL, capture_output=True, timeout=CLEANUP_TIMEOUT,
                )  # fmt: skip
        shutil.rmtree(directory, ignore_errors=True)


class SshStore(Store):
    def __init__(self, host: str, port: int | None, user: str | None, directory: str) -> None:
        self.host, self.port, self.user, self.directory = host, port, user, directory
        netloc = (f"{user}@" if user else "") + (f"[{host}]" if ":" in host else host)
        self._netloc = netloc + (f":{port}" if port else "")
        self.url = self.path_url(directory).rstrip("/") + "/"
        self._probe: tuple[str, float, _Probe] | None = None
        self._appending: tuple[str, asyncio.subprocess.Process] | None = None
        """The session of `stat_for_write(name)`, waiting to append to `name`."""

    def path_url(self, path: str) -> str:
        """The URL of a path on the host, for messages."""
        if path == ".":
            return f"ssh://{self._netloc}/~/"
        if path.startswith("/"):
            return f"ssh://{self._netloc}{path}"
        return f"ssh://{self._netloc}/~/{path}"

    def object_url(self, name: str) -> str:
        return self.url + name

    def _path(self, name: str) -> str:
        return self._join(check_object_name(name, self.url))

    def _join(self, name: str) -> str:
        return f"{self.directory.rstrip('/')}/{name}" if self.directory != "." else name

    def _argv(self, script: str, *args: str) -> list[str]:
        remote = " ".join(["sh", "-c", shlex.quote(script), "sh", *map(shlex.quote, args)])
        port = ["-p", str(self.port)] if self.port else []
        user = ["-l", self.user] if self.user else []
        return [*_multiplexed(_ssh_program(), self._netloc), *port, *user, "--", self.host, remote]

    async def _spawn(
        self, script: str, *args: str, stdin: bool = False
    ) -> asyncio.subprocess.Process:
        try:
            return await asyncio.create_subprocess_exec(
                *self._argv(script, *args),
                stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                limit=CHUNK,
            )
        except FileNotFoundError:
            raise Unavailable(
                "the OpenSSH client `ssh` is not installed (or NEON_SSH_COMMAND names a missing "
                "program); install openssh-client"
            ) from None

    async def _run(self, script: str, *args: str, where: str) -> bytes:
        """Run a script; its stdout, or the error its exit status means (naming `where`)."""
        status, out, err = await _finished(await self._spawn(script, *args))
        if status != 0:
            raise self.error(status, err, where)
        return out

    def error(self, status: int, stderr: bytes, path: str) -> NeonError:
        """One line for a failed remote command about `path`: ssh's own failures (255) by
        what ssh said, the scripts' by their status."""
        where = self.path_url(path)
        lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit status {status}"
        if status == 255:
            said = " ".join(lines)
            if "Host key verification failed" in said or "REMOTE HOST IDENTIFICATION" in said:
                return AuthFailed(
                    f"{where}: host key verification failed: the key of {self.host} is not in "
                    "known_hosts (or has changed); check it and add it (ssh-keyscan, or one "
                    "interactive `ssh` to the host), then run the command again"
                )
            if "Permission denied" in said:
                return AuthFailed(
                    f"{where}: the server refused the login ({last}); add your public key to "
                    "its authorized_keys or load the key into ssh-agent"
                )
            return Unavailable(f"cannot reach {where} over ssh: {last}")
        if status == NOT_FOUND:
            return NotFound(f"{where}: no such file")
        if status == NO_DIR:
            return NotFound(f"{where}: no such directory on {self.host}; create it first")
        if status == EXISTS:
            return already_exists(where)
        if status == SHORT:
            return Unavailable(
                f"{where}: the far side holds fewer bytes than were sent (is its disk full?)"
            )
        if status == NO_CUT:
            return Unavailable(f"{where}: `dd` on {self.host} cannot cut its partial file")
        if status == IS_DIR:
            return Conflict(f"{where} is a directory; end the URL with '/' to name a file in it")
        return Unavailable(f"{where}: the remote command failed: {last}")

    async def stat(self, name: str) -> ObjectInfo | None:
        """The object's size, by one PROBE that also keeps what a push asks next."""
        path = self._path(name)
        tmp = self._join(partial_name(name))
        out = await self._run(
            PROBE, self.directory, path, tmp, str(RESUME_BLOCK), str(HEAD_BYTES), where=path
        )
        return await self._probed(name, out)

    async def stat_for_write(self, name: str) -> ObjectInfo | None:
        """`stat` by PROBE_THEN_APPEND: the PROBE's session goes on waiting as the append of
        `open_resumable(name)` (no overwrite), so a push opens one session, not two (each
        session is a channel, a login shell and the script on the far side; 0.1-0.45 s on a
        loaded box). Not taken by that open, `close` ends it, doing nothing."""
        await self.close()
        path = self._path(name)
        tmp = self._join(partial_name(name))
        marker = secrets.token_hex(16)
        proc = await self._spawn(
            PROBE_THEN_APPEND, self.directory, path, tmp, str(RESUME_BLOCK), str(HEAD_BYTES),
            marker, self.directory, tmp, path, "0", stdin=True,
        )  # fmt: skip
        try:
            out = await _read_until(proc, f"\0{marker}\0".encode())
        except BaseException:
            await _dismiss(proc, kill=True)
            raise
        if out is None:  # the session ended before the PROBE did
            status, _out, err = await _finished(proc)
            raise self.error(status or 255, err, path)
        try:
            found = await self._probed(name, out)
        except BaseException:  # neither kept nor left waiting: the script ends doing nothing
            await _dismiss(proc)
            raise
        if self._probe is None:
            await _dismiss(proc)  # an answer not as written: the plain commands follow
        else:
            self._appending = (name, proc)
        return found

    async def close(self) -> None:
        kept, self._appending = self._appending, None
        if kept is not None:
            await _dismiss(kept[1])

    async def _probed(self, name: str, out: bytes) -> ObjectInfo | None:
        """The object's size from a PROBE's answer `out`, kept for the calls that follow."""
        path = self._path(name)
        probe = _parse_probe(out)
        if probe is None:  # an answer we cannot read: the plain command
            self._probe = None
            try:
                raw = await self._run(STAT, path, where=path)
            except NotFound:
                return None
            return ObjectInfo(name, _size(raw, self.object_url(name)))
        self._probe = (name, time.monotonic(), probe)
        return None if probe.size is None else ObjectInfo(name, probe.size)

    def _kept(self, name: str | None = None) -> _Probe | None:
        """The last PROBE's answer while fresh (of `name`'s stat, when given)."""
        if self._probe is None:
            return None
        of, when, probe = self._probe
        if time.monotonic() - when > PROBE_FRESH or (name is not None and of != name):
            self._probe = None
            return None
        return probe

    async def list(self) -> list[ObjectInfo]:
        probe = self._kept()
        if probe is not None and probe.listing is not None:
            listing, probe.listing = probe.listing, None
            if listing is _NO_DIR:
                raise self.error(NO_DIR, b"", self.directory)
            return listing
        out = await self._run(LIST, self.directory, where=self.directory)
        found = []
        for record in out.split(b"\0"):
            if record:
                size, _, name = record.decode(errors="surrogateescape").partition(" ")
                if not name.startswith("."):
                    found.append(ObjectInfo(name, _size(size.encode(), self.url)))
        return sorted(found, key=lambda o: o.name)

    async def open_write(self, name: str, *, overwrite: bool) -> ObjectWriter:
        final = self._path(name)
        tmp = self._join(f".{name}.{secrets.token_hex(4)}.partial")
        flag = "1" if overwrite else "0"
        self._probe = None
        proc = await self._spawn(WRITE, self.directory, tmp, final, flag, stdin=True)
        return SshWriter(self, proc, tmp, final, flag)

    async def open_resumable(self, name: str, *, overwrite: bool) -> ObjectWriter:
        final = self._path(name)
        tmp = self._join(partial_name(name))
        flag = "1" if overwrite else "0"
        probe = self._kept(name)
        self._probe = None
        if probe is not None:  # what DIGESTS would say, from the PROBE of this name
            if probe.listing is _NO_DIR:
                raise self.error(NO_DIR, b"", final)
            if probe.target == "dir":
                raise self.error(IS_DIR, b"", final)
            if probe.target == "exists" and not overwrite:
                raise self.error(EXISTS, b"", final)
            partial = probe.partial
        else:
            out = await self._run(
                DIGESTS, self.directory, tmp, final, flag, str(RESUME_BLOCK), where=final
            )
            partial = _partial(out)
        kept, self._appending = self._appending, None
        if kept is not None and (kept[0] != name or overwrite):
            await _dismiss(kept[1])  # waiting for another name, or to refuse an existing one
            kept = None
        if kept is not None:
            appending = kept[1]
        else:
            appending = await self._spawn(
                APPEND_WAITING, self.directory, tmp, final, flag, stdin=True
            )
        return ResumingWriter(partial, SshAppender(self, tmp, final, flag, appending))

    async def open_read(self, name: str, offset: int = 0) -> ObjectReader:
        path = self._path(name)
        probe = self._kept()
        head = None if probe is None or offset != 0 else probe.heads.pop(name, None)
        if head is not None:  # the PROBE read it: the rest only if asked for
            return HeadReader(self, name, *head)
        proc = await self._spawn(READ, path, str(offset + 1))
        reader = SshReader(self, proc, path, offset)
        await reader.start()
        return reader

    async def delete(self, name: str) -> None:
        path = self._path(name)
        self._probe = None
        await self._run(DELETE, path, where=path)


PROBE_FRESH = 10.0
"""Seconds a PROBE's answer serves the calls after it (a push makes them at once)."""


@dataclass(slots=True)
class _Probe:
    """A PROBE's answer: the object's size (None: none), what is at its name, its partial
    file; the listing (_NO_DIR: no directory; None once used) and `.neon` heads (size, head)."""

    size: int | None
    target: str
    partial: Partial
    listing: list[ObjectInfo] | None
    heads: dict[str, tuple[int, bytes]]


_NO_DIR: list[ObjectInfo] = []


def _parse_probe(out: bytes) -> _Probe | None:
    """PROBE's records; None when they are not as the script writes them."""
    try:
        pos = 0

        def record() -> tuple[str, str]:
            nonlocal pos
            end = out.index(b"\0", pos)
            kind, _, rest = out[pos:end].decode(errors="surrogateescape").partition(" ")
            pos = end + 1
            return kind, rest

        kind, size = record()
        if kind != "S":
            return None
        kind, target = record()
        if kind != "T" or target not in ("dir", "exists", "none"):
            return None
        kind, partial_size = record()
        end = out.index(b"\0", pos)
        if kind != "P":
            return None
        lines = out[pos:end].decode(errors="replace").split()
        partial = Partial(int(partial_size), tuple(ln for ln in lines if len(ln) == 64))
        pos = end + 1
        listing: list[ObjectInfo] = []
        heads: dict[str, tuple[int, bytes]] = {}
        while pos < len(out):
            kind, rest = record()
            if kind == "D":
                listing = _NO_DIR
                continue
            count, _, name = rest.partition(" ")
            if listing is _NO_DIR:
                return None
            if kind == "L":
                if not name.startswith("."):
                    listing.append(ObjectInfo(name, int(count)))
            elif kind == "H":
                if pos + int(count) > len(out):
                    return None
                heads[name] = (listing[-1].size, out[pos : pos + int(count)])
                pos += int(count)
            else:
                return None
        listing.sort(key=lambda o: o.name)
        return _Probe(None if size == "-" else int(size), target, partial, listing, heads)
    except (ValueError, IndexError):
        return None


def _size(raw: bytes, where: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise Unavailable(
            f"{where}: unexpected answer from the remote `wc -c`: {raw[:80]!r}"
        ) from None


def _partial(out: bytes) -> Partial:
    """The DIGESTS script's answer; anything unexpected: no partial file to resume."""
    lines = out.decode(errors="replace").split()
    try:
        size = int(lines[0])
        return Partial(size, tuple(line for line in lines[1:] if len(line) == 64))
    except (IndexError, ValueError):
        return NO_PARTIAL


async def _finished(
    proc: asyncio.subprocess.Process, data: bytes | None = None
) -> tuple[int, bytes, bytes]:
    """Send `data` to a remote command and wait for its end: its status, stdout and stderr.
    Cancelled (a push whose pageserver failed, SIGINT), it is killed, not left running."""
    try:
        out, err = await proc.communicate(data)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out, err


async def _read_until(proc: asyncio.subprocess.Process, marker: bytes) -> bytes | None:
    """What `proc` writes to stdout before `marker` (which it writes last, then waits);
    None when stdout ends first."""
    assert proc.stdout is not None
    out = bytearray()
    while not out.endswith(marker):
        chunk = await proc.stdout.read(CHUNK)
        if not chunk:
            return None
        out += chunk
    return bytes(out[: -len(marker)])


async def _gathered(stdout: asyncio.StreamReader) -> bytes:
    """The stream's next CHUNK when it comes within GATHER_SECONDS, else what came by then
    (at least a byte; b"" at its end). A plain `read` hands on what one pipe read got, the
    ssh client's 32-64 KiB: ~1000 chunks for bench.exchange's 47 MiB, each through the
    pull's spool and its growing file on threads (~0.35 s of the CLI's CPU, taken from the
    import it runs beside on two cores)."""
    try:
        return await within(stdout.readexactly(CHUNK), GATHER_SECONDS)
    except asyncio.IncompleteReadError as end:
        return end.partial
    except TimeoutError:  # a slow link: what came, so progress and the import go on
        return await stdout.read(CHUNK)


async def _dismiss(proc: asyncio.subprocess.Process | None, *, kill: bool = False) -> None:
    """Let a session started ahead (APPEND_WAITING, COMMIT_WAITING) go unused: its stdin
    closed before the first line, its script ends doing nothing (`kill`: at once)."""
    if proc is None or proc.returncode is not None:
        return
    if kill:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        await within(proc.communicate(), LANDING_TIMEOUT)
    except (TimeoutError, OSError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


class SshWriter(ObjectWriter):
    """`cat` on the far side writing `tmp`, published by COMMIT (run by `committer`, started
    ahead, when given); `base` bytes were there before (a resumed write), and `resumable` keeps
    `tmp` when the write is aborted."""

    def __init__(
        self, store: SshStore, proc: asyncio.subprocess.Process, tmp: str, final: str, flag: str,
        base: int = 0, resumable: bool = False,
        committer: asyncio.subprocess.Process | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self._store, self._proc, self._tmp, self._final, self._flag = store, proc, tmp, final, flag
        self._base, self._resumable, self._committer = base, resumable, committer
        assert proc.stderr is not None and proc.stdout is not None
        if proc.stdin is not None:  # `write` returns once its chunk is queued, not sent
            proc.stdin.transport.set_write_buffer_limits(high=WRITE_BUFFER)
        self._stderr = asyncio.ensure_future(proc.stderr.read())
        self._stdout = asyncio.ensure_future(proc.stdout.read())

    async def _failed(self) -> NeonError:
        """The error of a write command that ended early (the far side refused or broke)."""
        status = await self._proc.wait()
        return self._store.error(status or 255, await self._stderr, self._final)

    async def write(self, data: bytes) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        if self._proc.returncode is not None:
            raise await self._failed()
        try:
            stdin.write(data)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise await self._failed() from None
        self.bytes_written += len(data)

    async def commit(self) -> None:
        stdin = self._proc.stdin
        assert stdin is not None
        try:
            stdin.close()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await stdin.wait_closed()
            status = await self._proc.wait()
            if status != 0:
                raise self._store.error(status, await self._stderr, self._final)
            size = str(self._base + self.bytes_written)
            committer, self._committer = self._committer, None
            if committer is None or committer.returncode is not None:
                await _dismiss(committer)
                await self._store._run(
                    COMMIT, self._tmp, self._final, size, self._flag, where=self._final
                )
                return
            _out, err = await committer.communicate(f"{size}\n".encode())
            assert committer.returncode is not None
            if committer.returncode != 0:
                raise self._store.error(committer.returncode, err, self._final)
        except BaseException:
            await self.abort()
            raise

    async def abort(self) -> None:
        committer, self._committer = self._committer, None
        await _dismiss(committer)
        if self._resumable and self._proc.returncode is None and self._proc.stdin is not None:
            # What was sent is kept for the next run: let it land rather than cut the pipe.
            self._proc.stdin.close()
            with contextlib.suppress(Exception):
                await within(asyncio.shield(self._proc.wait()), LANDING_TIMEOUT)
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
        for task in (self._stderr, self._stdout):
            task.cancel()
        script = REMOVE_EMPTY if self._resumable else DELETE
        with contextlib.suppress(Exception):  # best effort: the file is hidden anyway
            await within(self._store._run(script, self._tmp, where=self._tmp), CLEANUP_TIMEOUT)


class SshAppender(PartialAppender):
    """The partial file on the far side, appended to by an SshWriter once cut: by `appending`
    (APPEND_WAITING, started ahead) when given.

    A small write (up to SMALL_WRITE bytes in all, a delta's usual size) is held here and sent
    at its commit, its size on the first line: the append session checks and publishes it
    itself, so the push opens no commit session and waits for one round trip less at its end.
    The cost: those bytes cross the link once the export ended, not while it ran, so a slow
    link loses the overlap with the export (for a delta, a fraction of a second). Past
    SMALL_WRITE the bytes stream, and a commit session is started, as before."""

    def __init__(
        self, store: SshStore, tmp: str, final: str, flag: str,
        appending: asyncio.subprocess.Process | None = None,
    ) -> None:  # fmt: skip
        self._store, self._tmp, self._final, self._flag = store, tmp, final, flag
        self._appending = appending
        self._writer: SshWriter | None = None
        self._keep = 0
        self._held: bytearray | None = None
        """The bytes of a write not sent yet (None once it streams)."""

    async def start(self, keep: int) -> None:
        self._keep, self._held = keep, bytearray()

    async def _appender(self, line: str) -> asyncio.subprocess.Process:
        """The append session started ahead, given its first line (a fresh one if it ended)."""
        proc, self._appending = self._appending, None
        if proc is None or proc.returncode is not None or proc.stdin is None:
            await _dismiss(proc)
            proc = await self._store._spawn(
                APPEND_WAITING, self._store.directory, self._tmp, self._final, self._flag,
                stdin=True,
            )  # fmt: skip
        assert proc.stdin is not None
        proc.stdin.write(line.encode())
        return proc

    async def _stream(self) -> SshWriter:
        """From now on, every write goes straight to the far side (a write past SMALL_WRITE)."""
        if self._writer is None:
            committer = await self._store._spawn(
                COMMIT_WAITING, self._tmp, self._final, self._flag, stdin=True
            )
            proc = await self._appender(f"{self._keep} -\n")
            self._writer = SshWriter(
                self._store, proc, self._tmp, self._final, self._flag, self._keep, True,
                committer,
            )  # fmt: skip
            held, self._held = self._held, None
            if held:
                await self._writer.write(bytes(held))
        return self._writer

    async def write(self, data: bytes) -> None:
        if self._held is not None and len(self._held) + len(data) <= SMALL_WRITE:
            self._held += data
            return
        await (await self._stream()).write(data)

    async def commit(self, size: int) -> None:
        writer, held = self._writer, self._held
        if held is not None:
            written = self._keep + len(held)
        else:
            assert writer is not None
            written = writer._base + writer.bytes_written
        if size != written:
            raise Conflict(f"{self._store.path_url(self._tmp)}: not the bytes written")
        if writer is not None:
            await writer.commit()
            return
        assert held is not None
        self._held = None
        # Cancelled midway, the stream is cut: the far side does not publish it.
        status, _out, err = await _finished(
            await self._appender(f"{self._keep} {size}\n"), bytes(held)
        )
        if status != 0:
            with contextlib.suppress(Exception):  # an empty partial file: not kept
                await within(
                    self._store._run(REMOVE_EMPTY, self._tmp, where=self._tmp), CLEANUP_TIMEOUT
                )
            raise self._store.error(status, err, self._final)

    async def abort(self) -> None:
        appending, self._appending = self._appending, None
        await _dismiss(appending)
        self._held = None  # never sent: nothing of it to keep
        if self._writer is not None:
            await self._writer.abort()


class SshReader(ObjectReader):
    def __init__(
        self, store: SshStore, proc: asyncio.subprocess.Process, path: str, offset: int
    ) -> None:
        self._store, self._proc, self._path, self._offset = store, proc, path, offset
        assert proc.stderr is not None
        self._stderr = asyncio.ensure_future(proc.stderr.read())

    async def _failed(self) -> NeonError:
        status = await self._proc.wait()
        return self._store.error(status, await self._stderr, self._path)

    async def start(self) -> None:
        """Read the size line: a missing file or a refused login fails here, at open."""
        stdout = self._proc.stdout
        assert stdout is not None
        line = await stdout.readline()
        if not line.endswith(b"\n"):  # the script refused, or ssh failed: it has ended
            raise await self._failed()
        self.size = _size(line, self._store.object_url(self._path))

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        stdout = self._proc.stdout
        assert stdout is not None and self.size is not None
        done = self._offset
        while chunk := await _gathered(stdout):
            done += len(chunk)
            yield chunk
        status = await self._proc.wait()
        # 255: ssh lost the connection; < 0: the client was killed (as a dropped link).
        if status == 255 or status < 0 or (status == 0 and done < self.size):
            raise StreamCut(
                f"{self._store.object_url(self._path)}: the ssh stream ended after {done} of "
                f"{self.size} bytes"
            )
        if status != 0:
            raise await self._failed()

    async def close(self) -> None:
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
        self._stderr.cancel()
