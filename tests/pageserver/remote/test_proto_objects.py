"""A pageserver as another's bucket: ProtoObjectStore against a real ProtoServer on loopback
serving the pageserver's blob.* methods (pageserver/remote/object_service.py) over files in a
temporary directory: the S3 operations' semantics, refusals, and TLS."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from pageserver.remote.object_service import blob_handlers
from pageserver.remote.objects import NoSuchObject, PreconditionFailed, open_bucket
from pageserver.remote.proto_objects import PAGESERVER_NAME, ProtoObjectStore
from pageserver.remote.settings import RemoteSettings
from proto.errors import AuthFailed, InvalidArgument, Unavailable
from proto.server import ProtoServer
from tests.tls import self_signed

TOKEN = "blob-token"


@asynccontextmanager
async def serving(
    root: Path, name: str = f"{PAGESERVER_NAME} test", tls: ssl.SSLContext | None = None
) -> AsyncIterator[int]:
    server = ProtoServer(blob_handlers(root), token=TOKEN, server_name=name)
    await server.start("127.0.0.1", 0, ssl=tls)
    try:
        yield server.port
    finally:
        await server.close()


def settings(tmp_path: Path, port: int, token: str = TOKEN, **kw: object) -> RemoteSettings:
    token_file = tmp_path / f"token-{token}"
    token_file.write_text(token + "\n")
    return RemoteSettings(
        "zcloud", "", "team", f"neon://127.0.0.1:{port}", secret_file=str(token_file),
        kind="remote", **kw,  # type: ignore[arg-type]
    )  # fmt: skip


async def test_the_bucket_operations_over_proto(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    async with serving(root) as port:
        s = settings(tmp_path, port)
        store = open_bucket(s)
        assert isinstance(store, ProtoObjectStore)
        big = bytes(range(256)) * 12_000  # several upload chunks
        async with store:
            assert await store.get_if_exists(s.key("pitr/a/index.json")) is None
            assert await store.size(s.key("pitr/a/index.json")) is None
            await store.put(s.key("pitr/a/objects/l1"), big)
            await store.put(s.key("pitr/a/index.json"), b"{}")
            await store.put(s.key("pitr/b/lease.json"), b"L", if_absent=True)
            with pytest.raises(PreconditionFailed):
                await store.put(s.key("pitr/b/lease.json"), b"M", if_absent=True)
            assert await store.get(s.key("pitr/a/objects/l1")) == big
            # A ranged get (WAL blocks: pageserver/remote/wal_blocks.py), across a chunk
            # and past the end.
            l1 = s.key("pitr/a/objects/l1")
            assert await store.get_range(l1, 1000, (1 << 20) + 7) == big[1000 : (1 << 20) + 7]
            assert await store.get_range(l1, len(big) - 3, len(big) + 10) == big[-3:]
            assert await store.size(s.key("pitr/a/objects/l1")) == len(big)
            assert await store.list_dirs(s.key("pitr") + "/") == ["a", "b"]
            keys = [k async for k in store.list_keys(s.key("pitr/a"))]
            assert keys == [("team/pitr/a/index.json", 2), ("team/pitr/a/objects/l1", len(big))]
            await store.delete(s.key("pitr/a/objects/l1"))
            await store.delete(s.key("pitr/a/objects/l1"))  # gone already: as S3, no error
            # A key it does not hold: NoSuchObject, as an S3 bucket's NoSuchKey (a reader of a
            # live area reads the index again on it: pageserver/remote/mirror.py).
            with pytest.raises(NoSuchObject):
                await store.get(s.key("pitr/a/objects/l1"))
            with pytest.raises(NoSuchObject):
                await store.get_range(s.key("pitr/a/objects/l1"), 0, 10)
            assert await store.get_if_exists(s.key("pitr/a/objects/l1")) is None
            assert await store.get(s.key("pitr/b/lease.json")) == b"L"  # not replaced
            for bad in ("team/../x", "/etc/passwd", "team/.hidden", "team//x"):
                with pytest.raises(InvalidArgument):
                    await store.put(bad, b"x")
        assert (root / "team" / "pitr" / "a" / "index.json").read_bytes() == b"{}"
        assert not (tmp_path / "x").exists()


async def test_only_an_index_or_a_lease_is_written_conditionally(tmp_path: Path) -> None:
    """Review L2 (session 25): checking an object's version hashes its stored bytes under the
    lock every index and lease write takes, so a token holder naming a large layer in a
    conditional put stalled them all. A condition on any other object is refused before
    anything is read or written. Fails where the layer was hashed and replaced."""
    root = tmp_path / "objects"
    async with serving(root) as port:
        s = settings(tmp_path, port)
        layer = s.key("pitr/a/objects/l1")
        big = bytes(range(256)) * 12_000
        async with open_bucket(s) as store:
            version = await store.put(layer, big)
            with pytest.raises(InvalidArgument, match="only an index or a lease"):
                await store.put(layer, b"other", if_match=version)
            with pytest.raises(InvalidArgument, match="cannot be written conditionally"):
                await store.put(s.key("pitr/a/objects/l2"), b"new", if_absent=True)
            assert await store.get(layer) == big
            assert await store.get_if_exists(s.key("pitr/a/objects/l2")) is None
            # The index and the lease keep their fence (the probe beside the index too).
            first = await store.put(s.key("pitr/a/index.json"), b"{}", if_absent=True)
            await store.put(s.key("pitr/a/index.json"), b"{ }", if_match=first)
            await store.put(s.key("pitr/a/lease.json"), b"L", if_absent=True)
            assert [k async for k in store.list_keys(s.key("pitr/a"))] == [
                (s.key("pitr/a/index.json"), 3),
                (s.key("pitr/a/lease.json"), 1),
                (layer, len(big)),
            ]


async def test_a_wrong_token_and_a_server_that_is_no_pageserver_are_refused(
    tmp_path: Path,
) -> None:
    async with (
        serving(tmp_path / "objects") as port,
        open_bucket(settings(tmp_path, port, token="wrong")) as store,
    ):
        with pytest.raises(AuthFailed, match="wrong token"):
            await store.size("team/x")
    async with (
        serving(tmp_path / "objects", name="neon snapshot serve") as port,
        open_bucket(settings(tmp_path, port)) as store,
    ):
        with pytest.raises(InvalidArgument, match="not a pageserver"):
            await store.size("team/x")


async def test_tls_verified_against_the_given_certificate(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with serving(tmp_path / "objects", tls=context) as port:
        async with open_bucket(settings(tmp_path, port, tls=True, ca_file=str(cert))) as store:
            await store.put("team/x", b"over tls")
            assert await store.get("team/x") == b"over tls"
        async with open_bucket(settings(tmp_path, port, tls=True)) as store:  # system CAs
            with pytest.raises(AuthFailed, match="does not verify"):
                await store.size("team/x")
        async with open_bucket(settings(tmp_path, port)) as store:  # plain to a TLS port
            with pytest.raises(Unavailable, match="tls=on"):
                await store.size("team/x")
