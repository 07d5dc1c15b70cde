"""`neon snapshot recv`: listen for pushed snapshots and keep them here.

It prints the URL a pusher uses, with a fresh one-time token, on stdout (one line, or one
JSON object per line with --json), then waits: `neon snapshot push --to URL SNAP` on the
other machine sends the snapshot's `.neon` file, which is verified and imported as a snapshot
of this home (named after the file, `pgdata1@snap1` -> `pgdata1-snap1`, or NAME). After each
snapshot a line on stderr says what arrived and, unless --once, the next URL (a new token)
is printed. A refused push (wrong or used token, tampered or cut stream, a name already
taken) is reported on stderr and changes nothing; the receiver goes on listening. SIGINT or
SIGTERM stops it; a snapshot still arriving then is dropped.

It listens on 127.0.0.1 unless --listen says otherwise: a receiver reachable from other
machines is a choice, not a default.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cli.context import get_app
from cli.output import human_size
from cli.secrets import generate_secret, read_secret, write_secret
from cli.storages import DEFAULT_STORAGE
from pageserver.history.snapshots import check_import_name
from proto.errors import InvalidArgument

if TYPE_CHECKING:
    from cli.receiver import Received, Receiver

WILDCARDS = ("0.0.0.0", "::", "")


@click.command("recv")
@click.argument("name", required=False)
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default="any free port")
@click.option("--listen", "address", default="127.0.0.1", show_default=True, metavar="ADDR")
@click.option("--once", is_flag=True, help="exit after one snapshot arrived")
@click.option(
    "--http", "use_http", is_flag=True, help="take http PUTs (an http:// URL) instead of neon://"
)
@click.option("-s", "--storage", default=DEFAULT_STORAGE, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON objects, one per line")
@click.pass_context
def snapshot_recv(
    ctx: click.Context, name: str | None, port: int, address: str, once: bool, use_http: bool,
    storage: str, as_json: bool,
) -> None:  # fmt: skip
    """Receive pushed snapshots (prints the URL to push to)."""
    from cli.receiver import OneTimeTokens, Receiver

    app = get_app(ctx)
    app.require_own_pageserver("neon snapshot recv")
    if name is not None:
        check_import_name(name)
    receiver = Receiver(
        app, storage, name, OneTimeTokens(), on_refused=_refused("neon snapshot recv"),
        show_progress=not as_json and sys.stderr.isatty(),
    )  # fmt: skip
    stopped_by = asyncio.run(_serve(receiver, address, port, once, use_http, as_json))
    if stopped_by == signal.SIGINT:
        ctx.exit(130)


@click.command("serve")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default="any free port")
@click.option("--listen", "address", default="127.0.0.1", show_default=True, metavar="ADDR")
@click.option(
    "--token-file", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
    help="the clients' token (made, mode 0600, if missing) [default: NEON_HOME/secrets/"
    "serve.token]",
)  # fmt: skip
@click.option("-s", "--storage", default=DEFAULT_STORAGE, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON objects, one per line")
@click.pass_context
def snapshot_serve(
    ctx: click.Context, port: int, address: str, token_file: Path | None, storage: str,
    as_json: bool,
) -> None:  # fmt: skip
    """Serve this home's snapshots on neon:// (pull, list, push; a token for all)."""
    from cli.receiver import Receiver, StandingToken

    app = get_app(ctx)
    app.require_own_pageserver("neon snapshot serve")
    token_file = token_file or app.home.secrets_dir / "serve.token"
    if not token_file.exists():
        write_secret(token_file, generate_secret())
    receiver = Receiver(
        app, storage, None, StandingToken(read_secret(token_file)),
        on_refused=_refused("neon snapshot serve"),
        show_progress=not as_json and sys.stderr.isatty(), serves=True,
    )  # fmt: skip
    served = asyncio.run(_serve(receiver, address, port, False, False, as_json, token_file))
    if served == signal.SIGINT:
        ctx.exit(130)


async def _serve(
    receiver: Receiver, address: str, port: int, once: bool, use_http: bool,
    as_json: bool, token_file: Path | None = None,
) -> int | None:  # fmt: skip
    """Listen until a signal (returned) or, with `once`, the first snapshot (None). With a
    standing token (in `token_file`) the URL is printed once, without the token."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int | None] = loop.create_future()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _finish, done, signum)
    scheme = "http" if use_http else "neon"
    printer = _Printer(scheme, address, as_json, token_file)

    def on_received(received: Received) -> None:
        printer.received(received)
        if once:
            _finish(done, None)
        elif token_file is None:
            printer.url(received.next_token)

    async with AsyncExitStack() as stack:
        listen = _listen_http if use_http else _listen_proto
        try:
            printer.port = await listen(stack, receiver, on_received, address, port)
        except OSError as exc:  # a name that resolves to nothing, a port taken
            where = f"[{address}]" if ":" in address else address
            raise InvalidArgument(
                f"cannot listen on {where}:{port}: {exc.strerror or exc}"
            ) from None
        printer.url(receiver.tokens.current)
        return await done


def _refused(command: str) -> Callable[[str], None]:
    """What logs a refusal on stderr, naming the command that refused."""

    def log(reason: str) -> None:
        click.echo(f"{command}: {reason}", err=True)

    return log


def _finish(done: asyncio.Future[int | None], value: int | None) -> None:
    if not done.done():
        done.set_result(value)


async def _listen_proto(
    stack: AsyncExitStack, receiver: Receiver, on_received: Any, address: str, port: int
) -> int:
    from cli.receiver_proto import receiver_server

    server = receiver_server(receiver, on_received)
    await server.start(address, port)
    stack.push_async_callback(server.close)
    return server.port


async def _listen_http(
    stack: AsyncExitStack, receiver: Receiver, on_received: Any, address: str, port: int
) -> int:
    from aiohttp import web

    from cli.receiver_http import receiver_app

    runner = web.AppRunner(receiver_app(receiver, on_received), access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    await web.TCPSite(runner, address, port).start()
    bound: int = runner.addresses[0][1]
    return bound


class _Printer:
    """The URL lines (stdout, for the pusher) and what arrived (stderr, or stdout as JSON)."""

    def __init__(self, scheme: str, address: str, as_json: bool, token_file: Path | None) -> None:
        self.scheme, self.as_json, self.token_file, self.port = scheme, as_json, token_file, 0
        host = socket.getfqdn() if address in WILDCARDS else address
        self.host = f"[{host}]" if ":" in host else host

    def url(self, token: str) -> None:
        url = f"{self.scheme}://{self.host}:{self.port}/"
        if self.token_file is None:
            url += f"?token={token}"
            self._out({"url": url}, url)
            return
        self._out({"url": url, "token_file": str(self.token_file)}, url)
        if not self.as_json:
            click.echo(
                f"(the token is in {self.token_file}; clients give it as NEON_TOKEN, or "
                "attach this URL with `neon storage attach -t remote`)",
                err=True,
            )

    def received(self, received: Received) -> None:
        snap = received.snapshot
        self._out(
            {
                "snapshot": snap.name,
                "lsn": snap.lsn,
                "lsn_text": snap.lsn_text,
                "bytes_received": received.bytes,
                "tar_bytes": received.tar_bytes,
                "snapshot_bytes": received.snapshot_bytes,
                "sha256": received.sha256,
                "seconds": round(received.seconds, 3),
            },
            None,
        )
        if not self.as_json:
            click.echo(
                f"Received snapshot {snap.name} ({human_size(received.bytes)} in "
                f"{received.seconds:.1f} s)",
                err=True,
            )

    def _out(self, value: dict[str, Any], line: str | None) -> None:
        if self.as_json:
            click.echo(json.dumps(value, sort_keys=True))
        elif line is not None:
            click.echo(line)
        sys.stdout.flush()
