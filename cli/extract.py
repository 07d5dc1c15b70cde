"""Downloading data directories from the pageserver.

`download_basebackup` unpacks a basebackup into the target as it arrives (cli/untar.py,
through a temporary directory renamed at the end), or, from the home's own daemon, has the
daemon write the files into that directory itself (`_written_by_daemon`: no stream, no
second unpacking process: pageserver/api/local_files.py); `remove_download_leftovers`
deletes what a killed download leaves behind. A downloaded directory has no
configuration, no replication slot, and the passwords of the node it came from:
`cli.nodes.finish_datadir` gives it this node's settings, passwords and slot in single-user
mode, before its first start, so the slot retains every WAL byte it writes.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from cli.context import App
from cli.pageserver_control import local_api, local_config
from cli.untar import extract_stream, staged_dir
from pageserver.api.local_files import peer_uid, receive_frame, send_frame, socket_path
from pageserver_api.client import PageserverClient
from pageserver_api.errors import ProtocolError, error_from_code
from pageserver_api.models import BasebackupRequest, BasebackupResponse

_RANDOM = "?" * 8  # what tempfile.mkstemp/mkdtemp insert between prefix and suffix


def remove_download_leftovers(target: Path) -> list[Path]:
    """Delete what a killed `download_basebackup(target)` leaves beside `target`: the
    extraction's temporary directory (`<name>.tmp-XXXXXXXX`, cli.untar), and the temporary
    tar (`.<name>.XXXXXXXX.tar`) that versions before 2026-12 downloaded first. The caller
    owns `target` (no download into it runs)."""
    name = glob.escape(target.name)
    found = [
        *target.parent.glob(f".{name}.{_RANDOM}.tar"),
        *target.parent.glob(f"{name}.tmp-{_RANDOM}"),
    ]
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


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
    show = sys.stderr.isatty()

    async def fetch(client: PageserverClient) -> BasebackupResponse:
        received = 0
        async with client.basebackup(request) as download:

            async def chunks() -> AsyncIterator[bytes]:
                nonlocal received
                async for chunk in download:
                    yield chunk
                    received += len(chunk)
                    if show:
                        print(f"\rreceived {received / 1048576:.1f} MiB", end="", file=sys.stderr)

            await extract_stream(chunks(), target)
        if show:
            print(file=sys.stderr)
        return download.result

    return api.run(fetch)


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
    with sock, staged_dir(target) as tmp:
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            send_frame(sock, request.to_wire(), [fd])
        finally:
            os.close(fd)
        answer, fds = receive_frame(sock)
        for extra in fds:
            os.close(extra)
        if isinstance(answer, dict) and isinstance(error := answer.get("error"), dict):
            raise error_from_code(str(error.get("code")), str(error.get("message")))
        if not isinstance(answer, dict) or "ok" not in answer:
            raise ProtocolError("the pageserver's local basebackup answer is malformed")
        return BasebackupResponse.from_wire(answer["ok"], "local basebackup")
