"""The NEON_HOME directory: where every piece of local state lives."""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cli.pgbin import make_pg_dir

# sockaddr_un holds 108 bytes; PostgreSQL appends "/.s.PGSQL.NNNNN" to the directory.
_MAX_SOCKET_DIR = 90


@dataclass(frozen=True, slots=True)
class NeonHome:
    root: Path

    @classmethod
    def resolve(cls, option: Path | None) -> NeonHome:
        """--home, else $NEON_HOME, else ~/.neon."""
        if option is not None:
            return cls(option.expanduser().absolute())
        env = os.environ.get("NEON_HOME")
        if env:
            return cls(Path(env).expanduser().absolute())
        return cls(Path("~/.neon").expanduser().absolute())

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
    def socket_dir(self) -> Path:
        """Unix sockets of local nodes; a short path in the temp dir when ours is too long."""
        preferred = self.root / "run"
        if len(str(preferred)) <= _MAX_SOCKET_DIR:
            return preferred
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"neon-{digest}"

    def ensure(self) -> None:
        """Create the layout; the root is traversable (not readable) by the PostgreSQL account."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        for sub in (self.secrets_dir, self.logs_dir):
            sub.mkdir(exist_ok=True)
            os.chmod(sub, 0o700)
        self.pageserver_dir.mkdir(exist_ok=True)
        make_pg_dir(self.storage_root, 0o711)
        make_pg_dir(self.socket_dir, 0o700)
