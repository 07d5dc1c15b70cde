"""Secrets (passwords, tokens) in files readable by their owner only, never printed."""

from __future__ import annotations

import os
import secrets as _random
import sys
from pathlib import Path

import click

from proto.errors import InvalidArgument, NotFound

MASK = "****"  # what listings, JSON and messages show instead of a secret
SOURCES_HINT = "@FILE (@- for stdin), env:VAR or --prompt-secrets"


def scram_verifier(password: str) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores for `password` (`SCRAM-SHA-256$<iterations>
    :<salt>$<StoredKey>:<ServerKey>`, base64: src/common/scram-common.c scram_build_secret),
    with 4096 iterations and a salt derived from the password, so the same on every run.
    `ALTER ROLE ... PASSWORD` stores a verifier as it is given, and the CLI sets a node's
    passwords only where its role holds another one (cli/nodes.py): set with the password
    itself (a new random salt each time), the single-user step of a checkout wrote pg_authid
    at every run, so the next checkout's delta changed pg_authid and ran the step again, on
    every checkout after one that had run it (60-70 ms each). The passwords are random
    (generate_secret): a salt derived from one gives nothing away."""
    import base64
    import hashlib

    from scramp import ScramMechanism

    salt = hashlib.sha256(b"pg-neon SCRAM salt\0" + password.encode()).digest()[:16]
    _salt, stored, server, iterations = ScramMechanism("SCRAM-SHA-256").make_auth_info(
        password, iteration_count=4096, salt=salt
    )
    b64 = base64.b64encode
    return (
        f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}"
        f"${b64(stored).decode()}:{b64(server).decode()}"
    )


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


def secret_from_source(what: str, value: str) -> tuple[str, bool]:
    """The secret `value` stands for: `@FILE` (`@-`: stdin) or `env:VAR` read it from there
    (nothing on the command line), anything else is the secret itself. Also returns whether it
    was literal: then it sat in the process list, where every local user can read it."""
    if value.startswith("@"):
        source = value[1:]
        try:
            text = sys.stdin.read() if source == "-" else Path(source).read_text()
        except OSError as exc:
            raise InvalidArgument(f"cannot read {what} from {source}: {exc.strerror}") from None
        secret, literal = text.rstrip("\r\n"), False
    elif value.startswith("env:"):
        variable = value[4:]
        if variable not in os.environ:
            raise InvalidArgument(f"environment variable {variable} (for {what}) is not set")
        secret, literal = os.environ[variable], False
    else:
        secret, literal = value, True
    if not secret:
        raise InvalidArgument(f"{what} is empty")
    return secret, literal


def prompt_secret(what: str) -> str:
    """Ask for a secret without echo; only on a terminal, so a script never hangs here."""
    if not sys.stdin.isatty():
        raise InvalidArgument(
            f"cannot prompt for {what}: stdin is not a terminal; give it as -c KEY=@FILE "
            "or -c KEY=env:VAR"
        )
    value: str = click.prompt(what, hide_input=True, err=True)
    return value
