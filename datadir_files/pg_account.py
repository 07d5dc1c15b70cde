"""PostgreSQL's OS account and the directories made for it, by every pg-neon process.

When pg-neon runs as root (CI does), PostgreSQL runs as the `postgres` account (or
`NEON_PG_USER`) and what it will write is handed to that account. The CLI creates homes and
data directories here, and the unpacker (`datadir_files.untar`) stages a data directory both
in the CLI and in the pageserver daemon that writes a basebackup itself, so this belongs to
neither (cli/pgbin.py keeps the binaries and how they are run).
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from proto.errors import InvalidArgument, NeonError


class MissingBinaries(NeonError):
    code = "missing_binaries"


@dataclass(frozen=True, slots=True)
class OsUser:
    name: str
    uid: int
    gid: int
    home: str


@cache
def pg_os_user() -> OsUser | None:
    """The account PostgreSQL binaries run as, or None to run them as ourselves."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("NEON_PG_USER", "postgres")
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise MissingBinaries(
            f"running as root, but the unprivileged account {name!r} that PostgreSQL must run as "
            "does not exist; create it (`useradd -r postgres`) or set NEON_PG_USER"
        ) from None
    return OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def give_to_pg_user(path: Path) -> None:
    """Hand a file or directory we created to the account PostgreSQL runs as; a link at
    `path` is changed itself, never what it names (inside a data directory, write and hand
    over through cli/pg_files.py's descriptors instead)."""
    user = pg_os_user()
    if user is not None:
        os.chown(path, user.uid, user.gid, follow_symlinks=False)


def traversal_mode() -> int:
    """Mode of our directories on the way to PostgreSQL's: enterable (x), never listable, by
    its OS user when that is another account; private otherwise."""
    return 0o711 if pg_os_user() is not None else 0o700


def _can_enter(st: os.stat_result, user: OsUser) -> bool:
    # PostgreSQL binaries run with the account's primary group only (popen_kwargs).
    if st.st_uid == user.uid:
        return bool(st.st_mode & 0o100)
    if st.st_gid == user.gid:
        return bool(st.st_mode & 0o010)
    return bool(st.st_mode & 0o001)


def require_pg_reachable(path: Path) -> None:
    """Refuse a location PostgreSQL's OS user cannot reach: we never change a parent for it."""
    user = pg_os_user()
    if user is None:
        return
    for parent in reversed(path.parents):
        try:
            st = parent.stat()
        except FileNotFoundError:
            return  # from here on we create the directories, enterable by it
        if not _can_enter(st, user):
            try:
                owner = pwd.getpwuid(st.st_uid).pw_name
            except KeyError:
                owner = str(st.st_uid)
            raise InvalidArgument(
                f"PostgreSQL's OS user {user.name!r} cannot enter {parent} (owner {owner}, mode "
                f"{stat.S_IMODE(st.st_mode):04o}), on the way to {path}; choose a location it "
                f"can reach, or allow it yourself with `chmod o+x {parent}` "
                "(pg-neon never changes a directory it did not create)"
            )


def require_own_dir(path: Path) -> None:
    """An existing `path` must be a real directory owned by us or by PostgreSQL's account."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidArgument(f"{path} exists and is not a directory; choose another location")
    user = pg_os_user()
    if st.st_uid not in (os.geteuid(), user.uid if user else os.geteuid()):
        raise InvalidArgument(
            f"{path} belongs to uid {st.st_uid}, not to us; pg-neon takes over no directory: "
            "remove it or choose another location"
        )


def make_dirs(path: Path, mode: int) -> bool:
    """Create `path` (mode `mode`) and its missing parents (traversal_mode()); return whether
    `path` was created. Existing directories, parents or not, are never changed."""
    missing: list[Path] = []
    cur = path
    while not os.path.lexists(cur):
        missing.append(cur)
        cur = cur.parent
    created = False
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue  # created concurrently: not ours to re-mode
        except OSError as exc:
            raise InvalidArgument(f"cannot create directory {directory}: {exc.strerror}") from None
        os.chmod(directory, mode if directory == path else traversal_mode())
        created = directory == path
    return created


def ensure_own_dir(path: Path, mode: int) -> None:
    """Create `path`, or bring our existing directory to `mode` (changed only if it differs,
    so a read-only home with the right modes still works)."""
    if make_dirs(path, mode):
        return
    require_own_dir(path)
    if stat.S_IMODE(path.stat().st_mode) != mode:
        os.chmod(path, mode)


def make_pg_dir(path: Path, mode: int = 0o700) -> None:
    """Create a directory PostgreSQL may write, or re-mode one of ours (never anyone else's).

    A new directory's existing parents must let PostgreSQL's OS user through: they are checked,
    never changed; parents created here are enterable (not listable) by it.
    """
    if not os.path.lexists(path):
        require_pg_reachable(path)
    ensure_own_dir(path, mode)
    user = pg_os_user()
    if user is not None and path.stat().st_uid != user.uid:
        give_to_pg_user(path)
