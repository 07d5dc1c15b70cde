"""`neon pg start-rest` and `neon pg stop-rest`: a read-only REST API over a node, in the
background (cli/rest/)."""

from __future__ import annotations

import click

from cli import nodes
from cli.context import get_app
from cli.node_lock import locked_node
from cli.output import print_json
from cli.rest import control
from proto.errors import Conflict


@click.command("start-rest")
@click.argument("node")
@click.option("--port", type=int, default=None, help="Port (default 3000 or the next free).")
@click.option("--listen", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--db", "database", default="postgres", show_default=True, help="Database served.")
@click.option(
    "--statement-timeout",
    type=click.FloatRange(min=0.001),
    default=10.0,
    show_default=True,
    help="Seconds a request's query may run.",
)
@click.option(
    "--role",
    default=None,
    help="Read as this role (its privileges apply; default: the node's superuser).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the server (and token) as JSON.")
@click.pass_context
def pg_start_rest(
    ctx: click.Context,
    node: str,
    port: int | None,
    listen: str,
    database: str,
    statement_timeout: float,
    role: str | None,
    as_json: bool,
) -> None:
    """Serve a running node read-only over HTTP, PostgREST-style, with time travel
    (/@SNAPSHOT/TABLE, /@LSN/TABLE). Prints the token once; requests send it as
    `Authorization: Bearer TOKEN`."""
    app = get_app(ctx)
    with locked_node(app, node, "pg start-rest") as row:
        if nodes.node_status(app, row).state != "running":
            raise Conflict(f"{row.pgdata} is not running; start it with `neon pg start {row.id}`")
        info, token = control.start(
            app,
            row,
            port=port,
            listen=listen,
            database=database,
            statement_timeout=statement_timeout,
            role=role,
        )
    token_file = control.token_path(app, row.id)
    if as_json:
        print_json(
            {
                "node": row.id,
                "pgdata": row.pgdata,
                "url": info.url,
                "listen": info.listen,
                "port": info.port,
                "pid": info.pid,
                "token": token,
                "token_file": str(token_file),
                "log": str(control.log_file(app, row.id)),
            }
        )
        return
    click.echo(f"REST API for {row.pgdata} on {info.url}")
    click.echo(f"token: {token}")
    click.echo(
        f"(shown once; kept in {token_file}, readable by you only; "
        "send it as `Authorization: Bearer TOKEN`)"
    )


@click.command("stop-rest")
@click.argument("node")
@click.pass_context
def pg_stop_rest(ctx: click.Context, node: str) -> None:
    """Stop the node's REST server (and the snapshot servers it started)."""
    app = get_app(ctx)
    row = app.registry.get_node(node)
    if control.stop(app, row.id):
        click.echo(f"Stopped the REST server of {row.pgdata}.")
    else:
        click.echo(f"No REST server was running for {row.pgdata}.")
