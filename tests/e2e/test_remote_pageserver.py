"""Another home's running pageserver as a remote storage (issue 13 item 3): home A attaches
home B's pageserver (`-t remote -c url=neon://HOST:PORT -c token=@B's token file`) and pushes
and pulls snapshots through its proto port; a wrong token is refused; with B serving TLS
(a self-signed certificate made here) A reaches it with -c tls=on -c ca=CERT, and keeps a
PITR area there that a third home attaches and extracts from."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pg15.lsn import format_lsn
from tests.e2e.test_disk_full import mounted
from tests.neoncli import NeonCli, free_port, psql
from tests.pgtest import pg_reachable_tmpdir
from tests.tls import self_signed

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
    data on A; a delta is sent on what B holds; a wrong token is refused before any byte
    (push, pull, and a PITR area, which is then not created)."""
    a, b, _base = homes
    c = str(a.json("pg", "show", "pgdata1")["connstr"])
    reference = pg_dump(c)  # unchanged since SNAP was made
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
    refused = a.fail("pitr", "create", "nope", "--pg", "pgdata1", "--storage", "zbad")
    assert "wrong token" in refused, refused
    assert "nope" not in [x["name"] for x in a.json("pitr", "list")]

    pushed = a.json("snapshot", "push", "--to", "zcloud", SNAP)
    assert pushed["parent"] is None and pushed["bytes_sent"] > 0
    assert "pgdata1-snap1" in [s["name"] for s in b.json("snapshot", "list")]
    assert dump(b, "pgdata1-snap1") == reference

    pulled = a.json("snapshot", "pull", "--from", "zcloud:pgdata1-snap1.neon", "back")
    assert pulled["name"] == "back" and pulled["bytes_received"] > 0
    assert dump(a, "back") == reference

    psql(c, "INSERT INTO t SELECT g, 'later' FROM generate_series(2001, 2100) g")
    a.run("snapshot", "create", "pgdata1@snap2")
    delta = a.json("snapshot", "push", "--to", "zcloud", "pgdata1@snap2")
    assert delta["parent"] == SNAP and delta["bytes_sent"] < pushed["bytes_sent"] / 2
    assert "pgdata1-snap2" in [s["name"] for s in b.json("snapshot", "list")]


def wait_uploaded(neon: NeonCli, storage: str, area: str, lsn: int) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        shown = neon.json("storage", "show", storage)
        [status] = [u for u in shown["uploads"] if u["area"] == area]
        if int(status["remote_lsn"]) >= lsn:
            return {**status, "used_bytes": shown["used_bytes"]}
        assert time.monotonic() < deadline, f"not uploaded to {format_lsn(lsn)}: {status}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def tls_b(homes: tuple[NeonCli, NeonCli, Path]) -> Path:
    """B's pageserver restarted with a self-signed certificate (NEON_TLS_CERT/KEY); A attaches
    it as ztls with -c tls=on -c ca=CERT. The certificate's path is returned."""
    a, b, base = homes
    cert, key = self_signed(base / "tls")
    b.run("pageserver", "stop")
    NeonCli(b.home, {"NEON_TLS_CERT": str(cert), "NEON_TLS_KEY": str(key)}).run(
        "pageserver", "start"
    )
    a.run("storage", "attach", "-t", "remote", "-n", "ztls", "-c", f"url={b_url(b)}",
          "-c", f"token=@{b_token(b)}", "-c", "tls=on", "-c", f"ca={cert}")  # fmt: skip
    return cert


def test_tls_to_a_remote_pageserver(homes: tuple[NeonCli, NeonCli, Path], tls_b: Path) -> None:
    """With TLS the push goes through and B's own CLI still reaches its daemon (it trusts the
    certificate the daemon serves); a plain connection, or TLS without the CA that signed the
    certificate, is refused before the token is sent."""
    a, b, _base = homes
    assert "tls" not in [s["name"] for s in b.json("snapshot", "list")]  # B's CLI reaches it
    pushed = a.json("snapshot", "push", "--to", "ztls:tls.neon", SNAP)
    assert pushed["bytes_sent"] > 0 and "tls" in [s["name"] for s in b.json("snapshot", "list")]
    a.run("storage", "attach", "-t", "remote", "-n", "zplain",
          "-c", f"url={b_url(b)}", "-c", f"token=@{b_token(b)}")  # fmt: skip
    refused = a.fail("snapshot", "push", "--to", "zplain:plain.neon", SNAP)
    assert "closed the connection during the hello" in refused and "tls=on" in refused
    a.run("storage", "attach", "-t", "remote", "-n", "znoca", "-c", f"url={b_url(b)}",
          "-c", f"token=@{b_token(b)}", "-c", "tls=on")  # fmt: skip
    refused = a.fail("snapshot", "push", "--to", "znoca:noca.neon", SNAP)
    assert "certificate that does not verify" in refused and "-c ca=PATH" in refused
    # A CLI using B's pageserver for everything (--pageserver), over TLS with NEON_TLS_CA.
    token = b_token(b).read_text().strip()
    remote = {"NEON_PAGESERVER": b_url(b), "NEON_TOKEN": token}
    there = NeonCli(a.home, {**remote, "NEON_TLS_CA": str(tls_b)}).json("snapshot", "list")
    assert "tls" in [s["name"] for s in there]
    assert "closed the connection" in NeonCli(a.home, remote).fail("snapshot", "list")


def test_a_pitr_area_kept_by_a_remote_pageserver(
    homes: tuple[NeonCli, NeonCli, Path], tls_b: Path
) -> None:
    """`pitr create --storage ztls` on A: its history (layers, WAL, index with checksums,
    lease) goes to B's pageserver over TLS; a third, fresh home attaches it and extracts at
    an uploaded LSN: the same data as A's snapshot at that LSN."""
    a, b, base = homes
    fresh = NeonCli(base / "c", {})
    try:
        a.run("pitr", "create", "zarea", "--pg", "pgdata1", "--storage", "ztls")
        c = str(a.json("pg", "show", "pgdata1")["connstr"])
        psql(c, "CREATE TABLE p AS SELECT g AS id, repeat('x', 200) AS v "
                "FROM generate_series(1, 20000) g")  # fmt: skip
        mark = a.json("snapshot", "create", "pgdata1@mark")
        at_mark = pg_dump(c)  # what the snapshot holds: nothing is written in between
        psql(c, "SELECT pg_switch_wal(); CHECKPOINT;")
        status = wait_uploaded(a, "ztls", "zarea", int(mark["lsn"]))
        assert status["last_error"] is None and status["generation"] == 1
        assert status["used_bytes"] == status["remote_bytes"] > 0
        kept = b.home / "pageserver" / "objects" / "pitr" / "zarea"
        assert (kept / "index.json").is_file() and (kept / "lease.json").is_file()

        fresh.run("storage", "attach", "-t", "remote", "-n", "zcloud", "-c", f"url={b_url(b)}",
                  "-c", f"token=@{b_token(b)}", "-c", "tls=on", "-c", f"ca={tls_b}")  # fmt: skip
        areas = {x["name"]: x for x in fresh.json("pitr", "list")}
        assert areas["zarea"]["storage"] == "zcloud"
        fresh.json(
            "pitr", "extract-snapshot", "zarea", "--lsn", format_lsn(int(mark["lsn"])),
            "--as", "back",
        )  # fmt: skip
        assert dump(fresh, "pgdata1@back") == at_mark
    finally:
        fresh.cleanup()
        a.run("pitr", "destroy", "zarea", check=False)


def test_a_remote_pageserver_whose_disk_fills(homes: tuple[NeonCli, NeonCli, Path]) -> None:
    """Issue 12's "remote disk full" for a pageserver attached as a remote storage: a home
    whose default storage is on a tmpfs too small for the push. The pusher's one line names
    the pageserver's URL (not its token) and what to do; nothing is left there (no
    snapshot, timeline, work directory or kept bytes), and it names no path of the
    pageserver's (its own log does); the tmpfs remounted bigger, the same push goes
    through."""
    a, _b, base = homes
    full = NeonCli(base / "full", {})
    full.run("storage", "list")  # the home, its default storage empty but for its marker
    storage = full.home / "storage" / "local"
    [marker] = storage.iterdir()
    kept = marker.read_bytes()
    with mounted(["-t", "tmpfs", "-o", "size=6m,mode=0711", "tmpfs"], storage):
        try:
            marker.write_bytes(kept)  # the same storage, now on the tmpfs
            marker.chmod(0o600)
            full.run("pageserver", "start")
            token = b_token(full).read_text().strip()
            a.run("storage", "attach", "-t", "remote", "-n", "zfull",
                  "-c", f"url={b_url(full)}", "-c", f"token=@{b_token(full)}")  # fmt: skip
            refused = a.run("snapshot", "push", "--to", "zfull", SNAP, check=False)
            assert refused.returncode == 1 and token not in refused.stderr, refused
            [line] = refused.stderr.splitlines()
            assert line.startswith(f"neon: error: {b_url(full)}/pgdata1@snap1.neon: the receiver's "
                                   "disk is full ("), line  # fmt: skip
            assert "free space in its storage 'local' and push again" in line, line
            assert str(full.home) not in line and "/" not in line.partition("full (")[2], line
            assert [s["name"] for s in full.json("snapshot", "list")] == []
            left = [p.name for p in storage.glob("pagestore/timelines/*")]
            assert left + [p.name for p in storage.glob(".*-*/*")] == [], left
            subprocess.run(["mount", "-o", "remount,size=64m", str(storage)], check=True)
            a.run("snapshot", "push", "--to", "zfull", SNAP)
            assert [s["name"] for s in full.json("snapshot", "list")] == ["pgdata1-snap1"]
            log = (full.home / "pageserver" / "pageserver.log").read_text()
            assert "Traceback" not in log and "the receiver's disk is full" in log, log
            [logged] = [line for line in log.splitlines() if "disk is full" in line]
            cause = logged.rpartition(" [")[2]  # the whole cause: for this side only
            assert cause.endswith("]") and "No space left on device" in cause, logged
        finally:
            a.run("storage", "detach", "zfull", check=False)
            full.cleanup()  # its pageserver, before its storage goes
