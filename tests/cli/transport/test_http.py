"""http(s):// against a real aiohttp server on 127.0.0.1: a cut download resumes through Range,
refusals are one line naming the URL with its secrets masked, a refused upload leaves
nothing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.snapshot_file_source import snapshots_in
from cli.transport import base, http, parse_location
from cli.transport.base import StreamCut, read_object
from cli.transport.http import INDEX_NAME, HttpStore
from proto.errors import AuthFailed, InvalidArgument, NotFound, Unavailable
from tests.cli.transport.conftest import S3Bucket, entries
from tests.httpd import FileServer, file_server
from tests.pgtest import free_port

DATA = os.urandom(2 * 1024 * 1024 + 7)


def test_urls() -> None:
    loc = parse_location("https://me:s3cret@host.example:8443/a%20dir/x%40y.neon?sig=abc")
    assert isinstance(loc.store, HttpStore) and loc.name == "x@y.neon"
    assert loc.url == "https://me:****@host.example:8443/a%20dir/x%40y.neon?****"
    directory = parse_location("http://host/snaps/")
    assert directory.name is None
    assert directory.named("p@s.neon").url == "http://host/snaps/p%40s.neon"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://host:123456/x.neon", "bad port"),
        ("http:///x.neon", "no host"),
        ("http://me:s3cret@/x.neon", "no host"),
        ("http://host/x.neon#frag", "fragment"),
    ],
)
def test_malformed_urls_are_one_line(url: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as raised:
        parse_location(url)
    assert "s3cret" not in str(raised.value) and "\n" not in str(raised.value)


async def test_cut_download_resumes_with_range(httpd: FileServer, remote_dir: Path) -> None:
    (remote_dir / "x.neon").write_bytes(DATA)
    httpd.cut_gets.extend([100_000, 700_000])
    seen: list[tuple[int, int | None]] = []
    got = b"".join(
        [
            c
            async for c in read_object(
                parse_location(httpd.url("x.neon")), lambda d, t: seen.append((d, t))
            )
        ]
    )
    assert got == DATA
    gets = [(r[0], r[2]) for r in httpd.requests if r[0] == "GET"]
    assert gets == [("GET", None), ("GET", "bytes=100000-"), ("GET", "bytes=800000-")]
    assert seen[-1] == (len(DATA), len(DATA))


async def test_too_many_cuts_give_up(
    httpd: FileServer, remote_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(base, "REOPEN_DELAY", 0.01)
    (remote_dir / "x.neon").write_bytes(DATA)
    httpd.cut_gets.extend([10] * (base.REOPEN_ATTEMPTS + 1))
    with pytest.raises(StreamCut, match=r"x\.neon: the download was cut after \d+ bytes"):
        async for _ in read_object(parse_location(httpd.url("x.neon"))):
            pass
    assert len([r for r in httpd.requests if r[0] == "GET"]) == base.REOPEN_ATTEMPTS + 1


@pytest.fixture
def httpd_auth(remote_dir: Path) -> Iterator[FileServer]:
    with file_server(remote_dir, auth=("me", "s3cret")) as server:
        yield server


async def test_basic_auth_and_masked_refusal(httpd_auth: FileServer, remote_dir: Path) -> None:
    (remote_dir / "x.neon").write_bytes(b"data")
    server = httpd_auth
    good = parse_location(server.url("x.neon"))
    assert b"".join([c async for c in read_object(good)]) == b"data"
    bad = parse_location(server.url("x.neon").replace("s3cret", "wrong"))
    with pytest.raises(AuthFailed, match=r"me:\*\*\*\*@127\.0\.0\.1.*HTTP 401") as raised:
        await bad.store.stat("x.neon")
    assert "wrong" not in str(raised.value)
    with pytest.raises(AuthFailed, match="HTTP 401"):
        async with await bad.store.open_write("y.neon", overwrite=False) as w:
            await w.write(DATA)
    assert entries(remote_dir) == ["x.neon"]


@pytest.mark.parametrize(
    ("status", "error", "message"),
    [
        (507, Unavailable, "no space left"),
        (403, AuthFailed, "refused access"),
        (405, InvalidArgument, "does not accept PUT"),
        (404, NotFound, "no such file"),
    ],
)
async def test_refused_upload_leaves_nothing(
    httpd: FileServer, remote_dir: Path, status: int, error: type[Exception], message: str
) -> None:
    httpd.refuse_puts = status
    loc = parse_location(httpd.url("x.neon"))
    with pytest.raises(error, match=message):
        async with await loc.store.open_write("x.neon", overwrite=False) as w:
            for i in range(0, len(DATA), 1 << 20):
                await w.write(DATA[i : i + (1 << 20)])
    assert entries(remote_dir) == []


async def test_presigned_url_is_masked_and_not_probed(httpd: FileServer) -> None:
    loc = parse_location(httpd.url("x.neon") + "?X-Amz-Signature=abcdef")
    assert loc.url.endswith("/x.neon?****")
    assert await loc.store.stat("x.neon") is None
    assert httpd.requests == []  # signed for one method: no HEAD


async def test_unreachable_server() -> None:
    url = f"http://127.0.0.1:{free_port()}/x.neon"
    loc = parse_location(url)
    with pytest.raises(Unavailable, match=rf"cannot download {url}"):
        async for _ in read_object(loc):
            pass
    with pytest.raises(Unavailable, match=rf"cannot upload to {url}"):
        async with await loc.store.open_write("x.neon", overwrite=False) as w:
            await w.write(b"x")


async def write_all(location_url: str, data: bytes = DATA) -> None:
    loc = parse_location(location_url)
    async with await loc.store.open_write(loc.object_name, overwrite=False) as w:
        for i in range(0, len(data), 1 << 20):
            await w.write(data[i : i + (1 << 20)])


async def test_presigned_urls_are_sent_with_their_size(httpd: FileServer, remote_dir: Path) -> None:
    """A server that refuses a chunked PUT as S3 does (501 NotImplemented): a plain URL is one
    line saying so (nothing kept); a presigned URL is spooled and sent with Content-Length."""
    httpd.refuse_chunked = True
    with pytest.raises(
        InvalidArgument, match=r"refuses a streamed \(chunked\) upload \(HTTP 501\)"
    ):
        await write_all(httpd.url("x.neon"))
    assert entries(remote_dir) == [] and httpd.put_lengths == [None]
    await write_all(httpd.url("x.neon") + "?X-Amz-Signature=abcdef&X-Amz-Expires=60")
    assert (remote_dir / "x.neon").read_bytes() == DATA
    assert httpd.put_lengths == [None, str(len(DATA))]
    assert entries(remote_dir) == ["x.neon"]  # a signature covers one object: no index


async def test_push_to_a_moto_presigned_put_url(s3_bucket: S3Bucket) -> None:
    """A presigned PutObject URL of a real S3 endpoint (moto), as `aws s3 presign` or boto3
    makes one: the object arrives whole; the URL's signature never shows."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3", endpoint_url=s3_bucket.moto.endpoint, config=Config(signature_version="s3v4")
    )
    url = client.generate_presigned_url(
        "put_object", Params={"Bucket": s3_bucket.bucket, "Key": "snaps/x.neon"}, ExpiresIn=300
    )
    assert "X-Amz-Signature=" in url
    loc = parse_location(url)
    assert loc.url.endswith("/snaps/x.neon?****")
    with pytest.raises(InvalidArgument, match="names one object"):
        await loc.store.list()
    await write_all(url)
    assert s3_bucket.read("x.neon") == DATA


async def test_a_plain_server_keeps_an_index_of_what_was_written(
    httpd: FileServer, remote_dir: Path
) -> None:
    """No listing in plain HTTP: the store keeps `neon-index.json` (name, size of each object
    written, as neon:// lists them); a delete takes its object out."""
    store = parse_location(httpd.url("")).store
    assert await store.list() == []
    await write_all(httpd.url("a.neon"), b"a" * 10)
    await write_all(httpd.url("b.neon"))
    assert json.loads((remote_dir / INDEX_NAME).read_bytes()) == [
        {"name": "a.neon", "size": 10},
        {"name": "b.neon", "size": len(DATA)},
    ]
    assert [(i.name, i.size) for i in await store.list()] == [("a.neon", 10), ("b.neon", len(DATA))]
    await store.delete("a.neon")
    assert [i.name for i in await store.list()] == ["b.neon"]


async def test_a_server_that_keeps_the_index_itself_is_not_asked_for_it(
    httpd: FileServer, remote_dir: Path
) -> None:
    """A PUT answered with `X-Neon-Index: live` (a `recv --http`, whose one-time token that
    PUT used up) is the end of the write: no GET of the index with the used token (which the
    receiver refused and logged after every push, review M2), no index written."""
    httpd.live_index = True
    await write_all(httpd.url("a.neon"))
    assert entries(remote_dir) == ["a.neon"]
    assert [(method, name) for method, name, _ in httpd.requests] == [("PUT", "a.neon")]


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"<!doctype html><html><body>Welcome</body></html>", "Expecting value"),
        (b'{"not": "a list"}', "not a list"),
        (b'[{"name": "a.neon", "size": true}]', "described an object as"),
        (b'[{"name": "a.neon", "size": -1}]', "described an object as"),
        (b"[" + b" " * 300 + b"]", "over 256 bytes"),
    ],
)
async def test_a_foreign_file_at_the_index_name_is_no_listing(
    httpd: FileServer, remote_dir: Path, monkeypatch: pytest.MonkeyPatch, body: bytes, why: str
) -> None:
    """What a server answers at `neon-index.json` that is not an index (a catch-all page, a
    stray file, one too long to hold) is no listing, as a server without one (review M1): the
    push's destination() sends the whole file (InvalidArgument, where CorruptData failed the
    push), and a write leaves that file as it was."""
    monkeypatch.setattr(http, "INDEX_LIMIT", 256)
    (remote_dir / INDEX_NAME).write_bytes(body)
    store = parse_location(httpd.url("")).store
    with pytest.raises(InvalidArgument, match=rf"cannot list the files: .*{INDEX_NAME}.*{why}"):
        await snapshots_in(store)
    await write_all(httpd.url("a.neon"), b"a" * 10)
    assert (remote_dir / "a.neon").read_bytes() == b"a" * 10
    assert (remote_dir / INDEX_NAME).read_bytes() == body
