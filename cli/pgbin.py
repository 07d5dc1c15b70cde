"""Finding PostgreSQL 15 binaries and running them as an unprivileged OS user.

initdb and postgres refuse to run as root. When `neon` runs as root (CI does), every
PostgreSQL binary runs as the `postgres` account (or `NEON_PG_USER`) and the directories it
writes are handed to that account.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from proto.errors import ExternalCommandFailed, NeonError

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
    """The directory of the PostgreSQL 15 binaries: NEON_PG_BIN, Debian's path, or PATH."""
    candidates: list[Path] = []
    env = os.environ.get("NEON_PG_BIN")
    if env:
        candidates.append(Path(env))
    else:
        candidates.append(DEBIAN_BIN)
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
        if (cand / "postgres").is_file() and (cand / "initdb").is_file():
            return cand
    where = ", ".join(str(c) for c in candidates)
    raise MissingBinaries(
        f"PostgreSQL {SUPPORTED_MAJOR} binaries not found (looked in {where}); " + INSTALL_HINT
    )


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
    """Hand a file or directory we created to the account PostgreSQL runs as."""
    user = pg_os_user()
    if user is not None:
        os.chown(path, user.uid, user.gid)


def make_pg_dir(path: Path, mode: int = 0o700) -> None:
    """Create a directory PostgreSQL may write, with parents traversable by it."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, mode)
    give_to_pg_user(path)
    if pg_os_user() is not None:
        # Parents we own must let the postgres account through (execute bit only).
        for parent in path.parents:
            try:
                st = parent.stat()
            except OSError:
                break
            if st.st_mode & 0o001 == 0 and st.st_uid == os.geteuid():
                os.chmod(parent, st.st_mode | 0o011)


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
