"""Real PostgreSQL servers for tests: initdb into a temp dir, 127.0.0.1, a free port.

Every server started here is stopped by its PID at fixture teardown, even on failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from cli import postmaster
from cli.pgbin import pg_binary, popen_kwargs
from datadir_files.pg_account import make_pg_dir

SUPERUSER = "neon_test"
PASSWORD = "test-secret-pw"


FREE_PORTS_FROM = 30400
"""free_port() hands out ports from here up to the kernel's ephemeral ports; below are the
PGPORT ranges of pgport_base()."""
FREE_PORTS_SLOT = 100
PGPORT_FROM = 10000
PGPORT_SLOT = 200
_pgport_claim: tuple[int, TextIO] | None = None
_free_ports_claim: tuple[range, TextIO] | None = None
_free_ports_next = 0


def _claim_slot(kind: str, slots: int) -> tuple[int, TextIO] | None:
    """The first of `slots` slots of `kind` no other process holds, claimed with an flock
    held for this process's life (so concurrent xdist workers and concurrent suites never
    share one); None when every slot is held."""
    lock_dir = Path(tempfile.gettempdir()) / "pg-neon-test-pgports"
    lock_dir.mkdir(exist_ok=True)
    for slot in range(slots):
        prefix = "slot" if kind == "pgport" else kind
        lock = (lock_dir / f"{prefix}-{slot}.lock").open("a")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            continue
        return slot, lock
    return None


def pgport_base() -> int:
    """The first of PGPORT_SLOT ports this test process alone searches from when a node is
    created without --port (tests/neoncli.py sets PGPORT to it). The slot is claimed for the
    process's life (a suite's nodes took another suite's port when slots came from PIDs)."""
    global _pgport_claim
    if _pgport_claim is None:
        claim = _claim_slot("pgport", (FREE_PORTS_FROM - PGPORT_FROM) // PGPORT_SLOT)
        if claim is None:
            raise RuntimeError("every PGPORT slot of the test suites is claimed")
        _pgport_claim = (PGPORT_FROM + PGPORT_SLOT * claim[0], claim[1])
    return _pgport_claim[0]


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_ports() -> range | None:
    """This process's own FREE_PORTS_SLOT ports between FREE_PORTS_FROM and the kernel's
    ephemeral ports, claimed for its life: a port one xdist worker handed to a node created
    with `--no-start --port P` was bound by another worker's server before the node started
    when every process drew from the whole range. None when no slot is left (an unusual
    kernel port range, or every slot held)."""
    global _free_ports_claim
    if _free_ports_claim is None:
        low = FREE_PORTS_FROM
        claim = _claim_slot("free", (_ephemeral_low() - low) // FREE_PORTS_SLOT)
        if claim is None:
            return None
        first = low + FREE_PORTS_SLOT * claim[0]
        _free_ports_claim = (range(first, first + FREE_PORTS_SLOT), claim[1])
    return _free_ports_claim[0]


def free_port() -> int:
    """A port nothing listens on now, for a server started next: the next of this process's
    own ports (`_free_ports`, in turn, so a port is handed out again only after every other
    one was) that binds now. Not one the kernel hands out (bind to port 0): that range is
    also where every outgoing connection on the host takes its local port, and one did take
    a port between this call and `pg create --port` binding it (another test's client, or a
    walreceiver connecting)."""
    global _free_ports_next
    ports = _free_ports()
    if ports is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    for _attempt in range(len(ports)):
        port = ports[_free_ports_next % len(ports)]
        _free_ports_next += 1
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"every port in {ports.start}-{ports.stop - 1} is in use")


@dataclass
class PgTestServer:
    """A throwaway PostgreSQL 15 server; `psql` runs SQL through the unix socket."""

    root: Path
    port: int
    settings: dict[str, object] = field(default_factory=dict)

    @property
    def datadir(self) -> Path:
        return self.root / "pgdata"

    @property
    def sockdir(self) -> Path:
        return self.root / "sock"

    @property
    def logfile(self) -> Path:
        return self.root / "postgres.log"

    @property
    def wal_dir(self) -> Path:
        return self.datadir / "pg_wal"

    def dsn(self, dbname: str = "postgres") -> str:
        return (
            f"host=127.0.0.1 port={self.port} user={SUPERUSER} password={PASSWORD} dbname={dbname}"
        )

    def config(self) -> tuple[dict[str, object], list[str]]:
        """The neon.conf settings and pg_hba.conf lines this server runs with."""
        base: dict[str, object] = {
            "port": self.port,
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.sockdir),
            "wal_level": "replica",
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "fsync": "off",
            "shared_buffers": "32MB",
            "max_prepared_transactions": 10,
        }
        base.update(self.settings)
        hba = [
            "local all all trust",
            f"host all {SUPERUSER} 127.0.0.1/32 scram-sha-256",
            f"host replication {SUPERUSER} 127.0.0.1/32 scram-sha-256",
        ]
        return base, hba

    def init(self) -> None:
        make_pg_dir(self.root, 0o711)
        make_pg_dir(self.sockdir)
        postmaster.initdb(self.datadir, superuser=SUPERUSER, password=PASSWORD)
        postmaster.write_config(self.datadir, *self.config())

    def start(self) -> int:
        return postmaster.start(self.datadir, self.logfile)

    def stop(self, mode: str = "fast") -> None:
        postmaster.stop(self.datadir, mode)

    def run(
        self, binary: str, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a client binary (psql, pgbench, pg_waldump...) against this server."""
        env = {"PGHOST": str(self.sockdir), "PGPORT": str(self.port), "PGUSER": SUPERUSER}
        return subprocess.run(
            [pg_binary(binary), *args],
            input=input,
            text=True,
            capture_output=True,
            check=check,
            **popen_kwargs(env),
        )  # type: ignore[call-overload]

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Run SQL (ON_ERROR_STOP) and return unaligned, tuples-only output."""
        proc = self.run(
            "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-d", dbname, input=sql, check=False
        )
        if proc.returncode != 0:
            raise AssertionError(f"psql failed: {proc.stderr}")
        return proc.stdout.strip()


class PgTestCluster:
    """Creates servers on demand and stops every one of them at the end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.servers: list[PgTestServer] = []

    def create(
        self, settings: Mapping[str, object] | None = None, start: bool = True
    ) -> PgTestServer:
        root = Path(tempfile.mkdtemp(prefix="pg", dir=self.base))
        server = PgTestServer(root, free_port(), dict(settings or {}))
        self.servers.append(server)
        server.init()
        if start:
            server.start()
        return server

    def create_empty(self, settings: Mapping[str, object] | None = None) -> PgTestServer:
        """A server whose data directory the caller fills (e.g. from a basebackup), then
        configures with `postmaster.write_config(server.datadir, *server.config())` and starts."""
        root = Path(tempfile.mkdtemp(prefix="pg", dir=self.base))
        server = PgTestServer(root, free_port(), dict(settings or {}))
        self.servers.append(server)
        make_pg_dir(root, 0o711)
        make_pg_dir(server.sockdir)
        return server

    def create_standby(
        self, primary: PgTestServer, settings: Mapping[str, object] | None = None
    ) -> PgTestServer:
        """A streaming standby of `primary` (pg_basebackup -R over TCP), started."""
        root = Path(tempfile.mkdtemp(prefix="pg", dir=self.base))
        server = PgTestServer(root, free_port(), {**primary.settings, **(settings or {})})
        self.servers.append(server)
        make_pg_dir(root, 0o711)
        make_pg_dir(server.sockdir)
        primary.run(
            "pg_basebackup", "-D", str(server.datadir), "-R", "-X", "stream", "-c", "fast",
            "-d", primary.dsn(),
        )  # fmt: skip
        postmaster.write_config(server.datadir, *server.config())
        server.start()
        return server

    def stop_all(self) -> None:
        for server in self.servers:
            try:
                server.stop("immediate")
            except Exception:
                pid = postmaster.read_pid_file(server.datadir)
                if pid:
                    with contextlib.suppress(OSError):
                        os.kill(pid, 9)


def pg_reachable_tmpdir(prefix: str) -> Path:
    """A new directory in the temp dir that PostgreSQL's OS user may enter (not list): pg-neon
    never changes a parent it did not create, and pytest's own directories are 0700."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(base, 0o711)
    return base


def cluster_fixture(tmp_path_factory: object) -> Iterator[PgTestCluster]:
    base = pg_reachable_tmpdir("neon-pgtest-")
    cluster = PgTestCluster(base)
    try:
        yield cluster
    finally:
        cluster.stop_all()
        shutil.rmtree(base, ignore_errors=True)
