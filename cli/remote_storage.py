"""The CLI's side of history kept in s3 storages (pageserver/remote/): what the pageserver is
told about an attached s3 storage, and when.

`neon storage attach -t s3` only records the storage (it may be attached before its bucket
exists, or offline). The pageserver is told about it, and reads the PITR areas in its bucket
(one LIST, one GET of each area's index), the first time a command needs what is there:
`pitr list`, `pitr extract-snapshot`, `snapshot list -s NAME`; it keeps what it read across
restarts. A bucket that cannot be read then is one warning line, not a failure of the command.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import click

from cli.context import App
from cli.output import human_size
from cli.pageserver_control import local_api
from cli.registry import StorageRow
from cli.storages import DEFAULT_STORAGE, secret_path
from pageserver.storage.retention import parse_size
from pageserver_api import models
from pageserver_api.client import SyncPageserverClient
from pg15.lsn import format_lsn
from proto.errors import InvalidArgument, NeonError

REMOTE_TYPES = ("s3", "remote")
"""Storages that can keep PITR history: a bucket, or another pageserver (its `blob.*`)."""


def s3_settings(app: App, row: StorageRow) -> dict[str, Any]:
    """The settings the pageserver reaches the bucket (or the remote pageserver) with: the
    path of the secret (the token), not it."""
    if row.type == "remote":
        return _remote_settings(app, row)
    if row.type != "s3":
        raise InvalidArgument(f"storage {row.name!r} is of type {row.type}, not s3 or remote")
    secret = secret_path(app.home, row.name, "secret_access_key")
    return {
        "storage": row.name,
        "bucket": row.options["bucket"],
        "prefix": row.options.get("prefix", ""),
        "endpoint": row.options.get("endpoint") or None,
        "region": row.options.get("region") or None,
        "access_key_id": row.options.get("access_key_id") or None,
        "secret_file": str(secret) if secret.exists() else None,
        "local_cache": _local_cache(row),
    }


def _local_cache(row: StorageRow) -> int | None:
    """`-c local_cache=SIZE`: bytes of uploaded layer files kept on disk (default: all)."""
    return parse_size(row.options["local_cache"]) if "local_cache" in row.options else None


def _remote_settings(app: App, row: StorageRow) -> dict[str, Any]:
    parts = urlsplit(row.options["url"])
    token = secret_path(app.home, row.name, "token")
    if not token.exists():
        raise InvalidArgument(
            f"storage {row.name} has no token; detach it and attach it again with "
            "-c token=@FILE (the remote pageserver's token file)"
        )
    return {
        "storage": row.name,
        "bucket": "",
        "prefix": unquote(parts.path).strip("/"),
        "endpoint": f"neon://{parts.netloc.rpartition('@')[2]}",
        "secret_file": str(token),
        "kind": "remote",
        "tls": row.options.get("tls") == "on",
        "ca_file": row.options.get("ca") or None,
        "local_cache": _local_cache(row),
    }


def sync_remote(
    app: App, api: SyncPageserverClient, only: str | None = None, *, rescan: bool = False
) -> None:
    """Tell the pageserver about the s3 storages it does not know yet (`only`: just that
    one), so it attaches the PITR areas of their buckets; `rescan`: also look again in the
    buckets it knows for areas created since (one LIST each, a GET per new area)."""
    rows = [r for r in app.registry.storages() if r.type in REMOTE_TYPES and only in (None, r.name)]
    if not rows:
        return
    known = {s.storage for s in api.remote_status().storages}
    for row in rows:
        if row.name in known and not rescan:
            continue
        try:
            api.remote_attach(models.RemoteAttachRequest(s3_settings(app, row)))
        except NeonError as exc:
            click.echo(f"neon: warning: cannot read storage {row.name}: {exc}", err=True)


def remote_status(api: SyncPageserverClient | None) -> models.RemoteStatusResponse | None:
    """The pageserver's uploads and s3 usage; None when it does not run or cannot say."""
    if api is None:
        return None
    try:
        return api.remote_status()
    except NeonError:
        return None


def upload_line(up: dict[str, Any]) -> str:
    """Where an area's uploads are: what is extractable from the bucket, what is pending, why
    it is behind (the RPO after a loss of this machine is the lag)."""
    line = (
        f"uploaded to {format_lsn(up['remote_lsn'])} of {format_lsn(up['local_lsn'])} "
        f"(lag {human_size(up['lag_bytes'])} of WAL; {up['pending_objects']} objects, "
        f"{human_size(up['pending_bytes'])} pending; "
        f"{human_size(up['remote_bytes'])} in the bucket)"
    )
    if up.get("cache_limit_bytes") is not None:
        line += (
            f"; local cache {human_size(up['cache_resident_bytes'])} of "
            f"{human_size(up['cache_limit_bytes'])} on disk, {up['evicted_layers']} layers "
            f"evicted, {human_size(up['fetched_bytes_total'])} fetched back"
        )
    if up.get("last_error"):
        line += f"; retrying: {up['last_error']}"
    return line


def node_uploads(app: App, node_id: str) -> list[dict[str, Any]]:
    """The uploads of a node's PITR areas kept in s3 storages (none when the pageserver does
    not run)."""
    try:
        status = remote_status(local_api(app, start=False))
    except NeonError:
        return []
    return [] if status is None else [u.to_wire() for u in status.uploads if u.node_id == node_id]


def in_storage(app: App, rows: list[dict[str, Any]], storage: str) -> list[dict[str, Any]]:
    """The snapshot rows kept in `storage`: attached from it (s3, remote), or of its nodes."""
    row = app.registry.get_storage(storage)
    if row.type in REMOTE_TYPES:
        return [r for r in rows if r.get("storage") == storage]
    node_storage = {n.id: n.storage for n in app.registry.nodes()}
    return [
        r for r in rows
        if r.get("storage") is None and node_storage.get(r["node_id"], DEFAULT_STORAGE) == storage
    ]  # fmt: skip
