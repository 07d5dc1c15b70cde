import subprocess
import sys
from pathlib import Path

from tests.pgtest import FREE_PORTS_FROM, PGPORT_FROM, PGPORT_SLOT, PgTestCluster, pgport_base


def test_server_starts_and_answers(pg_cluster: PgTestCluster) -> None:
    server = pg_cluster.create()
    assert server.psql("select 1+1") == "2"
    assert server.psql("show wal_level") == "replica"
    server.stop()
    assert not (server.datadir / "postmaster.pid").exists()


def lines_of_concurrent_processes(expression: str, count: int) -> list[str]:
    """The line each of `count` test processes, alive at once, prints of `expression` (free_port,
    pgport_base): each holds what it claimed until all have printed."""
    code = (
        "import sys\n"
        "from tests.pgtest import free_port, pgport_base\n"
        f"print({expression}, flush=True)\n"
        "sys.stdin.read()\n"
    )
    root = Path(__file__).resolve().parent.parent
    children = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=root,
        )
        for _ in range(count)
    ]
    try:
        return [child.stdout.readline() for child in children if child.stdout]
    finally:
        for child in children:
            child.communicate("", timeout=30)


def test_concurrent_test_processes_search_distinct_pgport_slots() -> None:
    """Nodes created without --port search from PGPORT; two suites (or workers) given the
    same base raced for the same port (a concurrent suite's node failed to start)."""
    mine = pgport_base()  # held while the others claim theirs
    bases = [int(line) for line in lines_of_concurrent_processes("pgport_base()", 3)]
    bases.append(mine)
    assert len(set(bases)) == 4, bases
    assert all(b >= PGPORT_FROM and b + PGPORT_SLOT <= FREE_PORTS_FROM for b in bases)


def test_concurrent_test_processes_get_distinct_free_ports() -> None:
    """A port free_port() gave one xdist worker for `pg create --no-start --port P` was bound
    by another worker's server before the node started (both drew from one range)."""
    lines = lines_of_concurrent_processes("*[free_port() for _ in range(60)]", 4)
    handed = [{int(p) for p in line.split()} for line in lines]
    assert [len(ports) for ports in handed] == [60] * 4
    every = set().union(*handed)
    assert len(every) == 240, "two test processes were handed the same port"
    assert all(FREE_PORTS_FROM <= p < 32768 for p in every)
