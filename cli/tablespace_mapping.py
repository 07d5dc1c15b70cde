"""`--tablespace-mapping OLD=NEW`: where a tablespace recorded at OLD goes on this machine.

pg_basebackup's option (src/bin/pg_basebackup/pg_basebackup.c tablespace_list_append): OLD
and NEW are absolute paths, canonicalized; `\\=` is an '=' inside a path; a mapping is
repeatable, one per tablespace. Its meaning here:
- `pg create --snapshot`: the new node's tablespace recorded at OLD is placed at NEW
  (pg_tblspc/OID a symlink to NEW, NEW/PG_15_202209061 its files) instead of in place
  (pageserver/basebackup/tar_stream.py says why in place is the default: OLD may belong to a
  running server). NEW must be a new directory or an empty one of ours or PostgreSQL's
  (cli/pgbin.py claim_dir): pg-neon never writes into a directory another server may use.
- `snapshot import`: the source's tablespace at OLD is read from NEW when the source's
  pg_tblspc/OID leads to OLD (a copied data directory or plain backup whose tablespaces
  were moved), and NEW is the location the page history records for it.
An OLD that is not a tablespace location of the snapshot or source is refused by name, so a
typo does not silently leave a tablespace where it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path

from cli.pgbin import claim_dir
from datadir_files.pg_account import give_to_pg_user, pg_os_user, traversal_mode
from durable_files import fsync_dir
from pg15.datadir_layout import TABLESPACE_VERSION_DIRECTORY
from proto.errors import InvalidArgument

OPTION = "--tablespace-mapping"


def _split(spec: str) -> tuple[str, str]:
    """OLD and NEW of `spec` at its one unescaped '=' (`\\=` stays an '=' in the path)."""
    parts, current, chars = [], "", iter(spec)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            current += nxt if nxt == "=" else ch + nxt
        elif ch == "=":
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    if len(parts) != 2 or not parts[0] or not parts[1]:
        what = "multiple '=' signs" if len(parts) > 2 else "no OLD=NEW"
        raise InvalidArgument(
            f"invalid {OPTION} {spec!r}: {what}; give OLD=NEW with absolute paths "
            "(write '\\=' for an '=' inside a path)"
        )
    return parts[0], parts[1]


def parse_mappings(specs: Iterable[str]) -> dict[str, str]:
    """OLD -> NEW (both absolute, canonical) of every `--tablespace-mapping` given."""
    out: dict[str, str] = {}
    for spec in specs:
        old, new = _split(spec)
        for side, path in (("old", old), ("new", new)):
            if not os.path.isabs(path):
                raise InvalidArgument(
                    f"invalid {OPTION} {spec!r}: the {side} directory {path!r} is not an "
                    "absolute path"
                )
        old, new = os.path.normpath(old), os.path.normpath(new)
        if old in out and out[old] != new:
            raise InvalidArgument(f"{OPTION}: {old} is mapped twice ({out[old]} and {new})")
        out[old] = new
    if len(set(out.values())) != len(out):
        raise InvalidArgument(f"{OPTION}: two tablespaces are mapped to the same directory")
    return out


def check_mapped(mappings: Mapping[str, str], locations: Iterable[str], what: str) -> None:
    """Every OLD must be a location of `what` (its absolute tablespace locations)."""
    known = {os.path.normpath(loc) for loc in locations if loc}
    unknown = sorted(old for old in mappings if old not in known)
    if unknown:
        have = ", ".join(sorted(known)) or "none"
        raise InvalidArgument(
            f"{OPTION} {unknown[0]}=...: {unknown[0]} is not a tablespace location of {what} "
            f"(its absolute tablespace locations: {have})"
        )


def mapped(mappings: Mapping[str, str], location: str) -> str:
    """The location to use for `location`: its NEW if mapped, else itself."""
    return mappings.get(os.path.normpath(location), location) if location else location


def place_mapped_tablespaces(
    datadir: Path, tablespaces: Mapping[int, str], mappings: Mapping[str, str]
) -> None:
    """Move each in-place tablespace of a rebuilt `datadir` whose recorded location is
    mapped to its NEW directory and link pg_tblspc/OID there. Every NEW is claimed (checked,
    created if new) before anything moves; a refusal removes the directories it created."""
    moves: list[tuple[int, Path]] = []
    created: list[Path] = []  # deepest first: NEW and the parents made for it
    try:
        for oid, location in sorted(tablespaces.items()):
            if location and os.path.normpath(location) in mappings:
                new = Path(mappings[os.path.normpath(location)])
                missing = [p for p in (new, *new.parents) if not os.path.lexists(p)]
                created.extend(missing)
                # PostgreSQL's account must enter NEW: it gets a NEW pg-neon creates, and
                # an existing one of ours is made enterable by it (never re-owned).
                user = pg_os_user()
                ours = user is not None and missing[:1] != [new] and new.stat().st_uid != user.uid
                mode = traversal_mode() if ours else 0o700
                try:
                    claimed = claim_dir(new, mode=mode, markers=(), what="tablespace location")
                except InvalidArgument as exc:
                    raise InvalidArgument(f"{OPTION} {location}={new}: {exc}") from None
                if missing[:1] == [new]:
                    give_to_pg_user(claimed)
                moves.append((oid, claimed))
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):
                path.rmdir()
        raise
    for oid, new in moves:
        in_place = datadir / "pg_tblspc" / str(oid)
        shutil.move(in_place / TABLESPACE_VERSION_DIRECTORY, new / TABLESPACE_VERSION_DIRECTORY)
        fsync_dir(new)
        shutil.rmtree(in_place)
        os.symlink(new, in_place)
    if moves:
        fsync_dir(datadir / "pg_tblspc")


def remove_mapped_tablespaces(datadir: Path, new_dirs: Iterable[str]) -> None:
    """Remove the files a node that was not made after all has at its NEW directories (those
    its pg_tblspc links lead to: claimed empty or new for it by place_mapped_tablespaces)."""
    wanted = {os.path.normpath(d) for d in new_dirs}
    tblspc = datadir / "pg_tblspc"
    if not wanted or not tblspc.is_dir():
        return
    for entry in tblspc.iterdir():
        if entry.is_symlink() and os.path.normpath(entry.readlink()) in wanted:
            shutil.rmtree(entry.readlink() / TABLESPACE_VERSION_DIRECTORY, ignore_errors=True)
