"""Downloading data directories from the pageserver.

`download_basebackup` streams a basebackup into a temporary tar beside the target, fsyncs it
and unpacks it (cli/untar.py); `remove_download_leftovers` deletes what a killed download
leaves behind. A downloaded directory has no configuration, no replication slot, and the
passwords of the node it came from: `cli.nodes.finish_datadir` gives it this node's settings,
passwords and slot in single-user mode, before its first start, so the slot retains every
WAL byte it writes.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
from pathlib import Path

from cli.context import App
from cli.pageserver_control import local_api
from cli.untar import extract_basebackup
from pageserver_api.client import PageserverClient
from pageserver_api.models import BasebackupRequest, BasebackupResponse

_RANDOM = "?" * 8  # what tempfile.mkstemp/mkdtemp insert between prefix and suffix


def remove_download_leftovers(target: Path) -> list[Path]:
    """Delete what a killed `download_basebackup(target)` leaves beside `target`: the
    temporary tar (`.<name>.XXXXXXXX.tar`) and the extraction's temporary directory
    (`<name>.tmp-XXXXXXXX`, cli.untar). The caller owns `target` (no download into it runs)."""
    name = glob.escape(target.name)
    found = [
        *target.parent.glob(f".{name}.{_RANDOM}.tar"),
        *target.parent.glob(f"{name}.tmp-{_RANDOM}"),
    ]
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def download_basebackup(
    app: App, target: Path, *, node_id: str | None = None, snapshot: str | None = None
) -> BasebackupResponse:
    """Stream a basebackup of a snapshot, or of a node's branch point, from the local
    pageserver and unpack it into `target`."""
    request = BasebackupRequest(node_id=node_id, snapshot=snapshot)
    api = local_api(app)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tar", dir=target.parent)
    tmp = Path(tmp_name)
    show = sys.stderr.isatty()

    async def fetch(client: PageserverClient) -> BasebackupResponse:
        received = 0
        with os.fdopen(fd, "wb") as out:
            async with client.basebackup(request) as download:
                async for chunk in download:
                    out.write(chunk)
                    received += len(chunk)
                    if show:
                        print(f"\rreceived {received / 1048576:.1f} MiB", end="", file=sys.stderr)
            out.flush()
            os.fsync(out.fileno())
        if show:
            print(file=sys.stderr)
        return download.result

    try:
        info = api.run(fetch)
        with open(tmp, "rb") as stream:
            extract_basebackup(stream, target)
    finally:
        tmp.unlink(missing_ok=True)
    return info
