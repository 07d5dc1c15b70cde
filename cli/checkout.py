"""`neon pg checkout PG@TAG`: roll a node back (or forward) to a snapshot.

Steps, with a journal beside the data directory so that a crash at any step ends, on the next
`pg checkout`/`pg start`, in either the old or the new directory, complete:

1. stop the node; name its current state `PG@HEAD{i}` (i = this node's checkout count);
2. branch a new timeline at the snapshot (next PostgreSQL timeline ID) in the pageserver;
3. where the pageserver can say which pages differ (cli/checkout_delta.py), rewrite those
   in the stopped directory itself, seal it and go to 5; else
   rebuild the directory at the branch point into `<datadir>.checkout` (the node's absolute
   tablespaces back at their locations: cli/tablespace_restore.py), finish it (config,
   passwords, slot), fsync the whole tree, then write the completion marker (the journal's
   text) durably;
4. swap: `<datadir>` -> `<datadir>.old`, `<datadir>.checkout` -> `<datadir>`, fsyncing the
   parent directory after each rename; delete the old, then the journal (parent fsynced);
5. start the node.

Once step 2 has happened the pageserver follows the new timeline, so recovery rolls forward:
it redoes 3 and 4 (3 is repeatable: the branch point does not change). The fsync order keeps
the journal true after a power loss too: a marker exists only over a durable tree, a renamed
directory only after its marker, and the journal is gone only after the swap is durable. A
marker equal to the journal in `<datadir>` means the swap happened. Recovery also deletes the
temporary tar and extraction directory a killed download left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, wait
from pathlib import Path
from typing import Any

from cli import checkout_files, nodes, postmaster
from cli.context import App
from cli.extract import download_basebackup, remove_download_leftovers
from cli.hints_mark import hints_logged_from, write_mark
from cli.pageserver_control import local_api
from cli.pg_files import read_pg_file, write_pg_file
from cli.registry import NodeRow
from cli.tablespace_restore import remove_left_locations, restore_own_locations
from durable_files import fsync_dir, fsync_tree, write_file_durably
from pageserver.api.own_thread import start_own_thread
from pageserver.history.snapshots import head_tag, split_snapshot_name
from pageserver_api.models import (
    NodeBranchRequest,
    NodeWalTailRequest,
    SnapshotCreateRequest,
    SnapshotShowRequest,
    TimelineInfo,
    TimelineInfoRequest,
)
from proto.errors import AlreadyExists, CorruptData, InvalidArgument, NeonError, Unavailable

COMPLETE_MARKER = ".neon-checkout-complete"


def _journal(node: NodeRow) -> Path:
    return node.datadir.with_name(node.datadir.name + ".checkout.json")


def _new_dir(node: NodeRow) -> Path:
    return node.datadir.with_name(node.datadir.name + ".checkout")


def _old_dir(node: NodeRow) -> Path:
    return node.datadir.with_name(node.datadir.name + ".old")


def _write_journal(node: NodeRow, entry: dict[str, Any]) -> None:
    write_file_durably(_journal(node), json.dumps(entry).encode())


def _current_timeline(app: App, node: NodeRow) -> TimelineInfo:
    return local_api(app).timeline_info(TimelineInfoRequest(node.id))


def checkout(app: App, node: NodeRow, snapshot: str, echo: Callable[[str], None]) -> None:
    nodes.refuse_attached(node, "check out a snapshot on")
    wait_seconds = nodes.shutdown_checkpoint_wait()  # a bad setting refused before anything
    _pgdata, tag = split_snapshot_name(snapshot)
    if tag == "CURRENT":
        raise InvalidArgument(f"{snapshot} is the node's current state already")
    # A clear error if missing; the pageserver begins rebuilding the target's pages the
    # delta will want while the node stops (pageserver/basebackup/prepared_pages.py).
    local_api(app).snapshot_show(SnapshotShowRequest(snapshot, checkout_node=node.id))
    finish_pending(app, node)
    echo(f"Stopping postgres on {node.pgdata}.")
    ahead = _import_ahead()
    at_once = _may_stop_at_once(node)
    try:
        stopping = nodes.begin_stop(app, node, "immediate" if at_once else "fast", at_once)
        try:
            # Asked while PostgreSQL stops: only this command's branch (it holds the node's
            # lock) changes the node's timeline and checkouts.
            info = _current_timeline(app, node)
            if stopping is not None and at_once:
                nodes.wait_stopped(app, node, stopping)  # its WAL is read next
            elif stopping is not None:
                nodes.wait_shut_down(app, node, stopping)
        except BaseException:
            if stopping is not None:
                stopping.close()
            raise
    finally:
        ahead.join()
    with contextlib.closing(stopping) if stopping is not None else contextlib.nullcontext():
        # A node found crashed (a checkout killed after it stopped the node at once, or a
        # crash of its own) has its tail taken too: its last commits are in its pg_wal only.
        take_tail = (at_once and stopping is not None) or (stopping is None and _crashed(node))
        _checkout_stopped(app, node, snapshot, info, stopping, wait_seconds, echo, take_tail)
    echo(f"Starting postgres on {node.pgdata}.")
    nodes.start_node(app, node)


def _checkout_stopped(
    app: App,
    node: NodeRow,
    snapshot: str,
    info: TimelineInfo,
    stopping: postmaster.Stopping | None,
    wait_seconds: float,
    echo: Callable[[str], None],
    take_tail: bool = False,
) -> None:
    """The checkout once the node has written its shutdown checkpoint, or has exited without
    one (`take_tail`: stopped at once, or crashed; its last WAL is taken from its pg_wal)
    (`info`: its timeline, `stopping`: its postmaster, maybe still exiting, waited for before
    the directory changes; `wait_seconds`: how long the pageserver may take to decode the
    node's last WAL)."""
    crash_end = None
    try:
        if take_tail:
            from pg15.pg_control import read_control_file

            timeline = read_control_file(node.datadir).checkpoint.this_timeline
            request = NodeWalTailRequest(
                node.id, str(node.datadir / "pg_wal"), timeline, wait_seconds
            )
            tail = local_api(app).node_take_wal_tail(request)
            reached: bool | None = tail.reached
            crash_end = tail.end_lsn
        else:
            reached = nodes.wait_for_shutdown_checkpoint(app, node, wait_seconds)
    except NeonError as exc:  # the pageserver died meanwhile, its ingest stopped on an error
        exc.message = f"{exc.message}; nothing was changed: {_start_again(app, node, stopping)}"
        raise
    if reached is False:
        _refuse_short_head(app, node, stopping, wait_seconds)
    echo(f"Rolling back {node.pgdata}@CURRENT to {snapshot}.")
    head = f"{node.pgdata}@{head_tag(info.checkouts or 0)}"
    # One request, not a listing first (which sizes every snapshot of every history): HEAD{i}
    # exists already only where a run was killed before its journal was written.
    head_lsn = None
    with contextlib.suppress(AlreadyExists):
        head_lsn = local_api(app).snapshot_create(SnapshotCreateRequest(node.id, head)).lsn
    entry: dict[str, Any] = {"snapshot": snapshot, "old_timeline": info.timeline_id, "head": head}
    if crash_end is not None:
        entry["crash_end"] = crash_end  # a killed run's recovery patches it in place too
    _write_journal(node, entry)
    for left in _roll_forward(app, node, info, head_lsn, stopping, crash_end):
        echo(f"Removed {left}: its tablespace is not in {snapshot} ({head} keeps it).")


def _refuse_short_head(
    app: App, node: NodeRow, stopping: postmaster.Stopping | None, wait_seconds: float
) -> None:
    """The pageserver has not decoded the node's last WAL (its shutdown checkpoint, or the
    tail it took from a node stopped at once: its receiver stalled, or never connected
    before the node went down, its ingest is behind): HEAD{i} named now would leave the
    node's last writes out, and once the node is on the new timeline nothing streams them
    any more. Nothing has changed yet: the node is started again (its slot kept that WAL,
    which then streams) and the checkout refused."""
    started = _start_again(app, node, stopping)
    raise Unavailable(
        f"the pageserver has not received the last WAL of {node.pgdata} "
        f"within {wait_seconds:g} s, so {node.pgdata}@HEAD "
        f"would miss its last writes; nothing was changed: {started}; check "
        f"out again once `neon pg show {node.pgdata}` shows its WAL ingested"
    )


def _start_again(app: App, node: NodeRow, stopping: postmaster.Stopping | None) -> str:
    """Start the node a refused checkout stopped (as it was before), once its postmaster has
    exited; says whether it did."""
    try:
        if stopping is not None:
            nodes.wait_stopped(app, node, stopping)
        nodes.start_node(app, node)
    except NeonError as exc:
        return f"postgres on {node.pgdata} could not be started again ({exc})"
    return f"postgres on {node.pgdata} was started again"


def _may_stop_at_once(node: NodeRow) -> bool:
    """Whether the checkout stops the node at once (immediate: no shutdown checkpoint, its
    last WAL taken from pg_wal by the pageserver: pageserver/follow/wal_tail.py) rather
    than fast: where the in-place checkout takes the crashed directory (hints WAL-logged,
    no tablespace links: cli/checkout_delta.py `_eligible`). The shutdown checkpoint writes
    and fsyncs every page the node dirtied, pages the delta rewrites anyway (a third of a
    1% checkout's stop, bench/README), and its WAL waits behind what the receiver has not
    streamed yet. A directory only a full rebuild takes keeps the fast stop."""
    if checkout_files.has_tablespace_links(node.datadir):
        return False
    return hints_logged_from(node.datadir) is not None


def _crashed(node: NodeRow) -> bool:
    """The stopped node's directory is a primary's that did not shut down cleanly."""
    from pg15.pg_control import DB_IN_PRODUCTION, read_control_file  # crc32c: slow to import

    try:
        return read_control_file(node.datadir).state == DB_IN_PRODUCTION
    except (OSError, CorruptData):
        return False


def _import_ahead() -> threading.Thread:
    """Import the in-place checkout's machinery (cli/checkout_delta.py: the applier, the
    delta reader; 50-70 ms of CPU, several times that on a loaded box) on a thread while
    PostgreSQL writes its shutdown checkpoint, which the command only waits for. Joined before
    the command imports anything else: two threads importing modules that import each other
    could deadlock. A failed import is left to the command's own, which raises it."""

    def load() -> None:
        with contextlib.suppress(Exception):
            importlib.import_module("cli.checkout_delta")

    thread = threading.Thread(target=load, name="import-ahead", daemon=True)
    thread.start()
    return thread


def _roll_forward(
    app: App,
    node: NodeRow,
    current: TimelineInfo | None = None,
    head_lsn: int | None = None,
    stopping: postmaster.Stopping | None = None,
    crash_end: int | None = None,
) -> list[Path]:
    """Redo the journal's checkout from wherever it stopped. `current`: the node's timeline
    as the caller read it after writing the journal, `head_lsn`: the LSN of the journal's
    HEAD where the caller just made it (else each is asked for), `stopping`: the caller's
    stop of the node, its postmaster maybe still exiting, `crash_end`: where the caller
    stopped it at once, the end of its valid WAL the history was brought to.

    The branch (the daemon writes what the node ingested on the timeline it leaves, then the
    new timeline and the node's state: 45-60 ms of a 1% checkout) runs on a thread while the
    delta of the target snapshot itself streams in (the same pages at the same LSN as the
    new branch point, a branch reading its ancestor there), and is waited for before anything
    after the delta: any order of the two is one a killed run's recovery redoes (it branches
    where the node is still on the old timeline, and applies the delta again)."""
    from cli import checkout_delta

    journal = _journal(node).read_text()
    if _marker(node.datadir) != journal:  # else the swap happened: only the cleanup is left
        entry = json.loads(journal)
        if crash_end is None:
            crash_end = entry.get("crash_end")
        if current is None:
            current = _current_timeline(app, node)
        # The branch on a thread of its own; its future's result() waits for it and raises
        # its error (at every call: a failed branch fails each step after it).
        branching: Future[Any] | None = None
        target = None
        if current.timeline_id == entry["old_timeline"]:
            tli = (current.pg_timeline or 0) + 1  # the daemon's own default, said for both
            branch = NodeBranchRequest(node.id, entry["snapshot"], pg_timeline=tli, checkout=True)
            branching = start_own_thread("checkout-branch", local_api(app).node_branch, branch)
            target = (entry["snapshot"], tli)
        new = _new_dir(node)
        try:
            _wait_exited(node, stopping)
            branched = branching.result if branching is not None else (lambda: None)
            in_place = _marker(new) != journal and checkout_delta.roll_forward(
                app, node, entry.get("head"), lambda datadir: _mark(datadir, journal),
                head_lsn, target, branched, crash_end,
            )  # fmt: skip
        except BaseException:
            if branching is not None:  # ended before the command does; its error is second
                wait([branching])
            raise
        if branching is not None:
            branching.result()  # the rebuild reads the node's branch point; an error raises
        if in_place:
            shutil.rmtree(new, ignore_errors=True)  # a rebuild a killed run had begun
            return _finish(node)  # done in place: no swap
        if _marker(new) != journal:
            shutil.rmtree(new, ignore_errors=True)
            rebuilt = download_basebackup(app, new, node_id=node.id)
            write_mark(new, 0)  # a fresh directory: no hint in it was left unlogged
            # The swap has not begun (`new` is not sealed): node.datadir is the old directory.
            restore_own_locations(new, node.datadir, rebuilt.tablespaces)
            nodes.copy_config_files(node.datadir, new)
            build = dataclasses.replace(node, datadir=new)
            nodes.finish_datadir(app, build)
            _seal(new, journal)
        _swap(node)
    return _finish(node)


def _wait_exited(node: NodeRow, stopping: postmaster.Stopping | None) -> None:
    """PostgreSQL gone from the directory before anything in it changes: this run's stop
    (HEAD named and the branch made while its processes exit, 20-30 ms) or a killed run's,
    still exiting. A postmaster that does not end fails the command; the journal stays."""
    if stopping is not None:
        stopping.wait()
    else:
        postmaster.wait_exiting(node.datadir)


def _marker(datadir: Path) -> str | None:
    # Through cli/pg_files.py, as _mark writes it: the directory is PostgreSQL's account's.
    try:
        raw = read_pg_file(datadir, COMPLETE_MARKER)
    except FileNotFoundError:  # no such directory (yet, or any more: the swap renames it)
        return None
    return None if raw is None else raw.decode(errors="replace")


def _seal(new: Path, journal: str) -> None:
    """Mark a rebuilt directory complete, durably: its whole tree first, then the marker."""
    fsync_tree(new)
    _mark(new, journal)


def _mark(datadir: Path, journal: str) -> None:
    """The marker, durably, through cli/pg_files.py (O_EXCL temporary, never through a
    link): the directory is PostgreSQL's account's, and a link it put at the temporary's
    fixed name made root truncate and write the file the link named."""
    write_pg_file(datadir, COMPLETE_MARKER, journal.encode())


def _swap(node: NodeRow) -> None:
    """The two renames, each made durable before the next step relies on it."""
    new, old, live = _new_dir(node), _old_dir(node), node.datadir
    if postmaster.running_pid(live) is not None:
        raise InvalidArgument(f"postgres runs on {live}; stop it before a checkout")
    if live.exists() and new.exists():
        shutil.rmtree(old, ignore_errors=True)  # a leftover: live is the state to keep
        os.replace(live, old)
        fsync_dir(live.parent)
    if new.exists():
        os.replace(new, live)
        fsync_dir(live.parent)


def _finish(node: NodeRow) -> list[Path]:
    """After a durable swap: the files of tablespaces the node left (cli/tablespace_restore.py),
    the old directory, then the journal, then the marker; the tablespace files removed."""
    left = remove_left_locations(_old_dir(node), node.datadir) if _old_dir(node).is_dir() else []
    shutil.rmtree(_old_dir(node), ignore_errors=True)
    checkout_files.remove_leftovers(node)
    _journal(node).unlink(missing_ok=True)
    fsync_dir(node.datadir.parent)
    (node.datadir / COMPLETE_MARKER).unlink(missing_ok=True)
    return left


def remove_checkout_files(node: NodeRow) -> None:
    """Everything a checkout keeps beside the node's directory (a killed one's rebuilt and old
    directories, state files, set-aside pg_wal and journal), for `pg destroy`: a node made
    later gets the same directory name and would take them for its own pending checkout."""
    for path in (_new_dir(node), _old_dir(node)):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
    remove_download_leftovers(_new_dir(node))
    checkout_files.remove_leftovers(node)
    _journal(node).unlink(missing_ok=True)


def finish_pending(app: App, node: NodeRow) -> bool:
    """Complete a checkout a crash interrupted; True if there was one."""
    remove_download_leftovers(_new_dir(node))
    if not _journal(node).exists():
        checkout_files.remove_leftovers(node)
        if not node.datadir.exists() and _new_dir(node).exists():
            _swap(node)  # crashed between the two renames of a swap that fsynced nothing
            _finish(node)
            return True
        return False
    _roll_forward(app, node)
    return True
