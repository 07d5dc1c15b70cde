"""The REST API as an aiohttp application: token check, routing by path, answers as JSON.

Every request is one READ ONLY REPEATABLE READ transaction (so an exact count and the rows
agree) on a pool whose connections start read-only and with a statement timeout.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiohttp import web

from cli.rest import catalog, openapi
from cli.rest.query import (
    QueryError,
    Target,
    content_range,
    count_statement,
    parse_path,
    parse_query,
    select_statement,
)
from cli.rest.sources import Sources
from proto.errors import (
    AlreadyExists,
    Conflict,
    InvalidArgument,
    NeonError,
    NotFound,
    Unavailable,
)

READ_METHODS = ("GET", "HEAD")
JSON = "application/json; charset=utf-8"
_SOURCES: web.AppKey[Sources] = web.AppKey("sources", Sources)
_TOKEN: web.AppKey[bytes] = web.AppKey("token", bytes)
_TITLE: web.AppKey[str] = web.AppKey("title", str)


def error_response(status: int, message: str, **headers: str) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps({"message": message}),
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


def _neon_status(exc: NeonError) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, InvalidArgument):
        return 400
    if isinstance(exc, Conflict | AlreadyExists):
        return 409
    return 503


def _pg_status(exc: asyncpg.PostgresError) -> int:
    state = getattr(exc, "sqlstate", "") or ""
    if state == "57014":
        return 504  # statement_timeout
    if state == "42501":
        return 403  # --role may not read it
    if state == "25006":
        return 405  # a write in a read-only transaction (never generated)
    if state.startswith(("22", "42")):
        return 400  # a value that is not of the column's type, a bad pattern...
    return 500


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Token first (a caller without it learns nothing), then the method, then errors as
    JSON with their status."""
    expected = request.app[_TOKEN]
    scheme, _sp, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        return error_response(401, "missing or wrong token", **{"WWW-Authenticate": "Bearer"})
    if request.method not in READ_METHODS:
        return error_response(
            405, f"{request.method} is not allowed: this API is read-only", Allow="GET, HEAD"
        )
    try:
        return await handler(request)
    except QueryError as exc:
        return error_response(exc.status, exc.message)
    except NeonError as exc:
        return error_response(_neon_status(exc), exc.message)
    except asyncpg.PostgresError as exc:
        return error_response(_pg_status(exc), str(exc).splitlines()[0])


async def _handle(request: web.Request) -> web.StreamResponse:
    target = parse_path(request.path)
    sources = request.app[_SOURCES]
    for attempt in range(2):
        source = await sources.source(target)
        try:
            async with (
                source.pool.acquire() as conn,
                conn.transaction(isolation="repeatable_read", readonly=True),
            ):
                if target.table is None:
                    return await _openapi(request, conn, target, source.label)
                return await _rows(request, conn, target)
        except (OSError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError) as exc:
            # The server restarted (a checkout) or went away (`snapshot stop`): reconnect
            # (restart) once.
            await sources.forget(source.label)
            if attempt:
                where = f"snapshot {source.label}" if source.label else "the node"
                raise Unavailable(f"{where} cannot be reached: {exc}") from None
    raise AssertionError("unreachable")


async def _openapi(request: web.Request, conn: Any, target: Target, label: str) -> web.Response:
    title = request.app[_TITLE] + (f" at {label}" if label else "")
    doc = openapi.document(await catalog.list_relations(conn), title)
    return web.Response(text=json.dumps(doc), content_type="application/openapi+json")


async def _rows(request: web.Request, conn: Any, target: Target) -> web.Response:
    assert target.table is not None
    query = parse_query(request.query.items())
    relation = await catalog.find_relation(conn, target.schema, target.table)
    if relation is None:
        shown = f"{target.schema}.{target.table}" if target.schema else target.table
        raise QueryError(f"table {shown!r} does not exist", 404)
    statement = select_statement(query, relation)
    body, returned = await conn.fetchrow(statement.sql, *statement.params)
    total = None
    if "count=exact" in request.headers.get("Prefer", "").replace(" ", "").split(","):
        counting = count_statement(query, relation)
        total = await conn.fetchval(counting.sql, *counting.params)
    return web.Response(
        text=body,
        content_type="application/json",
        charset="utf-8",
        headers={"Content-Range": content_range(query.offset, returned, total)},
    )


def make_app(sources: Sources, token: str, title: str) -> web.Application:
    app = web.Application(middlewares=[_guard])
    app[_SOURCES] = sources
    app[_TOKEN] = token.encode()
    app[_TITLE] = title
    app.router.add_route("*", "/{tail:.*}", _handle)
    return app
