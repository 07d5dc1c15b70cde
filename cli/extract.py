"""Downloading data directories from the pageserver.

`download_basebackup` unpacks a basebackup into the target as it arrives (datadir_files/untar.py,
through a temporary directory renamed at the end), or, from the home's own daemon, has the
daemon write the files into that directory itself (`_written_by_daemon`: no stream, no
second unpacking process: pageserver/api/local_files.py); `remove_download_leftovers`
deletes what a killed download leaves behind. A downloaded directory has no
configuration, no replication slot, and the passwords of the node it came from:
`cli.nodes.finish_datadir` gives it this node's settings, passwords and slot in single-user
mode, before its first start, so the slot retains every WAL byte it writes.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cli.context import App
from cli.pageserver_control import local_api, local_config
from datadir_files.untar import extract_stream, staged_dir
from pageserver.api.local_files import (
    SILENCE_SECONDS,
    peer_uid,
    receive_frame,
    send_frame,
    socket_path,
)
from pageserver_api.client import PageserverClient
from pageserver_api.errors import ProtocolError, Unavailable, error_from_code
from pageserver_api.models import BasebackupRequest, BasebackupResponse

_RANDOM = "?" * 8  # what tempfile.mkstemp/mkdtemp insert between prefix and suffix
_STOP_WAIT = 30.0  # for the daemon to stop writing into a directory about to be removed


def remove_download_leftovers(target: Path) -> list[Path]:
    """Delete what a killed `download_basebackup(target)` leaves beside `target`: the
    extraction's temporary directory (`<name>.tmp-XXXXXXXX`, datadir_files.untar), and the temporary
    tar (`.<name>.XXXXXXXX.tar`) that versions before 2026-12 downloaded first. The caller
    owns `target` (no download into it runs)."""
    name = glob.escape(target.name)
    found = [
        *target.parent.glob(f".{name}.{_RANDOM}.tar"),
        *target.parent.glob(f"{name}.tmp-{_RANDOM}"),
    ]
    for path in found:
        if path.is_dir() and not path.is_symlink():
            _remove_tree(path)
        else:
            path.unlink(missing_ok=True)
    return found


_RACING = (errno.ENOTEMPTY, errno.ENOENT)
"""What a removal meets in a tree still being written: a file made after its directory was
listed, or one gone before it was reached."""


def _remove_tree(path: Path) -> None:
    """Remove a leftover tree, again while a writer adds to it: the daemon writes a download
    into its directory through a descriptor (pageserver/api/local_files.py), and for a command
    killed by SIGKILL it stops only at its next MiB once it sees its peer gone, so the next
    command's recovery could remove the tree under it and a file made meanwhile left the
    directory behind. Retried for at most _STOP_WAIT seconds while that is all that fails;
    any other failure leaves the rest as it is."""
    deadline = time.monotonic() + _STOP_WAIT
    failures: list[BaseException] = []
    while True:
        failures.clear()
        shutil.rmtree(path, onerror=lambda _f, _p, info: failures.append(info[1]))
        racing = all(isinstance(e, OSError) and e.errno in _RACING for e in failures)
        if not os.path.lexists(path) or not racing or time.monotonic() > deadline:
            return
        time.sleep(0.01)


def download_basebackup(
    app: App, target: Path, *, node_id: str | None = None, snapshot: str | None = None
) -> BasebackupResponse:
    """Stream a basebackup of a snapshot, or of a node's branch point, from the local
    pageserver and unpack it into `target`."""
    request = BasebackupRequest(node_id=node_id, snapshot=snapshot)
    target.parent.mkdir(parents=True, exist_ok=True)
    api = local_api(app)  # started first if it is the home's own and stopped
    if app.remote is None:
        written = _written_by_daemon(app, request, target)
        if written is not None:
            return written

    async def fetch(client: PageserverClient) -> BasebackupResponse:
        received = 0
        progress = Progress("received")
        async with client.basebackup(request) as download:

            async def chunks() -> AsyncIterator[bytes]:
                nonlocal received
                async for chunk in download:
                    yield chunk
                    received += len(chunk)
                    progress(received)

            try:
                await extract_stream(chunks(), target)
            finally:  # an error on a line of its own, not after `received N MiB`
                progress.end()
        return download.result

    return api.run(fetch)


class Progress:
    """`<label> N MiB` on a terminal's stderr, over itself as the count grows (nothing where
    stderr is not a terminal)."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._show = sys.stderr.isatty()
        self._shown = False

    def __call__(self, done: int) -> None:
        if self._show:
            print(f"\r{self._label} {done / 1048576:.1f} MiB", end="", file=sys.stderr)
            self._shown = True

    def end(self) -> None:
        if self._shown:
            print(file=sys.stderr)


def _connect_local(app: App) -> socket.socket | None:
    """A connection to the home's daemon's local-files socket; None where there is none (an
    older daemon, a path too long for a socket) or its process is not of this user."""
    path = socket_path(local_config(app).workdir)
    if path is None:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        if peer_uid(sock) == os.geteuid():
            return sock
    except OSError:
        pass
    sock.close()
    return None


def _written_by_daemon(
    app: App, request: BasebackupRequest, target: Path
) -> BasebackupResponse | None:
    """The basebackup written by the home's daemon into a new directory renamed to `target`
    (`staged_dir`, as the stream's), whose descriptor it is handed; None (nothing made) when
    the daemon offers no such socket: the caller streams."""
    sock = _connect_local(app)
    if sock is None:
        return None
    with sock:
        progress = Progress("written")
        try:
            return written_by_peer(sock, request, target, progress)
        finally:  # an error on a line of its own, not after `written N MiB`
            progress.end()


def written_by_peer(
    sock: socket.socket, request: BasebackupRequest, target: Path, progress: Progress
) -> BasebackupResponse:
    """The basebackup the daemon at the other end of `sock` writes into a `staged_dir` of
    `target` (pageserver/api/local_files.py), its progress frames shown. Failed or
    interrupted (Ctrl-C), our end is shut down and the daemon's close waited for (its
    writing stops at its next MiB) before the directory is removed: removed under a daemon
    still writing, new files made the removal fail and left `<name>.tmp-XXXX` behind."""
    with staged_dir(target) as tmp:
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:  # a Ctrl-C once the request is sent (or part of it) waits as well
            try:
                send_frame(sock, request.to_wire(), [fd])
            finally:
                os.close(fd)
            answer = _final_answer(sock, progress)
        except BaseException:
            _wait_for_daemon_close(sock)
            raise
        if isinstance(answer, dict) and isinstance(error := answer.get("error"), dict):
            raise error_from_code(str(error.get("code")), str(error.get("message")))
        if not isinstance(answer, dict) or "ok" not in answer:
            raise ProtocolError("the pageserver's local basebackup answer is malformed")
        return BasebackupResponse.from_wire(answer["ok"], "local basebackup")


def _final_answer(sock: socket.socket, progress: Progress) -> Any:
    """The daemon's last frame, its progress frames before it shown; Unavailable after
    SILENCE_SECONDS without a frame (it sends one every second while it writes)."""
    sock.settimeout(SILENCE_SECONDS)
    while True:
        try:
            answer, fds = receive_frame(sock)
        except TimeoutError:
            raise Unavailable(
                f"the pageserver sent nothing of the local basebackup for {SILENCE_SECONDS:.0f} "
                "s; see the pageserver log"
            ) from None
        for extra in fds:
            os.close(extra)
        if isinstance(answer, dict) and isinstance(done := answer.get("progress"), int):
            progress(done)
            continue
        return answer


def _wait_for_daemon_close(sock: socket.socket) -> None:
    """Shut our end down (the daemon's writing stops at its next MiB) and wait, at most
    _STOP_WAIT seconds, for the daemon to close its end: it has stopped writing then."""
    deadline = time.monotonic() + _STOP_WAIT
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(1 << 16):
                return
