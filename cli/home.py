"""The NEON_HOME directory: where every piece of local state lives."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cli.home_root import ROOT_DEFAULT_HOME as ROOT_DEFAULT_HOME
from cli.home_root import chosen_home
from cli.pgbin import claim_dir
from datadir_files.pg_account import ensure_own_dir, make_pg_dir, traversal_mode

# sockaddr_un holds 108 bytes; PostgreSQL appends "/.s.PGSQL.NNNNN" to the directory.
_MAX_SOCKET_DIR = 90
# A directory holding one of these is a pg-neon home (registry.db: homes made before the marker).
HOME_MARKERS = (".pg-neon-home", "registry.db")


@dataclass(frozen=True, slots=True)
class NeonHome:
    root: Path

    @classmethod
    def resolve(cls, option: Path | None) -> NeonHome:
        """The home of `--home` (None: not given), by `cli.home_root.chosen_home`."""
        chosen = chosen_home(None if option is None else os.fspath(option))
        return cls(Path(chosen).expanduser().absolute())

    @property
    def registry_path(self) -> Path:
        return self.root / "registry.db"

    @property
    def secrets_dir(self) -> Path:
        return self.root / "secrets"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def storage_root(self) -> Path:
        return self.root / "storage"

    @property
    def pageserver_dir(self) -> Path:
        return self.root / "pageserver"

    @property
    def locks_dir(self) -> Path:
        """Per-node command locks (cli/node_lock.py), made on first use."""
        return self.root / "locks"

    @property
    def socket_dir(self) -> Path:
        """Unix sockets of local nodes; a short path in the temp dir when ours is too long."""
        preferred = self.root / "run"
        if len(str(preferred)) <= _MAX_SOCKET_DIR:
            return preferred
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"neon-{digest}"

    @property
    def ssh_dir(self) -> Path:
        """Control sockets of ssh connections kept open between commands (cli/transport/ssh.py),
        made on first use."""
        return self.root / "ssh"

    @property
    def cache_dir(self) -> Path:
        """What a command remembers of far places for the next one (cli/transport/s3_heads.py),
        made on first use (0700)."""
        return self.root / "cache"

    def ensure(self) -> None:
        """Create the layout, or check an existing one; nothing outside the root is changed.

        The root is new, empty or already a pg-neon home. Everything is private to its owner;
        the root, logs/ and storage/ are enterable (never listable) by PostgreSQL's OS user,
        which needs the directories it owns below them.
        """
        if not any((self.root / m).exists() for m in HOME_MARKERS):
            claim_dir(self.root, mode=traversal_mode(), markers=HOME_MARKERS, what="NEON_HOME")
            (self.root / HOME_MARKERS[0]).touch(0o600)
        for sub, mode in (
            (self.secrets_dir, 0o700),
            (self.pageserver_dir, 0o700),
            (self.logs_dir, traversal_mode()),
            (self.storage_root, traversal_mode()),
        ):
            ensure_own_dir(sub, mode)
        make_pg_dir(self.socket_dir, 0o700)


def private_dir(directory: Path) -> bool:
    """Make `directory` (0700) if missing; whether it is a directory of this user that no one
    else may enter (else nothing is kept there)."""
    try:
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
        info = os.lstat(directory)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o077


_current: NeonHome | None = None


def use_home(home: NeonHome) -> None:
    """The home this command runs in (App.open): what state kept between commands (ssh
    connections) belongs to."""
    global _current
    _current = home


def current_home() -> NeonHome | None:
    """The home of this command; None outside one (the library used in-process)."""
    return _current
