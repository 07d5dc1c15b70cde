"""A basebackup written by the home's own daemon into the directory the CLI hands it
(pageserver/api/local_files.py) is the directory the stream gives, file for file; where the
daemon offers no socket (an older one), the CLI streams."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cli.context import App
from cli.extract import _connect_local, download_basebackup
from cli.pageserver_control import local_config
from pageserver.api.local_files import socket_path
from tests.e2e.test_checkout_prepared import metric
from tests.neoncli import NeonCli, psql


def tree(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Every path under `root`: its mode, owner, group and (files) bytes."""
    found: dict[str, tuple[int, int, int, bytes]] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        data = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
        found[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, data)
    return found


def test_the_daemon_writes_what_the_stream_gives_and_an_older_daemon_streams(
    neon: NeonCli,
) -> None:
    neon.run("pg", "create")
    c = neon.json("pg", "show", "pgdata1")["connstr"]
    psql(c, "CREATE TABLE t AS SELECT g, md5(g::text) FROM generate_series(1, 30000) g")
    neon.run("snapshot", "create", "pgdata1@s")
    app = App.open(neon.home)
    sock = _connect_local(app)
    assert sock is not None  # the daemon offers the socket
    sock.close()
    work = neon.home / "work"
    work.mkdir(mode=0o711)
    written = download_basebackup(app, work / "written", snapshot="pgdata1@s")
    # Counted as the stream's request is (and compaction paused: proto_service.served).
    assert metric(neon, 'pageserver_proto_requests_total{method="basebackup",outcome="ok"}') == 1

    path = socket_path(local_config(app).workdir)
    assert path is not None
    os.rename(path, path.with_name("hidden"))  # what a daemon without the socket is like
    try:
        assert _connect_local(app) is None
        streamed = download_basebackup(app, work / "streamed", snapshot="pgdata1@s")
    finally:
        os.rename(path.with_name("hidden"), path)
    assert written.tar_bytes == streamed.tar_bytes > 30000 * 40
    assert written.lsn == streamed.lsn
    ours, theirs = tree(work / "written"), tree(work / "streamed")
    assert ours.keys() == theirs.keys()
    # The same files, modes and owners; pg_control and the checkpoint carry the time (the
    # same where both downloads ran in the same second).
    differ = {name for name in ours if ours[name] != theirs[name]}
    assert differ <= {"global/pg_control", f"pg_wal/{written.wal_segment}"}
    assert not list(work.glob("*.tmp-*"))
