"""`pg checkout` puts a node's absolute tablespaces back at their own locations.

A rebuilt data directory has every tablespace in place (pageserver/basebackup/tar_stream.py
says why: its location may belong to another server). A checkout rebuilds the directory of
the *same* node, whose tablespace at an absolute location L is its own: a PostgreSQL user
expects it to stay at L (pg_tablespace_location, disk layout, the space L was put on for).
So, for each tablespace of the rebuilt directory that the node's current directory has as
the symlink pg_tblspc/OID -> L, the rebuilt PG_15_202209061 directory replaces L's and
pg_tblspc/OID becomes that symlink again. L is usually the location in the page history; a
node made with `pg create --snapshot --tablespace-mapping OLD=NEW` has it at NEW, its own
(cli/tablespace_mapping.py), while the history keeps OLD.

Why overwriting L is safe: the checkout first names the node's current state PG@HEAD{i} in
the page history (after its shutdown checkpoint is ingested), so L's files are kept there;
and once the checkout branched, recovery only rolls forward (cli/checkout.py), redoing the
rebuild, and this step with it, until the swap: the old directory, still pointing at L, is
never started again. Anything else stays in place: a tablespace the node does not have at
an absolute location now (created after the snapshot and dropped since, or the node already
has it in place), so no other location is ever written.

The other way round, a tablespace the node has at L that the snapshot does not have (created
after it): once the swap is durable its files at L/PG_15_202209061 belong to no directory
the node will ever run on, so they are removed, as DROP TABLESPACE would (L itself stays,
the user's directory); the page history keeps them in PG@HEAD{i}, and a checkout back to
that has the tablespace in place (the node no longer links to L). The checkout says so.

L is read from a symlink in the data directory, which PostgreSQL's account can point
anywhere; the CLI may be root. So L is resolved, and written or removed only if PostgreSQL's
account owns it (as PostgreSQL requires of a tablespace location: create_tablespace_directories
in src/backend/commands/tablespace.c chmods it, which only its owner may) and its version
directory is not a link: a link to /etc there made root empty a directory of that name in any
place, or move the tablespace's files into one (`_location`). Else the tablespace stays in
place, or its files where they are.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Iterable
from pathlib import Path

from datadir_files.pg_account import pg_os_user
from durable_files import fsync_dir, fsync_tree
from pageserver_api.models import TablespaceLocation
from pg15.datadir_layout import TABLESPACE_VERSION_DIRECTORY


def own_location(current: Path, oid: int) -> str | None:
    """Where the node's current directory has tablespace `oid`: its symlink's target."""
    link = current / "pg_tblspc" / str(oid)
    return str(link.readlink()) if link.is_symlink() else None


def restore_own_locations(
    rebuilt: Path, current: Path, tablespaces: Iterable[TablespaceLocation]
) -> list[int]:
    """Move the rebuilt in-place tablespaces that are the node's own back to their locations
    (see the module docstring); the OIDs moved."""
    moved = []
    for ts in tablespaces:
        own = own_location(current, ts.oid)
        if own is None:
            continue
        in_place = rebuilt / "pg_tblspc" / str(ts.oid)
        location = _location(own)
        if location is None:
            continue  # not a location PostgreSQL made (or it is gone): stays in place
        target = location / TABLESPACE_VERSION_DIRECTORY
        # The node's files of the state being left: the page history has them as HEAD{i}.
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(in_place / TABLESPACE_VERSION_DIRECTORY, target)
        fsync_tree(target)
        fsync_dir(location)
        in_place.rmdir()
        os.symlink(own, in_place)
        moved.append(ts.oid)
    return moved


def remove_left_locations(old: Path, live: Path | None) -> list[Path]:
    """After the swap: remove the files of each absolute tablespace the old directory links
    to and the new one does not (see the module docstring); the directories removed. With
    no new directory (`pg destroy`), every absolute tablespace of the node goes: each is its
    own (made by its CREATE TABLESPACE, a mapping or a checkout, never another server's)."""
    removed: list[Path] = []
    tblspc = old / "pg_tblspc"
    if not tblspc.is_dir():
        return removed
    for entry in sorted(tblspc.iterdir()):
        if not entry.name.isdigit() or not entry.is_symlink():
            continue
        location = own_location(old, int(entry.name))
        if location is None or (live and own_location(live, int(entry.name)) == location):
            continue
        resolved = _location(location)
        if resolved is None:
            continue
        target = resolved / TABLESPACE_VERSION_DIRECTORY
        if target.is_dir():
            shutil.rmtree(target)
            fsync_dir(resolved)
            removed.append(Path(location) / TABLESPACE_VERSION_DIRECTORY)
    return removed


def _location(own: str) -> Path | None:
    """The tablespace location `own` (a pg_tblspc link's target) resolved, if this command
    may write and remove its version directory: an absolute path to a directory, owned by
    PostgreSQL's account when we run as root, whose version directory is not a link (see the
    module docstring); else None."""
    if not Path(own).is_absolute():
        return None
    location = Path(os.path.realpath(own))
    try:
        st = os.stat(location)
    except OSError:
        return None
    user = pg_os_user()
    if not stat.S_ISDIR(st.st_mode) or (user is not None and st.st_uid != user.uid):
        return None
    if (location / TABLESPACE_VERSION_DIRECTORY).is_symlink():
        return None
    return location
