"""Finding PostgreSQL 15 binaries and running them as an unprivileged OS user.

initdb and postgres refuse to run as root. When `neon` runs as root (CI does), every
PostgreSQL binary runs as the `postgres` account (or `NEON_PG_USER`) and the directories it
writes are handed to that account (datadir_files/pg_account.py: that account and the
directories made for it, shared with the pageserver's unpacker).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

from datadir_files.pg_account import (
    MissingBinaries,
    ensure_own_dir,
    pg_os_user,
    require_own_dir,
    require_pg_reachable,
)
from proto.errors import ExternalCommandFailed, InvalidArgument

SUPPORTED_MAJOR = 15
DEBIAN_BIN = Path(f"/usr/lib/postgresql/{SUPPORTED_MAJOR}/bin")
INSTALL_HINT = (
    "install them with `sudo apt-get install postgresql-15` (Debian/Ubuntu) "
    "or point NEON_PG_BIN at a PostgreSQL 15 bin directory"
)


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


# Directories that hold the system: never a place for pg-neon's files, even when empty.
SYSTEM_TREES = tuple(
    Path(p)
    for p in (
        "/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc",
        "/run", "/sbin", "/sys", "/usr",
    )
)  # fmt: skip


def _is_system_dir(path: Path) -> bool:
    if len(path.parts) <= 1:
        return True  # "/"
    if any(path == tree or tree in path.parents for tree in SYSTEM_TREES):
        return True
    return len(path.parts) == 2 and os.path.lexists(path)  # /home, /mnt, /tmp, /var, ...


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
