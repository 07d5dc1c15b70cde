"""The pageserver daemon as the CLI starts it (`python -m cli.pageserver_daemon`): the same
process as `python -m pageserver.daemon`, whose proto port also answers the `object.*` methods
of `neon snapshot serve` (cli/receiver_proto.py) for the home it belongs to.

So another home that attached this pageserver as a remote storage
(`neon storage attach -t remote -c url=neon://HOST:PORT -c token=...`) pushes and pulls
snapshots with it exactly as with `neon snapshot serve`: reads are the `.neon` bytes
`neon snapshot export` writes, writes are imported as `neon snapshot import` of the file does
(into the home's default storage), listings describe each snapshot by its manifest (so a push
sends a delta on a snapshot both sides have). The token is the pageserver's own, already
checked at the hello; nothing is deleted over the wire.

The methods are wired here and not in pageserver/: the receiving side needs the home (its
registry, its storages, the checked `.neon` extraction of cli/), which the pageserver does not
know. The daemon's work directory is ``<home>/pageserver`` (cli/home.py).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from cli.home import HOME_MARKERS
from pageserver.config import PageserverConfig
from pageserver.daemon import COMPANION_RESTART, main
from proto.errors import AuthFailed, InvalidArgument
from proto.server import Handler, RequestContext

log = logging.getLogger("pageserver.objects")

OBJECT_METHODS = ("object.stat", "object.list", "object.write", "object.read", "object.delete")


def object_methods(config: PageserverConfig) -> Mapping[str, Handler]:
    """The `object.*` handlers, made on their first request (the daemon listens by then, so
    the receiver finds it through the home as every CLI command does)."""
    made: dict[str, Handler] = {}

    def handlers() -> dict[str, Handler]:
        if made:
            return made
        from cli.context import App
        from cli.receiver import Receiver, StandingToken
        from cli.receiver_proto import object_handlers
        from cli.storages import DEFAULT_STORAGE

        home = config.workdir.parent
        if not any((home / marker).exists() for marker in HOME_MARKERS):
            raise InvalidArgument(
                f"this pageserver ({config.workdir}) belongs to no pg-neon home: it serves no "
                "snapshot files"
            )
        if config.token is None:
            raise AuthFailed("this pageserver has no token: it serves no snapshot files")
        receiver = Receiver(
            App.open(home), DEFAULT_STORAGE, None, StandingToken(config.token),
            on_refused=lambda reason: log.warning("%s", reason), serves=True,
        )  # fmt: skip
        made.update(
            object_handlers(
                receiver,
                lambda got: log.info(
                    "received snapshot %s (%d bytes)", got.snapshot.name, got.bytes
                ),
            )
        )
        return made

    def handler(method: str) -> Handler:
        async def run(ctx: RequestContext) -> Any:
            return await handlers()[method](ctx)

        return run

    return {method: handler(method) for method in OBJECT_METHODS}


def warm_server(config: PageserverConfig) -> list[str] | None:
    """The home's warm command server (cli/warm_server.py), if its socket's path fits."""
    from cli.warm_server import STALE_EXIT, socket_path

    assert STALE_EXIT == COMPANION_RESTART
    if socket_path(config.workdir) is None:
        return None
    return [sys.executable, "-m", "cli.warm_server", str(config.workdir), str(os.getpid())]


if __name__ == "__main__":
    sys.exit(main(extra=object_methods, companion=warm_server))
