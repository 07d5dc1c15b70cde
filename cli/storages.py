"""Storage types and their options: native (a local directory), s3, and remote pageservers.

Only native storages hold data yet; s3 and remote are modelled here (options, validation,
secrets) so that push/pull can use them without changing the registry.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cli.home import NeonHome
from cli.pgbin import claim_dir, traversal_mode
from cli.secrets import write_secret
from pageserver.storage.durable_files import write_file_durably
from proto.errors import InvalidArgument

DEFAULT_STORAGE = "local"
STORAGE_TYPES = ("native", "s3", "remote")
TYPE_LABELS = {"native": "neon-local", "s3": "S3", "remote": "neon-remote"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")

# Options that are secrets: stored in a 0600 file, never in the registry nor printed.
SECRET_OPTIONS = {"s3": ("secret_access_key",), "remote": ("token",), "native": ()}
ALLOWED_OPTIONS = {
    "native": ("path",),
    "s3": ("bucket", "prefix", "endpoint", "region", "access_key_id", "secret_access_key"),
    "remote": ("url", "token"),
}


@dataclass(frozen=True, slots=True)
class StorageSpec:
    """A validated storage definition ready to store in the registry."""

    name: str
    type: str
    options: dict[str, str]
    secrets: dict[str, str]

    @property
    def path(self) -> str:
        return location(self.type, self.options)


def location(type_: str, options: dict[str, str]) -> str:
    """The PATH column: a directory, an s3:// URL or a neon:// URL."""
    if type_ == "native":
        return options["path"]
    if type_ == "s3":
        return f"s3://{options['bucket']}/{options.get('prefix', '')}".rstrip("/")
    return options["url"]


RESERVED_NAMES = ("pagestore",)
# In a native storage's directory: pg-neon set it up (re-attaching it after a detach is fine).
STORAGE_MARKER = ".pg-neon-storage"


def validate_name(name: str, what: str = "storage") -> str:
    if name in RESERVED_NAMES:
        raise InvalidArgument(f"{what} name {name!r} is reserved; choose another")
    if not _NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid {what} name {name!r}: use letters, digits, '.', '_' or '-' "
            "(at most 63 characters, starting with a letter or digit)"
        )
    return name


def parse_options(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Parse repeated `-c key=value` options."""
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidArgument(f"invalid option {pair!r}: expected key=value")
        if key in options:
            raise InvalidArgument(f"option {key!r} given twice")
        options[key] = value
    return options


def _validate_remote_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme != "neon" or not parts.hostname:
        raise InvalidArgument(f"invalid remote url {url!r}: expected neon://HOST:PORT[/PATH]")
    try:
        port = parts.port
    except ValueError:
        raise InvalidArgument(f"invalid port in remote url {url!r}") from None
    if port is None:
        raise InvalidArgument(f"remote url {url!r} needs a port: neon://HOST:PORT[/PATH]")


def build_spec(home: NeonHome, name: str, type_: str, raw: dict[str, str]) -> StorageSpec:
    """Validate type-specific options and split out secrets."""
    validate_name(name)
    if type_ not in STORAGE_TYPES:
        raise InvalidArgument(
            f"unknown storage type {type_!r}: use one of " + ", ".join(STORAGE_TYPES)
        )
    if type_ == "native" and "compression" in raw:
        raise InvalidArgument(
            "a native storage has no compression option: its layer files are always "
            "zstd-compressed; drop -c compression=..."
        )
    unknown = sorted(set(raw) - set(ALLOWED_OPTIONS[type_]))
    if unknown:
        raise InvalidArgument(
            f"unknown option(s) {', '.join(unknown)} for a {type_} storage; allowed: "
            + ", ".join(ALLOWED_OPTIONS[type_])
        )
    options = {k: v for k, v in raw.items() if k not in SECRET_OPTIONS[type_]}
    secrets = {k: v for k, v in raw.items() if k in SECRET_OPTIONS[type_]}
    if type_ == "native":
        given = Path(options.get("path") or home.storage_root / name).expanduser()
        if not given.is_absolute():
            raise InvalidArgument(
                f"storage path {str(given)!r} is relative; give an absolute path "
                "(it is not resolved against the current directory)"
            )
        options["path"] = os.path.realpath(given)
    elif type_ == "s3":
        if not options.get("bucket"):
            raise InvalidArgument("an s3 storage needs -c bucket=NAME")
        options["prefix"] = options.get("prefix", "").strip("/")
        if options.get("endpoint"):
            parts = urlsplit(options["endpoint"])
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise InvalidArgument(
                    f"invalid s3 endpoint {options['endpoint']!r}: expected http(s)://HOST[:PORT]"
                )
    else:
        if not options.get("url"):
            raise InvalidArgument("a remote storage needs -c url=neon://HOST:PORT[/PATH]")
        _validate_remote_url(options["url"])
    return StorageSpec(name, type_, options, secrets)


def secret_path(home: NeonHome, storage: str, key: str) -> Path:
    return home.secrets_dir / f"storage.{storage}.{key}"


def materialize(home: NeonHome, spec: StorageSpec) -> None:
    """Create what a storage needs on this machine (its directory, its secret files)."""
    if spec.type == "native":
        path = claim_dir(
            Path(spec.options["path"]),
            mode=traversal_mode(),
            markers=(STORAGE_MARKER,),
            what="storage path",
        )
        marker = path / STORAGE_MARKER
        if not marker.exists():
            write_file_durably(marker, f"pg-neon storage {spec.name}\n".encode())
    for key, value in spec.secrets.items():
        write_secret(secret_path(home, spec.name, key), value)


def display_options(type_: str, options: dict[str, str]) -> str:
    """The OPTIONS column: what differs from the defaults, never secrets."""
    shown = []
    for key, value in sorted(options.items()):
        if key in ("path", "url"):
            continue
        if key == "prefix" and not value:
            continue
        shown.append(f"{key}={value}")
    return ",".join(shown)
