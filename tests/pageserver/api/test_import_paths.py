"""The paths an import request names are checked before anything reads them
(pageserver/api/import_paths.py): a `.neon` file that is a FIFO, a device or a link is refused
at once (a FIFO hung the import), as is a data directory that is not one, and any of them
inside the pageserver's own work directory or page histories, at any depth."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path

import pytest

from pageserver.api.service import Pageserver
from pageserver.config import PageserverConfig
from pageserver.history.snapshots import Snapshot
from proto.errors import InvalidArgument

WITHIN = 10.0


@pytest.fixture
def ps(tmp_path: Path) -> Pageserver:
    (tmp_path / "ps").mkdir()
    return Pageserver(PageserverConfig(tmp_path / "ps"))


def _import(
    ps: Pageserver, datadir: Path, store_dir: Path, neon_file: Path | None = None
) -> Snapshot:
    gone = threading.Event()

    async def run() -> Snapshot:
        try:
            return await asyncio.wait_for(
                ps.import_snapshot(
                    "pushed", datadir, store_dir, gone.is_set, neon_file=neon_file,
                    fetching=neon_file is not None,
                ),
                WITHIN,
            )  # fmt: skip
        finally:
            gone.set()  # an import that did begin ends

    return asyncio.run(run())


def _work(tmp_path: Path) -> tuple[Path, Path]:
    """An import's work directory beside its storage's history, as the CLI makes it."""
    store_dir = tmp_path / "storage" / "pagestore"
    work = tmp_path / "storage" / ".tmp-import-1"
    work.mkdir(parents=True)
    return store_dir, work


def test_a_fifo_given_as_the_neon_file_is_refused_at_once(ps: Pageserver, tmp_path: Path) -> None:
    store_dir, work = _work(tmp_path)
    fifo = work / "fetched.neon"
    os.mkfifo(fifo)
    release = threading.Timer(WITHIN + 1, _release, [fifo])  # a reader the old code left
    release.start()
    try:
        with pytest.raises(InvalidArgument, match=r"is a FIFO, not a regular \.neon file"):
            _import(ps, work / "pgdata", store_dir, fifo)
    finally:
        release.cancel()
    assert ps.list_snapshots() == []


def _release(fifo: Path) -> None:
    with contextlib.suppress(OSError):  # ENXIO: nobody waits in its open
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_a_link_device_or_directory_as_the_neon_file_is_refused(
    ps: Pageserver, tmp_path: Path
) -> None:
    store_dir, work = _work(tmp_path)
    real = tmp_path / "real.neon"
    real.touch()
    (work / "link.neon").symlink_to(real)
    (work / "dir.neon").mkdir()
    for given, kind in [
        (work / "link.neon", "a symbolic link"),
        (Path("/dev/null"), "a device"),
        (work / "dir.neon", "a directory"),
    ]:
        with pytest.raises(InvalidArgument, match=rf"is {kind}, not a regular \.neon file"):
            _import(ps, work / "pgdata", store_dir, given)
    with pytest.raises(InvalidArgument, match="does not exist"):
        _import(ps, work / "pgdata", store_dir, work / "none.neon")


def test_a_data_directory_that_is_none_is_refused(ps: Pageserver, tmp_path: Path) -> None:
    store_dir, work = _work(tmp_path)
    os.mkfifo(work / "fifo")
    (work / "real").mkdir()
    (work / "link").symlink_to(work / "real")
    for given, kind in [(work / "fifo", "a FIFO"), (work / "link", "a symbolic link")]:
        with pytest.raises(InvalidArgument, match=f"is {kind}, not a data directory"):
            _import(ps, given, store_dir)
    # Absent, it is refused unless a live import's journal beside it says it is on its way.
    with pytest.raises(InvalidArgument, match="does not exist"):
        _import(ps, work / "pgdata", store_dir)


def test_paths_inside_the_pageservers_own_directories_are_refused(
    ps: Pageserver, tmp_path: Path
) -> None:
    """The parent-of-parent check let `pgdata` sit in the storage's history itself
    (<storage>/pagestore/pgdata); the work directory is refused at any depth, through links
    too."""
    store_dir, work = _work(tmp_path)
    (work / "fetched.neon").touch()
    with pytest.raises(InvalidArgument, match="an extraction inside the pageserver's own"):
        _import(ps, store_dir / "pgdata", store_dir, work / "fetched.neon")
    deep = ps.config.workdir / "a" / "b"
    deep.mkdir(parents=True)
    (deep / "x.neon").touch()
    with pytest.raises(InvalidArgument, match=r"a \.neon file inside the pageserver's own"):
        _import(ps, work / "pgdata", store_dir, deep / "x.neon")
    (tmp_path / "innocent").symlink_to(ps.config.workdir)
    with pytest.raises(InvalidArgument, match="a data directory inside the pageserver's own"):
        _import(ps, tmp_path / "innocent" / "a", store_dir)
    assert ps.list_snapshots() == []


def test_a_nodes_import_checks_its_directory_too(ps: Pageserver, tmp_path: Path) -> None:
    """node.import (a node's first start, an attach) names a directory as the others do."""
    from pageserver.follow.followed_nodes import FollowedNode

    store_dir, work = _work(tmp_path)
    ps.nodes.add(FollowedNode("n1", "127.0.0.1", 1, "u", "p", store_dir=str(store_dir)))
    os.mkfifo(work / "fifo")
    inside = ps.config.workdir / "pgdata"
    inside.mkdir()
    for given, message in [
        (work / "fifo", "is a FIFO, not a data directory"),
        (inside, "a data directory inside the pageserver's own"),
        (store_dir / "x", "a data directory inside the pageserver's own"),
    ]:
        with pytest.raises(InvalidArgument, match=message):
            asyncio.run(asyncio.wait_for(ps.import_node("n1", given), WITHIN))
