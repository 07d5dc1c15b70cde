"""`pg checkout` in place: rewrite only what differs between the stopped node's directory
and the target, instead of rebuilding the whole directory (cli/checkout.py).

The pageserver makes a delta `.neon` file from the node's `HEAD{i}` snapshot (the state its
directory holds) to its new branch point (pageserver/basebackup/checkout_delta.py: the pages
of every key written on either side since the histories met, relations created, dropped or
resized, and the small non-page files whole); it is applied to the directory itself by the
applier snapshot import uses (cli/delta_apply.py), keeping the node's configuration.

Crash safety (the journal's contract: after a kill at any point, the next `pg checkout` or
`pg start` ends in the old or the new directory, complete), by files beside the directory:

1. the delta is downloaded to `<datadir>.checkout.neon.___temp`, fsynced, renamed to
   `<datadir>.checkout.neon`, the parent fsynced. Until that rename the directory is
   untouched: recovery may choose again (a delta, or a full rebuild);
2. it is applied in place. Applying is idempotent: whole files are rewritten, a fork is set
   to the size the delta says and its listed pages written, whatever is not listed removed;
   none of it reads what the directory holds. So recovery applies the same file again;
3. what it changed is fsynced (the whole tree after a killed run, whose writes may not
   be), then `.neon` is renamed `<datadir>.checkout.applied` (durably);
4. the node's passwords and slot (cli/nodes.py finish_datadir, single-user mode: not
   repeatable over step 2, which would drop the WAL it wrote, hence step 3's name; its own
   slot is removed first, so a killed run can be repeated; its shutdown checkpoint makes
   its writes durable), the configuration fsynced, then the completion marker (only: the
   rest is durable); the `.applied` file is removed last, by `remove_leftovers`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from cli.context import App
from cli.hints_mark import HINTS_MARK, hints_logged_from
from cli.nodes import CONFIG_FILES, finish_datadir
from cli.pageserver_control import local_api
from cli.postmaster import NEON_CONF
from cli.registry import NodeRow
from cli.snapshot_file_source import apply_delta_stream
from durable_files import fsync_dir, fsync_tree, temp_path
from pageserver.follow.followed_nodes import slot_name
from pageserver_api.client import PageserverClient
from pageserver_api.models import BasebackupRequest, BasebackupResponse
from proto.errors import InvalidArgument, NotFound
from snapfile.reader import read_manifest

KEEP = (*CONFIG_FILES, NEON_CONF, HINTS_MARK)
"""What the node's directory keeps that is not page history."""
_READ_CHUNK = 1 << 20


def delta_file(node: NodeRow) -> Path:
    return node.datadir.with_name(node.datadir.name + ".checkout.neon")


def applied_file(node: NodeRow) -> Path:
    return node.datadir.with_name(node.datadir.name + ".checkout.applied")


def remove_leftovers(node: NodeRow) -> None:
    """Once no checkout is pending (or it is sealed): its delta files are waste."""
    for path in (temp_path(delta_file(node)), delta_file(node), applied_file(node)):
        path.unlink(missing_ok=True)


def roll_forward(app: App, node: NodeRow, head: str | None, seal: Callable[[Path], None]) -> bool:
    """Bring the stopped directory to the node's branch point in place and `seal` it; False
    (the directory untouched) when no delta applies: the caller rebuilds it whole."""
    delta, applied = delta_file(node), applied_file(node)
    if not applied.exists():
        again = delta.exists()  # a killed run applied some of it, maybe not durably
        if not again and (head is None or not _download(app, node, head)):
            return False
        _apply(delta, node.datadir, durable=not again)
        if again:
            fsync_tree(node.datadir)
        os.replace(delta, applied)
        fsync_dir(applied.parent)
    shutil.rmtree(node.datadir / "pg_replslot" / slot_name(node.id), ignore_errors=True)
    finish_datadir(app, node)  # its shutdown checkpoint makes its own writes durable
    for name in KEEP:
        if (node.datadir / name).is_file():
            _fsync(node.datadir / name)
    fsync_dir(node.datadir)
    seal(node.datadir)
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _eligible(datadir: Path) -> int | None:
    """The hint mark if the directory may take a delta: no tablespace links either."""
    spaces = datadir / "pg_tblspc"
    if spaces.is_dir() and any(spaces.iterdir()):
        return None
    return hints_logged_from(datadir)


def _download(app: App, node: NodeRow, head: str) -> bool:
    """The delta from `head`, durably at `delta_file(node)`; False where the pageserver
    refuses one (no common history, hints not logged since its start) or the target has
    tablespaces (they are placed by a full rebuild: cli/tablespace_restore.py)."""
    mark = _eligible(node.datadir)
    if mark is None:
        return False
    request = BasebackupRequest(
        node_id=node.id, snapshot_file=True, checkout_from=head, hints_logged_from=mark
    )
    final = delta_file(node)
    tmp = temp_path(final)

    async def fetch(client: PageserverClient) -> BasebackupResponse:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            async with client.basebackup(request) as download:
                async for chunk in download:
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        return download.result

    try:
        result = local_api(app).run(fetch)
    except (InvalidArgument, NotFound):
        tmp.unlink(missing_ok=True)
        return False
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if result.tablespaces or result.parent != head:
        tmp.unlink(missing_ok=True)
        return False
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return True


def _apply(delta: Path, datadir: Path, durable: bool) -> None:
    with delta.open("rb") as f:
        manifest = read_manifest(f)

    async def chunks() -> AsyncIterator[bytes]:
        with delta.open("rb") as f:
            while chunk := f.read(_READ_CHUNK):
                yield chunk

    asyncio.run(
        apply_delta_stream(chunks(), str(delta), datadir, manifest, keep=KEEP, durable=durable)
    )
