"""Local PostgreSQL nodes: create, start, stop, destroy and inspect, with the registry.

A node is one data directory in a native storage plus, when running, its postmaster. Creation
is all-or-nothing: a row in state 'creating' reserves the ID, name and port; any failure
removes the directory and the row, and a creator that was killed is cleaned up later.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli import pageserver_control, postmaster
from cli.context import App
from cli.extract import download_basebackup, remove_download_leftovers
from cli.node_lock import node_lock
from cli.pageserver_control import local_api
from cli.pg_files import read_pg_file, write_pg_file
from cli.pgbin import run_pg
from cli.ports import port_is_free
from cli.registry import NodeRow
from cli.rest import control as rest_control
from cli.secrets import generate_secret, read_secret, scram_verifier, write_secret
from cli.storages import DEFAULT_STORAGE, validate_name
from cli.tablespace_mapping import (
    check_mapped,
    place_mapped_tablespaces,
    remove_mapped_tablespaces,
)
from cli.tablespace_restore import remove_left_locations
from datadir_files.pg_account import make_pg_dir
from pageserver.follow.followed_nodes import slot_name
from pageserver.pid_file import pid_alive
from pageserver_api.models import (
    MAX_WAIT_SECONDS,
    NodeBranchRequest,
    NodeImportRequest,
    NodePauseRequest,
    NodeRegisterRequest,
    NodeUnregisterRequest,
    NodeWaitDecodedRequest,
)
from pg15.lsn import format_lsn, parse_lsn
from proto.errors import (
    AlreadyExists,
    Conflict,
    CorruptData,
    ExternalCommandFailed,
    InvalidArgument,
    NeonError,
    NotFound,
    Unavailable,
)

DEFAULT_PORT = 5432
NODE_ID_PREFIX = "primary"
NODE_ID_RE = re.compile(rf"^{NODE_ID_PREFIX}\d+\Z", re.IGNORECASE)
"""Node IDs, present and future: no data directory name may match it."""
SUPERUSER = "neon"
ATTACHED = "attached"
"""The role of a server pg-neon follows but does not run (cli/attach.py)."""
REPLICATION_USER = "neon_replication"
MAX_PORT_PROBES = 200


@dataclass(frozen=True, slots=True)
class NodeStatus:
    node: NodeRow
    state: str  # running | stopped | crashed | creating
    pid: int | None


def superuser_secret(app: App, node_id: str) -> Path:
    return app.home.secrets_dir / f"node.{node_id}.superuser"


def replication_secret(app: App, node_id: str) -> Path:
    return app.home.secrets_dir / f"node.{node_id}.replication"


def passfile_path(app: App, node_id: str) -> Path:
    return app.home.secrets_dir / f"node.{node_id}.pgpass"


def node_log_dir(app: App, node: NodeRow) -> Path:
    return app.home.logs_dir / node.id


def startup_log(app: App, node: NodeRow) -> Path:
    return node_log_dir(app, node) / "startup.log"


def _pick_port(cur: sqlite3.Cursor, requested: int | None) -> int:
    taken = {row[0] for row in cur.execute("SELECT port FROM nodes")}
    taken |= {row[0] for row in cur.execute("SELECT port FROM replicas")}  # cli/replicas.py
    if requested is not None:
        if not 1 <= requested <= 65535:
            raise InvalidArgument(f"port {requested} is out of range 1-65535")
        if requested in taken:
            raise Conflict(
                f"port {requested} is already assigned to another neon node; "
                "choose another with --port"
            )
        if not port_is_free(requested):
            raise Conflict(f"port {requested} is in use on 127.0.0.1; choose another with --port")
        return requested
    first = port = default_port()
    for _ in range(MAX_PORT_PROBES):
        if port not in taken and port_is_free(port):
            return port
        port += 1
    raise Conflict(f"no free port found in {first}-{port}; pass one with --port")


def default_port() -> int:
    """Where a new node's port search starts: PGPORT if set (as libpq's default), else 5432."""
    raw = os.environ.get("PGPORT", "")
    if not raw:
        return DEFAULT_PORT
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise InvalidArgument(f"PGPORT={raw!r} is not a port number (1-65535)")
    return int(raw)


def _next_index(cur: sqlite3.Cursor, storage_path: Path, want_default_name: bool) -> int:
    ids = {row[0] for row in cur.execute("SELECT id FROM nodes")}
    names = {row[0] for row in cur.execute("SELECT pgdata FROM nodes")}
    i = 1
    while True:
        # Not an older home's data directory name either (made before NODE_ID_RE was checked).
        free_id = f"{NODE_ID_PREFIX}{i}" not in ids | names
        free_name = not want_default_name or (
            f"pgdata{i}" not in names and not (storage_path / f"pgdata{i}").exists()
        )
        if free_id and free_name:
            return i
        i += 1


def cleanup_abandoned(app: App) -> None:
    """Remove nodes whose `pg create` died half-way (its process is gone)."""
    for node in app.registry.nodes():
        if node.state != "creating" or node.creator_pid is None:
            continue
        if node.creator_pid == os.getpid() or pid_alive(node.creator_pid):
            continue
        _remove_node_files(app, node)
        with app.registry.transaction() as cur:
            cur.execute("DELETE FROM nodes WHERE id = ? AND state = 'creating'", (node.id,))


def _remove_node_files(app: App, node: NodeRow) -> None:
    """Stop, unregister and delete everything of a node; best effort, never raises."""
    with contextlib.suppress(Exception):
        postmaster.stop(node.datadir, "immediate", timeout=30)
    with contextlib.suppress(NeonError):
        unregister_from_pageserver(app, node)

    shutil.rmtree(node.datadir, ignore_errors=True)
    remove_download_leftovers(node.datadir)  # of a killed `pg create --snapshot`
    from cli.checkout import remove_checkout_files  # here: cli.checkout imports this module

    remove_checkout_files(node)  # of a killed `pg checkout`
    shutil.rmtree(node_log_dir(app, node), ignore_errors=True)
    for path in (
        superuser_secret(app, node.id),
        replication_secret(app, node.id),
        passfile_path(app, node.id),
    ):
        path.unlink(missing_ok=True)


def create_node(
    app: App,
    *,
    storage: str = DEFAULT_STORAGE,
    name: str | None = None,
    port: int | None = None,
    start: bool = True,
    snapshot: str | None = None,
    tablespace_mapping: Mapping[str, str] | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
) -> NodeStatus:
    cleanup_abandoned(app)
    store = app.registry.get_storage(storage)
    if store.type != "native":
        raise InvalidArgument(
            f"storage {storage!r} is of type {store.type}; nodes live in a native storage "
            "(use -s local or attach one with `neon storage attach -t native`)"
        )
    storage_path = Path(store.options["path"])
    if name is not None:
        validate_name(name, "data directory")
        if NODE_ID_RE.match(name):
            raise InvalidArgument(
                f"data directory name {name!r} looks like a node ID (IDs are primary<N>, "
                "and commands take either); choose another name with -n"
            )
    with app.registry.transaction() as cur:
        if (
            name is not None
            and cur.execute(
                "SELECT 1 FROM nodes WHERE pgdata = ? OR id = ? "
                "UNION SELECT 1 FROM replicas WHERE name = ?",
                (name, name, name),
            ).fetchone()
        ):
            raise AlreadyExists(f"a node named {name!r} already exists; see `neon pg list`")
        index = _next_index(cur, storage_path, name is None)
        node_id = f"{NODE_ID_PREFIX}{index}"
        pgdata = name or f"pgdata{index}"
        datadir = storage_path / pgdata
        if datadir.exists() and (not datadir.is_dir() or any(datadir.iterdir())):
            raise AlreadyExists(
                f"data directory {datadir} exists and is not empty; "
                "choose another name with -n or remove it"
            )
        chosen_port = _pick_port(cur, port)
        cur.execute(
            "INSERT INTO nodes(id, pgdata, storage, datadir, port, role, superuser, "
            "replication_user, state, creator_pid, created_at) "
            "VALUES (?, ?, ?, ?, ?, 'primary', ?, ?, 'creating', ?, ?)",
            (
                node_id,
                pgdata,
                storage,
                str(datadir),
                chosen_port,
                SUPERUSER,
                REPLICATION_USER,
                os.getpid(),
                time.time(),
            ),
        )
    node = app.registry.get_node(node_id)
    with node_lock(app.home, node_id, "pg create"):
        try:
            if snapshot is not None:
                progress(f"Creating {pgdata} from snapshot {snapshot}")
                _initialize_from_snapshot(app, node, snapshot, tablespace_mapping or {})
            else:
                progress(f"Initializing {pgdata} in storage {storage}")
                _initialize(app, node)
            with app.registry.transaction() as cur:
                cur.execute(
                    "UPDATE nodes SET state = 'ready', creator_pid = NULL WHERE id = ?", (node_id,)
                )
            node = app.registry.get_node(node_id)
            if snapshot is None:
                register_with_pageserver(app, node)
                progress(f"Importing {pgdata} into the page history")
                local_api(app).node_import(NodeImportRequest(node.id, str(node.datadir)))
            if start:
                start_node(app, node)
            else:
                pause_following(app, node)
        except BaseException:
            with contextlib.suppress(Exception):  # the node's files at a NEW go with it
                postmaster.stop(node.datadir, "immediate", timeout=30)
                remove_mapped_tablespaces(node.datadir, (tablespace_mapping or {}).values())
            _remove_node_files(app, node)
            with app.registry.transaction() as cur:
                cur.execute("DELETE FROM nodes WHERE id = ?", (node_id,))
            raise
    return node_status(app, node)


def _new_secrets(app: App, node: NodeRow) -> tuple[str, str]:
    """Generate the node's superuser and replication passwords and its passfile."""
    password = generate_secret()
    replication_password = generate_secret()
    write_secret(superuser_secret(app, node.id), password)
    write_secret(replication_secret(app, node.id), replication_password)
    write_secret(
        passfile_path(app, node.id),
        f"127.0.0.1:{node.port}:*:{node.superuser}:{password}\n"
        f"localhost:{node.port}:*:{node.superuser}:{password}\n",
    )
    return password, replication_password


def _single_user(node: NodeRow, sql: str, what: str) -> None:
    run_pg(
        "postgres",
        ["--single", "-D", str(node.datadir), "-c", "log_statement=none", "postgres"],
        input=sql,
        what=what,
    )


def _password_sql(role: str, password: str) -> str:
    """Set `role`'s password (its verifier: cli/secrets.py scram_verifier) unless the role
    holds that verifier already, so that pg_authid is written only where it changes."""
    verifier = scram_verifier(password)
    return (
        f"DO $neon$BEGIN IF (SELECT rolpassword FROM pg_authid WHERE rolname = '{role}') "
        f"IS DISTINCT FROM '{verifier}' THEN ALTER ROLE {role} PASSWORD '{verifier}'; "
        "END IF; END$neon$;\n"
    )


def _slot_sql(node: NodeRow) -> str:
    return f"SELECT pg_create_physical_replication_slot('{slot_name(node.id)}', true);\n"


def _initialize(app: App, node: NodeRow) -> None:
    password, replication_password = _new_secrets(app, node)
    postmaster.initdb(node.datadir, superuser=node.superuser, password=password)
    write_node_config(app, node)
    # The role and the slot are created in single-user mode, before the first start, so that
    # --no-start nodes are complete too and the slot retains every WAL byte from here on.
    _single_user(
        node,
        f"CREATE ROLE {node.replication_user} WITH LOGIN REPLICATION "
        f"PASSWORD '{scram_verifier(replication_password)}';\n"
        + _password_sql(node.superuser, password)  # initdb's with a salt of its own
        + _slot_sql(node),
        "creating the replication role",
    )


CONFIG_FILES = ("postgresql.conf", "postgresql.auto.conf", "pg_hba.conf", "pg_ident.conf")


def copy_config_files(source: Path, target: Path) -> None:
    """Carry a node's configuration (not in WAL, so not in page history) to a rebuilt dir,
    never through a link PostgreSQL's account put in either (cli/pg_files.py); the caller
    makes the directory durable."""
    for name in CONFIG_FILES:
        data = read_pg_file(source, name)
        if data is not None:
            write_pg_file(target, name, data, durable=False)


def finish_datadir(app: App, node: NodeRow) -> None:
    """Make a data directory rebuilt from page history this node's: its configuration, its
    passwords (roles created if the source lacked them) and a fresh slot, before any start."""
    write_node_config(app, node)
    password = read_secret(superuser_secret(app, node.id))
    replication_password = read_secret(replication_secret(app, node.id))
    ensure = (
        "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
        "CREATE ROLE {role} {attrs}; END IF; END$$;\n"
    )
    sql = (
        ensure.format(role=node.superuser, attrs="SUPERUSER LOGIN")
        + ensure.format(role=node.replication_user, attrs="LOGIN REPLICATION")
        + _password_sql(node.superuser, password)
        + _password_sql(node.replication_user, replication_password)
        + _slot_sql(node)
    )
    _single_user(node, sql, f"preparing {node.datadir}")


def _initialize_from_snapshot(
    app: App, node: NodeRow, snapshot: str, tablespace_mapping: Mapping[str, str]
) -> None:
    _new_secrets(app, node)
    register_with_pageserver(app, node)
    local_api(app).node_branch(NodeBranchRequest(node.id, snapshot, pg_timeline=1))
    from cli.hints_mark import write_mark

    rebuilt = download_basebackup(app, node.datadir, node_id=node.id)
    write_mark(node.datadir, 0)  # a fresh directory: no hint in it was left unlogged
    locations = {ts.oid: ts.location for ts in rebuilt.tablespaces}
    check_mapped(tablespace_mapping, locations.values(), f"snapshot {snapshot}")
    place_mapped_tablespaces(node.datadir, locations, tablespace_mapping)
    pgdata, sep, _tag = snapshot.partition("@")
    source = app.registry.find_node(pgdata) if sep else None  # imported: no node's config
    if source is not None and source.datadir.is_dir():
        copy_config_files(source.datadir, node.datadir)
    finish_datadir(app, node)


def write_node_config(app: App, node: NodeRow) -> None:
    log_dir = node_log_dir(app, node)
    make_pg_dir(log_dir)
    settings: dict[str, object] = {
        "port": node.port,
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": str(app.home.socket_dir),
        "wal_level": "replica",
        # Hints WAL-logged (as pg_rewind needs): a checkout rewrites only the pages the WAL
        # shows changed (cli/checkout_delta.py, cli/hints_mark.py).
        "wal_log_hints": True,
        # Every `snapshot create` of a running node is a CHECKPOINT, whose fsyncs wait for
        # whatever the backends left dirty in the kernel's page cache. Written back as they
        # go (sync_file_range: PostgreSQL's own knob, off by default on Linux), a CHECKPOINT
        # right after `pgbench -i -s 30` took 0.08 s instead of 0.33-0.61 s, and the load
        # itself 3.7-5.7 s instead of 6.0-8.0 s (one shared 2-core box, load average 4-5).
        "backend_flush_after": "256kB",
        "max_wal_senders": 10,
        "max_replication_slots": 10,
        "wal_keep_size": "64MB",
        "password_encryption": "scram-sha-256",
        "logging_collector": True,
        "log_directory": str(log_dir),
        "log_filename": "postgresql.log",
        "log_file_mode": "0600",
        "log_rotation_size": "100MB",
        "log_line_prefix": "%m [%p] ",
    }
    # A node made from a snapshot restores its prepared transactions at start; they must fit
    # (a source's own setting comes with its copied configuration, an attached server's not).
    prepared = len(list((node.datadir / "pg_twophase").glob("*")))
    if prepared:
        settings["max_prepared_transactions"] = prepared
    hba = [
        "# unix socket: the directory is private to the OS user that runs neon",
        "local all all trust",
        "local replication all trust",
        f"host replication {node.replication_user} 127.0.0.1/32 scram-sha-256",
        "host all all 127.0.0.1/32 scram-sha-256",
    ]
    postmaster.write_config(node.datadir, settings, hba)


def node_status(app: App, node: NodeRow) -> NodeStatus:
    if node.state == "creating":
        return NodeStatus(node, "creating", None)
    if node.role == ATTACHED:  # a server pg-neon follows and does not run (cli/attach.py)
        return NodeStatus(node, "attached" if node.state == "ready" else node.state, None)
    pid = postmaster.running_pid(node.datadir)
    if pid is not None:
        return NodeStatus(node, "running", pid)
    crashed = postmaster.read_pid_file(node.datadir) is not None
    return NodeStatus(node, "crashed" if crashed else "stopped", None)


def refuse_attached(node: NodeRow, action: str) -> None:
    """cli.attach's refusal, which loads that module (and the WAL receiver it uses) only for
    an attached node: start, stop and checkout of any other node do not pay for it."""
    if node.role != ATTACHED:
        return
    from cli.attach import refuse_attached as refuse  # cli.attach builds on this module

    refuse(node, action)


def _require_ready(node: NodeRow) -> None:
    if node.state != "ready":
        raise Conflict(f"node {node.id} is still being created; try again in a moment")
    if not node.datadir.is_dir():
        raise Conflict(
            f"data directory {node.datadir} of node {node.id} is missing; "
            f"remove the node with `neon pg destroy {node.id}`"
        )


def start_node(app: App, node: NodeRow) -> NodeStatus:
    from cli.hints_mark import note_start  # here: pg_control's crc32c is slow to import

    refuse_attached(node, "start")
    _require_ready(node)
    status = node_status(app, node)
    if status.state == "running":
        # Followed again: a `pg stop` or `pg checkout` killed after it paused the following
        # (stop_node) but before the node went down left it running unfollowed; its writes
        # would reach the history only at its next start, and a checkout then waited 30 s for
        # a shutdown checkpoint nothing streamed.
        register_with_pageserver(app, node)
        return status
    if status.state == "crashed":
        dead = postmaster.read_pid_file(node.datadir)
        if dead is not None:
            postmaster.remove_stale_locks(node.datadir, app.home.socket_dir, node.port, dead)
    if not port_is_free(node.port):
        raise Conflict(
            f"port {node.port} of node {node.id} is in use by another process; "
            "stop it and run `neon pg start` again"
        )
    write_node_config(app, node)
    last: ExternalCommandFailed | None = None
    for _attempt in range(3):
        try:
            postmaster.start(
                node.datadir,
                startup_log(app, node),
                server_log=node_log_dir(app, node) / "postgresql.log",
            )
            note_start(node.datadir)
            register_with_pageserver(app, node)
            return node_status(app, node)
        except ExternalCommandFailed as exc:
            # Orphaned backends of a killed postmaster hold shared memory for a moment.
            if "shared memory" not in exc.message and "lock file" not in exc.message:
                raise
            last = exc
            time.sleep(1)
    assert last is not None
    raise last


def stop_node(app: App, node: NodeRow, mode: str = "fast") -> bool:
    stopping = begin_stop(app, node, mode)
    if stopping is None:
        return False
    with contextlib.closing(stopping):
        wait_stopped(app, node, stopping)
    return True


def begin_stop(
    app: App, node: NodeRow, mode: str = "fast", wal_tail: bool = False
) -> postmaster.Stopping | None:
    """A stop's first half: the following paused, the postmaster signalled; the stop in
    progress (None if the node was not running), waited for with `wait_stopped` (or
    `wait_shut_down` first) and closed by the caller. `wal_tail`: the caller has the
    pageserver take the node's last WAL from its pg_wal once it has exited."""
    refuse_attached(node, "stop")
    _require_ready(node)
    pause_following(app, node, wal_tail)
    try:
        return postmaster.signal_stop(node.datadir, mode)
    except BaseException:
        _follow_if_running(app, node)
        raise


def wait_stopped(app: App, node: NodeRow, stopping: postmaster.Stopping) -> None:
    """Until the postmaster `begin_stop` signalled has exited; if it outlives its time it is
    followed again (it still runs) and ExternalCommandFailed raised."""
    try:
        stopping.wait()
    except BaseException:
        _follow_if_running(app, node)
        raise


SHUT_DOWN_POLL_SECONDS = 0.002
"""How often `wait_shut_down` reads pg_control (8 KiB) while the node writes its shutdown
checkpoint (~20-100 ms)."""


def wait_shut_down(app: App, node: NodeRow, stopping: postmaster.Stopping) -> None:
    """Until the stopping node's pg_control says it is shut down (its shutdown checkpoint is
    written and flushed: it writes no more WAL) or its postmaster has exited. What comes
    after that in PostgreSQL (its walsender waits for the pageserver's flush reply, then each
    process exits: 20-30 ms) a checkout overlaps with naming HEAD and branching; it waits for
    the exit (`wait_stopped`) before it changes the directory. Raises as `wait_stopped`."""
    from pg15.pg_control import DB_SHUTDOWNED, read_control_file

    while not stopping.gone(SHUT_DOWN_POLL_SECONDS):
        with contextlib.suppress(CorruptData):  # read while PostgreSQL writes it: again
            if read_control_file(node.datadir).state == DB_SHUTDOWNED:
                return
        if time.monotonic() - stopping.signalled > stopping.timeout:
            wait_stopped(app, node, stopping)  # raises: past its time


def _follow_if_running(app: App, node: NodeRow) -> None:
    """After a failed stop: a node still running is followed again."""
    if node_status(app, node).state == "running":
        with contextlib.suppress(NeonError):
            register_with_pageserver(app, node)


def pause_following(app: App, node: NodeRow, wal_tail: bool = False) -> None:
    """Tell a running pageserver the node is stopping: it takes the node's last WAL (from
    its pg_wal once it is stopped, with `wal_tail`: cli/checkout.py), then connects no more
    until `pg start` registers the node again, so whoever takes the node's port meanwhile
    hears nothing from it."""
    with contextlib.suppress(Unavailable, NotFound):
        local_api(app, start=False).node_pause(NodePauseRequest(node.id, wal_tail=wal_tail))


SHUTDOWN_CHECKPOINT_WAIT = 30.0
"""Seconds a stop or a checkout waits for the pageserver to decode the shutdown checkpoint
(by default: SHUTDOWN_CHECKPOINT_WAIT_ENV)."""
SHUTDOWN_CHECKPOINT_WAIT_ENV = "NEON_SHUTDOWN_CHECKPOINT_WAIT"


def shutdown_checkpoint_wait() -> float:
    """SHUTDOWN_CHECKPOINT_WAIT, or the seconds NEON_SHUTDOWN_CHECKPOINT_WAIT says (a box
    slower to ingest, or a test of the refusal that need not wait half a minute), up to the
    longest wait the pageserver takes (MAX_WAIT_SECONDS): refused here, before a node is
    stopped, rather than by the pageserver after."""
    raw = os.environ.get(SHUTDOWN_CHECKPOINT_WAIT_ENV, "")
    if not raw:
        return SHUTDOWN_CHECKPOINT_WAIT
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_WAIT_SECONDS):
        raise InvalidArgument(
            f"{SHUTDOWN_CHECKPOINT_WAIT_ENV}={raw!r} is not a positive number of seconds "
            f"up to {MAX_WAIT_SECONDS}; set it so or unset it ({SHUTDOWN_CHECKPOINT_WAIT:g} s)"
        )
    return seconds


def wait_for_shutdown_checkpoint(app: App, node: NodeRow, timeout: float) -> bool | None:
    """After a clean stop, wait until the pageserver decoded the shutdown checkpoint, for at
    most `timeout` seconds (shutdown_checkpoint_wait()).

    None when there is nothing to wait for (not shut down cleanly, pageserver not running).
    """
    from pg15.pg_control import DB_SHUTDOWNED, read_control_file

    control = read_control_file(node.datadir)
    if control.state != DB_SHUTDOWNED or pageserver_control.running_pid(app) is None:
        return None
    try:
        # Raises at once (with the error) when the node's ingest stopped on one.
        request = NodeWaitDecodedRequest(node.id, control.checkpoint_lsn, wait_timeout=timeout)
        result = local_api(app, start=False).node_wait_decoded(request)
    except NotFound:
        return None
    return result.reached


def wal_positions(app: App, statuses: list[NodeStatus]) -> dict[str, dict[str, Any]]:
    """Per node: what the pageserver received, flushed and ingested, and the lags behind the
    server. `lag_bytes` counts from what is ingested (in the page store, so a snapshot or a
    PITR extraction can name it), `receive_lag_bytes` from what is received."""
    try:
        followed = {f.node_id: f for f in local_api(app, start=False).node_list()}
    except Unavailable:
        followed = {}
    result: dict[str, dict[str, Any]] = {}
    for status in statuses:
        info = followed.get(status.node.id)
        if info is None:
            result[status.node.id] = {"stream": "not followed", "lag_bytes": None}
            continue
        server_lsn = server_wal_lsn(app, status)
        received = info.flushed_lsn_int or 0
        ingested = info.ingested_lsn_int or 0
        ingest = info.ingest or "ok"
        error = info.ingest_error or (info.last_error if info.state != "streaming" else None)
        if status.state == "running" and info.paused and ingest == "ok":
            # A `pg stop` or `pg checkout` killed between pausing the following and stopping
            # the node: its writes reach the history only once it is followed again.
            ingest = "paused"
            error = (
                f"the pageserver does not follow the running node (a `neon pg stop` or `neon pg "
                f"checkout` was interrupted); run `neon pg start {status.node.pgdata}` to "
                "follow it again"
            )

        result[status.node.id] = {
            "stream": info.state,
            "timeline": info.timeline,
            "received_lsn": info.received_lsn,
            "flushed_lsn": info.flushed_lsn,
            "decoded_lsn": info.decoded_lsn,
            "ingested_lsn": info.ingested_lsn,
            "durable_lsn": info.durable_lsn,
            "records": info.records,
            "server_lsn": format_lsn(server_lsn) if server_lsn is not None else None,
            "lag_bytes": _behind(server_lsn, ingested),
            "receive_lag_bytes": _behind(server_lsn, received),
            "ingest": ingest,
            "error": error,
        }
    return result


def _behind(server_lsn: int | None, reached: int) -> int | None:
    return max(0, server_lsn - reached) if server_lsn is not None and reached else None


def server_wal_lsn(app: App, status: NodeStatus, checkpoint: bool = False) -> int | None:
    """The node's own WAL position: its flush LSN if running, its shutdown checkpoint if not.
    `checkpoint`: a running node makes a checkpoint first, so that a delta checkout to this
    position starts from it (pageserver/basebackup/checkout_delta.py)."""
    if status.node.role == ATTACHED:
        from cli.attach import server_wal_lsn as attached_wal_lsn

        return attached_wal_lsn(app, status.node) if status.state == "attached" else None
    if status.state == "running":
        # psql, not psycopg: importing psycopg takes longer than running psql (a tenth of a
        # second against a hundredth), and `snapshot create` runs this on every call.
        sql = ["-c", "CHECKPOINT"] if checkpoint else []
        sql += ["-c", "SELECT pg_current_wal_flush_lsn()"]
        args = [f"{connstr(app, status.node)} connect_timeout=5", "-XAtq", "-v", "ON_ERROR_STOP=1"]
        try:
            what = f"CHECKPOINT on node {status.node.id}" if checkpoint else None
            out = run_pg("psql", [*args, *sql], timeout=None, what=what).stdout.strip()
        except ExternalCommandFailed:
            # Without its CHECKPOINT a snapshot would be named at a position a checkout back
            # to it cannot start from in place: fail, with psql's error, rather than go on.
            if checkpoint:
                raise
            return None
        return parse_lsn(out) if out else None
    from pg15.pg_control import DB_SHUTDOWNED, read_control_file  # here: crc32c is slow to import

    try:
        control = read_control_file(status.node.datadir)
    except NeonError:
        return None
    # A clean shutdown ends with the 114-byte checkpoint record.
    return (
        control.checkpoint_lsn + SHUTDOWN_CHECKPOINT_LEN if control.state == DB_SHUTDOWNED else None
    )


SHUTDOWN_CHECKPOINT_LEN = 114
HISTORY_DIR = "pagestore"


def register_with_pageserver(app: App, node: NodeRow) -> None:
    """Tell the local pageserver (started on demand) how to follow this node."""
    request = NodeRegisterRequest(
        node_id=node.id,
        host="127.0.0.1",
        port=node.port,
        user=node.replication_user,
        password=read_secret(replication_secret(app, node.id)),
        store_dir=str(history_dir(app, node)),
        pgdata=node.pgdata,
        # The replication connection goes through the socket directory only the PostgreSQL
        # OS user (and root) can enter: no other local user can stand in for the node there.
        socket_dir=str(app.home.socket_dir),
    )
    local_api(app).node_register(request)


def history_dir(app: App, node: NodeRow) -> Path:
    """The page history of the node's storage (shared by its nodes, so snapshots branch)."""
    return Path(app.registry.get_storage(node.storage).options["path"]) / HISTORY_DIR


def unregister_from_pageserver(app: App, node: NodeRow) -> None:
    with contextlib.suppress(NotFound):
        local_api(app).node_unregister(NodeUnregisterRequest(node.id))


def destroy_node(app: App, node: NodeRow) -> list[Path]:
    """Stop and delete the node; the files of its absolute tablespaces removed (their
    locations stay: the user's directories)."""
    if node.role == ATTACHED:
        from cli.attach import detach_server

        detach_server(app, node, keep=False)
        return []
    rest_control.remove(app, node.id)
    postmaster.stop(node.datadir, "immediate")
    removed = remove_left_locations(node.datadir, None)
    _remove_node_files(app, node)
    with app.registry.transaction() as cur:
        cur.execute("DELETE FROM nodes WHERE id = ?", (node.id,))
    return removed


def connstr(app: App, node: NodeRow) -> str:
    """A libpq string psql accepts as-is: the unix socket, trusted for the local OS user."""
    return f"host={app.home.socket_dir} port={node.port} user={node.superuser} dbname=postgres"


def tcp_connstr(app: App, node: NodeRow) -> str:
    return (
        f"host=127.0.0.1 port={node.port} user={node.superuser} dbname=postgres "
        f"passfile={passfile_path(app, node.id)}"
    )


def node_history(app: App, node: NodeRow) -> dict[str, Any]:
    """The node's snapshots and PITR areas (what its page history is kept for); read like
    `snapshot list` does, starting the pageserver if it is stopped (they live in its store)."""
    api = local_api(app)
    snaps, areas = api.snapshot_list(), api.pitr_list()
    return {
        "snapshots": [s.to_wire() for s in snaps if s.node_id == node.id],
        "pitr": [a.to_wire() for a in areas if a.node_id == node.id],
    }


def node_json(
    app: App, status: NodeStatus, used: int | None, wal: dict[str, Any] | None = None
) -> dict[str, Any]:
    node = status.node
    return {
        "id": node.id,
        "role": node.role,
        "pgdata": node.pgdata,
        "datadir": str(node.datadir),
        "storage": node.storage,
        "port": node.port,
        "endpoint": f"{node.extra['host']}:{node.port}"
        if node.role == ATTACHED
        else f"localhost:{node.port}",
        "state": status.state,
        "pid": status.pid,
        "used_bytes": used,
        "superuser": node.superuser,
        "replication_user": node.replication_user,
        "connstr": connstr(app, node),
        "tcp_connstr": tcp_connstr(app, node),
        "rest": rest.url if (rest := rest_control.running(app, node.id)) else None,
        "log": str(node_log_dir(app, node) / "postgresql.log"),
        "slot": slot_name(node.id),
        "wal": wal or {},
    }
