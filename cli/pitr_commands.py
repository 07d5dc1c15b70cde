"""`neon pitr ...`: point-in-time recovery areas over a node's WAL history."""

from __future__ import annotations

import sys
from datetime import datetime

import click

from cli import nodes
from cli.context import App, get_app
from cli.ingest_wait import wait_for_ingest
from cli.node_lock import node_lock
from cli.output import human_size, print_json, print_table
from cli.pageserver_control import local_api
from cli.remote_storage import REMOTE_TYPES, s3_settings, sync_remote
from pageserver.history.pitr import check_area_name
from pageserver.storage.retention import RetentionPolicy
from pageserver_api.models import (
    PitrCommitsRequest,
    PitrCommitsResponse,
    PitrCreateRequest,
    PitrDestroyRequest,
    PitrExtractRequest,
    XactInfo,
    parse_time,
)
from pg15.lsn import format_lsn, parse_lsn
from proto.errors import InvalidArgument, NotFound


@click.group("pitr")
def pitr_group() -> None:
    """PITR areas: any LSN or time inside one can be extracted as a snapshot."""


@pitr_group.command("create")
@click.argument("name")
@click.option("--pg", "node", default=None, help="The node (default: the only one).")
@click.option("--ttl", default="inf", show_default=True, help="History to keep: 30d, 12h, inf.")
@click.option("--size-limit", default="inf", show_default=True, help="10G, 500M, inf.")
@click.option(
    "--storage",
    default=None,
    help="Keep the area's history also in this s3 or remote storage (default: the node's "
    "storage only).",
)
@click.option(
    "--takeover",
    is_flag=True,
    help="With --storage: take the area over from a pageserver that is gone for good (its "
    "lease is taken; the area then holds this node's history).",
)
@click.pass_context
def pitr_create(
    ctx: click.Context, name: str, node: str | None, ttl: str, size_limit: str,
    storage: str | None, takeover: bool,
) -> None:  # fmt: skip
    """Keep a node's history for point-in-time extraction."""
    check_area_name(name)  # bad input: one line, before any state
    RetentionPolicy.parse_new(ttl, size_limit)
    app = get_app(ctx)
    if node is None:
        nodes = app.registry.nodes()
        if len(nodes) != 1:
            raise InvalidArgument("more than one node (or none): say which with --pg NODE")
        row = nodes[0]
    else:
        row = app.registry.get_node(node)
    remote = None
    if storage is not None and storage != row.storage:
        target = app.registry.get_storage(storage)
        if target.type not in REMOTE_TYPES:
            raise InvalidArgument(
                f"node {row.id} keeps its history in storage {row.storage!r}; PITR areas live "
                f"there or also in an s3 or remote storage ({storage!r} is {target.type}; push "
                "snapshots to it instead)"
            )
        remote = s3_settings(app, target)
    if takeover and remote is None:
        raise InvalidArgument("--takeover is for an area kept in an s3 or remote storage")
    local_api(app).pitr_create(
        PitrCreateRequest(
            name, row.id, ttl=ttl, size_limit=size_limit, remote=remote, takeover=takeover
        )
    )
    kept = f", kept in {storage}" if remote is not None else ""
    click.echo(
        f"Created PITR area {name} over {row.pgdata} (ttl {ttl}, size limit {size_limit}{kept})"
    )


@pitr_group.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def pitr_list(ctx: click.Context, as_json: bool) -> None:
    """List PITR areas with the LSN range each covers now."""
    app = get_app(ctx)
    api = local_api(app)
    sync_remote(app, api)
    areas = api.pitr_list()
    names = {n.id: n.pgdata for n in app.registry.nodes()}
    windows = [(a, format_lsn(a.from_lsn or 0), format_lsn(a.to_lsn or 0)) for a in areas]
    if as_json:
        print_json([{**a.to_wire(), "from": start, "to": end} for a, start, end in windows])
        return
    print_table(
        ("NAME", "PG", "TTL", "SIZE_LIMIT", "FROM", "TO", "STORAGE"),
        [
            (a.name, names.get(a.node_id, a.node_id), a.ttl, a.size_limit, start, end, a.storage)
            for a, start, end in windows
        ],
    )


@pitr_group.command("destroy")
@click.argument("name")
@click.pass_context
def pitr_destroy(ctx: click.Context, name: str) -> None:
    """Stop keeping history for an area (GC then frees it)."""
    local_api(get_app(ctx)).pitr_destroy(PitrDestroyRequest(name))
    click.echo("Ok")


@pitr_group.command("gc")
@click.argument("name")
@click.pass_context
def pitr_gc(ctx: click.Context, name: str) -> None:
    """Run garbage collection now (for the area's storage)."""
    app = get_app(ctx)
    api = local_api(app)
    if name not in {a.name for a in api.pitr_list()}:
        raise NotFound(f"PITR area {name!r} does not exist; see `neon pitr list`")
    results = api.gc_run()
    removed = sum(r.removed_layers for r in results)
    freed = sum(r.removed_bytes for r in results)
    click.echo(f"GC removed {removed} layer files ({human_size(freed)})")


@pitr_group.command("extract-snapshot")
@click.argument("name")
@click.option("--lsn", default=None, help="Record boundary at or below this LSN.")
@click.option(
    "--time",
    "at",
    default=None,
    help="The last commit at or before this time (ISO 8601 with a zone).",
)
@click.option("--as", "tag", default=None, help="Snapshot tag (default pitr-<LSN>).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def pitr_extract(
    ctx: click.Context, name: str, lsn: str | None, at: str | None, tag: str | None, as_json: bool
) -> None:
    """Name the state at an LSN or time inside the area as a snapshot."""
    request = PitrExtractRequest(
        name,
        lsn=parse_lsn(lsn) if lsn is not None else None,
        time=parse_time(at) if at is not None else None,
        tag=tag,
    )
    app = get_app(ctx)
    api = local_api(app)
    sync_remote(app, api)
    area = next((a for a in api.pitr_list() if a.name == name), None)
    if area is None:
        raise NotFound(f"PITR area {name!r} does not exist; see `neon pitr list`")
    with node_lock(app.home, area.node_id, "pitr extract-snapshot"):
        _wait_for_ingest(app, area.node_id, request.lsn, show_progress=not as_json)
        snap = api.pitr_extract(request)
    if as_json:
        print_json({**snap.to_wire(), "lsn_text": snap.lsn_text})
    else:
        click.echo(f"{snap.name} at {snap.lsn_text}")


@pitr_group.command("commits")
@click.argument("node")
@click.option(
    "--around",
    default=None,
    metavar="LSN|TIME",
    help="An LSN (X/Y) or an ISO 8601 time with a zone (default: the last ingested record).",
)
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=10, show_default=True, help="Rows per side."
)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def pitr_commits(
    ctx: click.Context, node: str, around: str | None, limit: int, as_json: bool
) -> None:
    """List the commits (and aborts, two-phase records) of a node's history around a point.

    Up to --limit records ending at or before the point and as many after it, read from the
    archived WAL (what PITR areas keep); each END LSN is an extraction point
    (`pitr extract-snapshot AREA --lsn END` gives the state just after that record)."""
    lsn, at = _point(around)
    app = get_app(ctx)
    row = app.registry.get_node(node)
    api = local_api(app)
    _wait_for_ingest(app, row.id, lsn, show_progress=not as_json)
    listing = api.pitr_commits(PitrCommitsRequest(row.id, lsn=lsn, time=at, limit=limit))
    if as_json:
        print_json(listing.to_wire())
        return
    _print_commits(listing)


def _point(around: str | None) -> tuple[int | None, datetime | None]:
    """--around as an LSN (it has a slash and no dash) or a time."""
    if around is None:
        return None, None
    if "/" in around and "-" not in around:
        return parse_lsn(around), None
    return None, parse_time(around, "--around")


def _print_commits(listing: PitrCommitsResponse) -> None:
    click.echo(
        f"Around {format_lsn(listing.point)} (WAL read {format_lsn(listing.scanned_from)}"
        f" .. {format_lsn(listing.scanned_to)})"
    )
    rows = [_commit_row(x) for x in listing.before]
    rows.append(("--- point ---", format_lsn(listing.point), "", "", ""))
    rows += [_commit_row(x) for x in listing.after]
    print_table(("KIND", "END LSN", "XID", "TIME", "GID"), rows)


def _commit_row(x: XactInfo) -> tuple[str, str, str, str, str]:
    return (x.kind, format_lsn(x.end_lsn), str(x.xid), x.time.isoformat(), x.gid or "")


def _wait_for_ingest(app: App, node_id: str, lsn: int | None, *, show_progress: bool) -> None:
    """Wait until the page history holds `lsn` (or, for a time, all the node has written): an
    LSN the server wrote is extractable even when ingest has not reached it yet. Past what
    the server wrote, nothing is waited for: the area's bounds refuse it."""
    node = app.registry.find_node(node_id)
    if node is None:
        return  # the node is gone: its history is all there will be
    server = nodes.server_wal_lsn(app, nodes.node_status(app, node))
    if server is None:
        return
    if lsn is not None and lsn > server:
        raise InvalidArgument(
            f"LSN {format_lsn(lsn)} is past what node {node_id} has written (its WAL ends "
            f"at {format_lsn(server)})"
        )
    wait_for_ingest(
        app,
        node_id,
        server if lsn is None else lsn,
        show_progress=show_progress and sys.stderr.isatty(),
    )
