"""`neon pg attach` and `neon pg detach`: servers pg-neon follows but does not run
(cli/attach.py)."""

from __future__ import annotations

import sys

import click

from cli import attach, nodes
from cli.context import get_app
from cli.node_lock import locked_node
from cli.output import dir_size, print_json, progress_printer
from cli.progress import Progress
from cli.storages import DEFAULT_STORAGE


@click.command("attach")
@click.argument("name")
@click.option(
    "--connstr",
    required=True,
    help="libpq connection string of the server (host=… port=… user=… [password=…]); "
    "the user needs the REPLICATION attribute.",
)
@click.option(
    "--slot", default=None, help="Physical replication slot to create or reuse (neon_NAME)."
)
@click.option(
    "--pitr-ttl",
    default=None,
    metavar="TTL",
    help="Also keep a PITR area named NAME over the server's history (e.g. 7d, inf).",
)
@click.option(
    "--auth-method",
    "auth_methods",
    multiple=True,
    type=click.Choice([m.value for m in attach.AuthMethod]),
    help="Authentication methods to answer (default: scram-sha-256 and trust; md5 or "
    "password hand the password, or an offline-guessable hash, to whoever listens there).",
)
@click.option("-s", "--storage", default=DEFAULT_STORAGE, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the node as JSON.")
@click.pass_context
def pg_attach(
    ctx: click.Context,
    name: str,
    connstr: str,
    slot: str | None,
    pitr_ttl: str | None,
    auth_methods: tuple[str, ...],
    storage: str,
    as_json: bool,
) -> None:
    """Follow a running PostgreSQL 15 server that pg-neon does not run: its history becomes
    NAME's (snapshots NAME@TAG, PITR, extraction, export, push), from a base backup and then
    its WAL through a replication slot."""
    app = get_app(ctx)
    say = (lambda _m: None) if as_json else progress_printer()
    progress = Progress(not as_json and sys.stderr.isatty(), "Base backup")
    node = attach.attach_server(
        app,
        name,
        connstr,
        slot=slot,
        auth_methods=auth_methods,
        pitr_ttl=pitr_ttl,
        storage=storage,
        progress=progress,
        echo=say,
    )
    if as_json:
        status = nodes.node_status(app, node)
        print_json(nodes.node_json(app, status, dir_size(node.datadir)))
        return
    click.echo(
        f"Attached {node.pgdata}: following {node.extra['host']}:{node.port} through slot "
        f"{node.extra['slot']}; snapshots are {node.pgdata}@TAG"
    )


@click.command("detach")
@click.argument("name")
@click.option("--keep", is_flag=True, help="Keep the history (snapshots, PITR areas).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def pg_detach(ctx: click.Context, name: str, keep: bool, yes: bool) -> None:
    """Stop following an attached server and drop its replication slot there."""
    app = get_app(ctx)
    row = app.registry.get_node(name)
    if not yes:
        kept = "keep" if keep else "delete"
        click.confirm(
            f"Drop replication slot {row.extra.get('slot')} on {row.extra.get('host')}:"
            f"{row.port} and {kept} the history of {row.pgdata}?",
            abort=True,
        )
    with locked_node(app, row.id, "pg detach") as row:
        attach.detach_server(app, row, keep=keep)
    if keep:
        click.echo(f"Detached {row.pgdata}; its history is kept (`neon pg destroy` removes it).")
    else:
        click.echo(f"Detached {row.pgdata} and deleted its history.")
