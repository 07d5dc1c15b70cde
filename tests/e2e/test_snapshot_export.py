"""`neon snapshot export` through the real CLI, on one node snapshot (1000 rows and an index;
500 more rows written after it, so an export of the live state would show): the tar starts
with stock PostgreSQL, the .neon file holds that very tar, the pg_dump restores into an empty
server, the CSV has every row; refusals are one line and leave nothing behind."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli import nodes, postmaster
from cli.pgbin import pg_binary
from datadir_files.pg_account import make_pg_dir, pg_os_user
from pageserver.pid_file import pid_alive
from snapfile import extract_tar
from tests.httpd import file_server
from tests.neoncli import NEON, NeonCli, free_port, psql, run_on_tty
from tests.pgtest import PgTestCluster, PgTestServer, pg_reachable_tmpdir
from tests.s3d import moto_s3
from tests.sshd import SshServer, ssh_server
from tests.tls import self_signed

SNAP = "pgdata1@snap1"
DUMP_KEY = "snapshotexporttest"  # pg_dump 15.18 prints a random \restrict key otherwise
DUMP_FLAGS = (f"--restrict-key={DUMP_KEY}", "--no-owner", "--no-privileges")


@pytest.fixture(scope="module")
def home() -> Iterator[NeonCli]:
    base = pg_reachable_tmpdir("neon-export-")
    neon = NeonCli(base / "home", {})
    try:
        neon.run("pg", "create", "--port", str(free_port()))
        c = str(neon.json("pg", "show", "pgdata1")["connstr"])
        psql(c, "CREATE TABLE t (id int PRIMARY KEY, v text);"
                "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 1000) g;"
                "CREATE INDEX t_v ON t (v)")  # fmt: skip
        neon.run("snapshot", "create", SNAP)
        psql(c, "INSERT INTO t SELECT g, 'later' FROM generate_series(1001, 1500) g")
        yield neon
    finally:
        for pgdata in (neon.home / "snapshot-servers").glob("*/pgdata"):  # a failed test's
            pid = postmaster.running_pid(pgdata)
            if pid is not None:
                os.kill(pid, signal.SIGQUIT)
        neon.cleanup()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def out_dir() -> Iterator[Path]:
    base = pg_reachable_tmpdir("neon-export-out-")
    yield base
    shutil.rmtree(base, ignore_errors=True)


def pg_dump_text(connstr: str) -> str:
    proc = subprocess.run(
        [pg_binary("pg_dump"), *DUMP_FLAGS, "-d", connstr],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def reference_dump(home: NeonCli) -> str:
    """The snapshot's pg_dump, through `snapshot start`."""
    ro = home.run("snapshot", "start", SNAP).stdout.strip()
    try:
        assert psql(ro, "SELECT count(*) FROM t") == "1000"
        return pg_dump_text(ro)
    finally:
        home.run("snapshot", "stop", SNAP)


def export(home: NeonCli, path: Path, *args: str) -> dict[str, object]:
    summary: dict[str, object] = home.json("snapshot", "export", SNAP, "-o", str(path), *args)
    assert not path.with_name(path.name + ".partial").exists()
    return summary


def no_snapshot_server(home: NeonCli) -> bool:
    return "no read-only server" in home.fail("snapshot", "stop", SNAP)


def started_from_tar(cluster: PgTestCluster, tar: Path) -> PgTestServer:
    server = cluster.create_empty()
    make_pg_dir(server.datadir)
    user = pg_os_user()
    as_pg = ["runuser", "-u", user.name, "--"] if user else []
    with tar.open("rb") as stream:
        subprocess.run([*as_pg, "tar", "-x", "-C", str(server.datadir)], stdin=stream, check=True)
    postmaster.write_config(server.datadir, *server.config())
    server.start()
    return server


def test_tar_starts_with_stock_postgres_and_equals_the_snapshot(
    home: NeonCli, out_dir: Path, reference_dump: str, pg_cluster_module: PgTestCluster
) -> None:
    path = out_dir / "snap.tar"
    summary = export(home, path, "--format", "tar")
    snap = home.json("snapshot", "list")
    lsn = next(s["lsn"] for s in snap if s["name"] == SNAP)
    assert summary["format"] == "tar"
    assert summary["path"] == str(path)
    assert summary["bytes"] == path.stat().st_size
    assert summary["lsn"] == lsn
    server = started_from_tar(pg_cluster_module, path)
    try:
        # The snapshot's roles came with it: connect as the node's superuser.
        c = f"host={server.sockdir} port={server.port} user={nodes.SUPERUSER} dbname=postgres"
        assert psql(c, "SELECT count(*), sum(id) FROM t") == "1000|500500"
        assert pg_dump_text(c) == reference_dump
    finally:
        server.stop()


def test_neon_file_holds_the_same_tar(home: NeonCli, out_dir: Path) -> None:
    tar_path, neon_path = out_dir / "same.tar", out_dir / "same.neon"
    export(home, tar_path, "--format", "tar")
    summary = export(home, neon_path)  # the default format
    assert summary["format"] == "neon"
    assert summary["bytes"] == neon_path.stat().st_size
    got = io.BytesIO()
    with neon_path.open("rb") as inp:
        manifest, _checksums = extract_tar(inp, got, label=neon_path.name)
    tar = tar_path.read_bytes()
    # Byte-identical: the basebackup's time is pinned to the snapshot's creation time.
    assert got.getvalue() == tar
    assert manifest.lsn == summary["lsn"]
    assert manifest.source == SNAP
    assert manifest.pg_version == 15 and manifest.pg_timeline == 1
    created = next(s["created_at"] for s in home.json("snapshot", "list") if s["name"] == SNAP)
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        assert {m.mtime for m in archive.getmembers()} == {int(created)}
        control = archive.extractfile("global/pg_control")
        assert control is not None
        (sysid,) = struct.unpack_from("<Q", control.read())
    assert manifest.system_identifier == sysid
    # To stdout as well, the same bytes but for the manifest's creation time.
    proc = subprocess.run(
        [NEON, "snapshot", "export", SNAP, "--format", "tar", "-o", "-"],
        capture_output=True, env=home.env(), timeout=120, check=True,
    )  # fmt: skip
    assert proc.stdout == tar


def test_pg_dump_restores_into_an_empty_server(
    home: NeonCli, out_dir: Path, reference_dump: str, pg_cluster_module: PgTestCluster
) -> None:
    path = out_dir / "snap.dump"
    summary = export(home, path, "--format", "pg_dump")
    assert summary["db"] == "postgres"
    assert no_snapshot_server(home)  # the temporary server was stopped
    server = pg_cluster_module.create()
    try:
        with path.open("rb") as dump:  # private to its owner (0600): read here, sent on stdin
            restore = subprocess.run(
                [pg_binary("pg_restore"), "--no-owner", "--no-privileges", "-d", server.dsn()],
                stdin=dump, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
        assert restore.returncode == 0, restore.stderr
        assert pg_dump_text(server.dsn()) == reference_dump
    finally:
        server.stop()


def test_csv_has_every_row(home: NeonCli, out_dir: Path) -> None:
    path = out_dir / "csv"
    summary = export(home, path, "--format", "csv")
    assert [t["file"] for t in summary["tables"]] == ["public.t.csv"]  # type: ignore[attr-defined]
    assert sorted(p.name for p in path.iterdir()) == ["public.t.csv"]
    lines = (path / "public.t.csv").read_text().splitlines()
    assert lines[0] == "id,v" and len(lines) == 1001
    assert no_snapshot_server(home)
    # --table, into a directory replaced with --force.
    export(home, path, "--format", "csv", "--table", "public.t", "--force")
    assert len((path / "public.t.csv").read_text().splitlines()) == 1001


def test_refusals_are_one_line_and_leave_nothing(home: NeonCli, out_dir: Path) -> None:
    target = out_dir / "refused.neon"
    assert "does not exist" in home.fail("snapshot", "export", "pgdata1@nosuch", "-o", str(target))
    assert not target.exists() and not target.with_name("refused.neon.partial").exists()

    target.write_text("keep me")
    message = home.fail("snapshot", "export", SNAP, "-o", str(target))
    assert "already exists" in message and "--force" in message
    assert target.read_text() == "keep me"
    assert not target.with_name("refused.neon.partial").exists()

    csv_dir = out_dir / "refused-csv"
    message = home.fail("snapshot", "export", SNAP, "--format", "csv", "-o", str(csv_dir),
                        "--table", "nosuch")  # fmt: skip
    assert "nosuch" in message and "does not exist" in message
    assert not csv_dir.exists() and not csv_dir.with_name("refused-csv.partial").exists()
    message = home.fail("snapshot", "export", SNAP, "--format", "pg_dump", "-o",
                        str(out_dir / "x.dump"), "--db", "nosuch")  # fmt: skip
    assert "'nosuch' does not exist" in message and "postgres" in message
    assert not (out_dir / "x.dump").exists() and not (out_dir / "x.dump.partial").exists()
    assert no_snapshot_server(home)
    assert json.loads(home.run("snapshot", "list", "--json").stdout)  # the home still works


def test_several_databases_need_db(home: NeonCli, out_dir: Path) -> None:
    c = str(home.json("pg", "show", "pgdata1")["connstr"])
    psql(c, "CREATE DATABASE app")
    psql(c, "CREATE DATABASE app2")
    psql(c, "CREATE TABLE a (x int); INSERT INTO a SELECT generate_series(1, 7)", dbname="app")
    home.run("snapshot", "create", "pgdata1@dbs")
    path = out_dir / "dbs.dump"
    message = home.fail("snapshot", "export", "pgdata1@dbs", "--format", "pg_dump", "-o", str(path))
    assert "app, app2, postgres" in message and "--db" in message
    assert not path.exists() and not (out_dir / "dbs.dump.partial").exists()
    csv = out_dir / "app-csv"
    home.run("snapshot", "export", "pgdata1@dbs", "--format", "csv", "--db", "app", "-o", str(csv))
    assert (csv / "public.a.csv").read_text().splitlines() == ["x", *map(str, range(1, 8))]


@contextlib.contextmanager
def small_tmpfs(where: Path) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_disk_is_one_line_and_leaves_nothing(
    home: NeonCli, out_dir: Path, sshd: SshServer
) -> None:
    """An export, and a push to a directory or over ssh, onto a full disk: one line, nothing
    visible (a push keeps its hidden partial file, to resume)."""
    with small_tmpfs(out_dir / "full") as full:
        for fmt in ("tar", "neon"):
            target = full / f"snap.{fmt}"
            message = home.fail("snapshot", "export", SNAP, "--format", fmt, "-o", str(target))
            assert "No space left on device" in message and str(target) in message
            assert list(full.iterdir()) == []
        pushing = with_env(home, sshd.env())
        for url in (f"{full}/", sshd.url(f"{full}/")):
            message = pushing.fail("snapshot", "push", "--to", url, SNAP)
            assert "No space left on device" in message, message
            assert [p.name for p in full.iterdir() if not p.name.startswith(".")] == []


def test_sigint_stops_the_temporary_server(home: NeonCli, out_dir: Path) -> None:
    target = out_dir / "interrupted.dump"
    server_dir = home.home / "snapshot-servers" / "pgdata1_snap1"
    proc = subprocess.Popen(
        [NEON, "snapshot", "export", SNAP, "--format", "pg_dump", "-o", str(target)],
        env=home.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    # Interrupt as soon as the postmaster has written its PID: the export of this small
    # snapshot can end within a fraction of a second of the server being ready, so waiting
    # longer raced the export's own clean-up (the PID file was already gone).
    pid_file = server_dir / "pgdata" / "postmaster.pid"
    deadline = time.monotonic() + 60
    pid = 0
    while not pid:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the temporary server never started"
        try:
            first = pid_file.read_text().split("\n", 1)
        except FileNotFoundError:
            first = []
        if len(first) == 2 and first[0].isdigit():  # the line is whole once it ends
            pid = int(first[0])
        else:
            time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert not pid_alive(pid)
    assert "Traceback" not in err
    assert not server_dir.exists()
    assert no_snapshot_server(home)
    assert not target.exists() and not (out_dir / "interrupted.dump.partial").exists()


def test_progress_on_a_tty_only(home: NeonCli, out_dir: Path) -> None:
    code, shown = run_on_tty(home, "snapshot", "export", SNAP, "-o", str(out_dir / "tty.neon"))
    assert code == 0, shown
    assert f"Exporting {SNAP}" in shown and "B/s" in shown
    code, shown = run_on_tty(
        home, "snapshot", "export", SNAP, "-o", str(out_dir / "quiet.neon"), "--json"
    )
    assert code == 0 and shown == ""
    proc = home.run("snapshot", "export", SNAP, "--format", "tar", "-o", str(out_dir / "p.tar"))
    assert proc.stderr == "" and proc.stdout == ""  # no TTY: quiet


# push and pull (issue 12): the snapshot's .neon file to another place and back as a snapshot


@pytest.fixture(scope="module")
def sshd() -> Iterator[SshServer]:
    with ssh_server() as server:
        yield server


def with_env(home: NeonCli, env: dict[str, str]) -> NeonCli:
    """The same NEON_HOME, with more environment (NEON_SSH_COMMAND)."""
    return NeonCli(home.home, {**home.env_extra, **env})


def snapshot_dump(home: NeonCli, name: str) -> str:
    ro = home.run("snapshot", "start", name).stdout.strip()
    try:
        return pg_dump_text(ro)
    finally:
        home.run("snapshot", "stop", name)


def test_push_then_pull_through_a_directory(
    home: NeonCli, out_dir: Path, reference_dump: str
) -> None:
    dest = out_dir / "pushed"
    dest.mkdir()
    summary = home.json("snapshot", "push", "--to", f"{dest}/", SNAP)
    path = dest / "pgdata1@snap1.neon"
    assert summary["url"] == str(path) and os.listdir(dest) == [path.name]
    assert summary["bytes_sent"] == path.stat().st_size < summary["snapshot_bytes"]
    assert summary["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    error = home.fail("snapshot", "push", "--to", f"{dest}/", SNAP)
    assert f"{path} already exists" in error and "--force" in error
    home.run("snapshot", "push", "--to", f"file://{path}", SNAP, "--force")
    assert os.listdir(dest) == [path.name]
    pulled = home.json("snapshot", "pull", "--from", f"file://{path}")
    try:
        assert pulled["name"] == "pgdata1-snap1"  # '@' is for node snapshots
        assert pulled["bytes_received"] == path.stat().st_size
        for key in ("sha256", "file_bytes", "snapshot_bytes"):  # the pushed file's, as push said
            assert pulled[key] == summary[key], key
        assert snapshot_dump(home, "pgdata1-snap1") == reference_dump
    finally:
        home.run("snapshot", "destroy", "pgdata1-snap1")


def test_push_over_ssh_then_pull_over_http_with_a_cut(
    home: NeonCli, out_dir: Path, reference_dump: str, sshd: SshServer
) -> None:
    dest = out_dir / "over-ssh"
    dest.mkdir()
    url = sshd.url(f"{dest}/x.neon")
    out = with_env(home, sshd.env()).run("snapshot", "push", "--to", url, SNAP).stdout
    assert out.startswith(f"Pushed {SNAP} to {url}: ") and " sent for " in out, out
    assert os.listdir(dest) == ["x.neon"]
    with file_server(dest) as server:
        server.cut_gets.append(100_000)  # the network drops once: the pull resumes
        out = home.run("snapshot", "pull", "--from", server.url("x.neon"), "overhttp").stdout
        gets = [r[2] for r in server.requests if r[0] == "GET"]
    try:
        assert out.startswith(f"Pulled {server.url('x.neon')} as snapshot overhttp: "), out
        # It resumes from what reached its spool: the bytes read before the cut was seen
        # (the client may drop what it had buffered but not read yet, on a busy machine).
        assert len(gets) == 2 and gets[0] is None, gets
        resumed = re.fullmatch(r"bytes=(\d+)-", gets[1] or "")
        assert resumed is not None and 0 < int(resumed.group(1)) <= 100_000, gets
        assert snapshot_dump(home, "overhttp") == reference_dump
    finally:
        home.run("snapshot", "destroy", "overhttp")


def test_push_and_pull_over_https(home: NeonCli, out_dir: Path) -> None:
    """https:// is http over TLS: a certificate SSL_CERT_FILE trusts takes the push and serves
    the pull (the same file back); one it does not is one line saying what to set."""
    dest = out_dir / "over-https"
    dest.mkdir()
    cert, key = self_signed(out_dir / "tls")
    with file_server(dest, tls=(cert, key)) as server:
        url = server.url("x.neon")
        refused = home.fail("snapshot", "push", "--to", url, SNAP)
        assert "certificate of 127.0.0.1 is not trusted" in refused and "SSL_CERT_FILE" in refused
        assert os.listdir(dest) == []
        trusting = with_env(home, {"SSL_CERT_FILE": str(cert)})
        pushed = trusting.json("snapshot", "push", "--to", url, SNAP)
        pulled = trusting.json("snapshot", "pull", "--from", url, "overhttps")
        missing = trusting.fail("snapshot", "pull", "--from", server.url("gone.neon"))
        assert "no such file on the server (HTTP 404)" in missing, missing
    try:
        assert pulled["sha256"] == pushed["sha256"] == file_sha256(dest / "x.neon")
        assert pulled["name"] == "overhttps"
    finally:
        home.run("snapshot", "destroy", "overhttps")


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_push_then_pull_over_s3(home: NeonCli, reference_dump: str) -> None:
    """s3:// against moto's server on 127.0.0.1: credentials from the AWS environment
    variables, the endpoint from --endpoint-url."""
    with moto_s3() as server:
        bucket = server.new_bucket()
        env = {k: v for k, v in server.env().items() if k != "AWS_ENDPOINT_URL"}
        s3home = with_env(home, env)
        endpoint = ("--endpoint-url", server.endpoint)
        summary = s3home.json("snapshot", "push", "--to", f"s3://{bucket}/snaps/", SNAP, *endpoint)
        key = "snaps/pgdata1@snap1.neon"
        assert summary["url"] == f"s3://{bucket}/{key}"
        body = server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
        assert summary["bytes_sent"] == len(body) < summary["snapshot_bytes"]
        assert summary["sha256"] == hashlib.sha256(body).hexdigest()
        error = s3home.fail("snapshot", "push", "--to", summary["url"], SNAP, *endpoint)
        assert f"{summary['url']} already exists" in error and "--force" in error
        missing = s3home.fail(
            "snapshot", "push", "--to", "s3://neon-no-bucket/x.neon", SNAP, *endpoint
        )
        assert "S3 bucket neon-no-bucket does not exist (NoSuchBucket)" in missing
        pulled = s3home.json("snapshot", "pull", "--from", summary["url"], "overs3", *endpoint)
    try:
        assert pulled["bytes_received"] == len(body)
        assert snapshot_dump(home, "overs3") == reference_dump
    finally:
        home.run("snapshot", "destroy", "overs3")


def test_push_to_and_pull_from_an_attached_s3_storage(
    home: NeonCli, reference_dump: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--to STORAGE`, `--from STORAGE:NAME`, as git remotes: bucket, prefix, endpoint and
    keys from `neon storage attach -t s3` (the secret from its 0600 file), none from the
    environment, whose keys are wrong; moto checks the keys."""
    import boto3
    import moto.settings

    with moto_s3() as server:
        bucket = server.new_bucket()
        iam = boto3.client(
            "iam", endpoint_url=server.endpoint, region_name="us-east-1",
            aws_access_key_id="admin", aws_secret_access_key="admin",
        )  # fmt: skip
        iam.create_user(UserName="pusher")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*",
                                                          "Resource": "*"}]}  # fmt: skip
        iam.put_user_policy(UserName="pusher", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="pusher")["AccessKey"]
        env = {**server.env(), "AWS_ACCESS_KEY_ID": "wrong", "AWS_SECRET_ACCESS_KEY": "wrong"}
        del env["AWS_ENDPOINT_URL"]
        neon = with_env(home, {**env, "S3_SECRET": key["SecretAccessKey"]})
        attach = ("storage", "attach", "-t", "s3", "-c", f"bucket={bucket}", "-c",
                  "prefix=team/snaps", "-c", f"endpoint={server.endpoint}")  # fmt: skip
        neon.run(*attach, "-n", "zcloud", "-c", f"access_key_id={key['AccessKeyId']}",
                 "-c", "secret_access_key=env:S3_SECRET")  # fmt: skip
        neon.run(*attach, "-n", "zbad", "-c", f"access_key_id={key['AccessKeyId']}",
                 "-c", "secret_access_key=env:AWS_SECRET_ACCESS_KEY")  # fmt: skip
        monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
        try:
            summary = neon.json("snapshot", "push", "--to", "zcloud", SNAP)
            assert summary["url"] == f"s3://{bucket}/team/snaps/pgdata1@snap1.neon"
            error = neon.fail("snapshot", "push", "--to", "zbad:x.neon", SNAP)
            assert "x.neon: S3 refused access (403)" in error and "wrong" not in error
            pulled = neon.json("snapshot", "pull", "--from", "zcloud:pgdata1@snap1.neon", "z1")
            assert pulled["url"] == summary["url"]
            assert pulled["bytes_received"] == summary["bytes_sent"]
            assert snapshot_dump(home, "z1") == reference_dump
        finally:
            monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
            home.run("snapshot", "destroy", "z1", check=False)
            for storage in ("zcloud", "zbad"):
                home.run("storage", "detach", storage, check=False)
        assert [o["Key"] for o in server.client().list_objects_v2(Bucket=bucket)["Contents"]] == [
            "team/snaps/pgdata1@snap1.neon"
        ]


def test_failed_push_and_pull_are_one_line_and_leave_nothing(
    home: NeonCli, out_dir: Path, sshd: SshServer
) -> None:
    before = [s["name"] for s in home.json("snapshot", "list")]
    dest = out_dir / "refused"
    dest.mkdir()
    error = home.fail("snapshot", "push", "--to", "ftp://me:s3cret@host/x.neon", SNAP)
    assert "unknown URL scheme 'ftp'" in error and "s3cret" not in error
    assert "bad port" in home.fail("snapshot", "pull", "--from", "ssh://host:99999/x.neon")
    assert "names a directory" in home.fail("snapshot", "pull", "--from", f"{dest}/")
    unknown_key = with_env(home, {"NEON_SSH_COMMAND": f"ssh -F {sshd.config_without_host_key()}"})
    error = unknown_key.fail("snapshot", "push", "--to", sshd.url(f"{dest}/x.neon"), SNAP)
    assert "host key verification failed" in error
    with file_server(dest) as server:
        server.refuse_puts = 507  # the server's disk is full
        error = home.fail("snapshot", "push", "--to", server.url("x.neon"), SNAP)
    assert "no space left (HTTP 507)" in error
    assert os.listdir(dest) == []
    home.run("snapshot", "push", "--to", str(dest / "good.neon"), SNAP)
    data = (dest / "good.neon").read_bytes()
    (dest / "cut.neon").write_bytes(data[: len(data) // 2])
    error = with_env(home, sshd.env()).fail(
        "snapshot", "pull", "--from", sshd.url(f"{dest}/cut.neon")
    )
    assert re.search(r"cut\.neon is (truncated|corrupt)", error), error
    assert [s["name"] for s in home.json("snapshot", "list")] == before


def test_interrupted_push_leaves_nothing(home: NeonCli, out_dir: Path) -> None:
    """SIGINT while the upload is under way: the PUT's body is never completed, so the server
    keeps nothing, and the command ends with 130."""
    dest = out_dir / "interrupted"
    dest.mkdir()
    with file_server(dest) as server:
        server.hold_puts = True
        proc = subprocess.Popen(
            [NEON, "snapshot", "push", "--to", server.url("x.neon"), SNAP],
            env=home.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert server.put_started.wait(timeout=60), proc.communicate()
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "Traceback" not in err
        deadline = time.monotonic() + 10
        while os.listdir(dest) and time.monotonic() < deadline:  # the handler sees the cut
            time.sleep(0.05)
    assert os.listdir(dest) == []


def test_push_progress_on_a_tty_only(home: NeonCli, out_dir: Path) -> None:
    code, shown = run_on_tty(home, "snapshot", "push", "--to", str(out_dir / "push-tty.neon"), SNAP)
    assert code == 0, shown
    # The tar's size, announced by the daemon: percent and ETA, ending at 100%.
    assert re.search(rf"Pushing {SNAP} .*100% \| .*B/s \| ETA 00:00", shown), shown
    assert not re.search(r"\b(10[1-9]|1[1-9]\d)%", shown), shown
    code, shown = run_on_tty(
        home, "snapshot", "push", "--to", str(out_dir / "push-quiet.neon"), SNAP, "--json"
    )
    assert code == 0 and shown == ""
    # A pull knows the file's size: percent and ETA.
    code, shown = run_on_tty(
        home, "snapshot", "pull", "--from", str(out_dir / "push-tty.neon"), "ttypull"
    )
    try:
        assert code == 0, shown
        assert re.search(r"Pulling ttypull .*100% \| .*B/s \| ETA 00:00", shown), shown
    finally:
        home.run("snapshot", "destroy", "ttypull", check=False)
