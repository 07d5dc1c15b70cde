"""Replicas: hot standbys of a node (`neon pg start --replica PRIMARY`).

A streaming replica's data directory is materialized from the page history, not copied from
the primary. The basebackup the pageserver writes is a *shut down* state at a synthesized
checkpoint C (pageserver/basebackup/tar_stream.py): its one WAL record exists nowhere on the
primary, so a standby started on it as it is would ask the primary for WAL after C, where the
primary's WAL holds other records (the first read fails its prev-link check, for ever). So
the replica starts the way a standby restarted after a clean stop does:

1. a physical slot of its own on the primary, reserving WAL from the current redo pointer
   (ReplicationSlotReserveWal, src/backend/replication/slot.c: a physical slot's restart_lsn
   is GetRedoRecPtr());
2. `CHECKPOINT` on the primary: it starts after the slot was made, so its redo R >= the
   slot's restart_lsn, and it waits until pg_control names it (at K);
3. the page history's state at X >= K + the checkpoint record (a temporary snapshot taken once
   ingest got there), downloaded; its own synthesized WAL removed;
4. pg_control: the primary's (same system identifier, checkpoint K with redo R on timeline T)
   with state "shut down in recovery" and minRecoveryPoint = X (pg15.pg_control.for_standby);
5. standby.signal, primary_conninfo and primary_slot_name: the startup process reads the
   checkpoint K by streaming from the slot (pg_wal is empty: WaitForWALToBecomeAvailable in
   src/backend/access/transam/xlogrecovery.c starts the walreceiver at R's segment), replays
   R..X over pages already at X (redo skips what a page has: XLogReadBufferForRedo compares
   page LSNs; full-page images are applied and later records redone, as in crash recovery),
   and opens for reads once past X (CheckRecoveryConsistency). The RUNNING_XACTS record a
   checkpoint logs before itself (CreateCheckPoint, xlog.c) gives hot standby its snapshot.

The replica connects through the home's socket directory, as the pageserver does
(cli/nodes.py, register_with_pageserver): its pg_hba trusts replication there, only
PostgreSQL's OS user can enter it, so no password lands in the replica's files and no other
local user can stand in for the primary on its TCP port while it is down.

A replica has no history of its own: it is never registered with the pageserver and lives
in its own registry table, so nothing that walks nodes sees it. `--from-snapshot` makes a
static read-only replica: the directory `neon snapshot start` serves (standby.signal, no WAL
source). A `pg checkout` of the primary (a new timeline, a rebuilt directory without the
replicas' slots) re-seeds its streaming replicas: they are rolled back with it, as the user
asked of the primary, and keep their names and ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cli import nodes, postmaster
from cli.context import App
from cli.extract import remove_download_leftovers
from cli.ingest_wait import wait_for_ingest
from cli.node_lock import node_lock
from cli.pageserver_control import local_api
from cli.pg_files import write_pg_file
from cli.ports import port_is_free
from cli.registry import NodeRow, ReplicaRow
from cli.snapshot_commands import READ_ONLY_HBA, read_only_settings, standby_dir_at
from cli.storages import validate_name
from datadir_files.pg_account import ensure_own_dir, traversal_mode
from pageserver.pid_file import pid_alive
from pageserver_api.models import SnapshotCreateRequest, SnapshotDestroyRequest, SnapshotShowRequest
from pg15.checkpoint import CHECKPOINT_RECORD_SIZE
from pg15.lsn import format_lsn
from pg15.pg_control import ControlFile, for_standby, read_control_file
from proto.errors import AlreadyExists, Conflict, CorruptData, InvalidArgument, NotFound

NAME_PREFIX = "replica-"
SEED_TAG = "replica-seed"
"""Tag prefix of the temporary snapshot a seeding takes (`PGDATA@replica-seed-<pid>-<hex>`)."""
_PGDATA_NAME_RE = re.compile(r"^pgdata\d+\Z")


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    replica: ReplicaRow
    state: str  # running | stopped | crashed | creating
    pid: int | None


def replica_root(app: App, name: str) -> Path:
    return app.home.root / "replicas" / name


def find(app: App, ref: str) -> ReplicaRow | None:
    return app.registry.find_replica(ref)


def status(replica: ReplicaRow) -> ReplicaStatus:
    if replica.state == "creating":
        return ReplicaStatus(replica, "creating", None)
    pid = postmaster.running_pid(replica.datadir)
    if pid is not None:
        return ReplicaStatus(replica, "running", pid)
    crashed = postmaster.read_pid_file(replica.datadir) is not None
    return ReplicaStatus(replica, "crashed" if crashed else "stopped", None)


def connstr(app: App, replica: ReplicaRow) -> str:
    return f"host={app.home.socket_dir} port={replica.port} user={nodes.SUPERUSER} dbname=postgres"


def _log(app: App, replica: ReplicaRow) -> Path:
    return replica_root(app, replica.name) / "postgres.log"


# creation


def create(
    app: App, primary: NodeRow, *, name: str | None, port: int | None, snapshot: str | None
) -> ReplicaRow:
    """Create and start a replica of `primary` (streaming, or static at `snapshot`)."""
    cleanup_abandoned(app)
    if primary.role != "primary":
        raise InvalidArgument(
            f"{primary.id} is not a node this home runs (role {primary.role}); a replica "
            "streams from a primary made by `neon pg create`"
        )
    if name is not None:
        _check_name(app, name)
    if snapshot is not None:
        info = local_api(app).snapshot_show(SnapshotShowRequest(snapshot))
        if info.node_id != primary.id:
            raise InvalidArgument(
                f"snapshot {snapshot} is not a snapshot of {primary.pgdata}; a replica of "
                f"{primary.pgdata} starts at one of its own (see `neon snapshot list`)"
            )
    with node_lock(app.home, primary.id, "pg start --replica"):
        primary = app.registry.get_node(primary.id)
        if snapshot is None:
            _require_running(app, primary)
        replica = _insert(app, primary, name, port, snapshot)
        try:
            if snapshot is not None:
                standby_dir_at(app, replica.datadir, snapshot)
                settings = read_only_settings(app, replica.datadir, replica.port)
            else:
                replica = _seed(app, primary, replica)
                settings = streaming_settings(app, primary, replica)
            postmaster.write_config(replica.datadir, settings, READ_ONLY_HBA)
            postmaster.start(replica.datadir, _log(app, replica))
            with app.registry.transaction() as cur:
                cur.execute(
                    "UPDATE replicas SET state = 'ready', creator_pid = NULL WHERE id = ?",
                    (replica.id,),
                )
        except BaseException:
            _remove(app, primary, replica)
            raise
    found = app.registry.find_replica(replica.name)
    assert found is not None
    return found


def _check_name(app: App, name: str) -> None:
    validate_name(name, "replica")
    if nodes.NODE_ID_RE.match(name) or _PGDATA_NAME_RE.match(name):
        raise InvalidArgument(
            f"replica name {name!r} looks like a node's ID or default data directory name; "
            "choose another with -n"
        )
    if app.registry.find_node(name) is not None or app.registry.find_replica(name) is not None:
        raise AlreadyExists(f"a node or replica named {name!r} already exists; see `neon pg list`")


def _require_running(app: App, primary: NodeRow) -> None:
    if nodes.node_status(app, primary).state != "running":
        raise Conflict(
            f"{primary.pgdata} is not running: a replica streams from its primary; start it "
            f"with `neon pg start {primary.pgdata}` first"
        )


def _insert(
    app: App, primary: NodeRow, name: str | None, port: int | None, snapshot: str | None
) -> ReplicaRow:
    """The replica's row in state 'creating' (its name and port reserved), its directory."""
    with app.registry.transaction() as cur:
        if name is None:
            taken = {r[0] for r in cur.execute("SELECT name FROM replicas")}
            taken |= {r[0] for r in cur.execute("SELECT pgdata FROM nodes")}
            i = 1
            while f"{NAME_PREFIX}{i}" in taken:
                i += 1
            name = f"{NAME_PREFIX}{i}"
        elif cur.execute("SELECT 1 FROM replicas WHERE name = ?", (name,)).fetchone():
            raise AlreadyExists(f"a replica named {name!r} already exists; see `neon pg list`")
        chosen = nodes._pick_port(cur, port)
        root = replica_root(app, name)
        cur.execute(
            "INSERT INTO replicas(name, primary_id, datadir, port, snapshot, state, "
            "creator_pid, created_at) VALUES (?, ?, ?, ?, ?, 'creating', ?, ?)",
            (
                name,
                primary.id,
                str(root / "pgdata"),
                chosen,
                snapshot,
                os.getpid(),
                time.time(),
            ),
        )
    replica = app.registry.find_replica(name)
    assert replica is not None
    shutil.rmtree(root, ignore_errors=True)  # a leftover of a replica of that name
    for directory in (root.parent, root):  # PostgreSQL's account enters them to reach pgdata
        ensure_own_dir(directory, traversal_mode())
    return replica


def _seed(app: App, primary: NodeRow, replica: ReplicaRow) -> ReplicaRow:
    """Materialize the replica's directory from the page history at the primary's current
    state, ready to stream from its slot (the module's steps 1-4); the row records the
    primary's PostgreSQL timeline it was seeded on."""
    import psycopg  # here: psycopg takes a tenth of a second to import

    slot = replica.slot
    assert slot is not None
    _drop_seed_leftovers(app, primary)
    # Until the end the row names no timeline: a seeding killed half-way leaves a directory
    # `pg start` seeds again (_stale) instead of starting it.
    extra = {k: v for k, v in replica.extra.items() if k not in ("timeline", "seeded_lsn")}
    _set_extra(app, replica, extra)
    with psycopg.connect(nodes.connstr(app, primary), autocommit=True, connect_timeout=10) as c:
        exists = c.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        if exists.fetchone() is None:
            c.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
        c.execute("CHECKPOINT")
    control = _live_control_file(primary.datadir)
    checkpoint, tli = control.checkpoint_lsn, control.checkpoint.this_timeline
    # The state once ingest is past the checkpoint record: X >= K + its record.
    seed_lsn = checkpoint + CHECKPOINT_RECORD_SIZE
    wait_for_ingest(app, primary.id, seed_lsn, show_progress=False)
    snapshot = f"{primary.pgdata}@{SEED_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
    api = local_api(app)
    api.snapshot_create(SnapshotCreateRequest(primary.id, snapshot, lsn=seed_lsn))
    try:
        backup = standby_dir_at(app, replica.datadir, snapshot)
    finally:
        api.snapshot_destroy(SnapshotDestroyRequest(snapshot))
    if backup.system_identifier != control.system_identifier:
        raise CorruptData(
            f"the page history of {primary.pgdata} is of system {backup.system_identifier}, "
            f"its server of {control.system_identifier}: a replica cannot stream from it"
        )
    if backup.lsn < seed_lsn:
        raise CorruptData(
            f"the page history of {primary.pgdata} gave a state at {format_lsn(backup.lsn)}, "
            f"before the checkpoint at {format_lsn(checkpoint)}"
        )
    wal = replica.datadir / "pg_wal"
    for path in wal.iterdir():
        if path.is_file():  # the synthesized segment (and history): the primary streams WAL
            path.unlink()
    write_pg_file(replica.datadir, "global/pg_control", for_standby(control.raw, backup.lsn, tli))
    extra = {**extra, "timeline": tli, "seeded_lsn": format_lsn(backup.lsn)}
    _set_extra(app, replica, extra)
    return replace(replica, extra=extra)


def _set_extra(app: App, replica: ReplicaRow, extra: dict[str, Any]) -> None:
    with app.registry.transaction() as cur:
        cur.execute(
            "UPDATE replicas SET extra = ? WHERE id = ?",
            (json.dumps(extra, sort_keys=True), replica.id),
        )


def _drop_seed_leftovers(app: App, primary: NodeRow) -> None:
    """Destroy the temporary snapshots of seedings whose process died (the caller holds the
    primary's lock, so no live seeding of this primary is at work)."""
    api = local_api(app)
    prefix = f"{primary.pgdata}@{SEED_TAG}-"
    for snap in api.snapshot_list():
        pid = snap.name[len(prefix) :].split("-")[0] if snap.name.startswith(prefix) else ""
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            with contextlib.suppress(NotFound):
                api.snapshot_destroy(SnapshotDestroyRequest(snap.name))


def _live_control_file(datadir: Path) -> ControlFile:
    """The running primary's pg_control: PostgreSQL rewrites it in one 8 KiB write
    (update_controlfile, src/common/controldata_utils.c); a read racing it fails its CRC and
    is read again. Read as read_control_file reads it (never through a link, 8 KiB)."""
    for _ in range(50):
        try:
            return read_control_file(datadir)
        except CorruptData:
            time.sleep(0.02)
    return read_control_file(datadir)


def streaming_settings(app: App, primary: NodeRow, replica: ReplicaRow) -> dict[str, object]:
    conninfo = (
        f"host={app.home.socket_dir} port={primary.port} user={primary.replication_user} "
        f"application_name={replica.name}"
    )
    return {
        **read_only_settings(app, replica.datadir, replica.port),
        "primary_conninfo": conninfo,
        "primary_slot_name": replica.slot,
        # A restarted primary is found again within a second (the default waits 5 s).
        "wal_retrieve_retry_interval": "1s",
    }


# start, stop, re-seed, destroy


def start(app: App, replica: ReplicaRow) -> bool:
    """Start a stopped replica; False if it was running. A streaming replica whose primary
    moved to another timeline (a `pg checkout`), or lost its slot, is seeded again first."""
    if replica.state != "ready":
        cleanup_abandoned(app)
        if app.registry.find_replica(replica.name) is None:
            raise NotFound(
                f"the creation of replica {replica.name} was interrupted and it was removed; "
                "create it again with `neon pg start --replica`"
            )
        raise Conflict(f"replica {replica.name} is still being created; try again in a moment")
    primary = app.registry.get_node(replica.primary_id)
    with node_lock(app.home, primary.id, "pg start (replica)"):
        st = status(replica)
        if st.state == "running":
            return False
        if st.state == "crashed":
            dead = postmaster.read_pid_file(replica.datadir)
            if dead is not None:
                postmaster.remove_stale_locks(
                    replica.datadir, app.home.socket_dir, replica.port, dead
                )
        if not port_is_free(replica.port):
            raise Conflict(
                f"port {replica.port} of replica {replica.name} is in use by another process"
            )
        if replica.snapshot is None and _stale(app, primary, replica):
            reseed(app, primary, replica)
            return True
        postmaster.start(replica.datadir, _log(app, replica))
    return True


def _stale(app: App, primary: NodeRow, replica: ReplicaRow) -> bool:
    """Whether the replica cannot continue: its primary is on another PostgreSQL timeline
    than it was seeded on, or (when running) lost the replica's slot."""
    try:
        tli = _live_control_file(primary.datadir).checkpoint.this_timeline
    except CorruptData:
        return False
    seeded = replica.extra.get("timeline")
    moved = tli != seeded
    running = nodes.node_status(app, primary).state == "running"
    if moved and not running:
        why = (
            f"{primary.pgdata} was checked out since replica {replica.name} was seeded"
            if seeded is not None
            else f"the seeding of replica {replica.name} was interrupted"
        )
        raise Conflict(
            f"{why}; start {primary.pgdata} (`neon pg start {primary.pgdata}`), then the "
            "replica is seeded again"
        )
    return moved or (running and not _slot_exists(app, primary, replica))


def _slot_exists(app: App, primary: NodeRow, replica: ReplicaRow) -> bool:
    import psycopg

    with psycopg.connect(nodes.connstr(app, primary), connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (replica.slot,)
        ).fetchone()
    return row is not None


def reseed(app: App, primary: NodeRow, replica: ReplicaRow) -> None:
    """Seed a streaming replica again from the primary's current state, and start it (the
    caller holds the primary's lock)."""
    _require_running(app, primary)
    postmaster.stop(replica.datadir, "immediate")
    shutil.rmtree(replica.datadir, ignore_errors=True)
    replica = _seed(app, primary, replica)
    postmaster.write_config(
        replica.datadir, streaming_settings(app, primary, replica), READ_ONLY_HBA
    )
    postmaster.start(replica.datadir, _log(app, replica))


@contextlib.contextmanager
def reseeded_after_checkout(
    app: App, primary: NodeRow, echo: Callable[[str], None]
) -> Iterator[None]:
    """Around a `pg checkout` of `primary` (its lock held): its streaming replicas stopped
    first, seeded again from the new state after. Their WAL position lies past the branch
    point on the old timeline, which no standby can go back from. A checkout that fails
    leaves them stopped; `pg start REPLICA` seeds a stale one again. One refused before
    anything changed (its primary running again on its timeline: cli/checkout.py
    _refuse_short_head) starts them again, where they were."""
    streaming = [
        r for r in app.registry.replicas(primary.id) if r.snapshot is None and r.state == "ready"
    ]
    stopped = [r for r in streaming if postmaster.stop(r.datadir, "fast")]
    for replica in stopped:
        echo(f"Stopped replica {replica.name}.")
    try:
        yield
    except BaseException:
        _start_unmoved(app, primary, stopped, echo)
        raise
    primary = app.registry.get_node(primary.id)
    for replica in streaming:
        echo(f"Seeding replica {replica.name} again from {primary.pgdata}.")
        reseed(app, primary, replica)


def _start_unmoved(
    app: App, primary: NodeRow, stopped: list[ReplicaRow], echo: Callable[[str], None]
) -> None:
    """After a failed checkout: start again the replicas it stopped whose primary runs on
    the timeline they were seeded on, with their slot (the checkout changed nothing); the
    others stay stopped, for `pg start REPLICA` to seed again. Best effort: the checkout's
    own error is the one reported."""
    primary = app.registry.get_node(primary.id)
    if nodes.node_status(app, primary).state != "running":
        return
    for replica in stopped:
        try:
            if _stale(app, primary, replica):
                continue
            postmaster.start(replica.datadir, _log(app, replica))
        except Exception as exc:  # reported; the checkout's own error follows
            echo(f"Replica {replica.name} not started again: {exc}")
            continue
        echo(f"Started replica {replica.name} again.")


def stop(replica: ReplicaRow, mode: str = "fast") -> bool:
    return postmaster.stop(replica.datadir, mode)


def destroy(app: App, replica: ReplicaRow) -> None:
    """Stop the replica, drop its slot on the primary (whose WAL it holds), delete it."""
    primary = app.registry.find_node(replica.primary_id)
    if primary is None:
        _remove(app, None, replica)
        return
    with node_lock(app.home, primary.id, "pg destroy (replica)"):
        _remove(app, primary, replica, strict=True)


def _remove(
    app: App, primary: NodeRow | None, replica: ReplicaRow, *, strict: bool = False
) -> None:
    """Stop and delete the replica and its slot; `strict`: a slot that cannot be dropped is
    an error (the replica is kept), else best effort (cleanup after a failure)."""
    with contextlib.suppress(Exception):
        postmaster.stop(replica.datadir, "immediate", timeout=30)
    if primary is not None and replica.slot is not None:
        try:
            drop_slot(app, primary, replica.slot)
        except Exception:
            if strict:
                raise
    shutil.rmtree(replica_root(app, replica.name), ignore_errors=True)
    remove_download_leftovers(replica.datadir)
    with app.registry.transaction() as cur:
        cur.execute("DELETE FROM replicas WHERE id = ?", (replica.id,))


def drop_slot(app: App, primary: NodeRow, slot: str) -> None:
    """Drop `slot` on the primary: over SQL when it runs, else in single-user mode (a slot
    left behind would keep the primary's WAL for ever)."""
    sql = (
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        f"WHERE slot_name = '{slot}'"
    )
    if nodes.node_status(app, primary).state == "running":
        import psycopg

        with psycopg.connect(nodes.connstr(app, primary), autocommit=True) as conn:
            # The walsender of a replica just killed may still hold the slot for a moment.
            for _ in range(100):
                try:
                    conn.execute(sql)
                    return
                except psycopg.errors.ObjectInUse:
                    time.sleep(0.1)
            conn.execute(sql)
        return
    if primary.datadir.is_dir():
        nodes._single_user(primary, sql + ";\n", f"dropping slot {slot} on {primary.pgdata}")


def cleanup_abandoned(app: App) -> None:
    """Remove replicas whose `pg start --replica` died half-way (its process is gone)."""
    for replica in app.registry.replicas():
        if replica.state != "creating" or replica.creator_pid is None:
            continue
        if replica.creator_pid == os.getpid() or pid_alive(replica.creator_pid):
            continue
        _remove(app, app.registry.find_node(replica.primary_id), replica)


def refuse_primary_destroy(app: App, primary: NodeRow) -> None:
    """A primary with replicas is not destroyed: they would be left streaming from nothing,
    their slots with it; the user destroys them first, knowingly."""
    names = [r.name for r in app.registry.replicas(primary.id)]
    if names:
        raise Conflict(
            f"{primary.pgdata} has replicas ({', '.join(names)}); destroy them first "
            f"(`neon pg destroy {names[0]}`)"
        )


# inspection


def lag(app: App, primary: NodeRow, st: ReplicaStatus) -> dict[str, Any]:
    """Replay lag: the primary's pg_current_wal_lsn() against the replica's
    pg_last_wal_replay_lsn() in bytes; in seconds the walsender's replay_lag (NULL once the
    standby is caught up and the primary idle: 0), else the time since the last replayed
    commit."""
    import psycopg

    info: dict[str, Any] = {
        "primary_lsn": None,
        "replay_lsn": None,
        "receive_lsn": None,
        "receiver": None,
        "lag_bytes": None,
        "lag_seconds": None,
    }
    if st.state != "running":
        return info
    replica = st.replica
    try:
        with psycopg.connect(connstr(app, replica), connect_timeout=5) as conn:
            row = conn.execute(
                "SELECT pg_last_wal_replay_lsn()::text, pg_last_wal_receive_lsn()::text, "
                "(SELECT status FROM pg_stat_wal_receiver), "
                "extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8"
            ).fetchone()
    except psycopg.Error:
        return info
    assert row is not None
    info.update(replay_lsn=row[0], receive_lsn=row[1], receiver=row[2])
    since_commit = row[3]
    if nodes.node_status(app, primary).state != "running" or replica.snapshot is not None:
        return info
    try:
        with psycopg.connect(nodes.connstr(app, primary), connect_timeout=5) as conn:
            prow = conn.execute(
                "SELECT pg_current_wal_lsn()::text, "
                "(SELECT extract(epoch FROM r.replay_lag)::float8 FROM pg_stat_replication r "
                "JOIN pg_replication_slots s ON s.active_pid = r.pid WHERE s.slot_name = %s), "
                "pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)::bigint",
                (replica.slot, row[0] or "0/0"),
            ).fetchone()
    except psycopg.Error:
        return info
    assert prow is not None
    behind = max(0, int(prow[2])) if row[0] is not None else None
    seconds = prow[1]
    if seconds is None and behind is not None:
        seconds = 0.0 if behind == 0 else since_commit
    info.update(primary_lsn=prow[0], lag_bytes=behind, lag_seconds=seconds)
    return info


def replica_json(
    app: App, st: ReplicaStatus, primary: NodeRow, with_lag: bool = False
) -> dict[str, Any]:
    replica = st.replica
    out: dict[str, Any] = {
        "id": replica.name,
        "role": "replica",
        "primary": primary.pgdata,
        "primary_id": primary.id,
        "kind": "static" if replica.snapshot is not None else "streaming",
        "snapshot": replica.snapshot,
        "datadir": str(replica.datadir),
        "port": replica.port,
        "endpoint": f"localhost:{replica.port}",
        "state": st.state,
        "pid": st.pid,
        "slot": replica.slot,
        "connstr": connstr(app, replica),
        "log": str(_log(app, replica)),
        "timeline": replica.extra.get("timeline"),
        "seeded_lsn": replica.extra.get("seeded_lsn"),
    }
    if with_lag:
        out["lag"] = lag(app, primary, st)
    return out
