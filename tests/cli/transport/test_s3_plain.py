"""The plain S3 client of a small push (cli/transport/s3_plain.py): its signatures are
botocore's, moto checks them, it answers a push's stat as aiobotocore does, it is used only
where botocore would send the same requests, and a push through it imports none of
aiobotocore, botocore and aiohttp."""

from __future__ import annotations

import contextlib
import datetime
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.transport import parse_location, s3_plain
from cli.transport.s3 import S3Store
from cli.transport.s3_plain import (
    PlainS3,
    PlainS3Error,
    PlainS3Unreachable,
    canonical_query,
    object_path,
    plain_client,
)
from proto.errors import AlreadyExists, AuthFailed, Unavailable
from tests.cli.transport.conftest import S3Bucket, only_aiobotocore
from tests.pgtest import free_port
from tests.tls import self_signed

NOW = datetime.datetime(2026, 12, 5, 12, 30, 15, tzinfo=datetime.UTC)
KEYS = ["a b.neon", "c+d.neon", "é&<x>.neon", "plain.neon", "~t=1?.neon"]
"""Names that the path's and the listing's encodings must each get right."""


def store_of(s3_bucket: S3Bucket, name: str) -> S3Store:
    store = parse_location(s3_bucket.url(name)).store
    assert isinstance(store, S3Store)
    return store


@pytest.mark.parametrize("token", [None, "session-token"])
@pytest.mark.parametrize(
    ("method", "key", "query", "headers", "body"),
    [
        ("HEAD", "snaps/a b+c~é&.neon", [], {}, b""),
        ("GET", "", [("list-type", "2"), ("prefix", "snaps/x y"), ("delimiter", "/")], {}, b""),
        ("GET", "", [("uploads", ""), ("prefix", "snaps/x.neon")], {}, b""),
        ("GET", "snaps/x.neon", [], {"Range": "bytes=0-4095"}, b""),
        ("PUT", "snaps/x.neon", [], {"Content-Type": "a/b", "If-None-Match": "*"}, b"data"),
    ],
)
def test_signatures_are_botocores(
    method: str, key: str, query: list[tuple[str, str]], headers: dict[str, str], body: bytes,
    token: str | None,
) -> None:  # fmt: skip
    """The same request signed by botocore's S3SigV4Auth (the reference) and here carries the
    same Authorization header."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    plain = PlainS3.of("http://minio.example:9000", "eu-west-3", "AKID", "secret/key", token)
    from botocore.utils import percent_encode

    path = object_path("bucket", key)
    assert path == "/bucket" + ("/" + percent_encode(key, safe="/~") if key else "")
    url = "http://minio.example:9000" + path + ("?" + canonical_query(query) if query else "")
    request = AWSRequest(method=method, url=url, headers=dict(headers), data=body)
    request.context["timestamp"] = NOW.strftime("%Y%m%dT%H%M%SZ")
    auth = S3SigV4Auth(Credentials("AKID", "secret/key", token), "s3", "eu-west-3")
    auth._modify_request_before_signing(request)
    canonical = auth.canonical_request(request)
    expected = auth.signature(auth.string_to_sign(request, canonical), request)
    digest = request.headers["X-Amz-Content-SHA256"]
    ours = plain.signed_headers(method, path, query, headers, digest, NOW)
    assert ours["authorization"].rsplit("Signature=", 1)[1] == expected


async def test_moto_checks_the_signatures(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With moto checking every request's signature (keys of an IAM user), a stat and a small
    write of odd names go through the plain client; a wrong secret is refused."""
    import boto3
    import moto.settings

    for name in KEYS[:2]:
        s3_bucket.write(name, b"x" * 10)
    iam = boto3.client("iam", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    user = f"pusher-{s3_bucket.bucket}"
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*",
                                                       "Resource": "*"}]}  # fmt: skip
    iam.put_user_policy(UserName=user, PolicyName="all", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    try:
        for name in KEYS:
            store = store_of(s3_bucket, name)
            assert store.plain() is not None
            info = await store.stat(name)
            assert (info is not None) == (name in KEYS[:2])
            if info is None:
                async with await store.open_resumable(name, overwrite=False) as writer:
                    await writer.write(b"new " + name.encode())
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        with pytest.raises(AuthFailed, match=r"S3 refused access"):
            await store_of(s3_bucket, "plain.neon").stat("plain.neon")
    finally:
        monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
    for name in KEYS[2:]:
        assert s3_bucket.read(name) == b"new " + name.encode()


async def test_a_stat_answers_as_aiobotocores(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Object, listing (several pages), manifests and pending uploads of a push's stat: the
    same through the plain client as through aiobotocore, odd names included."""
    for i, name in enumerate(KEYS):
        s3_bucket.write(name, os.urandom(5000 + i))
    s3_bucket.write(".hidden.neon.partial", b"p")
    s3_bucket.write("sub/deeper.neon", b"d")
    client = s3_bucket.moto.client()
    target = s3_bucket.prefix + "resumed.neon"
    upload = client.create_multipart_upload(Bucket=s3_bucket.bucket, Key=target)["UploadId"]
    client.upload_part(
        Bucket=s3_bucket.bucket, Key=target, UploadId=upload, PartNumber=1, Body=b"q" * 100
    )

    async def probe(name: str) -> tuple[object, ...]:
        store = store_of(s3_bucket, name)
        found = await store.stat(name)
        kept = store._kept(name)
        assert kept is not None
        return found, kept.listing, kept.pending, kept.heads

    plain = [await probe(name) for name in ("plain.neon", "resumed.neon")]
    client_of = store_of(s3_bucket, "x").plain()
    assert client_of is not None
    pages = await client_of.list_directory(s3_bucket.bucket, s3_bucket.prefix, max_keys=2)
    only_aiobotocore(monkeypatch, tmp_path)
    assert store_of(s3_bucket, "x").plain() is None
    assert plain == [await probe(name) for name in ("plain.neon", "resumed.neon")]
    listed = plain[0][1]
    assert isinstance(listed, list)
    shown = [(key, size) for key, size in pages if "/." not in key]  # 3 answers of 2 keys
    assert [(s3_bucket.prefix + o.name, o.size) for o in listed] == sorted(shown)
    assert [o.name for o in listed] == sorted(KEYS)


async def test_a_small_write_is_one_put_refused_over_an_object(s3_bucket: S3Bucket) -> None:
    """After the stat a small resumable write is one plain PutObject with If-None-Match: an
    object written meanwhile is not replaced; with overwrite it is."""
    store = store_of(s3_bucket, "x.neon")
    assert await store.stat("x.neon") is None
    writer = await store.open_resumable("x.neon", overwrite=False)
    await writer.write(b"mine")
    s3_bucket.write("x.neon", b"theirs")
    with pytest.raises(AlreadyExists):
        await writer.commit()
    assert s3_bucket.read("x.neon") == b"theirs"
    await store.stat("x.neon")
    async with await store.open_resumable("x.neon", overwrite=True) as writer:
        await writer.write(b"mine")
    assert s3_bucket.read("x.neon") == b"mine" and s3_bucket.pending_uploads() == []


def test_used_only_where_botocore_sends_the_same(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An explicit plain-http endpoint and explicit keys, no profile, config file or proxy."""
    for name in [n for n in os.environ if n.startswith("AWS_") or n.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path))
    given = ("http://minio:9000", "r1", "AKID", "secret")
    client = plain_client(*given)
    assert client is not None and (client.netloc, client.port) == ("minio:9000", 9000)
    assert client.region == "r1" and client.session_token is None
    import certifi

    tls = plain_client("https://minio", "r1", "AKID", "secret")
    assert tls is not None and (tls.port, tls.cafile) == (443, certifi.where())
    monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/our-ca.pem")
    tls = plain_client("https://minio:9000", "r1", "AKID", "secret")
    assert tls is not None and tls.cafile == "/etc/our-ca.pem"
    monkeypatch.delenv("AWS_CA_BUNDLE")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    assert plain_client("https://minio:9000", "r1", "AKID", "secret") is None
    assert plain_client("http://minio:9000", "r1", "AKID", "secret") is not None
    monkeypatch.delenv("HTTPS_PROXY")
    assert plain_client(None, "r1", "AKID", "secret") is None  # AWS itself
    assert plain_client("http://gw:9000/s3", "r1", "AKID", "secret") is None  # a path first
    assert plain_client("http://gw:9000/", "r1", "AKID", "secret") is not None
    assert plain_client("http://minio:9000", "r1", None, None) is None  # the credential chain
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://a:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "K")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "S")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "T")
    client = plain_client(None, "r1", None, None)
    assert client is not None and (client.netloc, client.access_key_id) == ("a:1", "K")
    assert client.session_token == "T"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3only")  # botocore's first choice
    client = plain_client(None, "r1", None, None)
    assert client is not None and client.netloc == "s3only"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    for name, value in (
        ("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "True"),
        ("AWS_PROFILE", "p"),
        ("HTTP_PROXY", "http://proxy:3128"),
    ):
        monkeypatch.setenv(name, value)
        assert plain_client(None, "r1", None, None) is None, name
        monkeypatch.delenv(name)
    monkeypatch.setenv("NO_PROXY", "a")
    monkeypatch.setenv("HTTP_PROXY", "http://proxy:3128")
    assert plain_client(None, "r1", None, None) is not None  # not through the proxy
    (tmp_path / ".aws").mkdir()
    (tmp_path / ".aws" / "config").write_text("[default]\n")
    assert plain_client(*given) is None


PUSH = """
import asyncio, sys
from cli.transport import parse_location, s3_plain
async def main():
    loc = parse_location(sys.argv[1])
    assert await loc.store.stat(loc.name) is None
    async with await loc.store.open_resumable(loc.name, overwrite=False) as writer:
        await writer.write(b"a small delta")
asyncio.run(main())
print(sorted(m for m in sys.modules if m.split(".")[0] in ("aiobotocore", "botocore", "aiohttp")))
"""


def test_a_small_push_imports_no_aws_library(s3_bucket: S3Bucket, tmp_path: Path) -> None:
    """A push's stat and its small write, in a process of their own: none of aiobotocore,
    botocore and aiohttp is imported (~0.25 s of CPU with a client), and the object is
    there."""
    env = {k: v for k, v in os.environ.items() if k != "AWS_CONFIG_FILE"}
    env.update(s3_bucket.moto.env(), HOME=str(tmp_path), PYTHONPATH=str(Path.cwd()))
    run = subprocess.run(
        [sys.executable, "-c", PUSH, s3_bucket.url("d.neon")],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert run.stdout.strip() == "[]", run.stdout
    assert s3_bucket.read("d.neon") == b"a small delta"


class _Flaky(http.server.BaseHTTPRequestHandler):
    """Answers HEAD with 503 SlowDown `failures` times, then 200 (7 bytes); GET with 400."""

    failures = 0
    seen = 0

    def do_HEAD(self) -> None:
        type(self).seen += 1
        if type(self).seen <= type(self).failures:
            self.send_response(503)
            self.send_header("Content-Length", "0")
        else:
            self.send_response(200)
            self.send_header("Content-Length", "7")
        self.end_headers()

    def do_GET(self) -> None:
        type(self).seen += 1
        body = b"<Error><Code>InvalidArgument</Code><Message>no &amp; never</Message></Error>"
        self.send_response(400)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


async def test_transient_errors_are_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """As botocore's standard mode: a 5xx twice, then the answer; three 5xx: the error; a
    client error at once; a refused connection three times, then Unreachable."""
    monkeypatch.setattr(s3_plain, "RETRY_WAIT_MAX", 0)
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            plain = PlainS3.of(f"http://127.0.0.1:{server.server_port}", "r", "K", "S", None)
            for failures, seen in ((2, 3), (0, 1)):
                _Flaky.failures, _Flaky.seen = failures, 0
                assert await plain.head("b", "k") == 7
                assert _Flaky.seen == seen
            _Flaky.failures, _Flaky.seen = 3, 0
            with pytest.raises(PlainS3Error, match="503"):
                await plain.head("b", "k")
            assert _Flaky.seen == 3
            _Flaky.seen = 0
            with pytest.raises(PlainS3Error) as err:
                await plain.get_range("b", "k", 0, 9)
            assert _Flaky.seen == 1
            assert err.value.response["Error"] == {
                "Code": "InvalidArgument",
                "Message": "no & never",
            }
        finally:
            server.shutdown()
    refused = PlainS3.of(f"http://127.0.0.1:{free_port()}", "r", "K", "S", None)
    with pytest.raises(PlainS3Unreachable, match="could not connect"):
        await refused.head("b", "k")


@contextlib.contextmanager
def moto_over_tls(directory: Path) -> Iterator[tuple[str, Path]]:
    """moto's S3 (the buckets of the moto_server fixture: one process's memory) served over
    TLS on 127.0.0.1: its endpoint and the certificate that verifies it."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    cert, key = self_signed(directory)
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=(str(cert), str(key)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.port}", cert
    finally:
        server.shutdown()


async def test_an_https_endpoint_is_verified(
    s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Over https the stat and the small write go the plain way too, the server's certificate
    checked against AWS_CA_BUNDLE: one it does not vouch for is refused, nothing sent."""
    with moto_over_tls(tmp_path / "tls") as (endpoint, cert):
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.setenv("AWS_CA_BUNDLE", str(cert))
        store = store_of(s3_bucket, "t.neon")
        plain = store.plain()
        assert plain is not None and plain.cafile == str(cert)
        assert await store.stat("t.neon") is None
        async with await store.open_resumable("t.neon", overwrite=False) as writer:
            await writer.write(b"over tls")
        assert s3_bucket.read("t.neon") == b"over tls"
        other, _ = self_signed(tmp_path / "other")
        monkeypatch.setenv("AWS_CA_BUNDLE", str(other))
        with pytest.raises(Unavailable, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
            await store_of(s3_bucket, "u.neon").stat("u.neon")
