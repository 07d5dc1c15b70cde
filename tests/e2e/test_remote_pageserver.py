"""Another home's running pageserver as a remote storage (issue 13 item 3): home A attaches
home B's pageserver (`-t remote -c url=neon://HOST:PORT -c token=@B's token file`) and pushes
and pulls snapshots through its proto port; a wrong token is refused."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.neoncli import NeonCli, free_port, psql
from tests.pgtest import pg_reachable_tmpdir

SNAP = "pgdata1@snap1"
DUMP_KEY = "remotepstest"


@pytest.fixture(scope="module")
def homes() -> Iterator[tuple[NeonCli, NeonCli, Path]]:
    base = pg_reachable_tmpdir("neon-rps-")
    a, b = NeonCli(base / "a", {}), NeonCli(base / "b", {})
    try:
        a.run("pg", "create", "--port", str(free_port()))
        c = str(a.json("pg", "show", "pgdata1")["connstr"])
        psql(c, "CREATE TABLE t (id int PRIMARY KEY, v text);"
                "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 2000) g")  # fmt: skip
        a.run("snapshot", "create", SNAP)
        b.run("pageserver", "start")
        yield a, b, base
    finally:
        b.cleanup()
        a.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def b_url(b: NeonCli) -> str:
    return f"neon://127.0.0.1:{b.json('pageserver', 'status')['proto_port']}"


def b_token(b: NeonCli) -> Path:
    return b.home / "secrets" / "pageserver.token"


def pg_dump(connstr: str) -> str:
    proc = subprocess.run(
        ["pg_dump", f"--restrict-key={DUMP_KEY}", "--no-owner", "-d", connstr],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return proc.stdout


def dump(neon: NeonCli, snapshot: str) -> str:
    ro = neon.run("snapshot", "start", snapshot).stdout.strip()
    try:
        return pg_dump(ro)
    finally:
        neon.run("snapshot", "stop", snapshot)


def test_push_and_pull_through_a_remote_pageserver(
    homes: tuple[NeonCli, NeonCli, Path], tmp_path: Path
) -> None:
    """push lands as a snapshot of B (its pageserver imported it); pull of it makes the same
    data on A; a delta is sent on what B holds; a wrong token is refused before any byte."""
    a, b, _base = homes
    reference = dump(a, SNAP)
    a.run("storage", "attach", "-t", "remote", "-n", "zcloud",
          "-c", f"url={b_url(b)}", "-c", f"token=@{b_token(b)}")  # fmt: skip
    (tmp_path / "wrong").write_text("not-the-token")
    a.run("storage", "attach", "-t", "remote", "-n", "zbad",
          "-c", f"url={b_url(b)}", "-c", f"token=@{tmp_path / 'wrong'}")  # fmt: skip
    refused = a.fail("snapshot", "push", "--to", "zbad", SNAP)
    assert "wrong token for pg-neon pageserver" in refused, refused
    refused = a.fail("snapshot", "pull", "--from", "zbad:pgdata1-snap1.neon", "nope")
    assert "wrong token" in refused, refused
    assert "pgdata1-snap1" not in [s["name"] for s in b.json("snapshot", "list")]

    pushed = a.json("snapshot", "push", "--to", "zcloud", SNAP)
    assert pushed["parent"] is None and pushed["bytes_sent"] > 0
    assert "pgdata1-snap1" in [s["name"] for s in b.json("snapshot", "list")]
    assert dump(b, "pgdata1-snap1") == reference

    pulled = a.json("snapshot", "pull", "--from", "zcloud:pgdata1-snap1.neon", "back")
    assert pulled["name"] == "back" and pulled["bytes_received"] > 0
    assert dump(a, "back") == reference

    c = str(a.json("pg", "show", "pgdata1")["connstr"])
    psql(c, "INSERT INTO t SELECT g, 'later' FROM generate_series(2001, 2100) g")
    a.run("snapshot", "create", "pgdata1@snap2")
    delta = a.json("snapshot", "push", "--to", "zcloud", "pgdata1@snap2")
    assert delta["parent"] == SNAP and delta["bytes_sent"] < pushed["bytes_sent"] / 2
    assert dump(b, "pgdata1-snap2") == dump(a, "pgdata1@snap2")
