"""The transport interface, the same for every scheme, against real peers: a local directory,
an sshd, an aiohttp server and moto's S3 server on 127.0.0.1. An object appears only once
committed; an aborted, refused or killed write leaves nothing at its name; reads from any
offset."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cli.transport import parse_location
from cli.transport.base import Location, read_object
from cli.transport.http import INDEX_NAME
from proto.errors import AlreadyExists, NotFound
from tests.cli.transport.conftest import S3Bucket, entries
from tests.httpd import FileServer
from tests.sshd import SshServer

DATA = os.urandom(3 * 1024 * 1024 + 12345)  # several chunks, not a multiple of one


@dataclass(frozen=True)
class Directory:
    """What a directory peer holds, seen through the file system (an http store's index,
    the listing it keeps beside the objects, not counted)."""

    directory: Path
    index: str | None = None

    def read(self, name: str) -> bytes:
        return (self.directory / name).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        (self.directory / name).write_bytes(data)

    def exists(self, name: str) -> bool:
        return (self.directory / name).exists()

    def entries(self) -> list[str]:
        return [name for name in entries(self.directory) if name != self.index]


@dataclass(frozen=True)
class Peer:
    scheme: str
    remote: Directory | S3Bucket  # what the peer holds, seen behind the transport's back
    url: Callable[[str], str]  # the URL of an object

    def location(self, name: str) -> Location:
        return parse_location(self.url(name))


@pytest.fixture(params=["file", "ssh", "http", "s3"])
def peer(request: pytest.FixtureRequest, remote_dir: Path) -> Peer:
    remote = Directory(remote_dir)
    if request.param == "file":
        return Peer("file", remote, lambda name: str(remote_dir / name))
    if request.param == "ssh":
        sshd: SshServer = request.getfixturevalue("ssh_env")
        return Peer("ssh", remote, lambda name: sshd.url(f"{remote_dir}/{name}"))
    if request.param == "s3":
        bucket: S3Bucket = request.getfixturevalue("s3_bucket")
        return Peer("s3", bucket, bucket.url)
    httpd: FileServer = request.getfixturevalue("httpd")
    return Peer("http", Directory(remote_dir, INDEX_NAME), httpd.url)


async def write(location: Location, data: bytes, *, overwrite: bool = False) -> None:
    assert location.name is not None
    async with await location.store.open_write(location.name, overwrite=overwrite) as w:
        for i in range(0, len(data), 1 << 20):
            await w.write(data[i : i + (1 << 20)])


async def read(location: Location, offset: int = 0) -> tuple[bytes, int | None]:
    assert location.name is not None
    async with await location.store.open_read(location.name, offset) as r:
        return b"".join([chunk async for chunk in r]), r.size


async def test_written_object_appears_whole(peer: Peer) -> None:
    loc = peer.location("x.neon")
    await write(loc, DATA)
    assert peer.remote.read("x.neon") == DATA
    assert peer.remote.entries() == ["x.neon"]  # no temporary file left
    assert b"".join([c async for c in read_object(loc)]) == DATA
    for offset in (1, len(DATA) - 1, len(DATA)):
        got, size = await read(loc, offset)
        assert got == DATA[offset:] and size == len(DATA), offset
    info = await loc.store.stat("x.neon")
    assert info is not None and info.size == len(DATA)
    assert await loc.store.stat("other.neon") is None


async def test_empty_object(peer: Peer) -> None:
    loc = peer.location("empty.neon")
    await write(loc, b"")
    assert peer.remote.read("empty.neon") == b""
    assert await read(loc) == (b"", 0)


async def test_aborted_write_leaves_nothing(peer: Peer) -> None:
    loc = peer.location("x.neon")
    with pytest.raises(RuntimeError):
        async with await loc.store.open_write("x.neon", overwrite=False) as w:
            await w.write(DATA[: 1 << 20])
            raise RuntimeError("the export failed")
    assert peer.remote.entries() == []
    assert await loc.store.stat("x.neon") is None


async def test_existing_object_is_kept_unless_overwrite(peer: Peer) -> None:
    loc = peer.location("x.neon")
    await write(loc, b"first")
    with pytest.raises(AlreadyExists, match=r"x\.neon already exists; .*--force"):
        await write(loc, DATA)
    assert peer.remote.read("x.neon") == b"first"
    assert peer.remote.entries() == ["x.neon"]
    await write(loc, DATA, overwrite=True)
    assert peer.remote.read("x.neon") == DATA
    assert peer.remote.entries() == ["x.neon"]


async def test_missing_objects_and_delete(peer: Peer) -> None:
    loc = peer.location("gone.neon")
    with pytest.raises(NotFound, match=r"gone\.neon"):
        await read(loc)
    with pytest.raises(NotFound, match=r"gone\.neon"):
        await loc.store.delete("gone.neon")
    await write(loc, b"data")
    await loc.store.delete("gone.neon")
    assert peer.remote.entries() == []


async def test_list_shows_finished_objects_only(peer: Peer) -> None:
    loc = peer.location("a.neon")
    peer.remote.write(".b.neon.1234.partial", b"half")  # a killed push's
    await write(loc, b"aaa")
    await write(peer.location("c d.neon"), b"cc")
    listed = await loc.store.list()
    assert [(o.name, o.size) for o in listed] == [("a.neon", 3), ("c d.neon", 2)]


KILLED_WRITER = """
import asyncio, os, signal, sys
from cli.transport import parse_location

async def main():
    loc = parse_location(sys.argv[1])
    w = await loc.store.open_write(loc.name, overwrite=False)
    for _ in range(4):
        await w.write(os.urandom(1 << 20))
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def test_killed_writer_leaves_nothing_visible(peer: Peer) -> None:
    loc = peer.location("x.neon")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, peer.url("x.neon")], env=env, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL
    assert not peer.remote.exists("x.neon")
    # At most a hidden temporary file, which no listing shows.
    assert all(name.startswith(".") for name in peer.remote.entries())
    assert asyncio.run(loc.store.list()) == []
