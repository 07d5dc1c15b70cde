"""A .neon file of a real basebackup: the basebackup of a stopped PostgreSQL 15 data
directory streamed into the writer, read back byte-equal, and opened with the documented
standard-tool pipeline into a data directory that stock PostgreSQL starts on."""

from __future__ import annotations

import io
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cli import postmaster
from datadir_files.pg_account import make_pg_dir, pg_os_user
from pageserver.basebackup.sources import DatadirSource
from pageserver.basebackup.tar_stream import basebackup, basebackup_chunks
from snapfile import Manifest, SnapshotFileWriter, extract_tar
from tests.pgtest import PgTestCluster

pytestmark = pytest.mark.slow

CONFIG_FILES = ("postgresql.conf", "pg_hba.conf", "pg_ident.conf", "postgresql.auto.conf")
NOW = 1_780_000_000
WORKLOAD = """
CREATE TABLE t (id int PRIMARY KEY, v text);
INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
CREATE DATABASE db2;
CHECKPOINT;
"""


def test_real_basebackup_round_trips_and_starts(pg_cluster: PgTestCluster, tmp_path: Path) -> None:
    source_server = pg_cluster.create()
    source_server.psql(WORKLOAD)
    source_server.stop()
    config = {name: (source_server.datadir / name).read_bytes() for name in CONFIG_FILES}
    path = tmp_path / "snap.neon"
    with DatadirSource(source_server.datadir) as source:
        reference = io.BytesIO()
        basebackup(source, source.lsn, out=reference, config_files=config, now=NOW)
        info, chunks = basebackup_chunks(source, source.lsn, config_files=config, now=NOW)
        manifest = Manifest(
            pg_version=15,
            system_identifier=info.system_identifier,
            lsn=info.lsn,
            pg_timeline=info.pg_timeline,
            source=str(source_server.datadir),
            created_at=datetime.fromtimestamp(NOW, UTC),
        )
        # Streamed straight to the file: no tar is staged anywhere.
        writer = SnapshotFileWriter(manifest)
        with path.open("wb") as out:
            for chunk in chunks:
                out.write(writer.write(chunk))
            out.write(writer.finish())
    tar = reference.getvalue()
    assert len(writer.checksums.frames) == -(-len(tar) // manifest.frame_size)
    assert path.stat().st_size < len(tar) // 2

    got = io.BytesIO()
    with path.open("rb") as inp:
        got_manifest, checksums = extract_tar(inp, got, label=path.name)
    assert got_manifest == manifest
    assert checksums == writer.checksums
    assert got.getvalue() == tar

    # The documented pipeline, extracting as PostgreSQL's OS user.
    restored = pg_cluster.create_empty()
    make_pg_dir(restored.datadir)
    user = pg_os_user()
    as_pg = f"runuser -u {user.name} -- " if user else ""
    pipeline = f"tar -xOf {path} --wildcards 'frames/*' | zstd -d | {as_pg}tar -x -C {{}}"
    subprocess.run(["bash", "-o", "pipefail", "-c", pipeline.format(restored.datadir)], check=True)
    postmaster.write_config(restored.datadir, *restored.config())
    restored.start()
    assert restored.psql("SELECT count(*), sum(id) FROM t") == "20000|200010000"
    assert "db2" in restored.psql("SELECT datname FROM pg_database")
    restored.stop()
