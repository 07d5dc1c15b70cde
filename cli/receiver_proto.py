"""A `neon snapshot recv` on pg-neon's protocol (the `neon://` scheme's far side): the object
methods cli/transport/neon.py calls, answered by a `Receiver`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cli.receiver import Received, Receiver
from proto.errors import InvalidArgument
from proto.server import Handler, ProtoServer, RequestContext

SERVER_NAME = "neon snapshot recv"
SERVE_NAME = "neon snapshot serve"


def receiver_server(receiver: Receiver, on_received: Callable[[Received], None]) -> ProtoServer:
    """A server (not yet listening) whose hello takes the receiver's current token."""
    return ProtoServer(
        object_handlers(receiver, on_received),
        token=None,
        authenticate=receiver.authenticate,
        server_name=SERVE_NAME if receiver.serves else SERVER_NAME,
    )


def _name(ctx: RequestContext) -> str:
    name = ctx.params.get("name")
    if not isinstance(name, str):
        raise InvalidArgument(f"{ctx.method} needs a file name")
    return name


def byte_offset(params: dict[str, Any], key: str, method: str) -> int:
    """A request's byte offset `key` (absent: 0); InvalidArgument for anything but an
    integer of 0 or more (JSON's `true` is a Python int, and no offset)."""
    value = params.get(key, 0)
    if type(value) is not int or value < 0:
        raise InvalidArgument(f"{method}: {key} must be a byte count, not {value!r:.40}")
    return value


def byte_count(params: dict[str, Any], key: str, method: str) -> int | None:
    """An optional byte count `key` (absent: None), checked as `byte_offset` checks one.
    Params a receiver does not know are not looked at: a newer pusher's reach an older
    receiver, which goes on without them."""
    return byte_offset(params, key, method) if key in params else None


def object_handlers(
    receiver: Receiver, on_received: Callable[[Received], None]
) -> dict[str, Handler]:
    """The `object.*` methods answered by `receiver` (a `neon snapshot recv` or `serve`, and
    the pageserver started by the CLI: cli/pageserver_daemon.py)."""

    async def stat(ctx: RequestContext) -> Any:
        info = await receiver.stat(_name(ctx))
        return None if info is None else info.to_wire()

    async def list_(ctx: RequestContext) -> Any:
        return [info.to_wire() for info in await receiver.list()]

    async def write(ctx: RequestContext) -> Any:
        name = _name(ctx)
        if ctx.params.get("overwrite"):
            raise InvalidArgument(
                "a receiver never replaces a snapshot: push without --force, or destroy the "
                "snapshot on the receiving side first"
            )
        resume_at = byte_offset(ctx.params, "resume_at", ctx.method)
        tar_total = byte_count(ctx.params, "tar_total", ctx.method)
        received = await receiver.receive(name, ctx.upload(), ctx.token, resume_at, tar_total)
        on_received(received)
        return {"snapshot": received.snapshot.name, "bytes": received.bytes}

    async def partial(ctx: RequestContext) -> Any:
        found = await receiver.partial(_name(ctx))
        return {"size": found.size, "digests": list(found.digests)}

    async def read(ctx: RequestContext) -> Any:
        offset = byte_offset(ctx.params, "offset", ctx.method)
        async for chunk in receiver.read(_name(ctx), offset):
            await ctx.send(chunk)
        return None

    async def refuse(ctx: RequestContext) -> Any:
        raise InvalidArgument(
            f"snapshots are not deleted over neon:// ({ctx.method}); run `neon snapshot "
            "destroy` where they are kept"
        )

    return {
        "object.stat": stat,
        "object.list": list_,
        "object.write": write,
        "object.partial": partial,
        "object.read": read,
        "object.delete": refuse,
    }
