"""postmaster.write_config leaves a configuration file that already holds what it would write
as it is (every start writes the same settings, a checkout twice, and each new file was then
fsynced by the checkout's seal), and still replaces a changed file or a link in its place."""

from __future__ import annotations

import os
from pathlib import Path

from cli.postmaster import NEON_CONF, write_config

HBA = ["local all all trust"]


def test_an_unchanged_configuration_is_not_written_again(tmp_path: Path) -> None:
    datadir = tmp_path / "pgdata"
    datadir.mkdir()
    write_config(datadir, {"port": 5432}, HBA)
    before = {name: os.stat(datadir / name).st_ino for name in (NEON_CONF, "pg_hba.conf")}
    write_config(datadir, {"port": 5432}, HBA)
    assert {name: os.stat(datadir / name).st_ino for name in before} == before
    write_config(datadir, {"port": 5433}, HBA)  # a changed setting is written
    assert os.stat(datadir / NEON_CONF).st_ino != before[NEON_CONF]
    assert "port = 5433" in (datadir / NEON_CONF).read_text()
    assert os.stat(datadir / "pg_hba.conf").st_ino == before["pg_hba.conf"]


def test_a_link_in_place_of_a_configuration_file_is_replaced(tmp_path: Path) -> None:
    datadir = tmp_path / "pgdata"
    datadir.mkdir()
    write_config(datadir, {"port": 5432}, HBA)
    outside = tmp_path / "outside"
    outside.write_bytes((datadir / "pg_hba.conf").read_bytes())  # the same bytes, elsewhere
    (datadir / "pg_hba.conf").unlink()
    (datadir / "pg_hba.conf").symlink_to(outside)
    write_config(datadir, {"port": 5432}, HBA)
    assert not (datadir / "pg_hba.conf").is_symlink()
    assert (datadir / "pg_hba.conf").read_bytes() == outside.read_bytes()
