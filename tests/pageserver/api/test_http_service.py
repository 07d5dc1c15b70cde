"""/v1/status shows paths and users: open on loopback, token-only when listening elsewhere.

Real aiohttp server on 127.0.0.1 over a real Pageserver; only its configured listen address
(what `--listen` would bind) differs between the cases.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from pageserver.api.http_service import build_app
from pageserver.api.service import Pageserver
from pageserver.config import PageserverConfig


async def _get_status(config: PageserverConfig, headers: dict[str, str]) -> tuple[int, dict]:
    ps = Pageserver(config)
    async with TestClient(TestServer(build_app(ps), host="127.0.0.1")) as client:
        resp = await client.get("/v1/status", headers=headers)
        body = await resp.json()
        metrics = await client.get("/metrics")
        assert metrics.status == 200  # scrapes stay open: node ids and counters only
    return resp.status, body


async def test_status_is_open_on_loopback(tmp_path: Path) -> None:
    config = PageserverConfig(workdir=tmp_path, token="s3cret")
    status, body = await _get_status(config, {})
    assert status == 200 and body["workdir"] == str(tmp_path)


async def test_status_needs_the_token_beyond_loopback(tmp_path: Path) -> None:
    config = PageserverConfig(workdir=tmp_path, listen_host="0.0.0.0", token="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, body = await _get_status(config, headers)
        assert status == 401 and "workdir" not in body, body
    status, body = await _get_status(config, {"Authorization": "Bearer s3cret"})
    assert status == 200 and body["workdir"] == str(tmp_path)


async def test_status_beyond_loopback_without_a_token_is_refused(tmp_path: Path) -> None:
    config = PageserverConfig(workdir=tmp_path, listen_host="::", token=None)
    status, body = await _get_status(config, {})
    assert status == 403 and "--token-file" in body["error"]
