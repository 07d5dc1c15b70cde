"""The local daemon's basebackup into a directory the CLI hands it (pageserver/api/local_files.py):
what it refuses, and that the writing keeps the unpacker's checks."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import socket
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli.pgbin import pg_os_user
from cli.untar import UnsafeArchive, _page_aligned, extract_into_dir_fd
from pageserver.api.local_files import (
    ClientGone,
    LocalFilesServer,
    receive_frame,
    send_frame,
    write_tar_into,
)
from pageserver.basebackup.tar_stream import AlignedChunks, tar_header
from pg15.constants import BLCKSZ
from proto.errors import CorruptData


def one_file_tar(name: str, payload: bytes) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


async def _write_a_file(raw: dict[str, Any], dir_fd: int, gone: Callable[[], bool]) -> Any:
    fd = os.open(raw["name"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dir_fd)
    os.close(fd)
    return {"wrote": raw["name"], "gone": gone()}


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
                return receive_frame(sock)[0]
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: another user's process
            try:
                os.setuid(as_uid)
                with socket.socket(socket.AF_UNIX) as sock:
                    sock.connect(str(path))
                    send(sock)
                    answer = receive_frame(sock)[0]
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
