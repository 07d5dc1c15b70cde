"""Where an s3 storage's bucket is and as whom the pageserver reaches it; or, for a remote
storage (`kind="remote"`), which other pageserver keeps the objects instead of a bucket
(pageserver/remote/proto_objects.py).

The CLI passes an attached storage's options (cli/storages.py) and the path of its secret
file (the secret access key, or the remote pageserver's token), never the secret: the
pageserver reads the file when it opens a client, so a rotated secret is used without
restarting anything and no secret is copied into the pageserver's own files.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from proto.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class RemoteSettings:
    storage: str
    """The storage's name in the CLI's registry (for messages and listings)."""
    bucket: str
    prefix: str = ""
    endpoint: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_file: str | None = None
    """A 0600 file holding the secret access key (NEON_HOME/secrets/...); remote: the token."""
    kind: str = "s3"
    """"s3", or "remote": `endpoint` is then neon://HOST:PORT of a pageserver and `bucket`
    is unused."""
    tls: bool = False
    """remote: TLS to the pageserver, its certificate verified against `ca_file` (else the
    system's CAs) and the host name."""
    ca_file: str | None = None
    local_cache: int | None = None
    """Bytes of layer files of a PITR area kept on disk once uploaded (None: all of them);
    the rest is fetched back when read (pageserver/remote/eviction.py)."""

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_wire(data: dict[str, Any]) -> RemoteSettings:
        try:
            settings = RemoteSettings(**data)
        except TypeError as exc:
            raise InvalidArgument(f"invalid s3 storage settings: {exc}") from None
        if settings.kind not in ("s3", "remote"):
            raise InvalidArgument(f"unknown remote storage kind {settings.kind!r}")
        if settings.kind == "s3" and not settings.bucket:
            raise InvalidArgument("an s3 storage needs a bucket")
        if settings.kind == "remote" and not (settings.endpoint or "").startswith("neon://"):
            raise InvalidArgument("a remote storage needs a neon://HOST:PORT endpoint")
        return settings

    def key(self, *parts: str) -> str:
        """An object key under the storage's prefix."""
        return "/".join(p for p in (self.prefix.strip("/"), *parts) if p)

    @property
    def url(self) -> str:
        if self.kind == "remote":
            assert self.endpoint is not None
            return "/".join(p for p in (self.endpoint.rstrip("/"), self.prefix.strip("/")) if p)
        return "s3://" + "/".join(p for p in (self.bucket, self.prefix.strip("/")) if p)

    def object_url(self, key: str) -> str:
        """Where object `key` (a full key, prefix included) is, for messages."""
        if self.kind == "remote":
            assert self.endpoint is not None
            return f"{self.endpoint.rstrip('/')}/{key}"
        return f"s3://{self.bucket}/{key}"

    def secret(self) -> str | None:
        if self.secret_file is None:
            return None
        try:
            return Path(self.secret_file).read_text().strip()
        except OSError as exc:
            raise InvalidArgument(
                f"cannot read the {'token' if self.kind == 'remote' else 'secret access key'} "
                f"of storage {self.storage!r} "
                f"({self.secret_file}): {exc.strerror}"
            ) from None
