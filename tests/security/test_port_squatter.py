"""A local user who takes a stopped node's port gets no connection and no password (issue 16).

The intruder is a fake PostgreSQL server run as `nobody` on the node's TCP port while the node
is stopped: it answers every startup message with a cleartext (or md5) password request and
reports what it received. The pageserver must not connect to it at all (a stopped node is not
followed until `pg start`, and a followed node is reached through its private unix socket),
and the walreceiver's client, pointed at it directly, must refuse before sending a byte.
Runs as root, as CI does: PostgreSQL runs as `postgres`, the intruder as `nobody`.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from proto.errors import AuthFailed
from tests.neoncli import NeonCli
from tests.pgtest import free_port
from walreceiver.replication import connect

INTRUDER = "nobody"
SYSTEM_PYTHON = "/usr/bin/python3"  # the intruder cannot enter our virtualenv; stdlib suffices
WATCH_SECONDS = 8.0  # longer than the follower's reconnect backoff (at most 5 s)

FAKE_SERVER = r"""
import json, socket, struct, sys, time

port, method, seconds = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])

def report(**event):
    print(json.dumps(event), flush=True)

def read_exactly(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data

srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen()
srv.settimeout(0.2)
report(listening=port)
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    try:
        conn, _ = srv.accept()
    except TimeoutError:
        continue
    conn.settimeout(3)
    startup = after = b""
    try:
        (length,) = struct.unpack(">i", read_exactly(conn, 4))
        startup = read_exactly(conn, length - 4)
        if method == "md5":
            conn.sendall(b"R" + struct.pack(">ii", 12, 5) + b"salt")
        else:
            conn.sendall(b"R" + struct.pack(">ii", 8, 3))
        while True:  # whatever the client answers, until it hangs up
            chunk = conn.recv(65536)
            if not chunk:
                break
            after += chunk
    except (OSError, struct.error) as exc:
        after += b"<" + str(exc).encode() + b">"
    finally:
        conn.close()
    report(startup=startup.hex(), after=after.hex())
"""


class FakeServer:
    """The fake PostgreSQL server, as `nobody`, for `seconds` seconds; `events()` after."""

    def __init__(self, port: int, method: str, seconds: float) -> None:
        script = [SYSTEM_PYTHON, "-c", FAKE_SERVER, str(port), method, str(seconds)]
        self.proc = subprocess.Popen(
            ["runuser", "-u", INTRUDER, "--", *script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        assert json.loads(first or "{}").get("listening") == port, self.proc.stderr.read()

    def events(self) -> list[dict[str, str]]:
        out, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err
        return [json.loads(line) for line in out.splitlines()]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # by PID (runuser); the script ends by itself in any case
            self.proc.wait()


@pytest.fixture
def stopped_node(neon: NeonCli) -> Iterator[tuple[NeonCli, int, str]]:
    """A node made and stopped with the real CLI: (cli, its port, its replication password)."""
    assert os.geteuid() == 0, "this test runs as root: it switches to `nobody` with runuser"
    neon.run("pg", "create", "--port", str(free_port()))  # not 5432: other tests' servers
    port = int(neon.json("pg", "show", "pgdata1")["port"])
    neon.run("pg", "stop", "pgdata1")
    password = (neon.home / "secrets" / "node.primary1.replication").read_text().strip()
    assert password
    yield neon, port, password


def followed(neon: NeonCli) -> dict[str, object]:
    nodes = neon.json("pageserver", "status")["nodes"]
    assert len(nodes) == 1, nodes
    return dict(nodes[0])


def receiver_children(neon: NeonCli) -> list[int]:
    """PIDs of the pageserver's walreceiver processes."""
    daemon = (neon.home / "pageserver" / "pageserver.pid").read_text().strip()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = (proc / "stat").read_text().rsplit(")", 1)[1].split()[1]
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if ppid == daemon and b"walreceiver.receiver" in cmdline:
            found.append(int(proc.name))
    return found


@pytest.mark.parametrize("method", ["cleartext", "md5"])
def test_stopped_nodes_port_gets_no_connection(
    stopped_node: tuple[NeonCli, int, str], method: str
) -> None:
    _neon, port, password = stopped_node
    fake = FakeServer(port, method, WATCH_SECONDS)
    try:
        events = fake.events()
    finally:
        fake.kill()
    assert events == [], f"the pageserver connected to a stranger on port {port}: {events}"
    assert password.encode().hex() not in json.dumps(events)


@pytest.mark.parametrize("method", ["cleartext", "md5"])
async def test_walreceiver_client_never_sends_the_password(
    stopped_node: tuple[NeonCli, int, str], method: str
) -> None:
    _neon, port, password = stopped_node
    fake = FakeServer(port, method, 5.0)
    try:
        with pytest.raises(AuthFailed, match="refusing to send it") as err:
            await connect("127.0.0.1", port, "neon_replication", password, timeout=5)
        events = fake.events()
    finally:
        fake.kill()
    assert password not in str(err.value)
    assert len(events) == 1, events
    assert password.encode().hex() not in events[0]["after"]
    assert b"neon_replication".hex() in events[0]["startup"]
    assert events[0]["after"] in ("", b"X\x00\x00\x00\x04".hex()), "only a Terminate may follow"


def test_stopped_node_is_not_followed_until_started(neon: NeonCli) -> None:
    neon.run("pg", "create", "--port", str(free_port()))
    assert followed(neon)["state"] == "streaming" or wait_state(neon, "streaming")
    assert followed(neon)["socket_dir"] == str(neon.home / "run")
    stop = neon.run("pg", "stop", "pgdata1")
    assert "warning" not in stop.stderr  # the shutdown checkpoint still arrived
    assert followed(neon)["paused"] is True
    assert wait_state(neon, "paused")
    assert receiver_children(neon) == [], "a paused follower runs no walreceiver"
    neon.run("pageserver", "stop")
    neon.run("pageserver", "start")
    assert followed(neon)["paused"] is True, "the pause outlives a pageserver restart"
    time.sleep(2)
    assert receiver_children(neon) == []
    neon.run("pg", "start", "pgdata1")
    assert followed(neon)["paused"] is False
    assert wait_state(neon, "streaming")


def wait_state(neon: NeonCli, state: str, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while followed(neon)["state"] != state:
        assert time.monotonic() < deadline, f"follower not {state}: {followed(neon)}"
        time.sleep(0.3)
    return True
