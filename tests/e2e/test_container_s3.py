"""Issue 13 item 5: `neon pageserver run` configured by environment variables alone keeps the
followed server's PITR area in S3 (NEON_S3_BUCKET, NEON_S3_ENDPOINT, NEON_S3_PREFIX; the
credentials from AWS's own variables), as docker/compose.yaml runs it beside a MinIO; here the
process runs beside moto's server and a test PostgreSQL. The history reaches the bucket, no
secret is written into the home, and another home reads the area from the bucket alone."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import pytest

from pg15.lsn import format_lsn, parse_lsn
from tests.e2e.test_container import start_container, stop_container
from tests.neoncli import NeonCli
from tests.pgtest import PASSWORD, SUPERUSER, PgTestCluster, free_port, pg_reachable_tmpdir
from tests.s3d import ACCESS_KEY, REGION, SECRET_KEY, MotoS3, moto_s3

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3]:
    with moto_s3() as server:
        yield server


def test_environment_configured_pageserver_keeps_its_history_in_s3(
    neon: NeonCli, pg_cluster: PgTestCluster, s3: MotoS3
) -> None:
    server = pg_cluster.create()
    server.psql(
        "CREATE TABLE t AS SELECT g AS a, md5(g::text) AS b FROM generate_series(1, 5000) g"
    )
    bucket = s3.new_bucket()
    secrets = pg_reachable_tmpdir("neon-container-s3-")
    (secrets / "token").write_text("container-s3-token\n")
    (secrets / "pgpass").write_text(PASSWORD + "\n")
    aws = {k: v for k, v in s3.env().items() if k != "AWS_ENDPOINT_URL"}
    env = {
        **aws,
        "NEON_PORT": str(free_port()),
        "NEON_HTTP_PORT": str(free_port()),
        "NEON_TOKEN_FILE": str(secrets / "token"),
        "NEON_FOLLOW_CONNSTR": f"host=127.0.0.1 port={server.port} user={SUPERUSER}",
        "NEON_FOLLOW_PASSWORD_FILE": str(secrets / "pgpass"),
        "NEON_FOLLOW_NAME": "db",
        "NEON_PITR_TTL": "inf",
        "NEON_S3_BUCKET": bucket,
        "NEON_S3_ENDPOINT": s3.endpoint,
        "NEON_S3_PREFIX": "team",
    }
    home = secrets / "home"
    container = start_container(home, env)
    inside = NeonCli(home, {})
    try:
        deadline = time.monotonic() + 90
        uploads: list[dict[str, object]] = []
        while not uploads:
            assert container.poll() is None, stop_container(container)
            assert time.monotonic() < deadline, "no PITR area uploads to s3"
            time.sleep(0.5)
            shown = inside.run("storage", "show", "s3", "--json", check=False)
            if shown.returncode == 0:
                uploads = list(inside.json("storage", "show", "s3")["uploads"])
        assert [u["area"] for u in uploads] == ["db"]
        server.psql("INSERT INTO t SELECT g, 'late' FROM generate_series(5001, 9000) g")
        lsn = parse_lsn(server.psql("SELECT pg_current_wal_flush_lsn()"))
        server.psql("SELECT pg_switch_wal(); CHECKPOINT;")
        deadline = time.monotonic() + 120
        while True:
            [up] = inside.json("storage", "show", "s3")["uploads"]
            if int(up["remote_lsn"]) >= lsn:
                break
            assert time.monotonic() < deadline, f"not uploaded to {format_lsn(lsn)}: {up}"
            time.sleep(1)
        assert up["last_error"] is None
        keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket)["Contents"]]
        assert "team/pitr/db/index.json" in keys and "team/pitr/db/lease.json" in keys
        assert not list((home / "secrets").glob("storage.s3.*"))  # keys from the environment

        # Another home reads the area from the bucket alone.
        secret = secrets / "s3-secret"
        secret.write_text(SECRET_KEY)
        neon.run(
            "storage", "attach", "-t", "s3", "-n", "s3tank", "-c", f"bucket={bucket}",
            "-c", "prefix=team", "-c", f"endpoint={s3.endpoint}", "-c", f"region={REGION}",
            "-c", f"access_key_id={ACCESS_KEY}", "-c", f"secret_access_key=@{secret}",
        )  # fmt: skip
        [area] = neon.json("pitr", "list")
        assert area["name"] == "db" and area["storage"] == "s3tank"
        assert parse_lsn(area["to"]) >= lsn
    finally:
        err = stop_container(container)
        shutil.rmtree(secrets, ignore_errors=True)
    assert container.returncode == 0, err
    assert "attached db" in err, err
