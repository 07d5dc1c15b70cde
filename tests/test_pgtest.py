from tests.pgtest import PgTestCluster


def test_server_starts_and_answers(pg_cluster: PgTestCluster) -> None:
    server = pg_cluster.create()
    assert server.psql("select 1+1") == "2"
    assert server.psql("show wal_level") == "replica"
    server.stop()
    assert not (server.datadir / "postmaster.pid").exists()
