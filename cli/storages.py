"""Storage types and their options: native (a local directory), s3, and remote pageservers.

Only native storages hold data yet; s3 and remote are modelled here (options, validation,
secrets) so that push/pull can use them without changing the registry.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from cli.home import NeonHome
from cli.pgbin import claim_dir
from cli.secrets import MASK, prompt_secret, secret_from_source, write_secret
from datadir_files.pg_account import traversal_mode
from durable_files import write_file_durably
from proto.errors import InvalidArgument

DEFAULT_STORAGE = "local"
STORAGE_TYPES = ("native", "s3", "remote")
TYPE_LABELS = {"native": "neon-local", "s3": "S3", "remote": "neon-remote"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z")

# Options that are secrets: stored in a 0600 file, never in the registry nor printed.
# A secret can come from a file, the environment or a prompt instead of the command line
# (cli/secrets.py); a remote url's password is split off into `password`.
SECRET_OPTIONS = {"s3": ("secret_access_key",), "remote": ("token", "password"), "native": ()}
ALLOWED_OPTIONS = {
    "native": ("path",),
    "s3": (
        "bucket",
        "prefix",
        "endpoint",
        "region",
        "access_key_id",
        "secret_access_key",
        "local_cache",
    ),
    "remote": ("url", "token", "password", "tls", "ca", "local_cache"),
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
    return mask_url(options["url"])


_URL_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*:)[^/]*@")


def mask_url(url: str) -> str:
    """The url with its password, if any, replaced by the mask (also for unparsable urls)."""
    return _URL_PASSWORD.sub(rf"\g<1>{MASK}@", url)


def split_url_password(url: str) -> tuple[str, str | None]:
    """A valid url without its password, and the password (percent-decoded), if any."""
    parts = urlsplit(url)
    if parts.password is None:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    bare = urlunsplit(parts._replace(netloc=f"{user}@{hostport}" if user else hostport))
    return bare, unquote(parts.password)


def shown_options(options: dict[str, str]) -> dict[str, str]:
    """Options fit for a listing: a url's password (stored before it was split off) masked."""
    return {k: mask_url(v) if k in ("url", "endpoint") else v for k, v in options.items()}


def read_secret_options(
    name: str, type_: str, raw: dict[str, str], *, prompt: bool
) -> tuple[dict[str, str], list[str]]:
    """Options with each secret read from where it was given (-c KEY=@FILE, -c KEY=env:VAR,
    the prompt); also the names of those given literally on the command line."""
    options = dict(raw)
    literal = []
    for key in SECRET_OPTIONS.get(type_, ()):
        if key in options:
            options[key], was_literal = secret_from_source(f"{key} of storage {name}", raw[key])
            if was_literal:
                literal.append(key)
    if type_ == "remote" and "url" in raw and _URL_PASSWORD.match(raw["url"]):
        literal.append("the url's password")
    if prompt:
        url = raw.get("url", "")
        # A url password is asked for only when the url names a user without one.
        user_without_password = "@" in url.partition("//")[2].partition("/")[0] and not (
            _URL_PASSWORD.match(url)
        )
        for key in SECRET_OPTIONS.get(type_, ()):
            if key not in options and (key != "password" or user_without_password):
                options[key] = prompt_secret(f"{key} of storage {name}")
    return options, literal


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


def _split_url(url: str, what: str) -> SplitResult:
    """urlsplit, with a malformed url (an unclosed IPv6 bracket...) as one clear error."""
    try:
        return urlsplit(url)
    except ValueError as exc:
        raise InvalidArgument(f"invalid {what} {mask_url(url)!r}: {exc}") from None


# AWS's naming rules for general purpose buckets (docs.aws.amazon.com, "Bucket naming rules").
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")
_S3_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_S3_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


def validate_s3_bucket(bucket: str) -> str:
    """Refuse a bucket name S3 would refuse, with the rule it breaks."""
    rule = None
    if not _S3_BUCKET.match(bucket):
        rule = (
            "use 3 to 63 lowercase letters, digits, '.' and '-', starting and ending with a "
            "letter or digit"
        )
    elif ".." in bucket:
        rule = "two adjacent periods are not allowed"
    elif re.fullmatch(r"\d+\.\d+\.\d+\.\d+", bucket):
        rule = "it must not look like an IP address"
    elif bucket.startswith(_S3_RESERVED_PREFIXES) or bucket.endswith(_S3_RESERVED_SUFFIXES):
        rule = (
            f"the prefixes {', '.join(_S3_RESERVED_PREFIXES)} and the suffixes "
            f"{', '.join(_S3_RESERVED_SUFFIXES)} are reserved by AWS"
        )
    if rule is not None:
        raise InvalidArgument(f"invalid s3 bucket name {bucket!r}: {rule} (AWS naming rules)")
    return bucket


def _validate_remote_url(url: str) -> None:
    parts = _split_url(url, "remote url")
    if parts.scheme != "neon" or not parts.hostname:
        raise InvalidArgument(
            f"invalid remote url {mask_url(url)!r}: expected neon://HOST:PORT[/PATH]"
        )
    try:
        port = parts.port
    except ValueError:
        raise InvalidArgument(f"invalid port in remote url {mask_url(url)!r}") from None
    if port is None:
        raise InvalidArgument(f"remote url {mask_url(url)!r} needs a port: neon://HOST:PORT[/PATH]")


def _validate_tls(options: dict[str, str]) -> None:
    """`tls=on|off` (default off) and `ca=PATH`, the PEM file that verifies the remote
    pageserver's certificate (default: the system's CAs), kept as an absolute path."""
    tls = options.get("tls", "off").lower()
    if tls not in ("on", "off"):
        raise InvalidArgument(f"tls={options['tls']!r}: use tls=on or tls=off")
    if "tls" in options:
        options["tls"] = tls
    if "ca" in options:
        if tls != "on":
            raise InvalidArgument("-c ca=PATH is for TLS: add -c tls=on")
        ca = Path(options["ca"]).expanduser()
        if not ca.is_file():
            raise InvalidArgument(f"ca={options['ca']}: no such file (a PEM certificate)")
        options["ca"] = os.path.realpath(ca)


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
    if "local_cache" in options:  # bytes of uploaded layers kept on disk (pageserver/remote/)
        # Imported here: retention's decimal and fractions cost every command's start ~3 ms.
        from pageserver.storage.retention import parse_size

        parse_size(options["local_cache"])
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
        validate_s3_bucket(options["bucket"])
        options["prefix"] = options.get("prefix", "").strip("/")
        if options.get("endpoint"):
            parts = _split_url(options["endpoint"], "s3 endpoint")
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise InvalidArgument(
                    f"invalid s3 endpoint {mask_url(options['endpoint'])!r}: "
                    "expected http(s)://HOST[:PORT]"
                )
    else:
        if not options.get("url"):
            raise InvalidArgument("a remote storage needs -c url=neon://HOST:PORT[/PATH]")
        _validate_remote_url(options["url"])
        options["url"], password = split_url_password(options["url"])
        if password is not None:
            if "password" in secrets:
                raise InvalidArgument(
                    "the remote password is given twice (in the url and as -c password=...); "
                    "keep -c password=@FILE or env:VAR"
                )
            secrets["password"] = password
        _validate_tls(options)
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
