"""Secrets (passwords, tokens) in files readable by their owner only, never printed."""

from __future__ import annotations

import os
import secrets as _random
from pathlib import Path

from proto.errors import NotFound


def generate_secret(nbytes: int = 24) -> str:
    return _random.token_urlsafe(nbytes)


def write_secret(path: Path, value: str) -> None:
    """Write atomically with mode 0600 from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        raise NotFound(f"secret file {path} is missing") from None


def ensure_secret(path: Path) -> str:
    """Return the secret at path, generating it on first use."""
    if path.exists():
        return read_secret(path)
    value = generate_secret()
    write_secret(path, value)
    return value
