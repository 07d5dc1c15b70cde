"""The local daemon's basebackup into a directory the CLI hands it (pageserver/api/local_files.py):
what it refuses, and that the writing keeps the unpacker's checks."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import io
import os
import select
import shutil
import socket
import tarfile
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

import cli.extract
from cli.context import App
from cli.extract import Progress, _final_answer, _wait_for_daemon_close, written_by_peer
from datadir_files.pg_account import pg_os_user
from datadir_files.untar import DIRECT_WRITES_ENV, UnsafeArchive, _page_aligned, extract_into_dir_fd
from pageserver.api import own_thread, proto_service
from pageserver.api.local_files import (
    ClientGone,
    LocalFilesServer,
    LocalWrite,
    WriteInto,
    send_frame,
    write_on_own_thread,
    write_tar_into,
)
from pageserver.api.metrics import Metrics
from pageserver.api.proto_service import local_basebackup
from pageserver.api.service import Pageserver
from pageserver.basebackup.tar_stream import AlignedChunks, BasebackupInfo, tar_header
from pageserver.history.flusher import FOREGROUND
from pageserver_api.models import BasebackupRequest
from pg15.constants import BLCKSZ
from proto.errors import CorruptData, NotFound
from tests.fifo import raised_within

T = TypeVar("T")


def one_file_tar(name: str, payload: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


async def _write_a_file(raw: dict[str, Any], dir_fd: int, write: LocalWrite) -> Any:
    fd = os.open(raw["name"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
    os.close(fd)
    return {"wrote": raw["name"], "gone": write.stopped()}


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


def answer_of(sock: socket.socket) -> Any:
    """The server's last frame (its progress frames passed over)."""
    return _final_answer(sock, Progress("written"))


def exchange(
    tmp_path: Path, send: Callable[[socket.socket], None], as_uid: int | None = None
) -> Any:
    """Start a server (its handler creates the file a request names), run `send` on a
    connection to it (from a child of uid `as_uid` if given) and return the answer."""
    path = tmp_path / "s.sock"

    def client() -> Any:
        if as_uid is None:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
                send(sock)
                return answer_of(sock)
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: another user's process
            try:
                os.setuid(as_uid)
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.connect(str(path))
                    # The server refuses another user's peer at once, without reading: it
                    # may have answered and closed before this send (EPIPE), its answer
                    # still queued here to read.
                    with contextlib.suppress(BrokenPipeError):
                        send(sock)
                    answer = answer_of(sock)
                os.write(write, repr(answer).encode())
            except BaseException as exc:
                os.write(write, f"child failed: {exc!r}".encode())
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        with os.fdopen(read) as got:
            return got.read()

    async def run() -> Any:
        server = LocalFilesServer(path, _write_a_file)
        await server.start()
        try:
            if as_uid is not None:
                os.chmod(path, 0o666)  # past the socket's own mode: the peer check stays
            return await asyncio.to_thread(client)
        finally:
            await server.close()

    return asyncio.run(run())


def test_a_directory_descriptor_is_written_into_and_anything_else_refused(
    tmp_path: Path,
) -> None:
    target = tmp_path / "dir"
    target.mkdir()

    def handing(what: Path | None) -> Callable[[socket.socket], None]:
        def send(sock: socket.socket) -> None:
            if what is None:
                send_frame(sock, {"name": "f"})
                return
            fd = os.open(what, os.O_RDONLY)
            try:
                send_frame(sock, {"name": "f"}, [fd])
            finally:
                os.close(fd)

        return send

    assert exchange(tmp_path, handing(target)) == {"ok": {"wrote": "f", "gone": False}}
    assert (target / "f").is_file()
    (tmp_path / "plain").write_bytes(b"x")
    answer = exchange(tmp_path, handing(tmp_path / "plain"))
    assert answer["error"]["code"] == "invalid_argument"
    assert "not a directory" in answer["error"]["message"]
    answer = exchange(tmp_path, handing(None))
    assert "one directory descriptor, got 0" in answer["error"]["message"]
    assert not (tmp_path / "f").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_a_peer_of_another_user_is_refused(tmp_path: Path) -> None:
    user = pg_os_user()
    assert user is not None
    reachable = Path(tempfile.mkdtemp(prefix="local-files-"))  # /tmp/pytest-of-root is 0700
    try:
        os.chmod(reachable, 0o777)
        target = reachable / "dir"
        target.mkdir()
        os.chmod(target, 0o777)

        def send(sock: socket.socket) -> None:
            # The refusal comes before the request is read: wait for the server's close,
            # so that the request below always meets a server that has answered and gone
            # (the send's EPIPE, the answer still queued here to read).
            closed = select.poll()
            closed.register(sock, select.POLLRDHUP)
            assert closed.poll(30_000), "the server did not answer and close"
            fd = os.open(target, os.O_RDONLY)
            send_frame(sock, {"name": "f"}, [fd])

        answer = exchange(reachable, send, as_uid=user.uid)
        assert "this daemon's own user only" in answer
        assert not (target / "f").exists()
    finally:
        shutil.rmtree(reachable)


def test_the_writing_keeps_the_unpackers_checks(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(UnsafeArchive, match="outside the target"):
            extract_into_dir_fd([[one_file_tar("../escaped", b"x")]], fd)
        assert not (tmp_path.parent / "escaped").exists()
        (tmp_path / "there").write_bytes(b"")
        with pytest.raises(Exception, match="not empty"):
            extract_into_dir_fd([[one_file_tar("a", b"x")]], fd)
    finally:
        os.close(fd)


def test_the_writing_stops_once_the_client_has_gone(tmp_path: Path) -> None:
    made: list[int] = []

    def chunks() -> Iterator[bytes]:
        for i in range(64):  # 64 MiB of members, a MiB each
            made.append(i)
            yield tar_header(f"f{i}", 1 << 20, 0) + bytes(1 << 20)
        yield bytes(1024)

    checks = iter([False, False, True])
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(ClientGone):
            write_tar_into(chunks(), fd, lambda: next(checks))
    finally:
        os.close(fd)
    assert len(list(tmp_path.iterdir())) == 2
    assert len(made) < 16  # the tar's maker stopped a few batches ahead


def test_aligned_chunks_lend_page_aligned_buffers_and_never_wait() -> None:
    """The tar maker's pages joined into page-aligned buffers the O_DIRECT writer writes as
    they are; with every buffer lent, bytes (a wait could deadlock against a consumer
    still gathering its batch); a buffer given back is lent again."""
    pages = [bytes([i]) * BLCKSZ for i in range(AlignedChunks.PAGES)]
    chunks = AlignedChunks(count=2)
    first, second = chunks.join(pages), chunks.join(pages[:3])
    assert isinstance(first, memoryview) and isinstance(second, memoryview)
    assert bytes(first) == b"".join(pages) and bytes(second) == b"".join(pages[:3])
    assert _page_aligned(first) and _page_aligned(second)
    assert not _page_aligned(memoryview(b"".join(pages)))  # a bytes object's data
    third = chunks.join(pages[:2])
    assert isinstance(third, bytes) and third == b"".join(pages[:2])
    chunks.release(third)  # not lent: nothing
    chunks.release(first)
    again = chunks.join(pages[5:7])
    assert isinstance(again, memoryview) and bytes(again) == b"".join(pages[5:7])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files to another user")
def test_the_files_go_to_the_owner_of_the_directory_handed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's environment (NEON_PG_USER) is that of whichever CLI started it: what it
    writes goes to the owner of the directory handed (the CLI gave it to PostgreSQL's
    account), not to an account it looks up itself."""
    monkeypatch.setenv("NEON_PG_USER", "nobody")
    os.chown(tmp_path, 4242, 4343)
    tar = one_file_tar("d/f", b"x") + bytes(1024)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        extract_into_dir_fd([[tar]], fd)
    finally:
        os.close(fd)
    for path in (tmp_path / "d", tmp_path / "d" / "f"):
        assert (path.stat().st_uid, path.stat().st_gid) == (4242, 4343)


def test_a_link_put_in_place_of_a_directory_is_not_written_through(tmp_path: Path) -> None:
    """PostgreSQL's account may write in the directory being filled: a link it puts where
    a member's directory goes fails that member, nothing lands where the link points."""
    target, outside = tmp_path / "target", tmp_path / "outside"
    target.mkdir()
    outside.mkdir()

    def batches() -> Iterator[list[bytes]]:
        yield [tar_header("a", 1, 0), b"x".ljust(512, b"\0")]
        (target / "d").symlink_to(outside)
        yield [tar_header("d/f", 1, 0), b"y".ljust(512, b"\0"), bytes(1024)]

    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(CorruptData, match="d/f"):
            extract_into_dir_fd(batches(), fd)
    finally:
        os.close(fd)
    assert (target / "a").read_bytes() == b"x"
    assert not list(outside.iterdir())


def test_a_fifo_put_at_a_members_name_is_refused_not_opened(tmp_path: Path) -> None:
    """PostgreSQL's account may also put a FIFO at the name of a member still to come:
    opened as a file (O_TRUNC, no O_EXCL), the writer blocked for good, its CLI waiting
    with progress frames still coming and the daemon unable to exit (the thread is not a
    daemon's). Every member is new in a directory checked empty: refused, naming it."""
    target = tmp_path / "target"
    target.mkdir()

    def batches() -> Iterator[list[bytes]]:
        yield [tar_header("a", 1, 0), b"x".ljust(512, b"\0")]
        os.mkfifo(target / "b")
        yield [tar_header("b", 1 << 20, 0), bytes(1 << 20), bytes(1024)]

    fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
    try:
        error = raised_within(lambda: extract_into_dir_fd(batches(), fd), target)
    finally:
        os.close(fd)
    assert isinstance(error, UnsafeArchive) and "'b'" in str(error)
    assert (target / "a").read_bytes() == b"x"


@contextlib.contextmanager
def serving(path: Path, write_into: WriteInto) -> Iterator[LocalFilesServer]:
    """A server at `path` on an event loop of its own thread (the test's thread is the
    CLI's), a progress frame every 50 ms."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = LocalFilesServer(path, write_into, progress_seconds=0.05)
    try:
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def test_a_write_running_at_shutdown_stays_in_its_own_directory(tmp_path: Path) -> None:
    """The daemon's shutdown cancels a write its thread goes on with (until its next check)
    after the request's descriptor is closed: through its own duplicate it writes into the
    directory it was handed, not into one the daemon opened meanwhile under the same
    number (`os.open` returns the lowest free one)."""
    target = tmp_path / "target"
    target.mkdir()
    entered, release, ended = threading.Event(), threading.Event(), threading.Event()
    numbers: list[int] = []

    async def blocked(raw: dict[str, Any], dir_fd: int, write: LocalWrite) -> dict[str, Any]:
        numbers.append(dir_fd)

        def write_late(fd: int) -> dict[str, Any]:
            entered.set()
            release.wait(30)
            try:
                os.close(os.open("late", os.O_WRONLY | os.O_CREAT, 0o600, dir_fd=fd))
            finally:
                ended.set()
            return {}

        return await write_on_own_thread(dir_fd, write_late)

    async def run() -> list[Path]:
        server = LocalFilesServer(tmp_path / "s.sock", blocked)
        await server.start()
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(tmp_path / "s.sock"))
            fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
            send_frame(sock, {}, [fd])
            os.close(fd)
            assert await asyncio.to_thread(entered.wait, 30)
            await server.close(wait=0.1)
        others: dict[int, Path] = {}
        while numbers[0] not in others and len(others) < 8:
            other = tmp_path / f"other{len(others)}"
            other.mkdir()
            others[os.open(other, os.O_RDONLY | os.O_DIRECTORY)] = other
        assert numbers[0] in others  # the request's number, now another directory's
        release.set()
        assert await asyncio.to_thread(ended.wait, 30)
        for fd in others:
            os.close(fd)
        return list(others.values())

    others = asyncio.run(run())
    assert [p.name for p in target.iterdir()] == ["late"]
    assert not [p for other in others for p in other.iterdir()]


def test_a_write_abandoned_at_shutdown_holds_the_connection_until_it_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`local_basebackup` as the daemon wires it, its tar maker blocked mid-way: the
    daemon's shutdown stops waiting for it (`close(wait=...)`) and closes the connection,
    but the writing thread holds its own duplicate of it, so the CLI (waiting for the
    close before it removes the directory) waits until the writing has stopped. Closed
    with the request, the CLI removed the directory under a thread still writing in it
    (`<name>.tmp-XXXX` left behind)."""
    target = tmp_path / "target"
    target.mkdir()
    entered, release = threading.Event(), threading.Event()

    def blocking_tar() -> Iterator[bytes]:
        yield tar_header("a", 2 << 20, 0) + bytes(2 << 20)  # a batch of its own
        entered.set()
        release.wait(30)
        yield tar_header("b", 1, 0) + b"y".ljust(512, b"\0") + bytes(1024)

    async def planned(*args: Any, **kwargs: Any) -> tuple[BasebackupInfo, Iterator[bytes]]:
        aligned.append(kwargs["aligned"])
        return BasebackupInfo(1, 1, 1, 1, "000000010000000000000001", 7, 1 << 24), blocking_tar()

    class Daemon:
        metrics = Metrics()

    aligned: list[AlignedChunks | None] = []
    monkeypatch.delenv(DIRECT_WRITES_ENV, raising=False)
    monkeypatch.setattr(proto_service, "_plan_basebackup", planned)
    write_into = local_basebackup(cast(Pageserver, Daemon()))

    async def run() -> tuple[bool, bool]:
        server = LocalFilesServer(tmp_path / "s.sock", write_into)
        await server.start()
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(tmp_path / "s.sock"))
            fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
            send_frame(sock, BasebackupRequest(snapshot="s").to_wire(), [fd])
            os.close(fd)
            assert await asyncio.to_thread(entered.wait, 30)
            for _ in range(3000):  # its first batch written: the writer waits for the next
                if (target / "a").exists() and (target / "a").stat().st_size == 2 << 20:
                    break
                await asyncio.sleep(0.01)
            await server.close(wait=0.1)
            waiting = threading.Thread(target=_wait_for_daemon_close, args=(sock,), daemon=True)
            waiting.start()
            await asyncio.to_thread(waiting.join, 1.0)
            waited_while_writing = waiting.is_alive()
            release.set()
            await asyncio.to_thread(waiting.join, 30)
            return waited_while_writing, waiting.is_alive()

    try:
        waited_while_writing, still_waiting = asyncio.run(run())
    finally:
        release.set()
        FOREGROUND.release()  # no linger for later tests
    assert waited_while_writing  # the daemon's close did not say "stopped" while it wrote
    assert not still_waiting  # it closed once the writing stopped
    assert [p.name for p in target.iterdir()] == ["a"]  # stopped at its next batch
    # aligned buffers where O_DIRECT is off too: the tar maker writes the pages into them
    assert len(aligned) == 1 and isinstance(aligned[0], AlignedChunks)


def test_a_write_cancelled_before_its_thread_ran_closes_its_duplicates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled before its thread took it (`set_running_or_notify_cancel`), the write never
    runs: the descriptors duplicated for it are closed all the same (they leaked)."""

    def never_started(name: str, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        return concurrent.futures.Future()

    monkeypatch.setattr(own_thread, "start_own_thread", never_started)
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)

    async def run() -> None:
        writing = asyncio.ensure_future(write_on_own_thread(fd, lambda own: None))
        await asyncio.sleep(0)  # the descriptors duplicated
        writing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await writing

    try:
        before = sorted(os.listdir("/proc/self/fd"))
        asyncio.run(run())
        after = sorted(os.listdir("/proc/self/fd"))
    finally:
        os.close(fd)
    assert after == before


def test_the_socket_serves_on_after_a_failed_accept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An accept that fails (EMFILE: too many descriptors open) is retried: it ended the
    serving for good, with the socket still there, and every later CLI waited forever."""
    target = tmp_path / "dir"
    target.mkdir()
    monkeypatch.setattr(cli.extract, "SILENCE_SECONDS", 10.0)  # a client that gives up

    async def run() -> Any:
        loop = asyncio.get_running_loop()
        accept = loop.sock_accept
        failed: list[int] = []

        async def failing_once(listener: socket.socket) -> tuple[socket.socket, Any]:
            if not failed:
                failed.append(1)
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
            return await accept(listener)

        monkeypatch.setattr(loop, "sock_accept", failing_once)
        server = LocalFilesServer(tmp_path / "s.sock", _write_a_file)
        await server.start()

        def client() -> Any:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(tmp_path / "s.sock"))
                fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    send_frame(sock, {"name": "f"}, [fd])
                finally:
                    os.close(fd)
                return answer_of(sock)

        try:
            return await asyncio.to_thread(client), failed
        finally:
            await server.close()

    answer, failed = asyncio.run(run())
    assert failed == [1]
    assert answer == {"ok": {"wrote": "f", "gone": False}}


def test_ctrl_c_waits_for_the_daemon_before_removing_the_directory(tmp_path: Path) -> None:
    """Interrupted once the daemon has written its first MiB, the CLI shuts its end down
    and waits for the daemon to stop before removing the staged directory: removed under
    it, the files it went on making left `<name>.tmp-XXXX` behind. The progress frames
    count the bytes written."""
    work = tmp_path / "work"
    work.mkdir()
    target = work / "data"

    async def many_files(raw: dict[str, Any], dir_fd: int, write: LocalWrite) -> dict[str, Any]:
        def chunks() -> Iterator[bytes]:
            for i in range(200_000):
                yield tar_header(f"f{i}", 1, 0) + b"x".ljust(512, b"\0")
            yield bytes(1024)

        def write_all(fd: int) -> dict[str, Any]:
            write_tar_into(chunks(), fd, write.stopped, None, write.add)
            return {}

        return await write_on_own_thread(dir_fd, write_all)

    class Interrupting(Progress):
        def __init__(self, label: str) -> None:
            super().__init__(label)
            self.seen: list[int] = []

        def __call__(self, done: int) -> None:
            self.seen.append(done)
            if done and any(work.glob("data.tmp-*/f*")):
                raise KeyboardInterrupt

    progress = Interrupting("written")
    with serving(tmp_path / "s.sock", many_files), socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(tmp_path / "s.sock"))
        with pytest.raises(KeyboardInterrupt):
            written_by_peer(sock, BasebackupRequest(snapshot="s"), target, progress)
        assert not list(work.iterdir())  # nothing left, no `data.tmp-XXXX`
    assert progress.seen[0] == 0 and progress.seen[-1] >= 1 << 20


def test_ctrl_c_right_after_the_request_waits_and_ends_the_progress_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C between sending the request and reading the answers waits for the daemon
    too (it skipped the wait: the send was outside the `try`), and the progress line is
    ended whatever happens (only on success: the error was printed after `written N MiB`)."""
    work = tmp_path / "work"
    work.mkdir()
    waited: list[bool] = []
    ended: list[bool] = []
    send = cli.extract.send_frame
    wait = cli.extract._wait_for_daemon_close

    def interrupted_send(sock: socket.socket, payload: Any, fds: Iterable[int] = ()) -> None:
        send(sock, payload, fds)
        raise KeyboardInterrupt

    def recorded_wait(sock: socket.socket) -> None:
        waited.append(True)
        wait(sock)

    class Ended(Progress):
        def end(self) -> None:
            ended.append(True)

    async def refused(raw: dict[str, Any], dir_fd: int, write: LocalWrite) -> dict[str, Any]:
        raise NotFound("no such snapshot")

    monkeypatch.setattr(cli.extract, "send_frame", interrupted_send)
    monkeypatch.setattr(cli.extract, "_wait_for_daemon_close", recorded_wait)
    monkeypatch.setattr(cli.extract, "Progress", Ended)
    with serving(tmp_path / "s.sock", refused):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(tmp_path / "s.sock"))
        monkeypatch.setattr(cli.extract, "_connect_local", lambda app: sock)
        with pytest.raises(KeyboardInterrupt):
            cli.extract._written_by_daemon(
                cast(App, None), BasebackupRequest(snapshot="s"), work / "data"
            )
    assert waited == [True] and ended == [True]
    assert not list(work.iterdir())


def test_the_local_basebackup_is_served_as_the_method_is(tmp_path: Path) -> None:
    """The local path is a basebackup request as the stream's is: compaction pauses while
    it runs (FOREGROUND held) and it is counted in pageserver_proto_requests_total."""
    held: list[bool] = []

    class Daemon:
        metrics = Metrics()

        def basebackup_source(self, node_id: str | None, snapshot: str | None) -> None:
            held.append(FOREGROUND.busy())
            raise NotFound(f"snapshot {snapshot} not found")

    daemon = Daemon()
    write_into = local_basebackup(cast(Pageserver, daemon))
    FOREGROUND.release()  # no linger of an earlier test's request
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(NotFound):
            asyncio.run(_awaited(write_into({"snapshot": "s"}, fd, LocalWrite(bool, bool))))
    finally:
        os.close(fd)
        FOREGROUND.release()  # none for later tests either
    assert held == [True]
    counted = daemon.metrics.value(
        "pageserver_proto_requests_total", method="basebackup", outcome="error"
    )
    assert counted == 1
