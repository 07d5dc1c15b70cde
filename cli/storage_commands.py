"""`neon storage ...`: places that hold page history and snapshots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cli.context import App, get_app
from cli.nodes import HISTORY_DIR
from cli.output import dir_size, human_size, print_json, print_table
from cli.pageserver_control import local_api
from cli.registry import StorageRow
from cli.remote_storage import REMOTE_TYPES, remote_status, upload_line
from cli.secrets import MASK, SOURCES_HINT
from cli.storage_usage import print_retained, retained_json
from cli.storages import (
    DEFAULT_STORAGE,
    SECRET_OPTIONS,
    STORAGE_TYPES,
    TYPE_LABELS,
    build_spec,
    display_options,
    location,
    materialize,
    parse_options,
    read_secret_options,
    secret_path,
    shown_options,
)
from pageserver_api.models import RemoteDetachRequest, RemoteStatusResponse
from proto.errors import AlreadyExists, Conflict, NeonError


@click.group("storage")
def storage_group() -> None:
    """Storages: native directories, S3 buckets, remote pageservers."""


def _remote(app: App) -> RemoteStatusResponse | None:
    """What the running pageserver says of s3 storages (None when it does not run)."""
    try:
        api = local_api(app, start=False)
    except NeonError:
        return None
    return remote_status(api)


def _used(row: StorageRow, remote: RemoteStatusResponse | None) -> int | None:
    """A native storage's bytes on disk; an s3 storage's from the indexes the pageserver
    holds (never a LIST of the bucket)."""
    if row.type == "native":
        return dir_size(Path(row.options["path"]))
    if row.type in REMOTE_TYPES and remote is not None:
        return next((u.used_bytes for u in remote.storages if u.storage == row.name), None)
    return None


def _path(row: StorageRow) -> str:
    return location(row.type, row.options)


def _breakdown(app: App, row: StorageRow) -> dict[str, int | None]:
    """What the bytes of a native storage are: data directories, page history, WAL."""
    if row.type != "native":
        return {}
    root = Path(row.options["path"])
    parts: dict[str, int | None] = {
        f"data directory {n.pgdata}": dir_size(n.datadir)
        for n in app.registry.nodes()
        if n.storage == row.name
    }
    parts["page history (layer files)"] = dir_size(root / HISTORY_DIR / "timelines")
    parts["WAL archives"] = dir_size(root / HISTORY_DIR / "wal")
    parts["LSN indexes"] = dir_size(root / HISTORY_DIR / "lsn_index")
    return parts


def _uploads(row: StorageRow, remote: RemoteStatusResponse | None) -> list[dict[str, Any]]:
    if remote is None:
        return []
    return [u.to_wire() for u in remote.uploads if u.storage == row.name]


def _attached(row: StorageRow, remote: RemoteStatusResponse | None) -> list[str]:
    if remote is None:
        return []
    return next((list(u.attached) for u in remote.storages if u.storage == row.name), [])


def _storage_json(app: App, row: StorageRow, remote: RemoteStatusResponse | None) -> dict[str, Any]:
    users = [n.id for n in app.registry.nodes() if n.storage == row.name]
    extra: dict[str, Any] = {}
    if row.type in REMOTE_TYPES:
        extra = {"uploads": _uploads(row, remote), "attached_areas": _attached(row, remote)}
    return {
        "name": row.name,
        "type": row.type,
        "type_label": TYPE_LABELS[row.type],
        "options": shown_options(row.options),
        "secrets": [
            k for k in SECRET_OPTIONS[row.type] if secret_path(app.home, row.name, k).exists()
        ],
        "path": _path(row),
        "used_bytes": _used(row, remote),
        "nodes": users,
        "breakdown": _breakdown(app, row),
        "retained": retained_json(app, row),
        **extra,
    }


@storage_group.command("attach")
@click.option(
    "-t", "--type", "type_", type=click.Choice(STORAGE_TYPES), default="native", show_default=True
)
@click.option("-n", "--name", required=True)
@click.option(
    "-c",
    "--config",
    "configs",
    multiple=True,
    metavar="KEY=VALUE",
    help="Option, repeatable: path=DIR, bucket=..., url=...",
)
@click.option(
    "--prompt-secrets",
    is_flag=True,
    help="Ask for the secrets not given with -c (hidden input; needs a terminal).",
)
@click.pass_context
def storage_attach(
    ctx: click.Context, type_: str, name: str, configs: tuple[str, ...], prompt_secrets: bool
) -> None:
    """Attach (and initialize) a storage.

    Secrets (secret_access_key, token, password) are best given as -c KEY=@FILE (@- reads
    stdin), -c KEY=env:VAR or --prompt-secrets: a literal value, or a password inside url=,
    is visible to every local user in the process list while the command runs. They are
    stored in NEON_HOME/secrets (0600) and shown as **** everywhere.
    """
    app = get_app(ctx)
    raw, literal = read_secret_options(name, type_, parse_options(configs), prompt=prompt_secrets)
    spec = build_spec(app.home, name, type_, raw)
    if app.registry.find_storage(name) is not None:
        raise AlreadyExists(f"storage {name!r} already exists; see `neon storage list`")
    for other in app.registry.storages():
        if spec.type == other.type == "native" and spec.path == other.options["path"]:
            raise Conflict(f"{spec.path} is already the directory of storage {other.name!r}")
    materialize(app.home, spec)
    with app.registry.transaction() as cur:
        if cur.execute("SELECT 1 FROM storages WHERE name = ?", (name,)).fetchone():
            raise AlreadyExists(f"storage {name!r} already exists; see `neon storage list`")
        app.registry.insert_storage(cur, spec.name, spec.type, spec.options)
    click.echo(f"Attached {TYPE_LABELS[type_]} storage {name} at {spec.path}")
    if literal:
        click.echo(
            f"neon: warning: {', '.join(literal)} was on the command line, visible to other "
            f"local users while it ran; next time give it as {SOURCES_HINT}",
            err=True,
        )


@storage_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def storage_list(ctx: click.Context, as_json: bool) -> None:
    """List attached storages."""
    app = get_app(ctx)
    rows = app.registry.storages()
    remote = _remote(app) if any(r.type in REMOTE_TYPES for r in rows) else None
    if as_json:
        print_json([_storage_json(app, r, remote) for r in rows])
        return
    print_table(
        ("NAME", "USED", "TYPE", "OPTIONS", "PATH"),
        [
            (
                r.name,
                human_size(_used(r, remote)),
                TYPE_LABELS[r.type],
                display_options(r.type, r.options),
                _path(r),
            )
            for r in rows
        ],
    )


@storage_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def storage_show(ctx: click.Context, name: str, as_json: bool) -> None:
    """Show one storage."""
    app = get_app(ctx)
    row = app.registry.get_storage(name)
    info = _storage_json(app, row, _remote(app) if row.type in REMOTE_TYPES else None)
    if as_json:
        print_json(info)
        return
    click.echo(f"{name}:")
    click.echo(f"  type: {info['type_label']}")
    click.echo(f"  path: {info['path']}")
    click.echo(f"  used: {human_size(info['used_bytes'])}")
    for key, value in sorted(info["options"].items()):
        if key not in ("path", "url"):
            click.echo(f"  {key}: {value}")
    for key in info["secrets"]:
        click.echo(f"  {key}: {MASK} (stored, not shown)")
    click.echo(f"  nodes: {', '.join(info['nodes']) or '-'}")
    if info["breakdown"]:
        click.echo("  used by:")
        for what, size in info["breakdown"].items():
            click.echo(f"    {what}: {human_size(size)}")
    print_retained(info["retained"] or [])
    for area in info.get("attached_areas", []):
        click.echo(f"  PITR area {area}: attached read-only from the bucket")
    for up in info.get("uploads", []):
        click.echo(f"  PITR area {up['area']}: {upload_line(up)}")


@storage_group.command("detach")
@click.argument("name")
@click.pass_context
def storage_detach(ctx: click.Context, name: str) -> None:
    """Forget a storage: nothing is removed and nothing is undone (its directory, as pg-neon
    set it up, and its files stay where they are; attach it again to use them)."""
    app = get_app(ctx)
    row = app.registry.get_storage(name)
    if name == DEFAULT_STORAGE:
        raise Conflict(f"the default storage {name!r} cannot be detached")
    if row.type in REMOTE_TYPES:
        try:
            api = local_api(app, start=False)
        except NeonError:
            api = None  # not running: it forgets the storage when told next (never, now)
        if api is not None:  # refused while PITR areas upload there
            api.remote_detach(RemoteDetachRequest(name))
    with app.registry.transaction() as cur:
        users = [r[0] for r in cur.execute("SELECT id FROM nodes WHERE storage = ?", (name,))]
        if users:
            raise Conflict(
                f"storage {name!r} is used by {', '.join(users)}; destroy those nodes first"
            )
        cur.execute("DELETE FROM storages WHERE name = ?", (name,))
    for key in SECRET_OPTIONS[row.type]:
        secret_path(app.home, name, key).unlink(missing_ok=True)
    kept = f"; nothing was removed: its files stay in {_path(row)}" if row.type == "native" else ""
    click.echo(f"Detached storage {name}{kept}")
