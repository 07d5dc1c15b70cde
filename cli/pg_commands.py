"""`neon pg ...`: PostgreSQL nodes."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
from collections.abc import Callable
from typing import Any

import click

from cli import checkout, nodes, replicas
from cli.context import App, get_app
from cli.lazy_group import LazyGroup
from cli.node_lock import locked_node
from cli.output import dir_size, human_size, print_json, print_table, progress_printer
from cli.pageserver_control import local_api
from cli.progress import Progress
from cli.registry import ReplicaRow
from cli.remote_storage import node_uploads, sync_remote, upload_line
from cli.rest import control as rest_control
from cli.storages import DEFAULT_STORAGE
from cli.tablespace_mapping import parse_mappings
from pageserver.history.snapshots import split_snapshot_name
from pageserver_api.models import SnapshotDestroyRequest
from proto.errors import InvalidArgument

# Commands with modules of their own load on use (cli/lazy_group.py): `pg checkout` does not
# import attaching (a base backup client, the WAL receiver) or the REST server.
LAZY_SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "attach": (
        "cli.attach_commands",
        "pg_attach",
        "Follow a running PostgreSQL 15 server that pg-neon does not run: its history becomes "
        "NAME's (snapshots NAME@TAG, PITR, extraction, export, push), from a base backup and "
        "then its WAL through a replication slot.",
    ),
    "detach": (
        "cli.attach_commands",
        "pg_detach",
        "Stop following an attached server and drop its replication slot there.",
    ),
    "start-rest": (
        "cli.rest_commands",
        "pg_start_rest",
        "Serve a running node read-only over HTTP, PostgREST-style, with time travel "
        "(/@SNAPSHOT/TABLE, /@LSN/TABLE).",
    ),
    "stop-rest": (
        "cli.rest_commands",
        "pg_stop_rest",
        "Stop the node's REST server (and the snapshot servers it started).",
    ),
}
"""tests/cli/test_lazy_imports.py checks that each short help is the command's own."""


@click.group("pg", cls=LazyGroup, lazy=LAZY_SUBCOMMANDS)
@click.pass_context
def pg_group(ctx: click.Context) -> None:
    """PostgreSQL nodes: data directories and their servers."""
    if (ctx.find_root().obj or {}).get("pageserver"):
        raise InvalidArgument(
            "neon pg manages this machine's nodes with the home's own pageserver; run it "
            "without --pageserver / NEON_PAGESERVER (the nodes a remote pageserver follows "
            "are reached through snapshot and pitr commands)"
        )


@pg_group.command("create")
@click.option("--no-start", is_flag=True, help="Initialize the data directory only.")
@click.option(
    "-s",
    "--storage",
    default=DEFAULT_STORAGE,
    show_default=True,
    help="Native storage that holds the data directory.",
)
@click.option("-n", "--name", default=None, help="Data directory name (default pgdata$i).")
@click.option("--port", type=int, default=None, help="Port (default 5432 or the next free).")
@click.option(
    "--snapshot",
    "snapshot",
    default=None,
    metavar="SNAPSHOT|SOURCE",
    help=(
        "Create the node from a snapshot (PGDATA@TAG or an imported NAME: a branch, nothing is "
        "copied), or from anything `snapshot import --from` takes (basebackup://…, a path with "
        "a '/', http(s)://…/x.neon): imported into a temporary snapshot, dropped afterwards."
    ),
)
@click.option("--cow", is_flag=True, help="Share unchanged files with the snapshot's files.")
@click.option(
    "--tablespace-mapping",
    "tablespace_mapping",
    multiple=True,
    metavar="OLD=NEW",
    help=(
        "With --snapshot: put the tablespace recorded at OLD in the new directory NEW (both "
        "absolute; '\\=' for an '=' in a path; repeatable) instead of inside the data "
        "directory."
    ),
)
@click.option("--json", "as_json", is_flag=True, help="Print the node as JSON.")
@click.argument("pgdata", required=False, metavar="[PGDATA]")
@click.pass_context
def pg_create(
    ctx: click.Context,
    no_start: bool,
    storage: str,
    name: str | None,
    port: int | None,
    snapshot: str | None,
    cow: bool,
    tablespace_mapping: tuple[str, ...],
    as_json: bool,
    pgdata: str | None,
) -> None:
    """Create a data directory (initdb, or a snapshot) and start PostgreSQL on it.

    PGDATA names it, as -n does (default pgdata$i)."""
    app = get_app(ctx)
    if cow and snapshot is None:
        raise InvalidArgument("--cow needs --snapshot")
    if tablespace_mapping and snapshot is None:
        raise InvalidArgument("--tablespace-mapping needs --snapshot")
    mappings = parse_mappings(tablespace_mapping)
    if pgdata is not None and name is not None and pgdata != name:
        raise InvalidArgument(f"two names given ({pgdata!r} and -n {name!r}); give one")
    name = name if name is not None else pgdata
    say = (lambda _text, _nl=True: None) if as_json else _say
    with contextlib.ExitStack() as temporary:
        if snapshot is not None and is_import_source(snapshot):
            bar = not as_json and sys.stderr.isatty()  # the line is printed once it is done
            if not bar:
                say("Downloading snapshot...", False)
            try:
                snapshot = temporary_import(app, snapshot, storage, temporary, bar, say)
            except BaseException:
                say("" if bar else " failed.")
                raise
            say("Downloading snapshot... Done." if bar else " Done.")
        elif snapshot is not None:  # it may be held in an attached bucket not read yet
            sync_remote(app, local_api(app))
        status = nodes.create_node(
            app,
            storage=storage,
            name=name,
            port=port,
            start=not no_start,
            snapshot=app.registry.snapshot_name(snapshot) if snapshot is not None else None,
            tablespace_mapping=mappings,
            progress=progress_printer(),
        )
        if cow:
            click.echo(
                "neon: note: --cow: the data directory was written in full from the page "
                "history (a full copy); reflink sharing is not available for rebuilt directories",
                err=True,
            )
        if status.state == "running":
            say(f"Started postgres on localhost:{status.node.port}")
        else:
            say(
                f"Created {status.node.pgdata} ({status.node.id}); "
                f"start it with `neon pg start {status.node.id}`"
            )
    if as_json:
        print_json(nodes.node_json(app, status, dir_size(status.node.datadir)))


def _say(text: str, newline: bool = True) -> None:
    click.echo(text, nl=newline)
    sys.stdout.flush()


def is_import_source(snapshot: str) -> bool:
    """A URL or a path, not a snapshot name: names never hold ':' or '/'."""
    return "://" in snapshot or "/" in snapshot


def temporary_import(
    app: App,
    source: str,
    storage: str,
    cleanup: contextlib.ExitStack,
    show_progress: bool,
    say: Callable[[str, bool], None],
) -> str:
    """Import `source` as a temporary snapshot that `cleanup` destroys (the node's branch
    keeps the history it needs); return the snapshot's name."""
    name = f"pg-create-{os.getpid()}-{secrets.token_hex(4)}"
    from cli.snapshot_commands import import_snapshot  # here: `pg start` and the rest need none

    progress = Progress(show_progress, "Downloading snapshot", transient=True)
    import_snapshot(app, source, name, storage, progress)

    def destroy() -> None:
        say("Destroying snapshot...", False)
        local_api(app).snapshot_destroy(SnapshotDestroyRequest(name))
        say(" Done.", True)

    cleanup.callback(destroy)
    return name


@pg_group.command("start")
@click.option(
    "--replica",
    is_flag=True,
    help="Create and start a hot standby of NODE (streaming from its own slot).",
)
@click.option("-n", "--name", default=None, help="With --replica: its name (replica-$i).")
@click.option("--port", type=int, default=None, help="With --replica: its port.")
@click.option(
    "--from-snapshot",
    "from_snapshot",
    default=None,
    metavar="PGDATA@TAG",
    help="With --replica: a static read-only replica at this snapshot of NODE.",
)
@click.argument("node")
@click.pass_context
def pg_start(
    ctx: click.Context,
    replica: bool,
    name: str | None,
    port: int | None,
    from_snapshot: str | None,
    node: str,
) -> None:
    """Start PostgreSQL on a node (ID or data directory name) or a replica; with --replica,
    create a replica of NODE."""
    app = get_app(ctx)
    if not replica and (name, port, from_snapshot) != (None, None, None):
        raise InvalidArgument("-n, --port and --from-snapshot go with --replica")
    if replica:
        snap = app.registry.snapshot_name(from_snapshot) if from_snapshot else None
        made = replicas.create(
            app, app.registry.get_node(node), name=name, port=port, snapshot=snap
        )
        click.echo(f"Started replica {made.name} on localhost:{made.port}")
        return
    if (standby := replicas.find(app, node)) is not None:
        if replicas.start(app, standby):
            click.echo(f"Started replica {standby.name} on localhost:{standby.port}")
        else:
            click.echo(f"replica {standby.name} is already running on localhost:{standby.port}")
        return
    with locked_node(app, node, "pg start") as row:
        checkout.finish_pending(app, row)
        before = nodes.node_status(app, row).state
        nodes.start_node(app, row)
    if before == "running":
        click.echo(f"postgres on {row.pgdata} is already running on localhost:{row.port}")
    else:
        click.echo(f"Started postgres on localhost:{row.port}")


@pg_group.command("stop")
@click.argument("node")
@click.option(
    "-m",
    "--mode",
    type=click.Choice(["smart", "fast", "immediate"]),
    default="fast",
    show_default=True,
)
@click.pass_context
def pg_stop(ctx: click.Context, node: str, mode: str) -> None:
    """Stop PostgreSQL on a node or a replica."""
    app = get_app(ctx)
    if (standby := replicas.find(app, node)) is not None:
        stopped = replicas.stop(standby, mode)
        click.echo(f"{'Stopped' if stopped else 'Was not running:'} replica {standby.name}.")
        return
    wait_seconds = nodes.shutdown_checkpoint_wait()  # a bad setting refused before anything
    with locked_node(app, node, "pg stop") as row:
        if rest_control.stop(app, row.id):
            click.echo(f"Stopped the REST server of {row.pgdata}.")
        if not nodes.stop_node(app, row, mode):
            click.echo(f"postgres on {row.pgdata} was not running.")
            return
        click.echo(f"Stopped postgres on {row.pgdata}.")
        reached = nodes.wait_for_shutdown_checkpoint(app, row, wait_seconds)
    if reached is False:
        click.echo(
            f"neon: warning: the pageserver has not yet received the shutdown checkpoint of "
            f"{row.pgdata}; it will catch up from the replication slot",
            err=True,
        )


@pg_group.command("destroy")
@click.argument("node")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_context
def pg_destroy(ctx: click.Context, node: str, yes: bool) -> None:
    """Stop a node (or a replica) and delete its data directory; a replica's slot on its
    primary is dropped. A node with replicas is refused: destroy them first."""
    app = get_app(ctx)
    if (standby := replicas.find(app, node)) is not None:
        if not yes:
            click.confirm(f"Destroy replica {standby.name}?", abort=True)
        replicas.destroy(app, standby)
        click.echo(f"Destroyed replica {standby.name}.")
        return
    row = app.registry.get_node(node)
    replicas.refuse_primary_destroy(app, row)
    if not yes:
        click.confirm(f"Destroy {row.id} and delete {row.datadir}?", abort=True)
    with locked_node(app, row.id, "pg destroy") as row:
        removed = nodes.destroy_node(app, row)
    for path in removed:
        click.echo(f"Removed {path} (a tablespace of {row.pgdata}).")
    click.echo(f"Destroyed {row.id} ({row.pgdata}).")


@pg_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def pg_list(ctx: click.Context, as_json: bool) -> None:
    """List nodes."""
    app = get_app(ctx)
    nodes.cleanup_abandoned(app)
    replicas.cleanup_abandoned(app)
    statuses = [nodes.node_status(app, n) for n in app.registry.nodes()]
    wal = nodes.wal_positions(app, statuses)
    infos = [nodes.node_json(app, s, dir_size(s.node.datadir), wal[s.node.id]) for s in statuses]
    for info, s in zip(infos, statuses, strict=True):
        info["replicas"] = [
            replicas.replica_json(app, replicas.status(r), s.node)
            for r in app.registry.replicas(s.node.id)
        ]
    if as_json:
        print_json(infos)
        return
    rows = [
        (
            i["id"],
            i["pgdata"],
            human_size(i["used_bytes"]),
            i["storage"],
            i["endpoint"] if i["state"] in ("running", "attached") else "-",
            _state_cell(i),
            i["wal"].get("ingested_lsn"),
            human_size(i["wal"]["lag_bytes"]),
        )
        for i in infos
    ]
    # Replicas under their primary, as in the proposal: `replica-1 localhost:5433`.
    table: list[tuple[object, ...]] = []
    for i, row in zip(infos, rows, strict=True):
        table += [
            row,
            *((r["id"], "", "", "", r["endpoint"], r["state"], "", "") for r in i["replicas"]),
        ]
    # LAG: WAL the server wrote that is not in the page history yet (snapshots wait for it).
    print_table(("ID", "PGDATA", "USED", "STORAGE", "ENDPOINT", "STATE", "INGESTED", "LAG"), table)
    for i in infos:
        if i["wal"].get("ingest", "ok") != "ok":
            click.echo(f"{i['id']}: WAL ingest {i['wal']['ingest']}: {i['wal'].get('error')}")


def _state_cell(info: dict[str, Any]) -> str:
    """The node's state, and a stopped WAL ingest next to it (its error follows the table)."""
    ingest = info["wal"].get("ingest", "ok")
    return info["state"] if ingest == "ok" else f"{info['state']}, ingest {ingest}"


@pg_group.command("show")
@click.argument("node")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def pg_show(ctx: click.Context, node: str, as_json: bool) -> None:
    """Show one node or replica, including a connection string for psql."""
    app = get_app(ctx)
    if (standby := replicas.find(app, node)) is not None:
        _show_replica(app, standby, as_json)
        return
    row = app.registry.get_node(node)
    status = nodes.node_status(app, row)
    wal = nodes.wal_positions(app, [status])[row.id]
    info = nodes.node_json(app, status, dir_size(row.datadir), wal)
    info["history"] = nodes.node_history(app, row)
    info["remote_uploads"] = node_uploads(app, row.id)
    if as_json:
        print_json(info)
        return
    click.echo(f"{row.pgdata}:")
    for key in (
        "id",
        "role",
        "state",
        "pid",
        "storage",
        "datadir",
        "endpoint",
        "connstr",
        "tcp_connstr",
        "rest",
        "log",
    ):
        click.echo(f"  {key}: {info[key] if info[key] is not None else '-'}")
    click.echo(f"  space used on {row.storage}: {human_size(info['used_bytes'])}")
    click.echo("  wal stream:")
    for key in (
        "stream",
        "ingest",
        "timeline",
        "received_lsn",
        "flushed_lsn",
        "decoded_lsn",
        "ingested_lsn",
        "durable_lsn",
        "records",
        "server_lsn",
        "error",
    ):
        if key in wal:
            click.echo(f"    {key}: {wal[key] if wal[key] is not None else '-'}")
    click.echo(f"    lag: {human_size(wal['lag_bytes'])} not ingested yet")
    if "receive_lag_bytes" in wal:
        click.echo(f"    receive lag: {human_size(wal['receive_lag_bytes'])} not received yet")
    history = info["history"]
    click.echo(f"  snapshots:\n    on {row.storage}:")
    for snap in history["snapshots"]:
        click.echo(f"      {snap['name'].partition('@')[2]}: {human_size(snap['size_bytes'])}")
    click.echo(f"  pitr:\n    on {row.storage}:")
    for area in history["pitr"]:
        click.echo(f"      {area['name']}: ttl {area['ttl']}, size limit {area['size_limit']}")
    for up in info["remote_uploads"]:  # the RPO if this machine is lost: the lag
        click.echo(f"    kept in {up['storage']} ({up['area']}): {upload_line(up)}")


@pg_group.command("checkout")
@click.argument("snapshot", metavar="PGDATA@TAG")
@click.pass_context
def pg_checkout(ctx: click.Context, snapshot: str) -> None:
    """Roll the node back (or forward) to a snapshot; its current state becomes HEAD{i}."""
    app = get_app(ctx)
    snapshot = app.registry.snapshot_name(snapshot)
    pgdata, _tag = split_snapshot_name(snapshot)
    with (
        locked_node(app, pgdata, "pg checkout") as row,
        replicas.reseeded_after_checkout(app, row, click.echo),
    ):
        checkout.checkout(app, row, snapshot, click.echo)


def _show_replica(app: App, standby: ReplicaRow, as_json: bool) -> None:
    primary = app.registry.get_node(standby.primary_id)
    info = replicas.replica_json(app, replicas.status(standby), primary, with_lag=True)
    if as_json:
        print_json(info)
        return
    click.echo(f"{standby.name}:")
    for key in ("role", "primary", "kind", "snapshot", "state", "pid", "datadir", "endpoint"):
        click.echo(f"  {key}: {info[key] if info[key] is not None else '-'}")
    for key in ("connstr", "slot", "log"):
        click.echo(f"  {key}: {info[key] if info[key] is not None else '-'}")
    lag = info["lag"]
    click.echo("  replay:")
    for key in ("receiver", "primary_lsn", "receive_lsn", "replay_lsn"):
        click.echo(f"    {key}: {lag[key] if lag[key] is not None else '-'}")
    seconds = lag["lag_seconds"]
    click.echo(
        f"    lag: {human_size(lag['lag_bytes'])}, "
        f"{f'{seconds:.1f} s' if seconds is not None else '- s'} behind the primary"
    )
