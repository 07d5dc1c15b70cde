"""`pg checkout` in place (cli/checkout_delta.py): the delta the pageserver makes from the
node's HEAD to its branch point turns a full extraction at HEAD into, byte for byte, a full
extraction at the branch point; the checked-out node dumps like a server started on the
target; both directions; hints set after the target do not survive; kills at each step of
the in-place path end in one complete state."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cli.checkout_delta import KEEP
from cli.context import App
from cli.pageserver_control import local_api
from cli.secrets import read_secret
from cli.snapshot_file_source import apply_delta_stream
from datadir_files.tar_reader import MemberData, MemberStart
from datadir_files.untar import extract_stream
from pageserver.basebackup.wal_synthesis import normalize_lsn
from pageserver_api.client import PageserverClient
from pageserver_api.models import BasebackupRequest, BasebackupResponse, SnapshotCreateRequest
from pg15.lsn import parse_lsn
from proto.errors import InvalidArgument
from snapfile.delta import FORK_HEADER, delta_tar_reader, fork_path_of, record_size
from snapfile.reader import TarData, read_manifest, read_snapshot_file
from tests.e2e.test_pitr_faithfulness import amcheck, assert_same_dumps, dump_all
from tests.neoncli import NEON, NeonCli, psql

MTIME = 1_700_000_000

BEFORE = """
CREATE EXTENSION amcheck;
CREATE TABLE ins (id int PRIMARY KEY, v text);
INSERT INTO ins SELECT g, 'v' || g FROM generate_series(1, 20000) g;
CREATE TABLE upd (id int PRIMARY KEY, n int);
INSERT INTO upd SELECT g, 0 FROM generate_series(1, 20000) g;
CREATE TABLE dropped AS SELECT generate_series(1, 5000) a;
CREATE TABLE truncated (a int PRIMARY KEY);
INSERT INTO truncated SELECT generate_series(1, 5000);
CREATE TABLE vf (id int PRIMARY KEY, pad text);
INSERT INTO vf SELECT g, repeat('x', 100) FROM generate_series(1, 10000) g;
DELETE FROM vf WHERE id % 2 = 0;
CREATE UNLOGGED TABLE ul AS SELECT generate_series(1, 1000) a;
CREATE TABLE hinted (id int PRIMARY KEY, v int);
INSERT INTO hinted SELECT g, g FROM generate_series(1, 20000) g;
VACUUM ANALYZE;
"""

AFTER = """
INSERT INTO ins SELECT g, 'w' || g FROM generate_series(20001, 25000) g;
UPDATE upd SET n = n + 1 WHERE id % 50 = 0;
DROP TABLE dropped;
TRUNCATE truncated;
INSERT INTO truncated VALUES (-1);
VACUUM FULL vf;
INSERT INTO ul SELECT generate_series(1, 500);
DELETE FROM hinted WHERE id BETWEEN 100 AND 300;
CREATE DATABASE db2;
"""

# After the delete commits, index scans mark its index entries dead (LP_DEAD, a hint no WAL
# record carries without wal_log_hints): they must not survive a checkout to before it.
HINT_SCANS = """
SET enable_seqscan = off; SET enable_bitmapscan = off;
SELECT count(*) FROM hinted WHERE id BETWEEN 1 AND 20000;
SELECT count(*) FROM hinted WHERE id BETWEEN 1 AND 20000;
"""

INDEX_COUNT = """
SET enable_seqscan = off; SET enable_bitmapscan = off;
SELECT count(*) FROM hinted WHERE id BETWEEN 100 AND 300;
"""


def connstr(neon: NeonCli, node: str = "pgdata1") -> str:
    return str(neon.json("pg", "show", node)["connstr"])


def datadir(neon: NeonCli) -> Path:
    return Path(neon.json("pg", "show", "pgdata1")["datadir"])


_UNLOGGED_DATA = re.compile(r"^--\n-- Data for Name: ul; .*?\n\\\.\n\n\n", re.M | re.S)


def node_dumps(c: str) -> dict[str, str]:
    """dump_all of the node without the unlogged table's (empty) data, which a read-only
    server started on a snapshot, in recovery, does not dump."""
    return {db: _UNLOGGED_DATA.sub("", text) for db, text in dump_all(c).items()}


def started_dumps(neon: NeonCli, snapshot: str) -> dict[str, str]:
    started = neon.json("snapshot", "start", snapshot)
    try:
        return dump_all(started["connstr"])
    finally:
        neon.run("snapshot", "stop", snapshot)


def download(app: App, request: BasebackupRequest, target: Path) -> BasebackupResponse:
    async def fetch(client: PageserverClient) -> BasebackupResponse:
        async with client.basebackup(request) as stream:
            await extract_stream(stream.__aiter__(), target)
        return stream.result

    return local_api(app).run(fetch)


def download_file(app: App, request: BasebackupRequest, target: Path) -> BasebackupResponse:
    async def fetch(client: PageserverClient) -> BasebackupResponse:
        with target.open("wb") as f:
            async with client.basebackup(request) as stream:
                async for chunk in stream:
                    f.write(chunk)
        return stream.result

    return local_api(app).run(fetch)


def files(root: Path) -> dict[str, bytes]:
    out = {}
    for top, _dirs, names in os.walk(root):
        for name in names:
            path = Path(top) / name
            out[path.relative_to(root).as_posix()] = path.read_bytes()
    return out


def assert_delta_equals_full(neon: NeonCli, head: str, work: Path) -> dict[str, tuple[int, int]]:
    """A full extraction at `head` with the checkout delta applied equals a full extraction
    of the node's branch point, file by file; the delta's forks (`fork_pages`)."""
    app = App.open(neon.home)
    full, patched, delta = work / "full", work / "patched", work / "delta.neon"
    download(app, BasebackupRequest(node_id="primary1", mtime=MTIME), full)
    download(app, BasebackupRequest(snapshot=head, mtime=MTIME), patched)
    request = BasebackupRequest(
        node_id="primary1", snapshot_file=True, checkout_from=head, hints_logged_from=0,
        mtime=MTIME,
    )  # fmt: skip
    result = download_file(app, request, delta)
    assert result.parent == head
    with delta.open("rb") as f:
        manifest = read_manifest(f)

    async def chunks():  # type: ignore[no-untyped-def]
        yield delta.read_bytes()

    asyncio.run(apply_delta_stream(chunks(), "delta", patched, manifest, keep=KEEP))
    want, got = files(full), files(patched)
    assert sorted(got) == sorted(want)
    differ = [name for name in want if want[name] != got[name]]
    assert differ == []
    return fork_pages(delta)


def fork_pages(delta: Path) -> dict[str, tuple[int, int]]:
    """(pages carried, blocks) of each relation fork member of a delta `.neon` file, by the
    fork's relation file path."""
    reader = delta_tar_reader()  # a delta file: its WAL segment is sparse
    heads: dict[str, tuple[int, bytearray]] = {}
    current: str | None = None
    with delta.open("rb") as f:
        for event in read_snapshot_file(f):
            if not isinstance(event, TarData):
                continue
            for item in reader.feed(event.data):
                if isinstance(item, MemberStart):
                    current = fork_path_of(item.name)
                    if current is not None:
                        heads[current] = (item.size, bytearray())
                elif isinstance(item, MemberData) and current is not None:
                    heads[current][1].extend(item.data[: FORK_HEADER.size - len(heads[current][1])])
    out = {}
    for path, (size, head) in heads.items():
        _magic, _page_size, nblocks = FORK_HEADER.unpack(bytes(head))
        out[path] = ((size - FORK_HEADER.size) // record_size(), nblocks)
    return out


def relation_path(c: str, table: str, dbname: str | None = None) -> str:
    return psql(c, f"SELECT pg_relation_filepath('{table}')", dbname=dbname)


def test_checkout_in_place_equals_full_extraction_both_ways(neon: NeonCli, tmp_path: Path) -> None:
    neon.run("pg", "create")
    c = connstr(neon)
    psql(c, BEFORE)
    neon.run("snapshot", "create", "pgdata1@s1")
    psql(c, AFTER)
    psql(c, "CREATE TABLE x AS SELECT generate_series(1, 3000) a", dbname="db2")
    assert psql(c, HINT_SCANS).splitlines() == ["19799", "19799"]
    live = node_dumps(c)
    inode = datadir(neon).stat().st_ino
    # Held open: deleted meanwhile, the old pg_wal's inode number was free for the new one.
    old_wal = os.open(datadir(neon) / "pg_wal", os.O_RDONLY | os.O_DIRECTORY)
    try:
        neon.run("pg", "checkout", "pgdata1@s1")
        assert datadir(neon).stat().st_ino == inode, "the directory was rebuilt, not patched"
        # The old pg_wal was set aside whole, the files not in the target too (FSM, VM,
        # stats), and deleted by a process the command did not wait for.
        assert (datadir(neon) / "pg_wal").stat().st_ino != os.fstat(old_wal).st_ino
    finally:
        os.close(old_wal)
    deadline = time.monotonic() + 60
    while list(datadir(neon).parent.glob("pgdata1.*")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(datadir(neon).parent.glob("pgdata1.*"))
    assert psql(c, INDEX_COUNT).splitlines()[-1] == "201"
    assert psql(c, "SELECT count(*) FROM ul") == "0"  # unlogged: empty, as after a crash
    amcheck(c)
    assert_same_dumps(node_dumps(c), started_dumps(neon, "pgdata1@s1"), "back to s1")
    forks = assert_delta_equals_full(neon, "pgdata1@HEAD{0}", tmp_path / "back")
    pages, nblocks = forks[relation_path(c, "ins")]
    assert 0 < pages < nblocks / 4, "an unchanged page of ins was sent"
    assert forks[relation_path(c, "hinted")][0] < 10
    assert forks[relation_path(c, "vf")][0] == forks[relation_path(c, "vf")][1]  # VACUUM FULL

    # Forward again, to the state before the checkout (another timeline now).
    psql(c, "INSERT INTO ins VALUES (-1, 'on timeline 2'); CREATE TABLE t2 (a int)")
    neon.run("pg", "checkout", "pgdata1@HEAD{0}")
    assert datadir(neon).stat().st_ino == inode
    amcheck(c)
    assert psql(c, INDEX_COUNT).splitlines()[-1] == "0"
    assert_same_dumps(node_dumps(c), live, "forward to HEAD{0}")
    forks = assert_delta_equals_full(neon, "pgdata1@HEAD{1}", tmp_path / "forward")
    pages, nblocks = forks[relation_path(c, "ins")]
    assert 0 < pages < nblocks / 3, "an unchanged page of ins was sent"
    psql(c, "INSERT INTO ins VALUES (-2, 'on timeline 3')")
    assert psql(c, "SELECT count(*) FROM ins") == "25001"


def test_checkout_rebuilds_whole_when_hints_were_not_logged(neon: NeonCli) -> None:
    """A run without wal_log_hints (here ALTER SYSTEM) leaves hints no WAL shows: the next
    checkout rebuilds the directory whole (a new inode), and is right."""
    neon.run("pg", "create")
    c = connstr(neon)
    psql(c, BEFORE)
    neon.run("snapshot", "create", "pgdata1@s1")
    psql(c, "ALTER SYSTEM SET wal_log_hints = off")
    neon.run("pg", "stop", "pgdata1")
    neon.run("pg", "start", "pgdata1")
    psql(c, AFTER)
    psql(c, HINT_SCANS)
    inode = datadir(neon).stat().st_ino
    neon.run("pg", "checkout", "pgdata1@s1")
    assert datadir(neon).stat().st_ino != inode
    assert psql(c, INDEX_COUNT).splitlines()[-1] == "201"


def on_branch_checkpoint(c: str, snapshot_lsn: int) -> bool:
    """Whether the server started on the checkpoint the delta brought (at the branch point:
    wal_synthesis.normalize_lsn), not on a later one a single-user run wrote at its shutdown.
    (Comparing the slot's restart_lsn with the checkpoint's redo said it too, but only until
    the pageserver's first feedback moved the slot on: under load that raced the query.)"""
    checkpoint = parse_lsn(psql(c, "SELECT checkpoint_lsn FROM pg_control_checkpoint()"))
    return checkpoint == normalize_lsn(snapshot_lsn, 16 << 20)


def test_checkout_in_place_sets_the_roles_only_where_pg_authid_changed(neon: NeonCli) -> None:
    """The single-user step that sets the node's passwords runs when the delta changed
    pg_authid (back to a snapshot taken with another password, the node's own is set again);
    otherwise the node's slot is written as a file and the server starts on the branch
    point's own checkpoint (no single-user run wrote a later one)."""
    neon.run("pg", "create")
    c = connstr(neon)
    tcp = str(neon.json("pg", "show", "pgdata1")["tcp_connstr"])
    secret = read_secret(neon.home / "secrets" / "node.primary1.superuser")
    psql(c, "ALTER ROLE neon PASSWORD 'not-the-nodes'; CREATE TABLE t (a int)")
    other = int(neon.json("snapshot", "create", "pgdata1@other_password")["lsn"])
    psql(c, f"ALTER ROLE neon PASSWORD '{secret}'; INSERT INTO t VALUES (1)")
    inode = datadir(neon).stat().st_ino

    neon.run("pg", "checkout", "pgdata1@other_password")
    assert datadir(neon).stat().st_ino == inode
    assert psql(tcp, "SELECT count(*) FROM t") == "0"  # the node's password, over TCP
    assert not on_branch_checkpoint(c, other)  # the single-user run's checkpoint

    same = int(neon.json("snapshot", "create", "pgdata1@same_roles")["lsn"])
    psql(c, "INSERT INTO t SELECT generate_series(1, 50000)")
    neon.run("pg", "checkout", "pgdata1@same_roles")
    assert datadir(neon).stat().st_ino == inode
    assert on_branch_checkpoint(c, same)
    assert psql(tcp, "SELECT count(*) FROM t") == "0"
    # The written slot holds the WAL for the pageserver: it follows the node on.
    psql(c, "INSERT INTO t VALUES (2)")
    neon.run("snapshot", "create", "pgdata1@after")
    neon.run("pg", "checkout", "pgdata1@same_roles")
    assert datadir(neon).stat().st_ino == inode
    neon.run("pg", "checkout", "pgdata1@after")
    assert psql(c, "SELECT count(*), max(a) FROM t") == "1|2"


def test_checkouts_after_a_single_user_run_keep_the_roles(neon: NeonCli) -> None:
    """Once the single-user step ran (a role was made since the snapshot), the checkouts
    back to that snapshot after it run it no more: it writes a password only where the role
    holds another verifier (cli/secrets.py scram_verifier), so it left pg_authid as it was.
    Set with new salts each time, it wrote pg_authid at every run, and every later
    checkout's delta changed pg_authid, so it ran again (60-70 ms a checkout)."""
    neon.run("pg", "create")
    c = connstr(neon)
    tcp = str(neon.json("pg", "show", "pgdata1")["tcp_connstr"])
    psql(c, "CREATE TABLE t (a int)")
    s = int(neon.json("snapshot", "create", "pgdata1@s")["lsn"])
    psql(c, "CREATE ROLE someone")
    neon.run("pg", "checkout", "pgdata1@s")
    assert not on_branch_checkpoint(c, s)  # pg_authid changed: the step ran
    assert psql(tcp, "SELECT count(*) FROM pg_roles WHERE rolname = 'someone'") == "0"
    for _ in range(2):
        psql(c, "INSERT INTO t VALUES (1)")
        neon.run("pg", "checkout", "pgdata1@s")
        assert on_branch_checkpoint(c, s)
        assert psql(tcp, "SELECT count(*) FROM t") == "0"  # the node's password, over TCP


@pytest.mark.parametrize("step", ["pgdata1.checkout.applying", "pgdata1.checkout.applied"])
def test_checkout_in_place_killed_rolls_forward(neon: NeonCli, step: str) -> None:
    """Killed while the delta is applied (`.applying` present) or while the node's passwords
    and slot are set (`.applied`): the next command ends in the target, complete."""
    neon.run("pg", "create")
    c = connstr(neon)
    psql(c, "CREATE TABLE t (a int, pad text); CREATE EXTENSION amcheck")
    psql(c, "INSERT INTO t SELECT g, repeat('p', 200) FROM generate_series(1, 100000) g")
    neon.run("snapshot", "create", "pgdata1@s")
    psql(c, "UPDATE t SET a = -a; CREATE INDEX ON t (a)")
    storage = datadir(neon).parent
    proc = subprocess.Popen(
        [NEON, "pg", "checkout", "pgdata1@s"],
        env=neon.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not (storage / step).exists():
        assert proc.poll() is None, f"the checkout ended before it was caught at {step}"
        assert time.monotonic() < deadline
        time.sleep(0.0005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    neon.run("pg", "start", "pgdata1")
    assert psql(c, "SELECT count(*), min(a) FROM t") == "100000|1"
    assert psql(c, "SELECT count(*) FROM pg_indexes WHERE tablename = 't'") == "0"
    amcheck(c)
    left = [p.name for p in storage.iterdir() if p.name.startswith(("pgdata1", ".pgdata1"))]
    assert left == ["pgdata1"]
    psql(c, "INSERT INTO t VALUES (0)")
    neon.run("pg", "checkout", "pgdata1@HEAD{0}")
    assert psql(c, "SELECT count(*), max(a) FROM t") == "100000|-1"


def test_checkout_keeps_the_head_a_killed_run_named(neon: NeonCli) -> None:
    """Killed after naming the stopped node's state `HEAD{0}` but before writing its journal:
    the next checkout takes that snapshot as the directory's state (the node stayed stopped:
    it is) instead of failing on the taken name; in place, and `HEAD{0}` holds that state."""
    neon.run("pg", "create")
    c = connstr(neon)
    psql(c, "CREATE TABLE t AS SELECT generate_series(1, 1000) a")
    neon.run("snapshot", "create", "pgdata1@s")
    psql(c, "INSERT INTO t VALUES (0)")
    neon.run("pg", "stop", "pgdata1")  # waits for the pageserver to take the shutdown checkpoint
    node_id = str(neon.json("pg", "show", "pgdata1")["id"])
    named = local_api(App.open(neon.home), start=False).snapshot_create(
        SnapshotCreateRequest(node_id, "pgdata1@HEAD{0}")
    )
    inode = datadir(neon).stat().st_ino
    neon.run("pg", "checkout", "pgdata1@s")
    assert datadir(neon).stat().st_ino == inode
    assert psql(c, "SELECT count(*) FROM t") == "1000"
    heads = [s for s in neon.json("snapshot", "list") if s["name"] == "pgdata1@HEAD{0}"]
    assert [h["lsn"] for h in heads] == [named.lsn]
    neon.run("pg", "checkout", "pgdata1@HEAD{0}")
    assert psql(c, "SELECT count(*), min(a) FROM t") == "1001|0"


def test_checkout_delta_request_is_checked() -> None:
    ok = BasebackupRequest(
        node_id="primary1", snapshot_file=True, checkout_from="pgdata1@HEAD{0}",
        hints_logged_from=0,
    )  # fmt: skip
    assert ok.checkout_from == "pgdata1@HEAD{0}"
    for bad in (
        {"node_id": "primary1", "checkout_from": "p@HEAD{0}"},
        {"node_id": "primary1", "checkout_from": "p@HEAD{0}", "delta_from": ["p@s"],
         "hints_logged_from": 0},
        {"snapshot": "p@s", "snapshot_file": True, "checkout_from": "p@HEAD{0}",
         "hints_logged_from": 0},
    ):  # fmt: skip
        with pytest.raises(InvalidArgument, match="checkout_from applies"):
            BasebackupRequest(**bad)  # type: ignore[arg-type]
