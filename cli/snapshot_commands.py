"""`neon snapshot ...`: named states of a node, and read-only servers over them."""

from __future__ import annotations

import contextlib
import functools
import json
import re
import shutil
import struct
import sys
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cli import nodes, postmaster
from cli.context import App, get_app
from cli.ingest_wait import refuse_if_ingest_stopped, wait_for_ingest
from cli.node_lock import locked_node, node_lock
from cli.nodes import HISTORY_DIR
from cli.output import human_size, print_json, print_table
from cli.pageserver_control import local_api
from cli.pg_files import write_pg_file
from cli.ports import port_is_free
from cli.progress import Progress
from cli.storages import DEFAULT_STORAGE
from datadir_files.pg_account import ensure_own_dir, traversal_mode
from pageserver.history.snapshots import check_import_name, check_user_tag, split_snapshot_name
from pageserver_api.client import SyncPageserverClient
from pageserver_api.models import (
    BasebackupResponse,
    SnapshotCreateRequest,
    SnapshotDestroyRequest,
    SnapshotImportDeltaRequest,
    SnapshotImportRequest,
    SnapshotInfo,
    SnapshotShowRequest,
    TimelineInfoRequest,
)
from pg15.lsn import format_lsn
from proto.errors import AlreadyExists, Conflict, ExternalCommandFailed, InvalidArgument, NotFound

if TYPE_CHECKING:
    from cli.neon_file_import import LocalNeonFile

SNAPSHOT_SERVER_PORT = 55432
PORT_ATTEMPTS = 3


@click.command("create")
@click.argument("name", metavar="PGDATA@TAG")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def snapshot_create(ctx: click.Context, name: str, as_json: bool) -> None:
    """Name the node's current state (O(1): nothing is copied)."""
    app = get_app(ctx)
    pgdata, tag = split_snapshot_name(name)
    check_user_tag(tag)
    if app.remote is not None:
        snap = _create_on_remote(app, pgdata, tag)
    else:
        with locked_node(app, pgdata, "snapshot create") as node:
            name = f"{node.pgdata}@{tag}"
            show = not as_json and sys.stderr.isatty()
            wait = _checkpointed_lsn(app, nodes.node_status(app, node), show)
            if wait is not None:
                wait_for_ingest(app, node.id, wait, show_progress=show)
            request = SnapshotCreateRequest(node.id, name, lsn=wait, wait_timeout=120)
            snap = local_api(app).snapshot_create(request)
    if as_json:
        print_json({**snap.to_wire(), "lsn_text": snap.lsn_text})


def _checkpointed_lsn(app: App, status: nodes.NodeStatus, show: bool) -> int | None:
    """The state the node has made durable: its flush LSN after a checkpoint (from which a
    checkout back here rewrites what changed: cli/checkout_delta.py), or its shutdown
    checkpoint. Right after a load the checkpoint (writing and fsyncing the load's pages) and
    ingest of the load's WAL each take a second or more: the history catches up to the flush
    LSN before the checkpoint while the checkpoint runs, so only its own records are left to
    wait for afterwards (and the pageserver pauses compaction meanwhile, as for any wait)."""
    if status.state != "running" or status.node.role == nodes.ATTACHED:
        return nodes.server_wal_lsn(app, status, checkpoint=True)
    before = nodes.server_wal_lsn(app, status)
    if before is not None:
        # No CHECKPOINT on a server whose history cannot follow it (ingest stopped on an
        # error: the snapshot cannot be named anyway). On a full disk the checkpoint may even
        # take the server down: CheckPointReplicationOrigin (replication/logical/origin.c)
        # writes pg_logical/replorigin_checkpoint.tmp at every checkpoint and PANICs when
        # the write fails.
        refuse_if_ingest_stopped(app, status.node.id, before)
    with ThreadPoolExecutor(1, thread_name_prefix="checkpoint") as pool:
        checkpointed = pool.submit(nodes.server_wal_lsn, app, status, True)
        if before is not None:
            wait_for_ingest(app, status.node.id, before, show_progress=show)
        return checkpointed.result()


def _create_on_remote(app: App, ref: str, tag: str) -> SnapshotInfo:
    """`--pageserver`: a node that pageserver follows (this home's registry does not know
    it), named once that pageserver has ingested what the server has flushed (it asks)."""
    api = local_api(app)
    followed = api.node_list()
    node = next((n for n in followed if ref in (n.node_id, n.pgdata)), None)
    if node is None:
        known = ", ".join(n.pgdata or n.node_id for n in followed) or "none"
        raise NotFound(
            f"the pageserver at --pageserver follows no node {ref!r} (it follows: {known})"
        )
    name = f"{node.pgdata or node.node_id}@{tag}"
    request = SnapshotCreateRequest(node.node_id, name, wait_timeout=120, at_server_lsn=True)
    return api.snapshot_create(request)


@click.command("import")
@click.option("--from", "source", required=True, metavar="SOURCE", help=(
    "basebackup://USER[:PASSWORD]@HOST[:PORT]/ (a running server), a stopped cluster's data "
    "directory, pg_basebackup output (plain, or -F tar), or a .neon file (a path or an "
    "http(s):// URL)"
))  # fmt: skip
@click.argument("name")
@click.option("-s", "--storage", default=DEFAULT_STORAGE, show_default=True)
@click.option("--tablespace-mapping", "tablespace_mapping", multiple=True, metavar="OLD=NEW",
              help="The source's tablespace at OLD is read from NEW and recorded as at NEW (both "
              "absolute; '\\=' for an '=' in a path; repeatable).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def snapshot_import(
    ctx: click.Context,
    source: str,
    name: str,
    storage: str,
    tablespace_mapping: tuple[str, ...],
    as_json: bool,
) -> None:
    """Import an existing PostgreSQL 15 database as snapshot NAME, on a history of its own."""
    app = get_app(ctx)
    app.require_own_pageserver("neon snapshot import")
    from cli.tablespace_mapping import parse_mappings

    mappings = parse_mappings(tablespace_mapping)
    progress = Progress(not as_json and sys.stderr.isatty(), "Importing")
    snap = import_snapshot(app, source, name, storage, progress, mappings)
    if as_json:  # else quiet, as `snapshot create` (the proposal shows only the progress bar)
        print_json({**snap.to_wire(), "lsn_text": snap.lsn_text})


def import_snapshot(
    app: App,
    source: str,
    name: str,
    storage: str,
    progress: Progress,
    tablespace_mapping: Mapping[str, str] | None = None,
) -> SnapshotInfo:
    """Import `source` (see cli/snapshot_import.py) as the bare-named snapshot `name` in the
    native storage `storage`; nothing is visible unless the whole import succeeded."""
    from cli.delta_import import parent_here
    from cli.live_import import LiveImport
    from cli.neon_file_import import import_whole_file
    from cli.snapshot_file_source import is_neon_source
    from cli.snapshot_import import import_workdir, prepare_clean_datadir

    storage_path = import_target(app, name, storage)
    api = local_api(app)
    try:
        with import_workdir(storage_path) as workdir:
            if not tablespace_mapping and is_neon_source(source):  # the pageserver reads it
                send = functools.partial(register_neon_file, api, name, workdir, storage_path)
                imported = import_whole_file(source, workdir, progress, send)
                if imported is not None:
                    return imported
            live: LiveImport[SnapshotInfo] = LiveImport(
                workdir / "pgdata",
                lambda pgdata, origin: register_import(api, name, pgdata, storage_path, origin),
            )
            with live:  # a server's backup and a whole .neon file are imported as they come
                clean = prepare_clean_datadir(
                    source, storage_path, workdir, progress, tablespace_mapping,
                    parent_here=functools.partial(parent_here, api), live=live,
                )  # fmt: skip
                if live.begun:
                    return live.finish()
            if clean.delta_on is not None:  # the delta goes on a branch of its parent here
                assert clean.origin is not None
                request = SnapshotImportDeltaRequest(
                    name, str(clean.path), clean.delta_on, clean.origin
                )
                return api.snapshot_import_delta(request)
            return register_import(api, name, clean.path, storage_path, clean.origin)
    finally:
        progress.close()


def import_target(app: App, name: str, storage: str) -> Path:
    """The path of the native storage `storage`, after checking that `name` can be imported
    into it (a valid name, not taken): refused before any byte is read."""
    storage_path = native_storage_path(app, storage)
    check_new_import(local_api(app), name)
    return storage_path


def native_storage_path(app: App, storage: str) -> Path:
    """Where the native storage `storage` is (snapshots are imported into native storages)."""
    store = app.registry.get_storage(storage)
    if store.type != "native":
        raise InvalidArgument(
            f"storage {storage!r} is of type {store.type}; snapshots are imported into a native "
            "storage (use -s local or attach one with `neon storage attach -t native`)"
        )
    return Path(store.options["path"])


def check_new_import(api: SyncPageserverClient, name: str) -> None:
    """`name` is a valid imported snapshot's name that no snapshot has yet."""
    check_import_name(name)
    with contextlib.suppress(NotFound):
        api.snapshot_show(SnapshotShowRequest(name))
        raise AlreadyExists(
            f"snapshot {name!r} already exists; choose another name or "
            f"`neon snapshot destroy {name}` first"
        )


def register_import(
    api: SyncPageserverClient, name: str, datadir: Path, storage_path: Path,
    origin: str | None = None,
) -> SnapshotInfo:  # fmt: skip
    """Have the pageserver take the cleanly shut-down `datadir` in as snapshot `name`
    (`origin`: the manifest of the `.neon` file it came from)."""
    request = SnapshotImportRequest(name, str(datadir), str(storage_path / HISTORY_DIR), origin)
    return api.snapshot_import(request)


def register_neon_file(
    api: SyncPageserverClient, name: str, workdir: Path, storage_path: Path,
    whole: LocalNeonFile,
) -> SnapshotInfo:  # fmt: skip
    """Have the pageserver read the whole `.neon` file `whole` itself and take it in as
    snapshot `name`, its small files extracted into `workdir`/pgdata
    (pageserver/ingest/import_neon.py)."""
    request = SnapshotImportRequest(
        name, str(workdir / "pgdata"), str(storage_path / HISTORY_DIR),
        whole.origin, str(whole.path), whole.label, whole.fetching,
    )  # fmt: skip
    return api.snapshot_import(request)


def register_delta_file(
    api: SyncPageserverClient, name: str, workdir: Path, storage_path: Path, parent: str,
    delta: LocalNeonFile,
) -> SnapshotInfo:  # fmt: skip
    """Have the pageserver read the delta `.neon` file `delta` itself and take it in as
    snapshot `name` on a branch of `parent`, its small files extracted into `workdir`/delta,
    a work directory of the storage at `storage_path` (pageserver/ingest/import_delta.py
    `import_delta_file`)."""
    request = SnapshotImportDeltaRequest(
        name, str(workdir / "delta"), parent, delta.origin, str(delta.path), delta.label,
        delta.fetching, str(storage_path / HISTORY_DIR),
    )  # fmt: skip
    return api.snapshot_import_delta(request)


def _rows(app: App) -> list[dict[str, Any]]:
    """User snapshots, each node's HEAD{i} states and its CURRENT, as the proposal lists them."""
    api = local_api(app)
    by_node: dict[str, list[dict[str, Any]]] = {}
    rows = []
    for snap in api.snapshot_list():
        if "@HEAD{" in snap.name:
            by_node.setdefault(snap.node_id, []).append(snap.to_wire())
        else:
            rows.append(snap.to_wire())
    for node in app.registry.nodes():
        rows.extend(by_node.pop(node.id, []))
        try:
            info = api.timeline_info(TimelineInfoRequest(node.id))
        except NotFound:
            continue
        if info.imported:
            rows.append(
                {
                    "name": f"{node.pgdata}@CURRENT",
                    "node_id": node.id,
                    "timeline_id": info.timeline_id,
                    "lsn": info.last_record_lsn,
                    "size_bytes": info.size_bytes,
                    "parent": info.parent,
                }
            )
    for leftovers in by_node.values():
        rows.extend(leftovers)
    return rows


def snapshot_json_row(row: dict[str, Any]) -> dict[str, Any]:
    """A listing row for --json: the LSN also as text, an origin manifest as an object."""
    shown = {**row, "lsn_text": format_lsn(row["lsn"])}
    if row.get("origin") is not None:
        shown["origin"] = json.loads(row["origin"])
    return shown


@click.command("list")
@click.option("-s", "--storage", default=None, help="Only the snapshots kept in this storage.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def snapshot_list(ctx: click.Context, storage: str | None, as_json: bool) -> None:
    """List snapshots; SIZE is the page history a snapshot keeps (for a snapshot of a
    bucket, what reading it downloads)."""
    from cli.remote_storage import in_storage, sync_remote

    app = get_app(ctx)
    if storage is not None:
        # An s3 storage's areas attached, those created there since included (one LIST).
        sync_remote(app, local_api(app), only=storage, rescan=True)
    rows = _rows(app)
    if storage is not None:
        rows = in_storage(app, rows, storage)
    if as_json:
        print_json([snapshot_json_row(r) for r in rows])
        return
    print_table(
        ("ID", "SIZE", "PARENT"),
        [(r["name"], human_size(r["size_bytes"]), r.get("parent")) for r in rows],
    )


@click.command("destroy")
@click.argument("name", metavar="SNAPSHOT")
@click.pass_context
def snapshot_destroy(ctx: click.Context, name: str) -> None:
    """Forget a snapshot (GC may then drop the history only it kept)."""
    app = get_app(ctx)
    name = app.registry.snapshot_name(name)
    _pgdata, _sep, tag = name.partition("@")
    if tag == "CURRENT":
        raise Conflict(f"{name} is a node's live state; destroy the node with `neon pg destroy`")
    if _server(app, name) is not None:
        raise Conflict(
            f"a read-only server runs over {name}; stop it with `neon snapshot stop {name}`"
        )
    node = app.registry.find_node(_pgdata) if tag else None  # none once the node is destroyed
    with contextlib.ExitStack() as lock:
        if node is not None:
            lock.enter_context(node_lock(app.home, node.id, "snapshot destroy"))
        local_api(app).snapshot_destroy(SnapshotDestroyRequest(name))
    click.echo("Ok")


def _server_dir(app: App, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return app.home.root / "snapshot-servers" / safe


def _server(app: App, name: str) -> dict[str, Any] | None:
    return app.registry.snapshot_server(name)


def _free_port(app: App, above: int = SNAPSHOT_SERVER_PORT - 1) -> int:
    taken = {n.port for n in app.registry.nodes()}
    taken |= app.registry.snapshot_server_ports()
    taken |= {r.port for r in app.registry.replicas()}
    port = above + 1
    while port in taken or not port_is_free(port):
        port += 1
    return port


def server_connstr(app: App, port: int) -> str:
    role = login_role(app, port)
    return f"host={app.home.socket_dir} port={port} user={role} dbname=postgres"


def login_role(app: App, port: int) -> str:
    """A superuser of the read-only server on `port` to log in as (its socket trusts every
    role): the bootstrap superuser its files name (cli/datadir_roles.py), else the first that
    exists of ours, the registry's other users, `postgres` and the OS user's name."""
    import getpass

    import psycopg  # here: a tenth of a second to import, for this call only

    from cli.datadir_roles import bootstrap_superuser

    running = app.registry.snapshot_server_on(port)
    own = bootstrap_superuser(Path(running["datadir"])) if running is not None else None
    candidates = [own] if own is not None else []
    candidates += [nodes.SUPERUSER, *sorted({n.superuser for n in app.registry.nodes()})]
    candidates += ["postgres", getpass.getuser()]
    for role in dict.fromkeys(candidates):
        try:
            with psycopg.connect(
                host=str(app.home.socket_dir), port=port, user=role, dbname="postgres",
                connect_timeout=10,
            ):  # fmt: skip
                return role
        except psycopg.OperationalError as exc:
            if "does not exist" not in str(exc):
                break  # not up (yet): the default; its error shows when it is used
    return nodes.SUPERUSER


@click.command("start")
@click.argument("name", metavar="SNAPSHOT")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def snapshot_start(ctx: click.Context, name: str, as_json: bool) -> None:
    """Start a temporary read-only PostgreSQL over a snapshot; prints its connection string."""
    app = get_app(ctx)
    name = app.registry.snapshot_name(name)
    port, datadir = start_snapshot_server(app, name)
    connstr = server_connstr(app, port)
    if as_json:
        print_json({"name": name, "connstr": connstr, "port": port, "datadir": str(datadir)})
    else:
        click.echo(connstr)


def start_snapshot_server(app: App, name: str) -> tuple[int, Path]:
    """Start the read-only server over snapshot `name` (resolved); return its port and data
    directory. Stop it with `remove_snapshot_server` (`snapshot stop`, `snapshot export`)."""
    local_api(app).snapshot_show(SnapshotShowRequest(name))
    running = _server(app, name)
    if running is not None:
        if postmaster.running_pid(Path(running["datadir"])) is not None:
            connstr = server_connstr(app, running["port"])
            raise AlreadyExists(f"a read-only server already runs over {name}: {connstr}")
        remove_snapshot_server(app, name)
    root = _server_dir(app, name)
    shutil.rmtree(root, ignore_errors=True)
    for directory in (root.parent, root):  # PostgreSQL's account enters them to reach pgdata
        ensure_own_dir(directory, traversal_mode())
    datadir = root / "pgdata"
    port = _free_port(app)
    with app.registry.transaction() as cur:
        cur.execute(
            "INSERT INTO snapshot_servers(name, datadir, port, created_at) VALUES (?, ?, ?, ?)",
            (name, str(datadir), port, time.time()),
        )
    try:
        standby_dir_at(app, datadir, name)
        for attempt in range(PORT_ATTEMPTS):
            postmaster.write_config(datadir, read_only_settings(app, datadir, port), READ_ONLY_HBA)
            try:
                postmaster.start(datadir, root / "postgres.log")
                break
            except ExternalCommandFailed as exc:
                # Another program took the port between the check and the start: next one.
                # It may have let it go again by now; PostgreSQL's own message still says so.
                taken = not port_is_free(port) or "could not create any TCP/IP" in exc.message
                if not taken or attempt == PORT_ATTEMPTS - 1:
                    raise
                port = _free_port(app, above=port)
                with app.registry.transaction() as cur:
                    cur.execute("UPDATE snapshot_servers SET port = ? WHERE name = ?", (port, name))
    except BaseException:
        remove_snapshot_server(app, name)
        raise
    return port, datadir


READ_ONLY_HBA = ["local all all trust", "host all all 127.0.0.1/32 scram-sha-256"]


def standby_dir_at(app: App, datadir: Path, snapshot: str) -> BasebackupResponse:
    """The data directory of a read-only server at `snapshot`: its basebackup and
    standby.signal (recovery stays on: the server never leaves read-only mode)."""
    from cli.extract import download_basebackup

    backup = download_basebackup(app, datadir, snapshot=snapshot)
    write_pg_file(datadir, "standby.signal", b"", durable=False)
    return backup


def read_only_settings(app: App, datadir: Path, port: int) -> dict[str, object]:
    """The settings of a hot standby over `datadir` (snapshot servers, replicas)."""
    from cli.tablespace_settings import in_place_tablespace_settings

    return {
        "port": port,
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": str(app.home.socket_dir),
        "hot_standby": True,
        "logging_collector": False,
        **standby_minimums(datadir),
        **in_place_tablespace_settings(datadir),
    }


_STANDBY_PARAMS = struct.Struct("<iiiii")  # pg_control @180: the primary's last settings


def standby_minimums(datadir: Path) -> dict[str, object]:
    """A hot standby refuses to start with smaller limits than the primary recorded."""
    from pg15.pg_control import read_control_file

    raw = read_control_file(datadir).raw  # no link, no FIFO, 8 KiB at most
    names = (
        "max_connections",
        "max_worker_processes",
        "max_wal_senders",
        "max_prepared_transactions",
        "max_locks_per_transaction",
    )
    values = dict(zip(names, _STANDBY_PARAMS.unpack_from(raw, 180), strict=True))
    # pg_control keeps the settings of the node's first run; prepared transactions made
    # after an ALTER SYSTEM must all fit as well.
    prepared = len(list((datadir / "pg_twophase").glob("*")))
    values["max_prepared_transactions"] = max(values["max_prepared_transactions"], prepared)
    return {name: value for name, value in values.items() if value > 0}


def remove_snapshot_server(app: App, name: str) -> None:
    """Stop the read-only server over `name` (if any) and delete its directory and row."""
    row = _server(app, name)
    if row is not None:
        postmaster.stop(Path(row["datadir"]), "fast")
    shutil.rmtree(_server_dir(app, name), ignore_errors=True)
    with app.registry.transaction() as cur:
        cur.execute("DELETE FROM snapshot_servers WHERE name = ?", (name,))


@click.command("stop")
@click.argument("name", metavar="SNAPSHOT")
@click.pass_context
def snapshot_stop(ctx: click.Context, name: str) -> None:
    """Stop the read-only server over a snapshot and delete its directory."""
    app = get_app(ctx)
    name = app.registry.snapshot_name(name)
    if _server(app, name) is None:
        raise NotFound(f"no read-only server runs over {name}; see `neon snapshot list`")
    remove_snapshot_server(app, name)
    click.echo(f"Stopped the read-only server over {name}.")
