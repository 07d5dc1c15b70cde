"""A basebackup written by the local daemon straight into a directory the CLI hands it.

Streamed, a 1 GiB basebackup is copied into the socket by the daemon, out of it by the CLI
and into the files, and the CLI parses it in a process of its own: ~0.9 s of CPU on top of
the daemon's tar (bench/README.md, `extract`). For a daemon on the same machine the CLI
instead makes the (empty, temporary) directory itself, opens it and hands the descriptor over
a unix socket in the daemon's working directory (SCM_RIGHTS); the daemon writes the files
relative to that descriptor with the same checks, modes and owner as the CLI's unpacker
(`datadir_files.untar.extract_into_dir_fd`), and answers with the basebackup's description.

Why this is safe: the socket is in the daemon's working directory, inside the home (private
to its OS user), and the daemon serves only a peer of its own user id (SO_PEERCRED), so it
never writes anything that peer could not write itself; it writes only below the directory
it was handed (never at a path a request names; each directory below it opened from its
parent's without following a link: `datadir_files.untar._Extractor`), through a duplicate of that
descriptor its writing thread owns (`write_on_own_thread`), and only into an empty one. A
remote pageserver, an older daemon (no socket at SOCKET_NAME) or a peer of another user
gets the stream.

The exchange, one per connection: the CLI sends a frame (`proto.frames`: a 4-byte length
and msgpack) holding the `BasebackupRequest`'s wire form, the descriptor attached to its
first bytes; the daemon answers `{"progress": bytes}` frames at once and every
PROGRESS_SECONDS (the tar's bytes written so far: the CLI shows them, and a silence of
SILENCE_SECONDS means the daemon is stuck or gone), then one frame, `{"ok":
BasebackupResponse}` or `{"error": {"code", "message"}}`, and closes. A CLI that goes
shuts its end down: the writing stops at its next MiB, and the CLI waits for the daemon's
close before it removes the directory (the writing thread holds the connection open until
it ends, also after the daemon's shutdown stopped waiting for it: `LocalWrite.held`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import stat
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from proto.errors import InternalError, InvalidArgument, NeonError, ProtocolError
from proto.frames import HEADER, decode_frame_body, encode_frame
from proto.unix_fds import MessageTooLarge, PeerClosed, peer_uid, receive_with_fds, send_with_fds

if TYPE_CHECKING:  # the CLI imports this module at its start: not the tar maker
    from pageserver.basebackup.tar_stream import AlignedChunks

log = logging.getLogger(__name__)

T = TypeVar("T")

SOCKET_NAME = "basebackup-files-2.sock"
"""-2: the daemon sends progress frames (a CLI finding only an older daemon's socket, or
none, streams)."""
PROGRESS_SECONDS = 1.0
SILENCE_SECONDS = 60.0
_SUN_PATH_MAX = 107  # sockaddr_un's sun_path holds 108 bytes with the NUL
_REQUEST_MAX = 1 << 20  # a request is a few fields and maybe a timeline history file
_RECEIVE_TIMEOUT = 30.0
_CLOSE_WAIT = 10.0  # for writes running at the daemon's shutdown (they stop at their next MiB)
_ACCEPT_RETRY = (0.1, 5.0)  # after a failed accept (EMFILE): first and longest wait


class LocalWrite:
    """One request as its handler sees it: `stopped()` once the client has gone or the
    daemon shuts down (called from the writing thread); `written`, the tar's bytes written
    so far (the client's progress), added to by `add` from that thread; `held`, the
    descriptors its writing thread holds until it ends (`write_on_own_thread`: the client's
    connection, which then closes only once the writing stopped)."""

    def __init__(
        self,
        client_gone: Callable[[], bool],
        closing: Callable[[], bool],
        held: tuple[int, ...] = (),
    ) -> None:
        self._client_gone = client_gone
        self._closing = closing
        self.held = held
        self.written = 0

    def stopped(self) -> bool:
        return self._closing() or self._client_gone()

    def add(self, n: int) -> None:
        self.written += n


WriteInto = Callable[[dict[str, Any], int, LocalWrite], Awaitable[dict[str, Any]]]
"""Serve one request (its wire form) into the directory open as the descriptor, which is
the server's: a thread writing on after the call is cancelled (the daemon's shutdown) must
use its own duplicate (`write_on_own_thread`). Returns the response's wire form; raises a
NeonError the client gets."""


def socket_path(workdir: Path) -> Path | None:
    """Where the daemon of `workdir` listens; None where the path is too long for a unix
    socket (such a daemon offers no local writing, and its CLI streams)."""
    path = workdir / SOCKET_NAME
    return path if len(os.fsencode(path)) <= _SUN_PATH_MAX else None


def send_frame(sock: socket.socket, payload: Any, fds: Iterable[int] = ()) -> None:
    """One frame, with `fds` attached to its first bytes."""
    send_with_fds(sock, encode_frame(payload), fds)


def receive_frame(sock: socket.socket, max_size: int = _REQUEST_MAX) -> tuple[Any, list[int]]:
    """One frame and the descriptors attached to it (the caller closes them). ProtocolError
    if the peer closes before the frame is whole or sends more than `max_size`."""
    try:
        body, fds = receive_with_fds(sock, HEADER, max_size, 4)
    except PeerClosed:
        raise ProtocolError("the peer closed the local basebackup connection mid-frame") from None
    except MessageTooLarge as exc:
        raise ProtocolError(f"a local basebackup frame of {exc.size} bytes is too large") from None
    try:
        return decode_frame_body(body), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


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


async def write_on_own_thread(
    dir_fd: int, write: Callable[[int], T], held: Iterable[int] = ()
) -> T:
    """`write(fd)` on a thread of its own (`on_own_thread`: a write lasts as long as the
    basebackup), `fd` a duplicate of `dir_fd` that thread owns and closes when it ends.
    Cancelled (the daemon's shutdown), the caller closes `dir_fd` while the thread writes on
    until its next check: through `dir_fd`'s number, reused by then for another directory
    the daemon opened, the rest of the tar would land there. The thread holds a duplicate of
    each of `held` too (`LocalWrite.held`: the client's connection, closed by the caller
    then, stays open until the writing stopped: the CLI waits for its close before it
    removes the directory, and a write abandoned after `LocalFilesServer.close`'s wait
    went on under a CLI that had removed it)."""
    from pageserver.api.own_thread import start_own_thread  # the daemon's: not at CLI start

    owned: list[int] = []  # here, before the thread starts: the originals may be closed by then

    def close_owned() -> None:
        while owned:
            os.close(owned.pop())

    try:
        for fd in (dir_fd, *held):
            owned.append(os.dup(fd))
    except BaseException:
        close_owned()
        raise
    own = owned[0]

    def run() -> T:
        try:
            return write(own)
        finally:
            close_owned()

    try:
        future = start_own_thread("basebackup-files", run)
    except BaseException:
        close_owned()
        raise
    # Cancelled before its thread ran (`set_running_or_notify_cancel`), `run` never runs.
    future.add_done_callback(lambda done: close_owned() if done.cancelled() else None)
    return await asyncio.wrap_future(future)


class LocalFilesServer:
    """The daemon's end: a unix socket at `path` whose connections `write_into` serves,
    with a progress frame every `progress_seconds`."""

    def __init__(
        self, path: Path, write_into: WriteInto, progress_seconds: float = PROGRESS_SECONDS
    ) -> None:
        self.path = path
        self._write_into = write_into
        self._progress_seconds = progress_seconds
        self._listener: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._serving: set[asyncio.Task[None]] = set()
        self._closing = False

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

    async def close(self, wait: float = _CLOSE_WAIT) -> None:
        """Stop accepting; running writes are told to stop (at their next MiB) and waited
        for up to `wait` seconds, then cancelled (their threads write on through their own
        descriptors, their clients' connections open until they end: `write_on_own_thread`)."""
        self._closing = True
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
        if self._serving:
            await asyncio.wait(list(self._serving), timeout=wait)
        running = list(self._serving)
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)  # their descriptors closed
        if self._listener is not None:
            self._listener.close()
            self.path.unlink(missing_ok=True)

    async def _accept(self, listener: socket.socket) -> None:
        """Serve each connection; a failed accept (EMFILE: the connection stays queued) is
        logged and retried after a growing wait, never the end of the socket's serving."""
        loop = asyncio.get_running_loop()
        first, longest = _ACCEPT_RETRY
        retry = first
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as exc:
                log.warning(
                    "local basebackup socket: accept failed (%s); again in %.1f s", exc, retry
                )
                await asyncio.sleep(retry)
                retry = min(retry * 2, longest)
                continue
            retry = first
            task = asyncio.create_task(self._serve(conn), name="local-files-request")
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, conn: socket.socket) -> None:
        from pageserver.api.own_thread import on_own_thread  # the daemon's: not at CLI start

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
                await on_own_thread("local-files-send", send_frame, conn, answer)

    async def _answer(self, conn: socket.socket) -> dict[str, Any]:
        from pageserver.api.own_thread import on_own_thread  # the daemon's: not at CLI start

        if peer_uid(conn) != os.geteuid():
            raise InvalidArgument("a local basebackup is served to this daemon's own user only")
        # Not the loop's default executor: six idle connections would hold all its threads.
        request, fds = await on_own_thread("local-files-receive", receive_frame, conn)
        try:
            dir_fd = checked_dir(fds)
            if not isinstance(request, dict):
                raise InvalidArgument("a local basebackup request must be a map")
            write = LocalWrite(gone(conn), lambda: self._closing, (conn.fileno(),))
            writing = asyncio.ensure_future(self._write_into(request, dir_fd, write))
            try:
                sending = True
                while True:
                    try:
                        if sending:
                            progress = {"progress": write.written}
                            await on_own_thread("local-files-send", send_frame, conn, progress)
                    except OSError:  # the client has gone: the writing stops at its next MiB
                        sending = False
                    if (await asyncio.wait([writing], timeout=self._progress_seconds))[0]:
                        break
            finally:
                if not writing.done():  # cancelled: the daemon shuts down
                    writing.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await writing
            return writing.result()
        finally:
            for fd in fds:
                os.close(fd)


class ClientGone(NeonError):
    """The CLI closed its connection while the daemon wrote its basebackup (or the daemon
    shuts down)."""


def write_tar_into(
    chunks: Iterator[bytes],
    dir_fd: int,
    client_gone: Callable[[], bool] = lambda: False,
    aligned: AlignedChunks | None = None,
    written: Callable[[int], None] = lambda n: None,
) -> None:
    """Unpack the tar `chunks` make into the empty directory open as `dir_fd` with the CLI's
    unpacker and its checks (`datadir_files.untar.extract_into_dir_fd`), the tar made on a thread of
    its own a few MiB ahead of the writes (`chunks_ahead`, as `basebackup` writes a pipe);
    `aligned`: the buffers the tar maker joins pages into, given back as each is written.
    ClientGone once `client_gone()` says so (checked every MiB); `written` is told of each
    MiB's bytes as it goes to the unpacker."""
    # Imported here: the CLI's side of this module is all `neon` loads at its start.
    from datadir_files.untar import extract_into_dir_fd
    from pageserver.api.thread_chunks import chunks_ahead
    from pageserver.basebackup.tar_stream import HANDOFF_BYTES, batched

    batches = chunks_ahead(batched(chunks, HANDOFF_BYTES))
    try:
        done = None if aligned is None else aligned.release
        extract_into_dir_fd(_until_gone(batches, client_gone, written), dir_fd, done)
    finally:  # its producer stops at its next batch
        cast(Generator[list[bytes], None, None], batches).close()


def _until_gone(
    batches: Iterable[list[bytes]], client_gone: Callable[[], bool], written: Callable[[int], None]
) -> Iterator[list[bytes]]:
    for batch in batches:
        if client_gone():
            raise ClientGone(
                "the local basebackup stopped: its client went away or the daemon stops"
            )
        yield batch
        written(sum(map(len, batch)))
