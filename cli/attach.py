"""`neon pg attach` / `neon pg detach`: follow a PostgreSQL 15 server that pg-neon does not run.

An attached server is a node row with role 'attached' (ID = data directory name = NAME, so
its snapshots are NAME@TAG and every command that takes a node takes it); the pageserver
follows it exactly as it follows a node it runs, from a physical slot.

No WAL byte between the initial image and the stream is missed because both hang on one slot:
the slot is created with RESERVE_WAL in the base backup's own replication session, before
BASE_BACKUP starts (walreceiver/base_backup.py `keep_slot`), so the server keeps every WAL
segment from the backup's start on until the pageserver has streamed it. The backup is made
consistent by stock recovery (cli/snapshot_import.py `recover_backup`), which yields the
server's state at the backup's end LSN E; the pageserver imports that state as of E (not as
of the local recovery's own shutdown checkpoint, which the server never wrote: see
pageserver/ingest/import_datadir.py) and decodes the server's WAL from E on.

What the server must allow (checked first, with the fix named): a replication connection
(`max_wal_senders` > 0, which needs `wal_level` replica or logical; a pg_hba.conf
`replication` line; the REPLICATION attribute), a free `max_replication_slots` entry, and
PostgreSQL 15. The password comes from the connection string, PGPASSWORD or the passfile,
is kept in a 0600 file under NEON_HOME and never printed; the connection answers SCRAM
(or trust) only unless `--auth-method` allows more.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cli.context import App
from cli.node_lock import node_lock
from cli.nodes import (
    ATTACHED,
    NODE_ID_RE,
    cleanup_abandoned,
    history_dir,
    replication_secret,
    unregister_from_pageserver,
)
from cli.pageserver_control import local_api
from cli.progress import Progress
from cli.registry import NodeRow
from cli.secrets import read_secret, write_secret
from cli.snapshot_import import (
    fetch_base_backup,
    import_workdir,
    pgpass_lookup,
    recover_backup,
)
from cli.storages import DEFAULT_STORAGE, validate_name
from pageserver.follow.followed_nodes import slot_name
from pageserver_api.models import (
    NodeImportRequest,
    NodePauseRequest,
    NodeRegisterRequest,
    PitrCreateRequest,
)
from pg15.lsn import format_lsn
from proto.errors import AlreadyExists, Conflict, InvalidArgument, NeonError, Unavailable
from walreceiver.base_backup import BaseBackupOptions, server_major_version
from walreceiver.receiver import ConnParams
from walreceiver.replication import ReplicationConnection, ServerError, connect
from walreceiver.replication_auth import TRUST_OR_SCRAM, AuthMethod, parse_auth_methods

DETACHED = "detached"
"""nodes.state of an attached server no longer followed whose history was kept."""
SUPPORTED_MAJOR = 15
NO_SENDER = "53300"  # too_many_connections: max_wal_senders is 0 or all are in use
NO_SLOT = "53400"  # configuration_limit_exceeded: all replication slots are in use
APPLICATION_NAME = "neon attach"


@dataclass(frozen=True, slots=True)
class ServerConn:
    """Where an attached server is and who logs in; the password is never shown."""

    host: str
    port: int
    user: str
    password: str | None
    socket_dir: str | None = None
    """A unix socket directory (a libpq host starting with '/')."""

    @property
    def shown(self) -> str:
        where = self.socket_dir or self.host
        return f"host={where} port={self.port} user={self.user}"

    def params(self, methods: frozenset[AuthMethod], name: str = APPLICATION_NAME) -> ConnParams:
        return ConnParams(
            self.host,
            self.port,
            self.user,
            self.password,
            application_name=name,
            auth_methods=methods,
            socket_dir=self.socket_dir,
        )


def parse_connstr(connstr: str) -> ServerConn:
    """A libpq connection string (key=value or postgresql:// URI) as libpq reads it: port,
    user and password fall back to PGPORT, PGUSER (else the OS user), PGPASSWORD, then the
    passfile (`passfile=`, PGPASSFILE or ~/.pgpass)."""
    from psycopg import conninfo  # psycopg's parser is libpq's own

    try:
        fields = conninfo.conninfo_to_dict(connstr)
    except Exception as exc:  # psycopg.ProgrammingError: libpq's message, never the password
        reason = str(exc).splitlines()[0] if str(exc) else "cannot be parsed"
        raise InvalidArgument(f"invalid connection string: {reason}") from None
    unknown = set(fields) - {
        "host", "hostaddr", "port", "user", "password", "passfile", "dbname", "sslmode",
        "connect_timeout", "application_name",
    }  # fmt: skip
    if unknown:
        raise InvalidArgument(
            f"connection string parameter(s) {', '.join(sorted(unknown))} are not supported "
            "here; give host, port, user and password (or a passfile)"
        )
    if str(fields.get("sslmode", "disable")) not in ("disable", "allow", "prefer"):
        raise InvalidArgument("sslmode must be disable, allow or prefer: TLS is not supported")
    host = str(fields.get("hostaddr") or fields.get("host") or os.environ.get("PGHOST") or "")
    if not host:
        raise InvalidArgument("the connection string names no host (host=...)")
    if "," in host:
        raise InvalidArgument(f"host {host!r}: give one server, not a list")
    raw_port = str(fields.get("port") or os.environ.get("PGPORT") or "5432")
    if not raw_port.isdigit() or not 0 < int(raw_port) < 65536:
        raise InvalidArgument(f"port {raw_port!r} is not a TCP port (1-65535)")
    port = int(raw_port)
    user = str(fields.get("user") or os.environ.get("PGUSER") or _os_user())
    socket_dir = host if host.startswith("/") else None
    if socket_dir is not None:
        host = "localhost"
    password = fields.get("password")
    if password is None:
        password = os.environ.get("PGPASSWORD")
    if password is None:
        passfile = fields.get("passfile")
        password = pgpass_lookup(
            host, port, user, Path(str(passfile)).expanduser() if passfile else None
        )
    return ServerConn(host, port, user, str(password) if password else None, socket_dir)


def _os_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def auth_policy(names: Iterable[str]) -> frozenset[AuthMethod]:
    methods = list(names)
    return parse_auth_methods(methods) if methods else TRUST_OR_SCRAM


# Checks, on one replication connection


@dataclass(frozen=True, slots=True)
class ServerFacts:
    system_id: str
    timeline: int
    wal_lsn: int
    version: str


@contextlib.asynccontextmanager
async def _session(
    server: ServerConn, methods: frozenset[AuthMethod]
) -> AsyncIterator[ReplicationConnection]:
    """A replication connection to the server, closed at the end; a refusal by the server
    names what to change there (`_named`)."""
    try:
        conn = await connect(
            server.host,
            server.port,
            server.user,
            server.password,
            APPLICATION_NAME,
            timeout=15.0,
            auth_methods=methods,
            socket_dir=server.socket_dir,
        )
    except ServerError as exc:
        raise _named(exc, server) from None
    try:
        yield conn
    finally:
        await conn.close()


def _named(exc: ServerError, server: ServerConn) -> NeonError:
    """A server's refusal, with what to change on the server to allow pg-neon in."""
    if exc.sqlstate == NO_SENDER:
        return Conflict(
            f"PostgreSQL at {server.shown} accepts no replication connection now ({exc}); "
            "it needs wal_level = replica (or logical) and a free WAL sender: set "
            "max_wal_senders to at least 2 more than it has in use, in postgresql.conf, "
            "and restart it"
        )
    if exc.sqlstate == NO_SLOT:
        return Conflict(
            f"PostgreSQL at {server.shown} has no free replication slot ({exc}); raise "
            "max_replication_slots in postgresql.conf and restart it, or drop an unused slot "
            "(SELECT pg_drop_replication_slot(...))"
        )
    return exc


async def check_server(server: ServerConn, methods: frozenset[AuthMethod]) -> ServerFacts:
    """Refuse, with the fix, a server that cannot be followed (see the module docstring)."""
    async with _session(server, methods) as conn:
        major = server_major_version(conn)
        version = conn.server_params.get("server_version", "?")
        if major != SUPPORTED_MAJOR:
            raise Conflict(
                f"PostgreSQL at {server.shown} is version {version}; pg-neon follows "
                f"PostgreSQL {SUPPORTED_MAJOR} only"
            )
        wal_level = await conn.show("wal_level")
        if wal_level not in ("replica", "logical"):
            raise Conflict(
                f"PostgreSQL at {server.shown} has wal_level = {wal_level}; set wal_level = "
                "replica in postgresql.conf and restart it"
            )
        if int(await conn.show("max_replication_slots")) == 0:
            raise Conflict(
                f"PostgreSQL at {server.shown} has max_replication_slots = 0; set it to at "
                "least 1 in postgresql.conf and restart it"
            )
        identity = await conn.identify_system()
        return ServerFacts(str(identity.systemid), identity.timeline, identity.xlogpos, version)


async def _drop_slot(server: ServerConn, methods: frozenset[AuthMethod], slot: str) -> None:
    async with _session(server, methods) as conn:
        if await conn.read_replication_slot(slot) is not None:
            await conn.drop_slot(slot, wait=True)


async def _wal_lsn(server: ServerConn, methods: frozenset[AuthMethod]) -> int:
    async with _session(server, methods) as conn:
        return (await conn.identify_system()).xlogpos


# The registry row


def is_attached(node: NodeRow) -> bool:
    return node.role == ATTACHED


def server_of(app: App, node: NodeRow) -> tuple[ServerConn, frozenset[AuthMethod]]:
    """How to reach an attached node's server (password from its secret file)."""
    extra = node.extra
    secret = replication_secret(app, node.id)
    password = read_secret(secret) if secret.exists() else None
    server = ServerConn(
        extra["host"], node.port, node.replication_user, password, extra.get("socket_dir")
    )
    return server, auth_policy(extra.get("auth_methods") or [])


def server_wal_lsn(app: App, node: NodeRow) -> int | None:
    """The attached server's WAL flush position (IDENTIFY_SYSTEM), None when unreachable."""
    server, methods = server_of(app, node)
    try:
        return asyncio.run(_wal_lsn(server, methods))
    except NeonError:
        return None


def refuse_attached(node: NodeRow, action: str) -> None:
    """`pg start`/`stop`/`checkout` act on a server pg-neon runs; say what to do instead."""
    if not is_attached(node):
        return
    raise Conflict(
        f"{node.pgdata} is a server pg-neon follows but does not run ({node.extra['host']}:"
        f"{node.port}); it cannot {action} it. To roll back to a snapshot, create a node "
        f"from it: `neon pg create --snapshot {node.pgdata}@TAG` (or extract one with `neon "
        "pitr extract-snapshot`)"
    )


def register(app: App, node: NodeRow, *, paused: bool = False) -> None:
    server, methods = server_of(app, node)
    local_api(app).node_register(
        NodeRegisterRequest(
            node_id=node.id,
            host=server.host,
            port=server.port,
            user=server.user,
            password=server.password or "",
            system_id=node.extra.get("system_id"),
            store_dir=str(history_dir(app, node)),
            pgdata=node.pgdata,
            socket_dir=server.socket_dir,
            replication_slot=node.extra["slot"],
            auth_methods=sorted(m.value for m in methods),
            paused=paused,
        )
    )


def check_new_name(app: App, name: str) -> None:
    validate_name(name, "server name")
    if NODE_ID_RE.match(name):
        raise InvalidArgument(
            f"name {name!r} looks like a node ID (primary<N>); choose another name"
        )
    if app.registry.find_node(name) is not None:
        raise AlreadyExists(f"a node named {name!r} already exists; see `neon pg list`")


def attach_server(
    app: App,
    name: str,
    connstr: str,
    *,
    slot: str | None = None,
    auth_methods: Iterable[str] = (),
    pitr_ttl: str | None = None,
    storage: str = DEFAULT_STORAGE,
    progress: Progress,
    echo: Callable[[str], None] = lambda _msg: None,
) -> NodeRow:
    """Register, back up, import and follow the server (see the module docstring); on any
    failure nothing is left: no row, no history, no slot this call created."""
    cleanup_abandoned(app)
    check_new_name(app, name)
    server = parse_connstr(connstr)
    methods = auth_policy(auth_methods)
    store = app.registry.get_storage(storage)
    if store.type != "native":
        raise InvalidArgument(
            f"storage {storage!r} is of type {store.type}; an attached server's history "
            "lives in a native storage"
        )
    slot = slot or slot_name(name)
    facts = asyncio.run(check_server(server, methods))
    echo(
        f"PostgreSQL {facts.version} at {server.shown}: system {facts.system_id}, timeline "
        f"{facts.timeline}, WAL at {format_lsn(facts.wal_lsn)}"
    )
    extra: dict[str, Any] = {
        "host": server.host,
        "slot": slot,
        "system_id": facts.system_id,
        "auth_methods": sorted(m.value for m in methods),
    }
    if server.socket_dir is not None:
        extra["socket_dir"] = server.socket_dir
    with app.registry.transaction() as cur:
        if cur.execute("SELECT 1 FROM nodes WHERE pgdata = ? OR id = ?", (name, name)).fetchone():
            raise AlreadyExists(f"a node named {name!r} already exists; see `neon pg list`")
        cur.execute(
            "INSERT INTO nodes(id, pgdata, storage, datadir, port, role, superuser, "
            "replication_user, state, creator_pid, created_at, extra) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'creating', ?, ?, ?)",
            (
                name,
                name,
                storage,
                str(app.home.root / "attached" / name),
                server.port,
                ATTACHED,
                server.user,
                server.user,
                os.getpid(),
                time.time(),
                json.dumps(extra, sort_keys=True),
            ),
        )
    node = app.registry.get_node(name)
    if server.password:
        write_secret(replication_secret(app, node.id), server.password)
    slot_existed = False
    with node_lock(app.home, node.id, "pg attach"):
        try:
            slot_existed = asyncio.run(_slot_exists(server, methods, slot))
            register(app, node, paused=True)  # nothing streams before the image is in
            storage_path = Path(store.options["path"])
            with import_workdir(storage_path) as workdir:
                pgdata = workdir / "pgdata"
                echo(f"Taking a base backup of {server.shown} (slot {slot})")
                options = BaseBackupOptions(label=f"pg-neon attach {name}", keep_slot=slot)
                try:
                    result = asyncio.run(
                        fetch_base_backup(server.params(methods), pgdata, progress, options)
                    )
                except ServerError as exc:
                    raise _named(exc, server) from None
                progress.close()
                echo(f"Recovering the backup to its end at {format_lsn(result.end_lsn)}")
                recover_backup(pgdata, workdir, server.shown)
                echo("Importing it into the page history")
                local_api(app).node_import(
                    NodeImportRequest(node.id, str(pgdata), at_lsn=result.end_lsn)
                )
            with app.registry.transaction() as cur:
                cur.execute(
                    "UPDATE nodes SET state = 'ready', creator_pid = NULL WHERE id = ?", (node.id,)
                )
            node = app.registry.get_node(node.id)
            register(app, node)
            if pitr_ttl is not None:
                local_api(app).pitr_create(PitrCreateRequest(name, node.id, ttl=pitr_ttl))
        except BaseException:
            _forget(app, node)
            if not slot_existed:
                with contextlib.suppress(Exception):
                    asyncio.run(_drop_slot(server, methods, slot))
            raise
    return node


async def _slot_exists(server: ServerConn, methods: frozenset[AuthMethod], slot: str) -> bool:
    async with _session(server, methods) as conn:
        return await conn.read_replication_slot(slot) is not None


def _forget(app: App, node: NodeRow) -> None:
    """Drop the node's history, secrets and row (best effort, never raises)."""
    with contextlib.suppress(NeonError):
        unregister_from_pageserver(app, node)
    replication_secret(app, node.id).unlink(missing_ok=True)
    with app.registry.transaction() as cur:
        cur.execute("DELETE FROM nodes WHERE id = ?", (node.id,))


def detach_server(app: App, node: NodeRow, *, keep: bool) -> None:
    """Stop following the server and drop its slot there; its history is dropped too unless
    `keep` (then the node stays, 'detached': its snapshots and PITR areas still work on what
    was ingested, and `neon pg destroy` removes it later)."""
    if not is_attached(node):
        raise Conflict(
            f"{node.pgdata} is a node pg-neon runs, not an attached server; remove it with "
            f"`neon pg destroy {node.pgdata}`"
        )
    if node.state != DETACHED:
        with contextlib.suppress(NeonError):  # release the slot: stop streaming now
            local_api(app, start=False).node_pause(NodePauseRequest(node.id, disconnect=True))
        server, methods = server_of(app, node)
        try:
            asyncio.run(_drop_slot(server, methods, node.extra["slot"]))
        except NeonError as exc:
            if node.state == "ready":
                register(app, node)  # still attached: follow it again
            raise Unavailable(
                f"cannot drop replication slot {node.extra['slot']!r} on {server.shown}: "
                f"{exc}; nothing was changed (the slot keeps WAL on the server until it is "
                "dropped)"
            ) from None
    if keep:
        with app.registry.transaction() as cur:
            cur.execute("UPDATE nodes SET state = ? WHERE id = ?", (DETACHED, node.id))
        return
    _forget(app, node)
