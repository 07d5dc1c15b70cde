"""Downloading data directories from the pageserver.

`download_basebackup` unpacks a basebackup into the target as it arrives (cli/untar.py,
through a temporary directory renamed at the end); `remove_download_leftovers` deletes what a
killed download leaves behind. A downloaded directory has no configuration, no replication
slot, and the passwords of the node it came from: `cli.nodes.finish_datadir` gives it this
node's settings, passwords and slot in single-user mode, before its first start, so the slot
retains every WAL byte it writes.
"""

from __future__ import annotations

import glob
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from cli.context import App
from cli.pageserver_control import local_api
from cli.untar import extract_stream
from pageserver_api.client import PageserverClient
from pageserver_api.models import BasebackupRequest, BasebackupResponse

_RANDOM = "?" * 8  # what tempfile.mkstemp/mkdtemp insert between prefix and suffix


def remove_download_leftovers(target: Path) -> list[Path]:
    """Delete what a killed `download_basebackup(target)` leaves beside `target`: the
    extraction's temporary directory (`<name>.tmp-XXXXXXXX`, cli.untar), and the temporary
    tar (`.<name>.XXXXXXXX.tar`) that versions before 2026-12 downloaded first. The caller
    owns `target` (no download into it runs)."""
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
    target.parent.mkdir(parents=True, exist_ok=True)
    show = sys.stderr.isatty()

    async def fetch(client: PageserverClient) -> BasebackupResponse:
        received = 0
        async with client.basebackup(request) as download:

            async def chunks() -> AsyncIterator[bytes]:
                nonlocal received
                async for chunk in download:
                    yield chunk
                    received += len(chunk)
                    if show:
                        print(f"\rreceived {received / 1048576:.1f} MiB", end="", file=sys.stderr)

            await extract_stream(chunks(), target)
        if show:
            print(file=sys.stderr)
        return download.result

    return local_api(app).run(fetch)
