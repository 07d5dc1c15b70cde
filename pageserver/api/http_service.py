"""HTTP endpoints for people and monitoring: /v1/status (JSON) and /metrics (Prometheus).

/v1/status shows paths, users and errors: open on loopback (only local users reach it), it asks
for the proto token (`Authorization: Bearer TOKEN`) when the daemon listens elsewhere.
"""

from __future__ import annotations

import hmac
import ipaddress

from aiohttp import web

from pageserver.api.service import Pageserver
from proto.server import bound_address

_PS_KEY: web.AppKey[Pageserver] = web.AppKey("pageserver", Pageserver)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _status_refusal(ps: Pageserver, request: web.Request) -> web.Response | None:
    """Why this request may not see /v1/status (None: it may)."""
    if _is_loopback(ps.config.listen_host):
        return None
    if ps.config.token is None:
        return web.json_response(
            {"error": "the pageserver listens beyond loopback without a token: start it with "
             "--token-file to read /v1/status"},
            status=403,
        )  # fmt: skip
    given = request.headers.get("Authorization", "")
    expected = f"Bearer {ps.config.token}"
    if hmac.compare_digest(given.encode(), expected.encode()):
        return None
    return web.json_response(
        {"error": "send the pageserver token: Authorization: Bearer TOKEN"},
        status=401,
        headers={"WWW-Authenticate": "Bearer"},
    )


async def _status(request: web.Request) -> web.Response:
    ps = request.app[_PS_KEY]
    ps.metrics.inc("pageserver_http_requests_total", path="/v1/status")
    refusal = _status_refusal(ps, request)
    if refusal is not None:
        return refusal
    return web.json_response(ps.status())


async def _metrics(request: web.Request) -> web.Response:
    ps = request.app[_PS_KEY]
    ps.metrics.inc("pageserver_http_requests_total", path="/metrics")
    ps.update_ingest_metrics()
    ps.update_remote_metrics()
    return web.Response(
        text=ps.metrics.render(),
        content_type="text/plain",
        charset="utf-8",
        headers={"X-Content-Type-Options": "nosniff"},
    )


def build_app(ps: Pageserver) -> web.Application:
    app = web.Application()
    app[_PS_KEY] = ps
    app.router.add_get("/v1/status", _status)
    app.router.add_get("/metrics", _metrics)
    return app


class HttpService:
    def __init__(self, ps: Pageserver) -> None:
        self._runner = web.AppRunner(build_app(ps), access_log=None)
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        # uvloop's server is not an asyncio.Server, but both expose the bound sockets.
        sockets = getattr(site._server, "sockets", None)
        self.port = port if sockets is None else bound_address(sockets, host, port)[1]
        return self.port

    async def close(self) -> None:
        await self._runner.cleanup()
