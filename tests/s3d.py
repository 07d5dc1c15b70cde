"""A real S3 endpoint on 127.0.0.1 for tests: moto's server in a thread of this process, and
a TCP proxy in front of it that can drop a download's connection mid-body, as a failing
network would.

moto keeps its buckets in this process's memory, so tests in one process share them: each
test takes a bucket of its own (`new_bucket`).
"""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.relay import Relay, pump

REGION = "us-east-1"
ACCESS_KEY, SECRET_KEY = "testing-key", "testing-secret"


@dataclass
class MotoS3:
    endpoint: str

    def client(self) -> Any:
        """A plain (blocking) boto3 client, to look at the bucket behind the code's back."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION,
            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
        )  # fmt: skip

    def new_bucket(self) -> str:
        bucket = f"neon-test-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket

    def env(self, endpoint: str | None = None) -> dict[str, str]:
        """What a client process needs to reach this server (and nothing from ~/.aws)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": endpoint or self.endpoint,
            "AWS_CONFIG_FILE": "/nonexistent",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
            "AWS_EC2_METADATA_DISABLED": "true",
        }


@contextlib.contextmanager
def moto_s3() -> Iterator[MotoS3]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield MotoS3(f"http://{host}:{port}")
    finally:
        server.stop()


_RANGE = re.compile(rb"\r\nrange: *([^\r]*)", re.IGNORECASE)


@dataclass
class CuttingProxy(Relay):
    """Forwards connections on 127.0.0.1:`port` to `upstream_port`. Each of the next
    connections whose first request is a GET gets `cut_gets.pop(0)` bytes of the answer
    (headers included), then both sides are dropped."""

    cut_gets: list[int] = field(default_factory=list)
    ranges: list[str | None] = field(default_factory=list)
    """The Range header of every GET that came through (None: without one)."""

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        first = client.recv(65536)
        budget = None
        if first.startswith(b"GET "):
            found = _RANGE.search(first)
            self.ranges.append(found.group(1).decode() if found else None)
            if self.cut_gets:
                budget = self.cut_gets.pop(0)
        upstream.sendall(first)
        threading.Thread(target=pump, args=(client, upstream, None), daemon=True).start()
        pump(upstream, client, budget)


@contextlib.contextmanager
def cutting_proxy(upstream_endpoint: str) -> Iterator[CuttingProxy]:
    proxy = CuttingProxy(int(upstream_endpoint.rpartition(":")[2]))
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
