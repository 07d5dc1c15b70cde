"""The REST server process of one node (`neon pg start-rest` spawns it; `stop-rest`, `pg stop`
and `pg destroy` SIGTERM it). It writes its state file once it listens, keeps the list of
snapshot servers it started there (so a killed daemon's servers can be stopped), and on
SIGTERM stops them and removes the file."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
from pathlib import Path

from aiohttp import web

from cli.context import App
from cli.rest import control
from cli.rest.server import make_app
from cli.rest.sources import Sources
from cli.secrets import read_secret
from durable_files import PRIVATE_UMASK


async def serve(args: argparse.Namespace) -> None:
    app = App.open(Path(args.home))
    node = app.registry.get_node(args.node)
    token = read_secret(control.token_path(app, node.id))
    state = control.state_file(app, node.id)
    app.registry.close()
    info = control.RestInfo(node.id, os.getpid(), args.listen, args.port)

    def record(servers: list[str], extracted: list[str]) -> None:
        nonlocal info
        info = control.RestInfo(
            node.id, info.pid, info.listen, info.port, tuple(servers), tuple(extracted)
        )
        control.write_state(state, info)

    sources = Sources(
        Path(args.home), node.id, args.db, args.statement_timeout, record, role=args.role
    )
    runner = web.AppRunner(make_app(sources, token, f"pg-neon REST: {node.pgdata}"))
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, args.listen, args.port).start()
        control.write_state(state, info)
        print(f"REST API for {node.pgdata} on {info.url}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        with contextlib.suppress(Exception):
            await sources.close()
        state.unlink(missing_ok=True)


def main() -> None:
    os.umask(PRIVATE_UMASK)
    parser = argparse.ArgumentParser(prog="cli.rest.daemon")
    parser.add_argument("--home", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--listen", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", default="postgres")
    parser.add_argument("--statement-timeout", type=float, default=10.0)
    parser.add_argument("--role", default=None)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
