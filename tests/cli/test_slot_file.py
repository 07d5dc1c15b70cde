"""cli/slot_file.py against PostgreSQL 15: the state file of a physical slot is byte for byte
the one the server writes, and a server started on a directory with a written slot has it,
reserving WAL from where the file says."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cli.slot_file import slot_state, write_physical_slot
from pg15.lsn import parse_lsn
from proto.errors import CorruptData, ExternalCommandFailed
from tests.pgtest import PgTestCluster

SLOTS = "SELECT slot_name, slot_type, restart_lsn, wal_status FROM pg_replication_slots"


def test_the_state_file_is_the_one_postgres_writes(pg_cluster: PgTestCluster) -> None:
    server = pg_cluster.create()
    server.psql("SELECT pg_create_physical_replication_slot('neon_primary7', true)")
    restart = parse_lsn(server.psql("SELECT restart_lsn FROM pg_replication_slots"))
    server.stop()
    written = (server.datadir / "pg_replslot" / "neon_primary7" / "state").read_bytes()
    assert slot_state("neon_primary7", restart) == written


def test_a_written_slot_is_the_servers_at_start(pg_cluster: PgTestCluster) -> None:
    server = pg_cluster.create()
    server.psql("CREATE TABLE t AS SELECT generate_series(1, 1000) a; CHECKPOINT")
    redo = server.psql("SELECT redo_lsn FROM pg_control_checkpoint()")
    server.stop()
    shutil.rmtree(server.datadir / "pg_replslot", ignore_errors=True)  # written from nothing
    write_physical_slot(server.datadir, "neon_primary3", parse_lsn(redo))
    server.start()
    assert server.psql(SLOTS) == f"neon_primary3|physical|{redo}|reserved"
    # A damaged file is refused by the server: it is the file PostgreSQL reads.
    state = server.datadir / "pg_replslot" / "neon_primary3" / "state"
    server.stop()
    raw = bytearray(state.read_bytes())
    raw[100] ^= 1  # in restart_lsn
    state.write_bytes(bytes(raw))
    with pytest.raises(ExternalCommandFailed, match="checksum mismatch for replication slot"):
        server.start()


def test_links_in_place_of_the_slot_are_not_followed(tmp_path: Path) -> None:
    """The data directory is PostgreSQL's OS user's, the writer may be root: a link that user
    put in place of the slot's directory fails the write, one in place of its file is
    replaced, and what they name is neither written nor handed over."""
    datadir, outside = tmp_path / "data", tmp_path / "outside"
    (datadir / "pg_replslot").mkdir(parents=True)
    outside.mkdir()
    (outside / "state").write_bytes(b"root's own")
    owner = outside.stat().st_uid, (outside / "state").stat().st_uid
    (datadir / "pg_replslot" / "neon_primary1").symlink_to(outside)
    with pytest.raises(CorruptData, match="not a directory"):
        write_physical_slot(datadir, "neon_primary1", 0x1000028)
    (datadir / "pg_replslot" / "neon_primary1").unlink()
    (datadir / "pg_replslot" / "neon_primary1").mkdir()
    (datadir / "pg_replslot" / "neon_primary1" / "state").symlink_to(outside / "state")
    write_physical_slot(datadir, "neon_primary1", 0x1000028)
    state = datadir / "pg_replslot" / "neon_primary1" / "state"
    assert not state.is_symlink() and state.read_bytes() == slot_state("neon_primary1", 0x1000028)
    assert (outside / "state").read_bytes() == b"root's own"
    assert (outside.stat().st_uid, (outside / "state").stat().st_uid) == owner
    assert sorted(p.name for p in outside.iterdir()) == ["state"]
