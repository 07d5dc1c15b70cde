"""A basebackup written by the local daemon straight into a directory the CLI hands it.

Streamed, a 1 GiB basebackup is copied into the socket by the daemon, out of it by the CLI
and into the files, and the CLI parses it in a process of its own: ~0.9 s of CPU on top of
the daemon's tar (bench/README.md, `extract`). For a daemon on the same machine the CLI
instead makes the (empty, temporary) directory itself, opens it and hands the descriptor over
a unix socket in the daemon's working directory (SCM_RIGHTS); the daemon writes the files
relative to that descriptor with the same checks, modes and owner as the CLI's unpacker
(`cli.untar.extract_into_dir_fd`), and answers with the basebackup's description.

Why this is safe: the socket is in the daemon's working directory, inside the home (private
to its OS user), and the daemon serves only a peer of its own user id (SO_PEERCRED), so it
never writes anything that peer could not write itself; it writes only below the directory
it was handed (never at a path a request names), and only into an empty one. A remote
pageserver, an older daemon (no socket) or a peer of another user gets the stream.

The exchange, one per connection: the CLI sends a frame (`proto.frames`: a 4-byte length
and msgpack) holding the `BasebackupRequest`'s wire form, the descriptor attached to its
first bytes; the daemon answers one frame, `{"ok": BasebackupResponse}` or
`{"error": {"code", "message"}}`, and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from proto.errors import InternalError, InvalidArgument, NeonError, ProtocolError
from proto.frames import HEADER, decode_frame_body, encode_frame

if TYPE_CHECKING:  # the CLI imports this module at its start: not the tar maker
    from pageserver.basebackup.tar_stream import AlignedChunks

log = logging.getLogger(__name__)

SOCKET_NAME = "basebackup-files.sock"
_SUN_PATH_MAX = 107  # sockaddr_un's sun_path holds 108 bytes with the NUL
_REQUEST_MAX = 1 << 20  # a request is a few fields and maybe a timeline history file
_RECEIVE_TIMEOUT = 30.0
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

WriteInto = Callable[[dict[str, Any], int, Callable[[], bool]], Awaitable[dict[str, Any]]]
"""Serve one request (its wire form) into the directory open as the descriptor; the third
argument says whether the client has gone (its connection closed). Returns the response's
wire form; raises a NeonError the client gets."""


def socket_path(workdir: Path) -> Path | None:
    """Where the daemon of `workdir` listens; None where the path is too long for a unix
    socket (such a daemon offers no local writing, and its CLI streams)."""
    path = workdir / SOCKET_NAME
    return path if len(os.fsencode(path)) <= _SUN_PATH_MAX else None


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a unix socket (when it connected)."""
    _pid, uid, _gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return uid


def send_frame(sock: socket.socket, payload: Any, fds: Iterable[int] = ()) -> None:
    """One frame, with `fds` attached to its first bytes."""
    data = encode_frame(payload)
    sent = socket.send_fds(sock, [data], list(fds)) if fds else 0
    sock.sendall(data[sent:])


def receive_frame(sock: socket.socket, max_size: int = _REQUEST_MAX) -> tuple[Any, list[int]]:
    """One frame and the descriptors attached to it (the caller closes them). ProtocolError
    if the peer closes before the frame is whole or sends more than `max_size`."""
    data, fds, _flags, _addr = socket.recv_fds(sock, HEADER.size, 4)
    try:
        while len(data) < HEADER.size:
            data += _receive(sock, HEADER.size - len(data))
        (size,) = HEADER.unpack(data)
        if size > max_size:
            raise ProtocolError(f"a local basebackup frame of {size} bytes is too large")
        body = bytearray()
        while len(body) < size:
            body += _receive(sock, size - len(body))
        return decode_frame_body(body), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _receive(sock: socket.socket, n: int) -> bytes:
    data = sock.recv(n)
    if not data:
        raise ProtocolError("the peer closed the local basebackup connection mid-frame")
    return data


def gone(sock: socket.socket) -> Callable[[], bool]:
    """Whether the peer of `sock` has closed its end (it sends nothing more after its
    request: readable then means closed)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLRDHUP)

    def check() -> bool:
        return bool(poller.poll(0))

    return check


def checked_dir(fds: list[int]) -> int:
    """The one descriptor a request carries, if it is open on a directory."""
    if len(fds) != 1:
        raise InvalidArgument(f"a local basebackup needs one directory descriptor, got {len(fds)}")
    if not stat.S_ISDIR(os.fstat(fds[0]).st_mode):
        raise InvalidArgument("the descriptor handed for a local basebackup is not a directory")
    return fds[0]


class LocalFilesServer:
    """The daemon's end: a unix socket at `path` whose connections `write_into` serves."""

    def __init__(self, path: Path, write_into: WriteInto) -> None:
        self.path = path
        self._write_into = write_into
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._serving: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)  # a crashed daemon's
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.path))
            os.chmod(self.path, 0o600)
            listener.listen(16)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._accepting = asyncio.create_task(self._accept(listener), name="local-files")

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        for task in list(self._serving):
            task.cancel()
        if self._listener is not None:
            self._listener.close()
            self.path.unlink(missing_ok=True)

    async def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            task = asyncio.create_task(self._serve(conn), name="local-files-request")
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.setblocking(True)
            conn.settimeout(_RECEIVE_TIMEOUT)
            try:
                answer = {"ok": await self._answer(conn)}
            except NeonError as exc:
                answer = {"error": {"code": exc.code, "message": exc.message}}
            except Exception as exc:
                log.exception("local basebackup failed")
                answer = {"error": {"code": InternalError.code, "message": str(exc)}}
            with contextlib.suppress(OSError):  # the client may be gone
                await asyncio.to_thread(send_frame, conn, answer)

    async def _answer(self, conn: socket.socket) -> dict[str, Any]:
        if peer_uid(conn) != os.geteuid():
            raise InvalidArgument("a local basebackup is served to this daemon's own user only")
        request, fds = await asyncio.to_thread(receive_frame, conn)
        try:
            dir_fd = checked_dir(fds)
            if not isinstance(request, dict):
                raise InvalidArgument("a local basebackup request must be a map")
            return await self._write_into(request, dir_fd, gone(conn))
        finally:
            for fd in fds:
                os.close(fd)


class ClientGone(NeonError):
    """The CLI closed its connection while the daemon wrote its basebackup."""


def write_tar_into(
    chunks: Iterator[bytes],
    dir_fd: int,
    client_gone: Callable[[], bool] = lambda: False,
    aligned: AlignedChunks | None = None,
) -> None:
    """Unpack the tar `chunks` make into the empty directory open as `dir_fd` with the CLI's
    unpacker and its checks (`cli.untar.extract_into_dir_fd`), the tar made on a thread of
    its own a few MiB ahead of the writes (`chunks_ahead`, as `basebackup` writes a pipe);
    `aligned`: the buffers the tar maker joins pages into, given back as each is written.
    ClientGone once `client_gone()` says so (checked every MiB)."""
    # Imported here: the CLI's side of this module is all `neon` loads at its start.
    from cli.untar import extract_into_dir_fd
    from pageserver.api.thread_chunks import chunks_ahead
    from pageserver.basebackup.tar_stream import HANDOFF_BYTES, batched

    batches = chunks_ahead(batched(chunks, HANDOFF_BYTES))
    try:
        done = None if aligned is None else aligned.release
        extract_into_dir_fd(_until_gone(batches, client_gone), dir_fd, done)
    finally:  # its producer stops at its next batch
        cast(Generator[list[bytes], None, None], batches).close()


def _until_gone(
    batches: Iterable[list[bytes]], client_gone: Callable[[], bool]
) -> Iterator[list[bytes]]:
    for batch in batches:
        if client_gone():
            raise ClientGone("the client of a local basebackup went away")
        yield batch
