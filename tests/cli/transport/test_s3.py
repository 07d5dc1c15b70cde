"""s3:// against moto's S3 server on 127.0.0.1 through aiobotocore: a multipart upload with
parallel parts reads back equal and appears only when complete, an abort or a kill leaves no
object (and an abort no pending upload), an object written meanwhile is never replaced, a cut
download resumes through Range, and bad credentials, a missing bucket, an unreachable endpoint
and malformed URLs are one line each."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import cli.home
from cli.context import App
from cli.home import NeonHome
from cli.snapshot_file_source import snapshots_in
from cli.snapshot_transfer import parse_transfer_url
from cli.transport import base, parse_location, s3
from cli.transport.base import Location, ObjectInfo, read_object
from cli.transport.s3 import S3Store, S3Writer
from proto.errors import AlreadyExists, AuthFailed, InvalidArgument, NotFound, Unavailable
from snapfile.writer import write_snapshot_file
from tests.cli.transport.conftest import SMALL_PART, S3Bucket
from tests.pgtest import free_port, pg_reachable_tmpdir
from tests.s3d import cutting_proxy
from tests.snapfile.snapfile_helpers import generated_bytes, make_manifest

DATA = os.urandom(5 * SMALL_PART + 123)  # six parts, the last a short one


def store_of(url: str) -> tuple[S3Store, str | None]:
    loc = parse_location(url)
    assert isinstance(loc.store, S3Store)
    return loc.store, loc.name


@pytest.mark.parametrize(
    ("url", "bucket", "prefix", "name"),
    [
        ("s3://my-bucket/snaps/daily/p@s.neon", "my-bucket", "snaps/daily/", "p@s.neon"),
        ("S3://my-bucket/x.neon", "my-bucket", "", "x.neon"),
        ("s3://my-bucket", "my-bucket", "", None),
        ("s3://my-bucket/", "my-bucket", "", None),
        ("s3://my-bucket/snaps/", "my-bucket", "snaps/", None),
        ("s3://my-bucket/a b/c%20d.neon", "my-bucket", "a b/", "c%20d.neon"),  # keys as typed
    ],
)
def test_urls(url: str, bucket: str, prefix: str, name: str | None) -> None:
    store, got = store_of(url)
    assert (store.bucket, store.prefix, got) == (bucket, prefix, name)


def test_url_of_a_pushed_snapshot() -> None:
    loc = parse_location("s3://my-bucket/snaps/").named("pgdata1@snap1.neon")
    assert loc.url == "s3://my-bucket/snaps/pgdata1@snap1.neon"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://", "no bucket"),
        ("s3:///x.neon", "no bucket"),
        ("s3://key:s3cret@my-bucket/x.neon", "no credentials or port"),
        ("s3://my-bucket:9000/x.neon", "no credentials or port"),
        ("s3://My_Bucket/x.neon", "invalid s3 bucket name 'My_Bucket'"),
        ("s3://my-bucket//x.neon", "empty path segment"),
        ("s3://my-bucket/a//x.neon", "empty path segment"),
        ("s3://my-bucket/dir/.hidden", "invalid object name"),
        ("s3://my-bucket/x\n.neon", "control character"),
    ],
)
def test_malformed_urls_are_one_line(url: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as raised:
        parse_location(url)
    text = str(raised.value)
    assert text.startswith("invalid ") and "s3cret" not in text and "\n" not in text


async def write(location: Location, data: bytes, *, overwrite: bool = False) -> None:
    name = location.object_name
    async with await location.store.open_write(name, overwrite=overwrite) as w:
        for i in range(0, len(data), 64 * 1024):
            await w.write(data[i : i + 64 * 1024])


async def read_all(location: Location) -> bytes:
    return b"".join([c async for c in read_object(location)])


async def test_multipart_upload_with_parallel_parts(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_flight = most = 0
    upload_part = S3Writer._upload_part

    async def counted(self: S3Writer, number: int, body: bytes) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await upload_part(self, number, body)
        finally:
            in_flight -= 1

    monkeypatch.setattr(S3Writer, "_upload_part", counted)
    loc = parse_location(s3_bucket.url("x.neon"))
    await write(loc, DATA)
    assert most == s3.PARTS_IN_FLIGHT == 3  # parts upload side by side, never more
    head = s3_bucket.moto.client().head_object(Bucket=s3_bucket.bucket, Key="snaps/x.neon")
    assert head["ETag"].endswith('-6"')  # a multipart object of six parts
    assert await read_all(loc) == DATA
    assert s3_bucket.read("x.neon") == DATA and s3_bucket.pending_uploads() == []


async def test_parts_grow(s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3, "PART_GROWTH_EVERY", 2)
    loc = parse_location(s3_bucket.url("x.neon"))
    await write(loc, DATA)  # 1, 1, 2 then the last 1.x parts of SMALL_PART
    head = s3_bucket.moto.client().head_object(Bucket=s3_bucket.bucket, Key="snaps/x.neon")
    assert head["ETag"].endswith('-4"')
    assert await read_all(loc) == DATA


async def test_object_appears_only_when_complete_and_abort_leaves_nothing(
    s3_bucket: S3Bucket,
) -> None:
    loc = parse_location(s3_bucket.url("x.neon"))
    with pytest.raises(RuntimeError):
        async with await loc.store.open_write("x.neon", overwrite=False) as w:
            await w.write(DATA[: 4 * SMALL_PART])
            await asyncio.sleep(0.2)  # parts uploaded, or uploading
            assert s3_bucket.pending_uploads() == ["snaps/x.neon"]
            assert s3_bucket.keys() == []  # not visible before CompleteMultipartUpload
            raise RuntimeError("the export failed")
    assert s3_bucket.keys() == [] and s3_bucket.pending_uploads() == []


@pytest.mark.parametrize("size", [100, len(DATA)], ids=["one-put", "multipart"])
async def test_object_written_meanwhile_is_never_replaced(s3_bucket: S3Bucket, size: int) -> None:
    """The HEAD before the upload passed; another writer's object appeared since: the final
    request's If-None-Match refuses to replace it."""
    loc = parse_location(s3_bucket.url("x.neon"))
    with pytest.raises(AlreadyExists, match=r"s3://.*/snaps/x\.neon already exists; .*--force"):
        async with await loc.store.open_write("x.neon", overwrite=False) as w:
            s3_bucket.write("x.neon", b"theirs")
            await w.write(DATA[:size])
    assert s3_bucket.read("x.neon") == b"theirs" and s3_bucket.pending_uploads() == []


async def test_cut_download_resumes_with_range(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(base, "REOPEN_DELAY", 0.01)
    s3_bucket.write("x.neon", DATA)
    with cutting_proxy(s3_bucket.moto.endpoint) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
        proxy.cut_gets.extend([100_000, 300_000])
        seen: list[tuple[int, int | None]] = []
        loc = parse_location(s3_bucket.url("x.neon"))
        got = b"".join([c async for c in read_object(loc, lambda d, t: seen.append((d, t)))])
    assert got == DATA
    assert proxy.ranges[0] is None and len(proxy.ranges) == 3
    offsets = [int(r.removeprefix("bytes=").removesuffix("-")) for r in proxy.ranges[1:] if r]
    assert 0 < offsets[0] < 100_000 < offsets[1] < 400_000  # resumed where each cut came
    assert seen[-1] == (len(DATA), len(DATA))


async def test_read_from_any_offset(s3_bucket: S3Bucket) -> None:
    s3_bucket.write("x.neon", DATA)
    store, name = store_of(s3_bucket.url("x.neon"))
    assert name is not None
    for offset in (1, len(DATA) - 1, len(DATA)):
        async with await store.open_read(name, offset) as r:
            assert (b"".join([c async for c in r]), r.size) == (DATA[offset:], len(DATA))


async def test_bad_credentials_are_one_line(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    import moto.settings

    s3_bucket.write("x.neon", b"data")
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # keys are checked
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    loc = parse_location(s3_bucket.url("x.neon"))
    for attempt in (loc.store.stat("x.neon"), read_all(loc), write(loc, b"new")):
        with pytest.raises(AuthFailed, match=r"S3 refused access \(.*\); check AWS_ACC") as err:
            await attempt
        text = str(err.value)
        assert s3_bucket.url("x.neon") in text and "\n" not in text and "wrong" not in text
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
    assert s3_bucket.read("x.neon") == b"data" and s3_bucket.pending_uploads() == []


async def test_no_credentials_is_one_line(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(AuthFailed, match="no AWS credentials; set AWS_ACCESS_KEY_ID"):
        await parse_location(s3_bucket.url("x.neon")).store.stat("x.neon")


async def test_missing_bucket_is_one_line(s3_bucket: S3Bucket) -> None:
    loc = parse_location("s3://neon-no-such-bucket/snaps/x.neon")
    message = r"S3 bucket neon-no-such-bucket does not exist \(NoSuchBucket\)"
    for attempt in (read_all(loc), loc.store.list(), write(loc, DATA)):
        with pytest.raises(NotFound, match=message) as err:
            await attempt
        assert "\n" not in str(err.value)


async def test_missing_object(s3_bucket: S3Bucket) -> None:
    loc = parse_location(s3_bucket.url("gone.neon"))
    with pytest.raises(NotFound, match=r"snaps/gone\.neon: no such object in S3"):
        await read_all(loc)
    with pytest.raises(NotFound, match=r"snaps/gone\.neon: no such object in S3"):
        await loc.store.delete("gone.neon")


async def test_unreachable_endpoint(s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    loc = parse_location(s3_bucket.url("x.neon"))
    with pytest.raises(Unavailable, match=r"cannot reach s3://.*x\.neon: .*connect") as err:
        await loc.store.stat("x.neon")
    assert "\n" not in str(err.value)


async def test_list_is_one_level_under_the_prefix(s3_bucket: S3Bucket) -> None:
    for name in ("a.neon", "sub/b.neon", ".c.neon"):
        s3_bucket.write(name, b"xx")
    s3_bucket.moto.client().put_object(Bucket=s3_bucket.bucket, Key="snapsy.neon", Body=b"")
    listed = await parse_location(s3_bucket.url("")).store.list()
    assert [(o.name, o.size) for o in listed] == [("a.neon", 2)]


KILLED_WRITER = """
import asyncio, os, signal, sys
from cli.transport import parse_location, s3

async def main():
    s3.PART_SIZE = 256 * 1024
    loc = parse_location(sys.argv[1])
    w = await loc.store.open_write(loc.name, overwrite=False)
    for _ in range(4):
        await w.write(os.urandom(256 * 1024))
    await asyncio.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def test_killed_writer_leaves_an_invisible_pending_upload(s3_bucket: S3Bucket) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[3])}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, s3_bucket.url("x.neon")], env=env, timeout=60
    )
    assert proc.returncode == -signal.SIGKILL
    assert s3_bucket.keys() == []
    assert s3_bucket.pending_uploads() == ["snaps/x.neon"]  # for a lifecycle rule to remove


@pytest.fixture
def app() -> Iterator[App]:
    """A NEON_HOME of its own (no server in it)."""
    base = pg_reachable_tmpdir("neon-s3-")
    try:
        yield App.open(base / "home")
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def test_endpoint_url_option(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch, app: App
) -> None:
    monkeypatch.setattr(s3, "_settings", s3.S3Settings())  # restored after the test
    with pytest.raises(InvalidArgument, match=r"invalid --endpoint-url 'ftp://h'"):
        parse_transfer_url(app, s3_bucket.url("x.neon"), "ftp://h")
    with pytest.raises(InvalidArgument, match=r"--endpoint-url is for s3:// URLs, not /tmp/x"):
        parse_transfer_url(app, "/tmp/x.neon", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # overridden
    loc = parse_transfer_url(app, s3_bucket.url("x.neon"), s3_bucket.moto.endpoint)
    await write(loc, b"via --endpoint-url")
    assert s3_bucket.read("x.neon") == b"via --endpoint-url"


async def test_requests_share_one_session(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request of a process goes through one aiobotocore session (a new one per request
    loaded botocore's S3 model again, 0.15-0.2 s each), and another AWS environment gets a
    session of its own (a session reads the credentials once)."""
    monkeypatch.setattr(s3, "_SESSIONS", {})
    store = parse_location(s3_bucket.url("x.neon")).store
    async with await store.open_write("x.neon", overwrite=False) as writer:
        await writer.write(b"z" * 1000)
    assert await store.stat("x.neon") is not None
    assert [o.name for o in await store.list()] == ["x.neon"]
    assert len(s3._SESSIONS) == 1
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another")
    assert await store.stat("x.neon") is not None  # (moto checks no signature)
    assert len(s3._SESSIONS) == 2


def _neon_file(lsn: int, size: int) -> bytes:
    out = io.BytesIO()
    write_snapshot_file(out, make_manifest(lsn=lsn), [generated_bytes(size, lsn % 1000)])
    return out.getvalue()


async def test_a_push_asks_its_questions_at_once(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stat before a push sends, at once, the requests the push makes next (the listing,
    each `.neon` head, the pending uploads): the listing, the manifest reads and the
    resumable open after it send none of them again, their answers are those of the plain
    calls, and each answer is used once."""
    monkeypatch.setattr(s3, "_SESSIONS", {})
    plain_client = s3_bucket.moto.client()
    files = {"a.neon": _neon_file(0x1_0000_0000, 9000), "b.neon": _neon_file(0x2_0000_0000, 5)}
    for name, data in {**files, "notes.txt": b"x"}.items():
        plain_client.put_object(Bucket=s3_bucket.bucket, Key=s3_bucket.prefix + name, Body=data)
    store = parse_location(s3_bucket.url("c.neon")).store
    plain = parse_location(s3_bucket.url("c.neon")).store
    expected_list = await plain.list()
    expected = await snapshots_in(plain)
    assert sorted(expected) == ["a.neon", "b.neon"]
    sent: list[str] = []
    s3._session().register(
        "before-send.s3", lambda event_name, **_: sent.append(event_name.rsplit(".", 1)[1])
    )
    assert await store.stat("c.neon") is None
    assert sorted(sent) == ["GetObject", "GetObject", "HeadObject", "ListMultipartUploads",
                            "ListObjectsV2"]  # fmt: skip
    sent.clear()
    assert await snapshots_in(store) == expected
    assert sent == []
    data = _neon_file(0x3_0000_0000, 100_000)
    assert len(data) < SMALL_PART  # a delta: one PutObject, no multipart upload begun and aborted
    async with await store.open_resumable("c.neon", overwrite=False) as writer:
        await writer.write(data)
    assert sent == ["PutObject"]
    assert s3_bucket.read("c.neon") == data
    sent.clear()
    again = sorted([*expected_list, ObjectInfo("c.neon", len(data))], key=lambda o: o.name)
    assert await store.list() == again  # used once: asked again
    assert sent == ["ListObjectsV2"]
    # The object now exists: a resumable open after a stat is refused as a HEAD refuses it.
    await store.stat("c.neon")
    with pytest.raises(AlreadyExists):
        await store.open_resumable("c.neon", overwrite=False)


async def test_a_push_of_parts_after_its_stat_begins_the_upload_with_its_first_part(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the stat of a push no upload is begun at the open (the stat found the bucket):
    a stream of whole parts begins it with the first part and completes it."""
    monkeypatch.setattr(s3, "_SESSIONS", {})
    store = parse_location(s3_bucket.url("d.neon")).store
    sent: list[str] = []
    s3._session().register(
        "before-send.s3", lambda event_name, **_: sent.append(event_name.rsplit(".", 1)[1])
    )
    assert await store.stat("d.neon") is None
    sent.clear()
    data = os.urandom(2 * SMALL_PART + 1000)
    async with await store.open_resumable("d.neon", overwrite=False) as writer:
        assert sent == []
        await writer.write(data)
    assert sent[0] == "CreateMultipartUpload" and sent[-1] == "CompleteMultipartUpload"
    assert sorted(sent[1:-1]) == ["UploadPart"] * 3
    assert s3_bucket.read("d.neon") == data and s3_bucket.pending_uploads() == []


def test_plain_http_endpoints_need_no_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """The endpoint a client reaches over plain http (where it needs no CA bundle): the given
    one, else the environment's as botocore picks it; none for https or ignored endpoints."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(s3, "_SESSIONS", {})
    assert s3._http_endpoint("http://minio:9000") == "http://minio:9000"
    # Through a proxy (maybe https) the endpoint's verify setting is the proxy's: kept on.
    monkeypatch.setenv("HTTP_PROXY", "https://proxy:3128")
    assert s3._http_endpoint("http://minio:9000") is None
    monkeypatch.setenv("NO_PROXY", "minio")
    assert s3._http_endpoint("http://minio:9000") == "http://minio:9000"
    monkeypatch.delenv("HTTP_PROXY")
    monkeypatch.delenv("NO_PROXY")
    assert s3._http_endpoint("https://minio:9000") is None
    assert s3._http_endpoint(None) is None  # AWS itself
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://a:1")
    monkeypatch.setattr(s3, "_SESSIONS", {})
    assert s3._http_endpoint(None) == "http://a:1"
    assert s3._http_endpoint("https://given") is None
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3only")  # botocore's first choice
    monkeypatch.setattr(s3, "_SESSIONS", {})
    assert s3._http_endpoint(None) is None
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "true")
    monkeypatch.setattr(s3, "_SESSIONS", {})
    assert s3._http_endpoint(None) is None


async def test_clients_load_models_without_scanning_every_service(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client and its requests load S3's models from S3's own directory: botocore's loader
    scanned the directories of all ~440 services once per model type (~24 ms of a push's
    CPU) to check the name. The models are those botocore's own loader gives, and a service
    botocore does not know is still refused by botocore."""
    from botocore.exceptions import UnknownServiceError
    from botocore.loaders import Loader, create_loader

    scans: list[str] = []
    plain_scan = Loader.list_available_services

    def counted_scan(self: Loader, type_name: str) -> list[str]:
        scans.append(type_name)
        return list(plain_scan(self, type_name))

    monkeypatch.setattr(Loader, "list_available_services", counted_scan)
    monkeypatch.setattr(s3, "_SESSIONS", {})
    store = parse_location(s3_bucket.url("x.neon")).store
    assert await store.stat("x.neon") is None
    assert await store.list() == []
    assert scans == []
    assert isinstance(s3._session().get_component("data_loader"), s3._service_loader_class())
    loader = s3._data_loader(s3._session())  # fresh: a client's handlers change what it loaded
    for type_name in ("service-2", "endpoint-rule-set-1", "paginators-1", "waiters-2"):
        model = loader.load_service_model("s3", type_name)
        assert loader.load_service_model("s3", type_name, "2006-03-01") == model
        assert scans == []
        assert model == create_loader().load_service_model("s3", type_name), type_name
        scans.clear()
    with pytest.raises(UnknownServiceError):
        loader.load_service_model("no-such-service", "service-2")


async def test_preloaded_models_serve_every_session_s_client(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After `preload_models` (the warm server's, before it forks) a session's client and a
    push's requests read no model file: a warm child's first client parsed S3's models and
    botocore's shared data again (~35 ms of its CPU)."""
    from botocore.loaders import JSONFileLoader

    monkeypatch.setattr(s3, "_LOADERS", {})
    monkeypatch.setattr(s3, "_SESSIONS", {})
    s3.preload_models()
    read: list[str] = []
    plain_load = JSONFileLoader.load_file

    def counted_load(self: JSONFileLoader, file_path: str) -> object:
        data = plain_load(self, file_path)
        if data is not None:  # (a model's optional extras are looked for, none found)
            read.append(file_path)
        return data

    monkeypatch.setattr(JSONFileLoader, "load_file", counted_load)
    store = parse_location(s3_bucket.url("x.neon")).store
    async with await store.open_write("x.neon", overwrite=False) as writer:
        await writer.write(b"z" * 1000)
    assert await store.stat("x.neon") is not None
    assert [o.name for o in await store.list()] == ["x.neon"]
    assert read == []
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another")  # another session, the same loader
    assert await store.stat("x.neon") is not None
    assert len(s3._SESSIONS) == 2 and read == []


async def test_a_push_s_stat_and_upload_share_one_client(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stat of a push (`stat_for_write`) keeps its client for the upload that follows
    (a second client cost ~5 ms of CPU and ~4 ms more for its first request); a client no
    upload took is closed by `close`, and a plain stat keeps none."""
    made: list[object] = []
    plain_client = S3Store.client

    def counted(self: S3Store) -> object:
        made.append(self)
        return plain_client(self)

    monkeypatch.setattr(S3Store, "client", counted)
    store, _ = store_of(s3_bucket.url("c.neon"))
    assert await store.stat_for_write("c.neon") is None
    async with await store.open_resumable("c.neon", overwrite=False) as writer:
        await writer.write(b"delta" * 1000)
    await store.close()
    assert len(made) == 1
    assert s3_bucket.read("c.neon") == b"delta" * 1000
    assert await store.stat_for_write("d.neon") is None
    assert store._client_kept is not None
    await store.close()
    assert store._client_kept is None and len(made) == 2
    assert await store.stat("d.neon") is None
    assert store._client_kept is None
    with pytest.raises(AlreadyExists):
        assert await store.stat_for_write("c.neon") is not None
        await store.open_resumable("c.neon", overwrite=False)
    await store.close()


def _home_recording_requests(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[NeonHome, list[str]]:
    """A home in use (as a command's) and the list the S3 requests sent from now on go to."""
    monkeypatch.setattr(s3, "_SESSIONS", {})
    home = NeonHome(tmp_path / "home")
    home.root.mkdir()
    monkeypatch.setattr(cli.home, "_current", home)
    sent: list[str] = []
    s3._session().register(
        "before-send.s3", lambda event_name, **_: sent.append(event_name.rsplit(".", 1)[1])
    )
    return home, sent


async def test_a_push_reads_no_head_it_wrote_or_read_before(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """In a home, the heads of `.neon` objects this home wrote (whole or in parts) or read are
    remembered with their size and ETag: a later probe reads only the objects it does not
    know or that changed, finds the same manifests as the plain reads, and forgets the
    objects no longer listed. The cache is private; one that cannot be read is as none."""
    home, sent = _home_recording_requests(monkeypatch, tmp_path)
    store = parse_location(s3_bucket.url("x.neon")).store
    small, parted = _neon_file(0x1_0000_0000, 9000), _neon_file(0x2_0000_0000, 3 * SMALL_PART)
    for name, data in (("a.neon", small), ("b.neon", parted)):
        async with await store.open_write(name, overwrite=False) as writer:
            await writer.write(data)
    s3_bucket.write("c.neon", _neon_file(0x3_0000_0000, 5))  # another writer's
    plain = await snapshots_in(parse_location(s3_bucket.url("x.neon")).store)
    assert sorted(plain) == ["a.neon", "b.neon", "c.neon"]

    async def probed() -> list[str]:
        sent.clear()
        assert await store.stat("x.neon") is None
        asked = sorted(sent)
        assert await snapshots_in(store) == await snapshots_in(
            parse_location(s3_bucket.url("x.neon")).store
        )
        return asked

    asked = ["HeadObject", "ListMultipartUploads", "ListObjectsV2"]
    assert await probed() == ["GetObject", *asked]  # c.neon's head only
    assert await probed() == asked  # c.neon's remembered too
    s3_bucket.write("a.neon", _neon_file(0x4_0000_0000, 9000))  # replaced: read again
    assert await probed() == ["GetObject", *asked]
    assert await probed() == asked
    cache_files = list((home.cache_dir / "s3-heads").iterdir())
    assert len(cache_files) == 1
    assert cache_files[0].stat().st_mode & 0o777 == 0o600
    assert (home.cache_dir / "s3-heads").stat().st_mode & 0o777 == 0o700
    s3_bucket.moto.client().delete_object(Bucket=s3_bucket.bucket, Key=s3_bucket.prefix + "b.neon")
    await probed()
    assert "b.neon" not in cache_files[0].read_text()  # no longer listed: forgotten
    cache_files[0].write_text('{"store": "elsewhere", "objects": {}}')
    assert await probed() == ["GetObject", "GetObject", *asked]
    cache_files[0].write_bytes(b"\xff not json")
    assert await probed() == ["GetObject", "GetObject", *asked]
    assert await probed() == asked


async def test_a_head_cache_that_cannot_be_used_fails_nothing(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The cache is a shortcut only: a file too deeply nested to parse, a FIFO, another
    user's mode, or a cache directory that cannot be made leave the heads to be read and
    the writes to succeed (a write's cache failure after its commit is no failure)."""
    home, sent = _home_recording_requests(monkeypatch, tmp_path)
    store = parse_location(s3_bucket.url("x.neon")).store
    async with await store.open_write("a.neon", overwrite=False) as writer:
        await writer.write(_neon_file(0x1_0000_0000, 9000))
    (cache_file,) = (home.cache_dir / "s3-heads").iterdir()

    async def gets() -> int:
        sent.clear()
        assert await store.stat("x.neon") is None
        assert "a.neon" in await snapshots_in(store)
        return sent.count("GetObject")

    assert await gets() == 0
    good = cache_file.read_bytes()
    for broken in (b"[" * 500_000, b"\x00"):
        cache_file.write_bytes(broken)
        assert await gets() == 1  # read, and remembered again
        assert await gets() == 0
    cache_file.chmod(0o644)
    assert await gets() == 1  # not private: as none (and written anew, private)
    assert cache_file.stat().st_mode & 0o777 == 0o600
    cache_file.unlink()
    os.mkfifo(cache_file)
    assert await asyncio.wait_for(gets(), 10) == 1  # no hang on a FIFO
    cache_file.unlink()
    cache_file.write_bytes(good)
    shutil.rmtree(home.cache_dir)
    home.cache_dir.write_text("not a directory")
    async with await store.open_write("b.neon", overwrite=False) as writer:
        await writer.write(_neon_file(0x2_0000_0000, 9000))
    assert s3_bucket.exists("b.neon")
    assert await gets() == 2
