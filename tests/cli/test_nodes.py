"""`neon pg ...` and `neon storage ...` against real PostgreSQL, through the real CLI."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest

from cli.nodes import default_port
from cli.pgbin import pg_binary
from proto.errors import InvalidArgument
from tests.neoncli import NeonCli, psql, wait_gone


def test_two_nodes_lifecycle(neon: NeonCli) -> None:
    out1 = neon.run("pg", "create").stdout
    out2 = neon.run("pg", "create").stdout
    assert out1.startswith("Started postgres on localhost:")
    nodes = neon.json("pg", "list")
    assert [n["id"] for n in nodes] == ["primary1", "primary2"]
    assert [n["pgdata"] for n in nodes] == ["pgdata1", "pgdata2"]
    assert nodes[0]["port"] != nodes[1]["port"]
    assert all(n["state"] == "running" and n["pid"] for n in nodes)
    assert out2.strip() == f"Started postgres on localhost:{nodes[1]['port']}"

    # psql accepts the connection string as-is, for each node; they are distinct servers.
    for n in nodes:
        psql(n["connstr"], f"create table t_{n['id']}(a int); insert into t_{n['id']} values (1)")
    assert (
        psql(nodes[0]["connstr"], "select count(*) from pg_class where relname='t_primary2'") == "0"
    )
    assert psql(nodes[1]["connstr"], "show port") == str(nodes[1]["port"])
    # Backends write back as they go: a snapshot's CHECKPOINT has less to wait for.
    assert psql(nodes[0]["connstr"], "show backend_flush_after") == "256kB"
    # TCP with the generated superuser (scram) through the passfile the string names.
    assert psql(nodes[0]["tcp_connstr"], "select current_user") == "neon"

    # The text table reads like the proposal's transcript.
    lines = neon.run("pg", "list").stdout.splitlines()
    assert lines[0].split() == [
        "ID",
        "PGDATA",
        "USED",
        "STORAGE",
        "ENDPOINT",
        "STATE",
        "INGESTED",
        "LAG",
    ]
    first = lines[1].split()
    assert first[0:2] == ["primary1", "pgdata1"] and first[3] == "local"
    assert first[4] == f"localhost:{nodes[0]['port']}" and first[5] == "running"

    # Nodes are addressed by ID or by data directory name.
    assert neon.json("pg", "show", "pgdata2")["id"] == "primary2"
    assert neon.run("pg", "stop", "pgdata1").stdout.startswith("Stopped postgres on pgdata1")
    shown = neon.json("pg", "show", "primary1")
    assert shown["state"] == "stopped" and shown["pid"] is None
    wait_gone(nodes[0]["pid"])
    neon.run("pg", "start", "primary1")
    assert psql(nodes[0]["connstr"], "select a from t_primary1") == "1"
    neon.run("pg", "stop", "-m", "immediate", "primary1")

    neon.run("pg", "destroy", "--yes", "primary2")
    wait_gone(nodes[1]["pid"])
    assert not Path(nodes[1]["datadir"]).exists()
    assert [n["id"] for n in neon.json("pg", "list")] == ["primary1"]
    # The ID is free again: the next node reuses the lowest free index.
    neon.run("pg", "create", "--no-start")
    assert [n["id"] for n in neon.json("pg", "list")] == ["primary1", "primary2"]


def test_sigkill_shows_crashed_and_start_recovers(neon: NeonCli) -> None:
    neon.run("pg", "create", "-n", "victim")
    node = neon.json("pg", "show", "victim")
    psql(node["connstr"], "create table k(a int); insert into k select generate_series(1,100)")
    os.kill(node["pid"], signal.SIGKILL)
    wait_gone(node["pid"])
    listed = neon.json("pg", "list")[0]
    assert listed["state"] == "crashed" and listed["pid"] is None
    assert neon.run("pg", "list").stdout.splitlines()[1].split()[4:6] == ["-", "crashed"]
    neon.run("pg", "start", "victim")
    node2 = neon.json("pg", "show", "primary1")
    assert node2["state"] == "running" and node2["pid"] != node["pid"]
    assert psql(node2["connstr"], "select count(*) from k") == "100"


def test_errors_are_one_line_and_change_nothing(neon: NeonCli, tmp_path: Path) -> None:
    assert "node 'nosuch' does not exist" in neon.fail("pg", "start", "nosuch")
    assert "storage 'nosuch' does not exist" in neon.fail("pg", "create", "-s", "nosuch")
    neon.run("pg", "create", "--no-start", "-n", "one")
    assert "already exists" in neon.fail("pg", "create", "-n", "one")
    assert "invalid data directory name" in neon.fail("pg", "create", "-n", "../evil")

    # A port in use: clear error and no node left behind.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert f"port {port} is in use" in neon.fail("pg", "create", "--port", str(port))
    assert [n["pgdata"] for n in neon.json("pg", "list")] == ["one"]

    # A non-empty data directory that is not ours.
    storage = Path(neon.json("storage", "show", "local")["path"])
    (storage / "pgdata2").mkdir()
    (storage / "pgdata2" / "precious").write_text("keep me")
    assert "not empty" in neon.fail("pg", "create", "-n", "pgdata2")
    assert (storage / "pgdata2" / "precious").read_text() == "keep me"

    bad_type = neon.run("storage", "attach", "-t", "ftp", "-n", "x", check=False)
    assert bad_type.returncode == 2 and "'ftp' is not one of" in bad_type.stderr
    assert "expected key=value" in neon.fail("storage", "attach", "-n", "x", "-c", "oops")
    assert "unknown option" in neon.fail("storage", "attach", "-n", "x", "-c", "colour=red")
    assert "neon://HOST:PORT" in neon.fail(
        "storage", "attach", "-t", "remote", "-n", "r", "-c", "url=http://example"
    )
    assert "bucket" in neon.fail("storage", "attach", "-t", "s3", "-n", "s")
    assert [s["name"] for s in neon.json("storage", "list")] == ["local"]


def test_failed_create_leaves_nothing(neon: NeonCli) -> None:
    # A PostgreSQL installation whose initdb fails half-way (after creating files), where
    # PostgreSQL's account can run it (next to the home; tmp_path's parents are 0700).
    fake = neon.home.parent / "pgbin"
    fake.mkdir()
    real = Path(pg_binary("initdb")).parent
    for entry in real.iterdir():
        (fake / entry.name).symlink_to(entry)
    (fake / "initdb").unlink()
    (fake / "initdb").write_text(
        '#!/bin/sh\nfor a; do case $a in -D) n=1;; *) [ -n "$n" ] && d=$a && n=;; esac; done\n'
        'mkdir -p "$d/base" && echo junk > "$d/PG_VERSION"\n'
        "echo 'initdb: error: disk on fire' >&2; exit 1\n"
    )
    (fake / "initdb").chmod(0o755)
    os.chmod(fake, 0o755)
    broken = NeonCli(neon.home, {"NEON_PG_BIN": str(fake)})
    err = broken.fail("pg", "create")
    assert "disk on fire" in err
    assert neon.json("pg", "list") == []
    storage = Path(neon.json("storage", "show", "local")["path"])
    assert not (storage / "pgdata1").exists()
    assert not any(p.name.startswith("node.") for p in (neon.home / "secrets").iterdir())
    # And the real one still works afterwards, reusing the same ID.
    neon.run("pg", "create", "--no-start")
    assert [n["id"] for n in neon.json("pg", "list")] == ["primary1"]


def test_missing_binaries_say_how_to_install(neon: NeonCli, tmp_path: Path) -> None:
    broken = NeonCli(neon.home, {"NEON_PG_BIN": str(tmp_path / "nothing")})
    assert "apt-get install postgresql-15" in broken.fail("pg", "create")
    assert neon.json("pg", "list") == []


def test_concurrent_creates_get_distinct_ids_and_ports(neon: NeonCli) -> None:
    procs = [
        subprocess.Popen(
            [*_neon_cmd(), "pg", "create", "--no-start"],
            env=neon.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    for p in procs:
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    nodes = neon.json("pg", "list")
    assert sorted(n["id"] for n in nodes) == ["primary1", "primary2", "primary3"]
    assert len({n["port"] for n in nodes}) == 3
    assert len({n["datadir"] for n in nodes}) == 3


def _neon_cmd() -> list[str]:
    from tests.neoncli import NEON

    return [NEON]


def test_storages_and_secrets(neon: NeonCli) -> None:
    custom = neon.home.parent / "custom-store"  # PostgreSQL's account enters it (not tmp_path)
    out = neon.run(
        "storage",
        "attach",
        "-t",
        "native",
        "-n",
        "local.compr",
        "-c",
        f"path={custom}",
    ).stdout
    assert "local.compr" in out
    neon.run(
        "storage",
        "attach",
        "-t",
        "s3",
        "-n",
        "s3tank",
        "-c",
        "bucket=tank",
        "-c",
        "prefix=pg/",
        "-c",
        "endpoint=http://127.0.0.1:9000",
        "-c",
        "access_key_id=AKIA",
        "-c",
        "secret_access_key=topsecret",
    )
    neon.run(
        "storage",
        "attach",
        "-t",
        "remote",
        "-n",
        "zcloud",
        "-c",
        "url=neon://127.0.0.1:6400/stas/mystore",
        "-c",
        "token=hushhush",
    )
    listed = neon.json("storage", "list")
    assert [s["name"] for s in listed] == ["local", "local.compr", "s3tank", "zcloud"]
    table = neon.run("storage", "list").stdout
    assert table.splitlines()[0].split() == ["NAME", "USED", "TYPE", "OPTIONS", "PATH"]
    assert str(custom) in table
    assert "s3://tank/pg" in table and "neon://127.0.0.1:6400/stas/mystore" in table
    everything = (
        table
        + neon.run("storage", "show", "s3tank").stdout
        + neon.run("storage", "show", "zcloud", "--json").stdout
    )
    assert "topsecret" not in everything and "hushhush" not in everything
    assert neon.json("storage", "show", "s3tank")["secrets"] == ["secret_access_key"]
    assert "(stored, not shown)" in neon.run("storage", "show", "zcloud").stdout

    # Secrets and the registry are private to the owner.
    for path in [*(neon.home / "secrets").iterdir(), neon.home / "registry.db"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert b"topsecret" not in (neon.home / "registry.db").read_bytes()

    # A node in the custom storage pins it.
    neon.run("pg", "create", "--no-start", "-s", "local.compr")
    assert (custom / "pgdata1" / "PG_VERSION").exists()
    assert "used by primary1" in neon.fail("storage", "detach", "local.compr")
    assert "cannot be detached" in neon.fail("storage", "detach", "local")
    assert "not a native" in neon.fail("pg", "create", "-s", "s3tank").replace(
        "is of type s3; nodes live in a native", "not a native"
    )
    neon.run("storage", "detach", "zcloud")
    assert not (neon.home / "secrets" / "storage.zcloud.token").exists()
    neon.run("pg", "destroy", "--yes", "primary1")
    neon.run("storage", "detach", "local.compr")
    assert [s["name"] for s in neon.json("storage", "list")] == ["local", "s3tank"]
    assert "already exists" in neon.fail(
        "storage", "attach", "-n", "s3tank", "-c", f"path={custom}"
    )


@pytest.mark.parametrize("mode", ["smart", "fast", "immediate"])
def test_stop_modes(neon: NeonCli, mode: str) -> None:
    neon.run("pg", "create")
    pid = neon.json("pg", "show", "primary1")["pid"]
    neon.run("pg", "stop", "-m", mode, "primary1")
    wait_gone(pid)
    assert neon.json("pg", "show", "primary1")["state"] == "stopped"
    assert "was not running" in neon.run("pg", "stop", "primary1").stdout
    neon.run("pg", "start", "primary1")
    assert neon.json("pg", "show", "primary1")["state"] == "running"


def test_default_port_follows_pgport(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGPORT", raising=False)
    assert default_port() == 5432
    monkeypatch.setenv("PGPORT", "6543")
    assert default_port() == 6543
    monkeypatch.setenv("PGPORT", "65536")
    with pytest.raises(InvalidArgument, match="PGPORT='65536' is not a port"):
        default_port()
