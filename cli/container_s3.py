"""`neon pageserver run` with the history in S3 (issue 13 item 5), from environment variables:

    NEON_S3_BUCKET     the bucket (setting it turns this on)
    NEON_S3_ENDPOINT   an S3-compatible service, http(s)://HOST[:PORT] (default: AWS)
    NEON_S3_PREFIX     a key prefix inside the bucket (default: none)
    NEON_S3_REGION     the region (default: AWS_REGION, else us-east-1)
    NEON_S3_STORAGE    the storage's name in the home (default: s3)

Credentials are AWS's own variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN), or whatever else botocore finds (an instance role): the storage is
attached without keys, so the pageserver, which inherits this environment, reaches the bucket
as botocore's default chain says and no secret is written into the home.

The storage is attached once (`neon storage attach -t s3`; kept in NEON_HOME). The PITR area
over the followed server (NEON_PITR_TTL) is then created with `--storage` instead of by
`neon pg attach`, so its layers and WAL are uploaded as they are produced; the same is done
after a restart if the area is missing. A fresh container (empty NEON_HOME) over a bucket
another pageserver wrote is refused by that history's lease (one writer per history): give
it another NEON_FOLLOW_NAME, or attach the bucket on a CLI to read the old history.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from cli.context import App

DEFAULT_STORAGE_NAME = "s3"


@dataclass(frozen=True, slots=True)
class S3Config:
    bucket: str
    endpoint: str | None = None
    prefix: str = ""
    region: str | None = None
    storage: str = DEFAULT_STORAGE_NAME

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> S3Config | None:
        bucket = env.get("NEON_S3_BUCKET") or None
        if bucket is None:
            return None
        return cls(
            bucket=bucket,
            endpoint=env.get("NEON_S3_ENDPOINT") or None,
            prefix=env.get("NEON_S3_PREFIX", ""),
            region=env.get("NEON_S3_REGION") or env.get("AWS_REGION") or None,
            storage=env.get("NEON_S3_STORAGE") or DEFAULT_STORAGE_NAME,
        )


def _neon(app: App, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "--home", str(app.home.root), *args],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def attach_storage(app: App, s3: S3Config) -> None:
    """Attach the bucket as a storage unless the home has it (InvalidArgument: one line)."""
    if app.registry.find_storage(s3.storage) is not None:
        return
    options = [f"bucket={s3.bucket}", f"prefix={s3.prefix}"]
    options += [f"endpoint={s3.endpoint}"] if s3.endpoint else []
    options += [f"region={s3.region}"] if s3.region else []
    argv = ["storage", "attach", "-t", "s3", "-n", s3.storage]
    for option in options:
        argv += ["-c", option]
    done = _neon(app, *argv)
    if done.returncode != 0:
        from proto.errors import InvalidArgument

        raise InvalidArgument(done.stderr.strip().removeprefix("neon: error: "))


def ensure_area(app: App, s3: S3Config, node: str, ttl: str) -> str | None:
    """The PITR area `node` over the followed node, kept in the bucket; None when it exists
    or was made now, else why not (the caller retries)."""
    listed = _neon(app, "pitr", "list", "--json")
    if listed.returncode == 0 and node in {a["name"] for a in json.loads(listed.stdout)}:
        return None
    done = _neon(app, "pitr", "create", node, "--pg", node, "--ttl", ttl, "--storage", s3.storage)
    if done.returncode == 0:
        return None
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit {done.returncode}"
