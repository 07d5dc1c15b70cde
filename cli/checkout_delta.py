"""`pg checkout` in place: rewrite only what differs between the stopped node's directory
and the target, instead of rebuilding the whole directory (cli/checkout.py).

The pageserver makes a delta (the tar of a delta `.neon` file, snapfile/delta.py) from the
node's `HEAD{i}` snapshot (the state its directory holds) to its new branch point
(pageserver/basebackup/checkout_delta.py: the pages of every key written on either side
since the histories met, relations created, dropped or resized, and the small non-page files
whole); it is applied to the directory itself by the applier snapshot import uses
(cli/delta_apply.py), keeping the node's configuration.

Crash safety (the journal's contract: after a kill at any point, the next `pg checkout` or
`pg start` ends in the old or the new directory, complete), by files beside the directory:

1. `<datadir>.checkout.applying` is written (durably) before the first byte is applied: from
   then on the directory may be half patched and is never started as it is;
2. the delta's tar is streamed from the pageserver into the applier (no copy on disk, no
   compression: both sides are on this machine; its WAL segment a sparse member, two pages
   instead of 16 MiB of zeros). Applying is idempotent and any delta between
   the same two states will do: whole files get the member's bytes (written from their
   first difference; after a failed run, written whole: see `DeltaApplier`'s `compare`), a
   fork is set to the size the delta says and its listed pages written (with the target's
   content), whatever is not listed removed, and a page the delta does not list is one no
   WAL changed on either side, which no run touched. So recovery asks for the delta again
   and applies it over what a killed run left (or rebuilds the directory whole: it is
   replaced then);
3. what it changed is fsynced (the whole tree after a killed run, whose writes may not be),
   then `.applying` is renamed `<datadir>.checkout.applied` (durably);
4. the node's passwords and slot (cli/nodes.py finish_datadir, single-user mode: not
   repeatable over step 2, which would drop the WAL it wrote, hence step 3's name; its own
   slot is removed first, so a killed run can be repeated; its shutdown checkpoint makes
   its writes durable), the configuration fsynced, then the completion marker (only: the
   rest is durable); the `.applied` file is removed last, by `remove_leftovers`. The state
   files' names are in cli/checkout_files.py. Where this run's delta left pg_authid as it
   was, the roles and passwords are the directory's own and only the slot is missing: it is
   written as the file PostgreSQL would write (cli/slot_file.py), without the single-user
   run (a start, the SQL and a shutdown checkpoint). After a killed run what changed is not
   known: the single-user step runs.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path, PurePosixPath

from cli.checkout_files import (
    applied_file,
    applying_file,
    has_tablespace_links,
    old_wal_dir,
    remove_later,
    stale_dir,
)
from cli.context import App
from cli.delta_apply import DeltaApplier
from cli.hints_mark import HINTS_MARK, hints_logged_from
from cli.nodes import CONFIG_FILES, SHUTDOWN_CHECKPOINT_LEN, finish_datadir, write_node_config
from cli.pageserver_control import local_api
from cli.pg_files import read_pg_file
from cli.postmaster import NEON_CONF
from cli.registry import NodeRow
from cli.slot_file import write_physical_slot
from datadir_files.untar import consume_in_thread
from durable_files import fsync_dir, fsync_tree, sync_filesystem, write_file_durably
from pageserver.follow.followed_nodes import slot_name
from pageserver_api.client import BasebackupDownload, PageserverClient
from pageserver_api.models import BasebackupRequest, SnapshotShowRequest
from pg15.catalogs import parse_relmap
from pg15.pg_control import DB_IN_PRODUCTION, DB_SHUTDOWNED, read_control_file
from proto.errors import CorruptData, InvalidArgument, NotFound

AUTHID_RELATION_ID = 1260
"""pg_authid's OID (src/include/catalog/pg_authid.h): a shared, mapped catalog in global/."""

KEEP = (*CONFIG_FILES, NEON_CONF, HINTS_MARK)
"""What the node's directory keeps that is not page history."""


def _set_wal_aside(node: NodeRow) -> None:
    """Move the directory's pg_wal out of it and delete it (`remove_later`) while the
    delta streams in. None of it is the target's (the delta brings its own segment and
    history file; a full rebuild keeps none either), and unlinking its dozens of 16 MiB
    segments at the end, with the other files the delta does not name, took a fifth of a
    checkout. Called once `.applying` exists: from then on the directory is rolled forward,
    never started as it is. A linked pg_wal stays (its files go as before); a killed run's
    leftover goes with the checkout's other state files (`remove_leftovers`)."""
    wal, aside = node.datadir / "pg_wal", old_wal_dir(node)
    if wal.is_symlink() or not wal.is_dir():
        return
    shutil.rmtree(aside, ignore_errors=True)
    try:
        os.rename(wal, aside)
    except OSError:  # a mount point (EBUSY, EXDEV): it stays, and its files go as before
        return
    remove_later(aside)


def roll_forward(
    app: App,
    node: NodeRow,
    head: str | None,
    seal: Callable[[Path], None],
    head_lsn: int | None = None,
    target: tuple[str, int] | None = None,
    branched: Callable[[], None] = lambda: None,
    crash_end: int | None = None,
) -> bool:
    """Bring the stopped directory to the node's branch point in place and `seal` it; False
    when no delta applies (the caller rebuilds it whole, which a half-patched directory
    allows too: it is replaced). `head_lsn`: `head`'s LSN where the caller just made it (else
    it is asked for). `target`: (snapshot, PostgreSQL timeline) of a branch point still being
    made: the delta is asked of that snapshot, and `branched` (waiting for the branch, raising
    its error) is called once the delta is in, before anything else (refused, the delta is
    asked again of the branch point once `branched` returned). `crash_end`: the caller
    stopped the node at once and brought its history to the end of its valid WAL there
    (`_eligible`)."""
    applying, applied = applying_file(node), applied_file(node)
    roles_kept = False  # after a killed run: what it changed is not known
    if not applied.exists():
        again = applying.exists()  # a killed run applied some of it, maybe not durably
        result = None
        if head is not None:
            result = _stream_apply(app, node, head, again, head_lsn, target, crash_end)
            if result is None and target is not None:
                # Refused before its first byte (a target held in a bucket, which the branch
                # adopts; or any refusal, which the branch point's delta repeats): asked again
                # of the node's branch point, once made.
                branched()
                result = _stream_apply(app, node, head, again, head_lsn, None, crash_end)
        if result is None:
            return False
        roles_kept = result
        os.replace(applying, applied)
        fsync_dir(applied.parent)
    branched()
    slot = slot_name(node.id)
    shutil.rmtree(node.datadir / "pg_replslot" / slot, ignore_errors=True)
    if roles_kept:
        # The roles and passwords are the directory's own (HEAD's, which finish_datadir set
        # when the node was made or last checked out): only the slot is missing.
        write_node_config(app, node)
        write_physical_slot(node.datadir, slot, read_control_file(node.datadir).checkpoint.redo)
    else:
        finish_datadir(app, node)  # its shutdown checkpoint makes its own writes durable
    for name in KEEP:
        if (node.datadir / name).is_file():
            _fsync(node.datadir / name)
    fsync_dir(node.datadir)
    seal(node.datadir)
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _eligible(datadir: Path, crash_end: int | None = None) -> tuple[int, int] | None:
    """(hint mark, end of the node's WAL) if the directory may take a delta: no tablespace
    links (the node's tablespaces are placed by a full rebuild: cli/tablespace_restore.py),
    and either shut down cleanly (the end: its shutdown checkpoint) or stopped at once by
    this command, which brought the history to the end of the node's valid WAL (`crash_end`,
    cli/checkout.py); else its pages may hold WAL the pageserver never received.

    A directory stopped at once holds what its last completed checkpoint wrote and fsynced,
    and, of any page WAL changed after that checkpoint's redo pointer R, some version at
    least as old as the node's last (its dirty buffers were lost): a page WAL changed before
    R was dirty when that checkpoint began and written by it (BufferSync,
    src/backend/storage/buffer/bufmgr.c: the very guarantee crash recovery redoes from R
    on), and a hint after R WAL-logs the page (see pageserver/basebackup/checkout_delta.py).
    The delta rewrites every page WAL changed since the redo pointer of the last checkpoint
    at or before the histories' common point, which is at or before R: every page that may
    differ from the history at the WAL's end is written with the target's content, and the
    non-page files (SLRUs, pg_control, two-phase state) are written whole, as after a clean
    stop. No page on disk is newer than that end: a page is written only after the WAL up to
    its LSN is flushed (the WAL-before-data rule, bufmgr.c FlushBuffer), and flushed WAL is
    valid WAL."""
    if has_tablespace_links(datadir):
        return None
    control = read_control_file(datadir)
    mark = hints_logged_from(datadir)
    if mark is None:
        return None
    if control.state == DB_SHUTDOWNED:
        return mark, control.checkpoint_lsn + SHUTDOWN_CHECKPOINT_LEN
    if crash_end is not None and control.state == DB_IN_PRODUCTION:
        return mark, crash_end
    return None


def _stream_apply(
    app: App, node: NodeRow, head: str, again: bool, head_lsn: int | None = None,
    target: tuple[str, int] | None = None, crash_end: int | None = None,
) -> bool | None:  # fmt: skip
    """Apply the delta from `head` (the state the directory holds) to the node's branch
    point; None, the directory untouched, where none is right (see `_eligible`; HEAD short
    of the directory's shutdown checkpoint; the pageserver refuses: no common history,
    hints not logged since its start). Else whether the roles are known to be unchanged
    (`_roles_kept`)."""
    api = local_api(app)
    if again:  # half patched: pg_control may be the target's already; the mark is kept
        mark = hints_logged_from(node.datadir)
        if mark is None:
            return None
    else:
        eligible = _eligible(node.datadir, crash_end)
        if eligible is None:
            return None
        mark, shut_down_at = eligible
        if head_lsn is None:
            try:
                head_lsn = api.snapshot_show(SnapshotShowRequest(head)).lsn
            except NotFound:
                return None
        if head_lsn < shut_down_at:
            return None
    # Of the target snapshot itself while the node's branch is made (`target`): no node_id,
    # so that a daemon older than that refuses it (it would read the node's current branch
    # point, not made yet) and the checkout rebuilds the directory whole instead.
    snapshot, pg_timeline = target if target is not None else (None, None)
    request = BasebackupRequest(
        node_id=node.id if target is None else None,
        snapshot=snapshot,
        pg_timeline=pg_timeline,
        checkout_from=head,
        hints_logged_from=mark,
        sparse_wal=True,
        fork_sizes=True,
    )
    stale = stale_dir(node)
    shutil.rmtree(stale, ignore_errors=True)  # a killed run's: its names would be taken
    applier = DeltaApplier(
        node.datadir, KEEP, sync_early=not again, aside=stale, compare=not again, sparse_wal=True
    )
    marked = again

    async def received(download: BasebackupDownload) -> AsyncIterator[bytes]:
        nonlocal marked
        async for chunk in download:
            if not marked:  # the first byte: the pageserver did not refuse
                write_file_durably(applying_file(node), b"")
                marked = True
                _set_wal_aside(node)
            yield chunk

    def apply(chunks: Iterator[bytes]) -> None:
        for chunk in chunks:
            applier.feed(chunk)
        applier.finish()

    async def fetch(client: PageserverClient) -> None:
        # Applied on a thread of its own while the next bytes arrive: handed over a chunk
        # at a time and awaited, the pageserver's sending stood still while each was
        # written (py-spy of the newcomer's checkout: its tar maker blocked on a full
        # queue a fifth of its samples).
        async with client.basebackup(request) as download:
            await consume_in_thread(received(download), apply)

    try:
        api.run(fetch)
    except (InvalidArgument, NotFound):
        if marked and not again:
            raise
        return None
    finally:
        applier.close()
        if stale.exists():
            remove_later(stale)
    if again:
        fsync_tree(node.datadir)
        return False
    if crash_end is not None:
        # What the crashed server wrote since its last checkpoint and never fsynced, in
        # files the delta found as they should be (a fork truncated, an SLRU page), as
        # PostgreSQL's crash recovery syncs the whole directory first (xlog.c
        # SyncDataDirectory). No tablespace link here (_eligible): one filesystem.
        sync_filesystem(node.datadir)
    applier.make_durable()
    return _roles_kept(node.datadir, applier)


def _roles_kept(datadir: Path, applier: DeltaApplier) -> bool:
    """Whether the delta left pg_authid as it was: no page written, no new size (a new
    relfilenode after VACUUM FULL is a fork created whole). Then the node's roles and
    passwords are those the directory held at HEAD, and the single-user step that sets them
    (finish_datadir) can be left out."""
    try:
        raw = read_pg_file(datadir, "global/pg_filenode.map")  # no link, no FIFO
        if raw is None:
            return False
        mapping = parse_relmap(raw)
    except (OSError, CorruptData):
        return False
    filenode = mapping.get(AUTHID_RELATION_ID)
    return filenode is not None and not applier.changed_fork(PurePosixPath(f"global/{filenode}"))
