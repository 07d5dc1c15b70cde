"""Finding PostgreSQL 15 binaries and running them as an unprivileged OS user.

initdb and postgres refuse to run as root. When `neon` runs as root (CI does), every
PostgreSQL binary runs as the `postgres` account (or `NEON_PG_USER`) and the directories it
writes are handed to that account.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from proto.errors import ExternalCommandFailed, InvalidArgument, NeonError

SUPPORTED_MAJOR = 15
DEBIAN_BIN = Path(f"/usr/lib/postgresql/{SUPPORTED_MAJOR}/bin")
INSTALL_HINT = (
    "install them with `sudo apt-get install postgresql-15` (Debian/Ubuntu) "
    "or point NEON_PG_BIN at a PostgreSQL 15 bin directory"
)


class MissingBinaries(NeonError):
    code = "missing_binaries"


@cache
def pg_bin_dir() -> Path:
    """The directory of the PostgreSQL 15 binaries: NEON_PG_BIN, Debian's path, or PATH's
    pg_config's. pg_config runs only when Debian's path has none: on Debian it is a shell
    script (ls and tail), which every `pg start` and `pg checkout` waited for."""
    env = os.environ.get("NEON_PG_BIN")
    candidates = [Path(env)] if env else [DEBIAN_BIN]
    if not env and not _has_binaries(DEBIAN_BIN):
        on_path = shutil.which("pg_config")
        if on_path:
            try:
                out = subprocess.run(
                    [on_path, "--bindir"], capture_output=True, text=True, check=True
                ).stdout.strip()
                candidates.append(Path(out))
            except (OSError, subprocess.CalledProcessError):
                pass
    for cand in candidates:
        if _has_binaries(cand):
            return cand
    where = ", ".join(str(c) for c in candidates)
    raise MissingBinaries(
        f"PostgreSQL {SUPPORTED_MAJOR} binaries not found (looked in {where}); " + INSTALL_HINT
    )


def _has_binaries(directory: Path) -> bool:
    return (directory / "postgres").is_file() and (directory / "initdb").is_file()


def pg_binary(name: str) -> str:
    path = pg_bin_dir() / name
    if not path.is_file():
        raise MissingBinaries(
            f"PostgreSQL binary {name!r} not found in {pg_bin_dir()}; " + INSTALL_HINT
        )
    return str(path)


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


# Directories that hold the system: never a place for pg-neon's files, even when empty.
SYSTEM_TREES = tuple(
    Path(p)
    for p in (
        "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
        "/run", "/sbin", "/sys", "/usr",
    )
)  # fmt: skip


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


def _is_system_dir(path: Path) -> bool:
    if len(path.parts) <= 1:
        return True  # "/"
    if any(path == tree or tree in path.parents for tree in SYSTEM_TREES):
        return True
    return len(path.parts) == 2 and os.path.lexists(path)  # /home, /mnt, /tmp, /var, ...


def ensure_own_dir(path: Path, mode: int) -> None:
    """Create `path`, or bring our existing directory to `mode` (changed only if it differs,
    so a read-only home with the right modes still works)."""
    if make_dirs(path, mode):
        return
    require_own_dir(path)
    if stat.S_IMODE(path.stat().st_mode) != mode:
        os.chmod(path, mode)


def claim_dir(path: Path, *, mode: int, markers: Sequence[str], what: str) -> Path:
    """Make `path` (absolute) a directory of pg-neon's and return its real location.

    It is created, or it already exists and is ours (a real directory owned by us), and is
    empty or holds one of `markers` (set up by pg-neon before). System directories are refused
    even when empty; parents are never changed (PostgreSQL's OS user must already be able to
    enter them, see require_pg_reachable). Checks come first: a refusal changes nothing.
    """
    real = Path(os.path.realpath(path))
    if _is_system_dir(real):
        raise InvalidArgument(
            f"{what} {path} is a system directory; give a new directory such as "
            f"/var/lib/neon/{path.name or 'neon'} (pg-neon creates it)"
        )
    require_pg_reachable(real)
    if os.path.lexists(real):
        require_own_dir(real)
        if not any((real / m).exists() for m in markers) and any(real.iterdir()):
            raise InvalidArgument(
                f"{what} {path} exists and is not empty; pg-neon only uses a new or empty "
                "directory (or one it set up before), never takes over one with files in it"
            )
    ensure_own_dir(real, mode)
    return real


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


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = env.get("LC_ALL", "C.UTF-8")
    user = pg_os_user()
    if user is not None:
        env["HOME"] = user.home
        env["USER"] = env["LOGNAME"] = user.name
    if extra:
        env.update(extra)
    return env


def popen_kwargs(env: Mapping[str, str] | None = None) -> dict[str, object]:
    """Keyword arguments for subprocess calls that run a PostgreSQL binary."""
    kwargs: dict[str, object] = {"env": _child_env(env), "cwd": "/"}
    user = pg_os_user()
    if user is not None:
        kwargs.update(user=user.uid, group=user.gid, extra_groups=[])
    return kwargs


def run_pg(
    name: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float | None = 300,
    what: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL binary to completion; a failure is one clear error with its stderr."""
    cmd = [pg_binary(name), *args]
    try:
        proc = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            input=input,
            timeout=timeout,
            **popen_kwargs(env),  # type: ignore[call-overload]
        )
    except subprocess.TimeoutExpired:
        raise ExternalCommandFailed(f"{what or name} timed out after {timeout}s") from None
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        last = detail[-1] if detail else f"exit code {proc.returncode}"
        raise ExternalCommandFailed(f"{what or name} failed: {last}")
    return proc
