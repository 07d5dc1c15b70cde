"""`neon pageserver ...`: the local pageserver daemon."""

from __future__ import annotations

import sys

import click

from cli import pageserver_control as control
from cli.context import get_app
from cli.output import print_json
from pageserver.config import DEFAULT_HTTP_PORT, DEFAULT_PROTO_PORT


@click.group("pageserver")
def pageserver_group() -> None:
    """The pageserver daemon that keeps page history."""


@pageserver_group.command("start")
@click.option("--port", type=int, default=None, help=f"Proto port (default {DEFAULT_PROTO_PORT}).")
@click.option(
    "--http-port", type=int, default=None, help=f"HTTP port (default {DEFAULT_HTTP_PORT})."
)
@click.pass_context
def ps_start(ctx: click.Context, port: int | None, http_port: int | None) -> None:
    """Start the local pageserver in the background."""
    app = get_app(ctx)
    was = control.running_pid(app)
    row = control.start_local(app, port, http_port)
    verb = "is already running" if was else "started"
    click.echo(
        f"pageserver {verb}: proto 127.0.0.1:{row.port}, http "
        f"http://127.0.0.1:{row.http_port}/v1/status"
    )


@pageserver_group.command("stop")
@click.pass_context
def ps_stop(ctx: click.Context) -> None:
    """Stop the local pageserver (SIGTERM to its PID)."""
    app = get_app(ctx)
    click.echo("pageserver stopped" if control.stop_local(app) else "pageserver was not running")


@pageserver_group.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def ps_status(ctx: click.Context, as_json: bool) -> None:
    """Show whether the local pageserver runs, and what it serves."""
    app = get_app(ctx)
    if control.running_pid(app) is None:
        if as_json:
            print_json({"running": False})
        else:
            click.echo("pageserver: not running")
        sys.exit(3)
    status = control.local_api(app, start=False).status()
    if as_json:
        print_json({"running": True, **status.to_wire()})
        return
    click.echo(f"pageserver: running (pid {status.pid}, up {status.uptime_seconds:.0f}s)")
    click.echo(f"  proto: {status.listen_host}:{status.proto_port}")
    click.echo(f"  http:  http://{status.listen_host}:{status.http_port}/v1/status")
    click.echo(f"  nodes: {', '.join(n.node_id for n in status.nodes) or '-'}")


@pageserver_group.command("run")
@click.option(
    "--listen", envvar="NEON_LISTEN", default="127.0.0.1", show_default=True,
    help="Address to bind (NEON_LISTEN).",
)  # fmt: skip
@click.option("--port", type=int, envvar="NEON_PORT", default=DEFAULT_PROTO_PORT, show_default=True)
@click.option(
    "--http-port", type=int, envvar="NEON_HTTP_PORT", default=DEFAULT_HTTP_PORT, show_default=True
)
@click.pass_context
def ps_run(ctx: click.Context, listen: str, port: int, http_port: int) -> None:
    """Run the pageserver in the foreground (containers), configured by environment variables:
    NEON_FOLLOW_CONNSTR attaches the server to follow (see cli/container.py and the README);
    SIGTERM stops it cleanly."""
    import dataclasses
    import os

    from cli import container

    app = get_app(ctx)
    config = dataclasses.replace(
        container.ContainerConfig.from_environ(os.environ),
        listen=listen,
        port=port,
        http_port=http_port,
    )
    sys.exit(container.run(app, config))
