"""Proto methods of the pageserver: the CLI's (and remote peers') way in."""

from __future__ import annotations

from typing import Any

from pageserver.followed_nodes import FollowedNode
from pageserver.service import Pageserver
from proto.errors import InvalidArgument
from proto.server import Handler, RequestContext


def _param(params: dict[str, Any], name: str, kind: type) -> Any:
    value = params.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidArgument(f"parameter {name!r} must be a {kind.__name__}")
    return value


def build_handlers(ps: Pageserver) -> dict[str, Handler]:
    async def status(ctx: RequestContext) -> Any:
        return ps.status()

    async def node_register(ctx: RequestContext) -> Any:
        p = ctx.params
        node = FollowedNode(
            node_id=_param(p, "node_id", str),
            host=_param(p, "host", str),
            port=_param(p, "port", int),
            user=_param(p, "user", str),
            password=_param(p, "password", str),
            system_id=p.get("system_id") if isinstance(p.get("system_id"), str) else None,
        )
        return await ps.register_node(node)

    async def node_unregister(ctx: RequestContext) -> Any:
        return await ps.unregister_node(_param(ctx.params, "node_id", str))

    async def node_list(ctx: RequestContext) -> Any:
        return ps.node_statuses()

    async def node_wait_decoded(ctx: RequestContext) -> Any:
        """Wait until the record at `lsn` (e.g. a shutdown checkpoint) has been decoded."""
        follower = ps.follower(_param(ctx.params, "node_id", str))
        timeout = ctx.params.get("timeout", 30)
        if not isinstance(timeout, int | float) or not 0 <= timeout <= 600:
            raise InvalidArgument("parameter 'timeout' must be a number of seconds <= 600")
        reached = await follower.wait_decoded(_param(ctx.params, "lsn", int), float(timeout))
        return {"reached": reached, **follower.status()}

    handlers: dict[str, Handler] = {
        "status": status,
        "node.register": node_register,
        "node.unregister": node_unregister,
        "node.list": node_list,
        "node.wait_decoded": node_wait_decoded,
    }

    def counted(name: str, fn: Handler) -> Handler:
        async def wrapper(ctx: RequestContext) -> Any:
            try:
                result = await fn(ctx)
            except Exception:
                ps.metrics.inc("pageserver_proto_requests_total", method=name, outcome="error")
                raise
            ps.metrics.inc("pageserver_proto_requests_total", method=name, outcome="ok")
            return result

        return wrapper

    return {name: counted(name, fn) for name, fn in handlers.items()}
