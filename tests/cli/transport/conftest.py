"""Real peers for the transport tests: an sshd and an aiohttp file server on 127.0.0.1, each
serving a directory of its own, and moto's S3 server on 127.0.0.1, a bucket for each test."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import cli.home
from cli.transport import s3
from tests.httpd import FileServer, file_server
from tests.s3d import MotoS3, moto_s3
from tests.sshd import SshServer, ssh_server

SMALL_PART = 256 * 1024  # S3 parts in tests: many parts from a few MiB


@pytest.fixture(autouse=True)
def no_home(monkeypatch: pytest.MonkeyPatch) -> None:
    """Transports used in-process belong to no home (an App.open of another test set one):
    ssh connections end with the process, none is kept between commands."""
    monkeypatch.setattr(cli.home, "_current", None)


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    with ssh_server() as server:
        yield server


@pytest.fixture
def ssh_env(sshd: SshServer, monkeypatch: pytest.MonkeyPatch) -> SshServer:
    """The ssh client of this process set up for `sshd` (NEON_SSH_COMMAND)."""
    monkeypatch.setenv("NEON_SSH_COMMAND", sshd.ssh_command)
    return sshd


@pytest.fixture
def remote_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="neon-transport-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def httpd(remote_dir: Path) -> Iterator[FileServer]:
    with file_server(remote_dir) as server:
        yield server


def entries(directory: Path) -> list[str]:
    """Everything in `directory`, hidden files included."""
    return sorted(os.listdir(directory))


@pytest.fixture(scope="module")
def moto_server() -> Iterator[MotoS3]:
    with moto_s3() as server:
        yield server


@dataclass(frozen=True)
class S3Bucket:
    """A bucket of its own on `moto`, seen with a plain boto3 client: objects under
    `prefix`, as a directory peer's files."""

    moto: MotoS3
    bucket: str
    prefix: str = "snaps/"

    def url(self, name: str) -> str:
        return f"s3://{self.bucket}/{self.prefix}{name}"

    def read(self, name: str) -> bytes:
        answer = self.moto.client().get_object(Bucket=self.bucket, Key=self.prefix + name)
        body: bytes = answer["Body"].read()
        return body

    def write(self, name: str, data: bytes) -> None:
        self.moto.client().put_object(Bucket=self.bucket, Key=self.prefix + name, Body=data)

    def exists(self, name: str) -> bool:
        return self.prefix + name in self.keys()

    def keys(self) -> list[str]:
        """Every key in the bucket (not only under the prefix)."""
        answer = self.moto.client().list_objects_v2(Bucket=self.bucket)
        return sorted(o["Key"] for o in answer.get("Contents", []))

    def entries(self) -> list[str]:
        return [k.removeprefix(self.prefix) for k in self.keys() if k.startswith(self.prefix)]

    def pending_uploads(self) -> list[str]:
        """The keys of multipart uploads neither completed nor aborted."""
        answer = self.moto.client().list_multipart_uploads(Bucket=self.bucket)
        return sorted(u["Key"] for u in answer.get("Uploads", []))


@pytest.fixture
def s3_bucket(moto_server: MotoS3, monkeypatch: pytest.MonkeyPatch) -> S3Bucket:
    """A fresh bucket, this process's AWS_* environment pointing at it, and small parts
    (moto's 5 MiB minimum part size lowered to match)."""
    import moto.s3.models

    for key, value in moto_server.env().items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", 1)
    monkeypatch.setattr(s3, "PART_SIZE", SMALL_PART)
    monkeypatch.setattr(s3, "PARTS_IN_FLIGHT", 3)
    return S3Bucket(moto_server, moto_server.new_bucket())
