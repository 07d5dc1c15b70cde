"""Snapshots between two homes on this machine (two NEON_HOMEs, two pageservers): a round
trip through every scheme (a file, ssh to a real sshd, a plain http server, s3 on moto,
neon:// and http to `neon snapshot recv`) ends in a node on the receiving home whose pg_dump
equals the sender's snapshot. `neon snapshot recv` as the proposal's transcript runs it: the
receiver prints a URL with a one-time token, the pusher pushes to it; refused pushes (wrong,
used or missing token, a taken name, a tampered, cut or abandoned stream) change nothing
there; a receiver takes deltas on what it holds."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cli.progress import PROGRESS_ENV, ProgressReport
from cli.receiver_partials import PARTIALS_DIR
from cli.transport import parse_location
from cli.transport.http import RESUME_AT, TAR_TOTAL
from proto.errors import AlreadyExists, AuthFailed, CorruptData, InvalidArgument, NeonError
from tests.e2e.test_disk_full import fill, mounted
from tests.httpd import file_server
from tests.neoncli import NEON, NeonCli, free_port, psql
from tests.pgtest import pg_reachable_tmpdir
from tests.s3d import moto_s3
from tests.sshd import ssh_server

SNAP = "pgdata1@snap1"
FILE = "pgdata1@snap1.neon"
DUMP_KEY = "snapshotrecvtest"
URL = re.compile(r"^neon://127\.0\.0\.1:(\d+)/\?token=([A-Za-z0-9_-]{32})$")


@pytest.fixture(scope="module")
def homes() -> Iterator[tuple[NeonCli, NeonCli]]:
    base = pg_reachable_tmpdir("neon-recv-")
    sender, receiver = NeonCli(base / "a", {}), NeonCli(base / "b", {})
    try:
        sender.run("pg", "create", "--port", str(free_port()))
        c = str(sender.json("pg", "show", "pgdata1")["connstr"])
        psql(c, "CREATE TABLE t (id int PRIMARY KEY, v text);"
                "INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 1000) g")  # fmt: skip
        sender.run("snapshot", "create", SNAP)
        psql(c, "INSERT INTO t SELECT g, 'later' FROM generate_series(1001, 1500) g")
        receiver.run("snapshot", "list")  # its home and pageserver
        yield sender, receiver
    finally:
        receiver.cleanup()
        sender.cleanup()
        shutil.rmtree(base, ignore_errors=True)


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


@pytest.fixture(scope="module")
def reference(homes: tuple[NeonCli, NeonCli]) -> str:
    return dump(homes[0], SNAP)


@dataclass
class Recv:
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    err: str = ""
    """What `wait_logged` read of its stderr."""

    out: str = ""
    """What was read of its stdout past the lines `line` returned."""

    def line(self, timeout: float = 60) -> str:
        """The next stdout line (read from the descriptor: two lines printed at once, as
        --json prints what arrived and the next URL, are both there to take)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while "\n" not in self.out:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(fd, 65536) if ready else b""
            assert chunk, "neon snapshot recv printed nothing"
            self.out += chunk.decode()
        text, _, self.out = self.out.partition("\n")
        self.lines.append(text.strip())
        return text.strip()

    def wait_logged(self, text: str, timeout: float = 60) -> None:
        """Read the receiver's stderr (into `err`) until `text` is in it."""
        assert self.proc.stderr is not None
        fd = self.proc.stderr.fileno()
        deadline = time.monotonic() + timeout
        while text not in self.err:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(fd, 65536) if ready else b""
            assert chunk, f"neon snapshot recv did not log {text!r}; it logged: {self.err}"
            self.err += chunk.decode()


@contextlib.contextmanager
def receiving(neon: NeonCli, *args: str) -> Iterator[Recv]:
    proc = subprocess.Popen(
        [NEON, "snapshot", "recv", *args], env=neon.env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        yield Recv(proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)


def with_env(neon: NeonCli, env: dict[str, str]) -> NeonCli:
    return NeonCli(neon.home, {**neon.env_extra, **env})


@pytest.mark.parametrize("scheme", ["file", "http", "s3", "neon", "recv-http"])
def test_round_trip_between_two_homes(
    homes: tuple[NeonCli, NeonCli], reference: str, scheme: str, tmp_path: Path
) -> None:
    """push from A; pull into B (or B receives); `pg create --snapshot` on B: pg_dump equal
    (ssh: test_ssh_as_the_transcript_writes_it)."""
    sender, receiver = homes
    name = f"rt-{scheme}"
    with contextlib.ExitStack() as stack:
        if scheme in ("neon", "recv-http"):
            flags = ("--http",) if scheme == "recv-http" else ()
            recv = stack.enter_context(receiving(receiver, name, "--once", *flags))
            sender.run("snapshot", "push", "--to", recv.line(), SNAP)
            assert recv.proc.wait(timeout=60) == 0
        else:
            if scheme == "file":
                url = f"file://{tmp_path}/x.neon"
            elif scheme == "http":
                url = stack.enter_context(file_server(tmp_path)).url("x.neon")
            else:
                s3 = stack.enter_context(moto_s3())
                url = f"s3://{s3.new_bucket()}/team/x.neon"
                sender, receiver = with_env(sender, s3.env()), with_env(receiver, s3.env())
            sender.run("snapshot", "push", "--to", url, SNAP)
            receiver.run("snapshot", "pull", "--from", url, name)
        receiver.run("pg", "create", "--snapshot", name, "--port", str(free_port()))
    # Which snapshot it is travels with it: the sender's name and LSN (deltas go on it).
    [origin] = [s["origin"] for s in receiver.json("snapshot", "list") if s["name"] == name]
    [sent] = [s for s in sender.json("snapshot", "list") if s["name"] == SNAP]
    assert (origin["source"], origin["lsn"], origin["parent"]) == (SNAP, sent["lsn_text"], None)
    try:
        assert pg_dump(str(receiver.json("pg", "show", "pgdata1")["connstr"])) == reference
    finally:
        receiver.run("pg", "destroy", "--yes", "pgdata1")
        receiver.run("snapshot", "destroy", name)


def test_ssh_as_the_transcript_writes_it(homes: tuple[NeonCli, NeonCli]) -> None:
    """`neon snapshot push --to ssh://user@host pgdata1@snap1` as the CLI proposal writes it: no
    port, no path (the host an ssh_config alias, as a user's would be): the file lands in
    the login directory. Then a delta over ssh (parent set, a few percent of the bytes), and
    both pulled over ssh into the other home: pg_dump equal."""
    sender, receiver = homes
    c = str(sender.json("pg", "show", "pgdata1")["connstr"])
    names = ("pgdata1@snap1.neon", "pgdata1@ssh2.neon")
    login_dir = Path(os.path.expanduser("~"))
    # The login directory is the user's, not this run's: another run of this test at once
    # (a CI clone and a checkout, one user) would remove these files under it (review L3).
    with held(login_dir / ".pg-neon-tests.lock"), ssh_server() as sshd:
        config = sshd.root / "ssh_config_alias"
        config.write_text(
            f"Host db2\n  HostName 127.0.0.1\n  Port {sshd.port}\n" + sshd.client_config.read_text()
        )
        env = {"NEON_SSH_COMMAND": f"ssh -F {config}"}
        a, b = with_env(sender, env), with_env(receiver, env)
        for name in names:
            (login_dir / name).unlink(missing_ok=True)
        try:
            out = a.run("snapshot", "push", "--to", f"ssh://{sshd.user}@db2", SNAP).stdout
            assert out.startswith(f"Pushed {SNAP} to ssh://{sshd.user}@db2/"), out
            assert (login_dir / names[0]).is_file()
            psql(c, "UPDATE t SET v = 'over ssh' WHERE id <= 10")
            a.run("snapshot", "create", "pgdata1@ssh2")
            delta = a.json("snapshot", "push", "--to", f"ssh://{sshd.user}@db2", "pgdata1@ssh2")
            assert delta["parent"] == SNAP
            assert delta["bytes_sent"] <= 0.05 * delta["snapshot_bytes"], delta
            for name, as_name in zip(names, ("ssh1", "ssh2"), strict=True):
                b.run("snapshot", "pull", "--from", f"ssh://{sshd.user}@db2/~/{name}", as_name)
            assert dump(receiver, "ssh2") == dump(sender, "pgdata1@ssh2")
        finally:
            for name in names:
                (login_dir / name).unlink(missing_ok=True)
            for name in ("ssh1", "ssh2"):
                receiver.run("snapshot", "destroy", name, check=False)
            sender.run("snapshot", "destroy", "pgdata1@ssh2", check=False)


@contextlib.contextmanager
def held(lock: Path) -> Iterator[None]:
    """An exclusive flock on `lock` (made if missing) while the block runs: runs wait."""
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def snapshots(neon: NeonCli) -> list[str]:
    return sorted(s["name"] for s in neon.json("snapshot", "list"))


def test_push_to_the_url_recv_printed(homes: tuple[NeonCli, NeonCli], reference: str) -> None:
    """The transcript: recv prints a URL, `push --to` it; the token is used up, a fresh one
    printed; a node made from the received snapshot has the sender's data."""
    sender, receiver = homes
    with receiving(receiver) as recv:
        url = recv.line()
        port, token = URL.match(url).groups()  # type: ignore[union-attr]
        out = sender.run("snapshot", "push", "--to", url, SNAP).stdout
        assert out.startswith(f"Pushed {SNAP} to neon://127.0.0.1:{port}/pgdata1@snap1.neon: ")
        assert token not in out
        url2 = recv.line()
        token2 = URL.match(url2).groups()[1]  # type: ignore[union-attr]
        assert token2 != token
        used = sender.fail("snapshot", "push", "--to", url, SNAP)
        assert "one-time token was already used" in used and token not in used
        wrong = sender.fail("snapshot", "push", "--to", url2[:-4] + "xxxx", SNAP)
        assert "wrong token for this receiver" in wrong
        none = sender.fail("snapshot", "push", "--to", url2.partition("?")[0], SNAP)
        assert "needs the token it printed" in none
        read = sender.fail("snapshot", "pull", "--from", url2.replace("/?", "/x.neon?"))
        assert "this receiver only takes pushes; pull from a `neon snapshot serve`" in read
        taken = sender.fail("snapshot", "push", "--to", url2, SNAP)
        assert "pgdata1@snap1.neon already exists" in taken
        recv.proc.send_signal(signal.SIGTERM)
        _, err = recv.proc.communicate(timeout=60)
    assert recv.proc.returncode == 0, err
    assert re.search(r"^Received snapshot pgdata1-snap1 \(.+ in .+ s\)$", err, re.M), err
    assert "already used" in err and "Traceback" not in err and token2 not in err
    assert snapshots(receiver) == ["pgdata1-snap1"]
    receiver.run("pg", "create", "--snapshot", "pgdata1-snap1", "--port", str(free_port()))
    try:
        c = str(receiver.json("pg", "show", "pgdata1")["connstr"])
        assert psql(c, "SELECT count(*) FROM t") == "1000"
        assert dump(receiver, "pgdata1-snap1") == reference
    finally:
        receiver.run("pg", "destroy", "--yes", "pgdata1")
        receiver.run("snapshot", "destroy", "pgdata1-snap1")


def test_http_once_with_a_name_and_json(
    homes: tuple[NeonCli, NeonCli], reference: str, tmp_path: Path
) -> None:
    """`recv --http --once NAME --json`: refusals first (a tampered or cut stream: 400, a
    wrong or missing token: 401), each one line for the pusher (the token never shown), the
    reason in the receiver's log, nothing kept, the token still good; then a PUT from `push
    --to http://...` (token in the query, never shown); the receiver exits by itself after
    the snapshot. (A used token and a taken name: the same Receiver as neon://, above.)"""
    sender, receiver = homes
    data, tampered = exported(sender, tmp_path)
    storage = receiver.home / "storage" / "local"  # the default native storage
    with receiving(receiver, "movies", "--http", "--once", "--json") as recv:
        url = json.loads(recv.line())["url"]
        assert re.match(r"^http://127\.0\.0\.1:\d+/\?token=[A-Za-z0-9_-]{32}$", url), url
        token = url.partition("?token=")[2]
        with pytest.raises(NeonError, match=r"tampered\.neon"):
            write_object(url, "tampered.neon", tampered)
        with pytest.raises(NeonError, match=r"cut\.neon"):
            write_object(url, "cut.neon", data[: len(data) * 2 // 3])
        wrong = sender.fail("snapshot", "push", "--to", url[:-4] + "xxxx", SNAP)
        assert "wrong token for this receiver" in wrong and token[:-4] not in wrong
        none = sender.fail("snapshot", "push", "--to", url.partition("?")[0], SNAP)
        assert "(HTTP 401)" in none or "needs the token it printed" in none  # HEAD: no text
        # A resume offset that is no byte count ('²'.isdigit(), int('²') fails): looked at
        # only with the token, then one line (review L5: a 500 and a traceback in the log).
        assert raw_put(url[:-4] + "xxxx", {RESUME_AT: "²"})[0] == 401
        status, text = raw_put(url, {RESUME_AT: "²"})
        assert (status, text) == (400, f"{RESUME_AT} must be a byte count, not '²'\n")
        # The tar's total for the bar: a byte count or refused, before anything is kept.
        for bad in ("-1", "12x", "²", ""):
            status, text = raw_put(url, {TAR_TOTAL: bad}, name="badtotal.neon")
            assert (status, text) == (400, f"{TAR_TOTAL} must be a byte count, not {bad!r}\n")
        assert snapshots(receiver) == []
        assert not (storage / PARTIALS_DIR).exists() or not any((storage / PARTIALS_DIR).iterdir())
        assert list(storage.glob(".import-*")) == []
        summary = sender.json("snapshot", "push", "--to", url, SNAP)
        assert summary["url"].endswith("/pgdata1%40snap1.neon?****")
        got = json.loads(recv.line())
        assert recv.proc.wait(timeout=60) == 0
        assert recv.proc.stderr is not None
        err = recv.proc.stderr.read()
    assert "refused tampered.neon: " in err and "refused cut.neon: " in err, err
    assert "needs the token it printed" in err and "wrong token" in err
    assert "Traceback" not in err and token not in err
    assert got["snapshot"] == "movies" and got["bytes_received"] == summary["bytes_sent"]
    assert got["sha256"] == summary["sha256"]
    # The whole snapshot's size, as push and pull say it: the tar the file holds.
    assert got["snapshot_bytes"] == got["tar_bytes"] == summary["snapshot_bytes"] > 0
    try:
        assert dump(receiver, "movies") == reference
    finally:
        receiver.run("snapshot", "destroy", "movies")


def raw_put(
    url: str, headers: dict[str, str], data: bytes = b"x", name: str = "x.neon"
) -> tuple[int, str]:
    """A plain PUT of `data` (by default a few bytes) as `name` to the receiver at `url`
    (its printed URL): the answer's status and text."""
    import aiohttp

    async def run() -> tuple[int, str]:
        target = url.replace("/?", f"/{name}?")
        async with (
            aiohttp.ClientSession() as session,
            session.put(target, data=data, headers=headers) as answer,
        ):
            return answer.status, await answer.text()

    return asyncio.run(run())


def exported(neon: NeonCli, tmp_path: Path) -> tuple[bytes, bytes]:
    """SNAP's `.neon` file (what a push sends), and a copy with a byte flipped mid-way."""
    good = tmp_path / "good.neon"
    neon.run("snapshot", "export", SNAP, "-o", str(good))
    data = good.read_bytes()
    tampered = bytearray(data)
    tampered[len(data) // 2] ^= 0x40
    return data, bytes(tampered)


def write_object(
    url: str, name: str, data: bytes, *, abandon: bool = False, tar_total: int | None = None
) -> None:
    """Send `data` as object `name` through the neon:// transport (what push does with a
    .neon stream; `tar_total` announced as push does when its daemon told it), or abandon
    the upload halfway."""

    async def run() -> None:
        location = parse_location(url).named(name)
        writer = await location.store.open_write(name, overwrite=False)
        if tar_total is not None:
            writer.expect_tar(tar_total)
        if abandon:
            await writer.write(data[: len(data) // 2])
            await asyncio.sleep(0.5)
            await writer.abort()
            return
        async with writer:
            for start in range(0, len(data), 65536):
                await writer.write(data[start : start + 65536])

    asyncio.run(run())


def test_tampered_cut_and_abandoned_streams_change_nothing(
    homes: tuple[NeonCli, NeonCli], tmp_path: Path
) -> None:
    sender, receiver = homes
    data, tampered = exported(sender, tmp_path)
    storage = receiver.home / "storage" / "local"  # the default native storage
    with receiving(receiver) as recv:
        url = recv.line()
        with pytest.raises(CorruptData, match=r"tampered\.neon"):
            write_object(url, "tampered.neon", tampered)
        with pytest.raises(NeonError, match=r"cut\.neon"):
            write_object(url, "cut.neon", data[: len(data) * 2 // 3])
        write_object(url, "abandoned.neon", data, abandon=True)
        # It notices the end of the connection once it has unpacked what came before.
        recv.wait_logged("refused abandoned.neon: ")
        with pytest.raises(AuthFailed, match="wrong token"):
            write_object(url.replace("?token=", "?token=x"), "x.neon", data)
        bad_total = r"object\.write: tar_total must be a byte count, not -1"
        with pytest.raises(InvalidArgument, match=bad_total):
            write_object(url, "badtotal.neon", data, tar_total=-1)
        assert snapshots(receiver) == []
        assert list(storage.glob(".import-*")) == []
        assert not (storage / PARTIALS_DIR / "badtotal.neon").exists()
        write_object(url, "good.neon", data)  # the token still works: nothing consumed it
        assert URL.match(recv.line())
        with pytest.raises(AlreadyExists, match="already has a snapshot of that name"):
            write_object(recv.lines[-1], "good.neon", data)
        recv.proc.send_signal(signal.SIGTERM)
        _, rest = recv.proc.communicate(timeout=60)
    err = recv.err + rest
    assert "refused tampered.neon: " in err and "refused cut.neon: " in err
    assert "refused abandoned.neon: " in err and "Traceback" not in err
    assert "refused badtotal.neon: " not in err  # refused before it was looked at
    assert snapshots(receiver) == ["good"]
    receiver.run("snapshot", "destroy", "good")


def written_by(pid: int) -> int:
    """Bytes process `pid` has written so far (files, pipes, sockets: /proc/PID/io wchar)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError(f"no wchar in /proc/{pid}/io")


def timelines(neon: NeonCli) -> list[str]:
    """The timelines of the default storage's page store (one being deleted may vanish)."""
    try:
        return sorted(os.listdir(neon.home / "storage" / "local" / "pagestore" / "timelines"))
    except FileNotFoundError:
        return []


def test_the_pageserver_reads_a_pushed_file_as_it_arrives(
    homes: tuple[NeonCli, NeonCli], reference: str
) -> None:
    """A whole file pushed to recv is written still compressed, and the receiving pageserver
    reads it as it grows (cli/neon_file_import.py): the receiving CLI writes about the
    file's bytes, never the data directory (extracting it there wrote every file of it,
    several times the file's size)."""
    sender, receiver = homes
    with receiving(receiver) as recv:
        url = recv.line()
        before = written_by(recv.proc.pid)
        summary = sender.json("snapshot", "push", "--to", url, SNAP)
        recv.line()  # the next URL: the snapshot is in
        written = written_by(recv.proc.pid) - before
        recv.proc.send_signal(signal.SIGTERM)
        recv.proc.communicate(timeout=60)
    try:
        sent, full = summary["bytes_sent"], summary["snapshot_bytes"]
        assert full > 4 * sent  # a data directory written out would be far more than the file
        assert sent <= written < sent + 1024 * 1024, (written, sent, full)
        assert dump(receiver, "pgdata1-snap1") == reference
    finally:
        receiver.run("snapshot", "destroy", "pgdata1-snap1")


def test_streams_damaged_anywhere_are_refused_by_the_reading_pageserver(
    homes: tuple[NeonCli, NeonCli], tmp_path: Path
) -> None:
    """A byte flipped in the first frame (found while the stream still arrives), in the
    trailing checksums (found only once it ended), bytes after its end, and a stream cut
    after the head: each refused naming the file, no snapshot, no timeline and no work
    directory left, the token still good."""
    sender, receiver = homes
    good = tmp_path / "good.neon"
    sender.run("snapshot", "export", SNAP, "-o", str(good))
    data = good.read_bytes()
    early, late = bytearray(data), bytearray(data)
    early[70 * 1024] ^= 0x01  # past the manifest (it ends within 67 KiB): the first frame
    late[-20] ^= 0x01
    kept = timelines(receiver)
    storage = receiver.home / "storage" / "local"  # the default native storage
    with receiving(receiver) as recv:
        url = recv.line()
        for name, damaged in [
            ("early.neon", bytes(early)), ("late.neon", bytes(late)),
            ("longer.neon", data + b"\0" * 4096), ("head.neon", data[: 70 * 1024]),
        ]:  # fmt: skip
            with pytest.raises(NeonError, match=re.escape(name)):
                write_object(url, name, damaged)
            assert snapshots(receiver) == []
            assert timelines(receiver) == kept
            assert list(storage.glob(".import-*")) == []
        write_object(url, "good.neon", data)
        assert URL.match(recv.line())
        recv.proc.send_signal(signal.SIGTERM)
        _, err = recv.proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    assert snapshots(receiver) == ["good"]
    receiver.run("snapshot", "destroy", "good")


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_receiver_killed_mid_file_leaves_nothing(
    homes: tuple[NeonCli, NeonCli], tmp_path: Path
) -> None:
    """recv SIGKILLed while the pageserver reads a pushed file as it grows: the pageserver
    sees its caller gone and deletes the import's timeline (no snapshot), and the next
    receive sweeps the dead one's work directory."""
    sender, receiver = homes
    good = tmp_path / "good.neon"
    sender.run("snapshot", "export", SNAP, "-o", str(good))
    data = good.read_bytes()
    kept = timelines(receiver)
    storage = receiver.home / "storage" / "local"  # the default native storage

    async def push_half_then_kill(url: str, proc: subprocess.Popen[str]) -> None:
        writer = (
            await parse_location(url)
            .named("torn.neon")
            .store.open_write("torn.neon", overwrite=False)
        )
        await writer.write(data[: len(data) // 2])

        def importing() -> bool:
            begun = len(timelines(receiver)) > len(kept)
            with contextlib.suppress(FileNotFoundError):  # a work directory may go meanwhile
                return begun and any(
                    p.stat().st_size > 0 for p in storage.glob(".import-*/fetched.neon")
                )
            return False

        await asyncio.to_thread(wait_for, importing, "the pageserver's import of the spool")
        proc.kill()
        proc.wait(timeout=60)
        with contextlib.suppress(Exception):
            await writer.abort()

    with receiving(receiver) as recv:
        asyncio.run(push_half_then_kill(recv.line(), recv.proc))
    wait_for(lambda: timelines(receiver) == kept, "the torn import's timeline deleted")
    assert snapshots(receiver) == []
    assert len(list(storage.glob(".import-*"))) == 1  # the dead receiver's, until the next
    with receiving(receiver, "--once") as recv:
        write_object(recv.line(), "good.neon", data)
        assert recv.proc.wait(timeout=60) == 0
    assert list(storage.glob(".import-*")) == []
    assert snapshots(receiver) == ["good"]
    receiver.run("snapshot", "destroy", "good")


def test_bad_arguments_are_one_line(homes: tuple[NeonCli, NeonCli]) -> None:
    sender, receiver = homes
    assert "invalid snapshot name" in receiver.fail("snapshot", "recv", "a@b")
    assert "storage 'nope' does not exist" in receiver.fail("snapshot", "recv", "-s", "nope")
    bad = receiver.fail("snapshot", "recv", "--listen", "999.1.1.1", "--port", "7")
    assert "cannot listen on 999.1.1.1:7: Name or service not known" in bad
    error = sender.fail("snapshot", "push", "--to", "neon://127.0.0.1/x.neon", SNAP)
    assert "needs a host and a port" in error
    port = free_port()
    url = f"neon://127.0.0.1:{port}/?token=zzsecretzz"
    error = sender.fail("snapshot", "push", "--to", url, SNAP)
    assert f"cannot connect to the snapshot receiver at 127.0.0.1:{port}" in error
    assert "zzsecretzz" not in error


def history_bytes(neon: NeonCli) -> int:
    return sum(p.stat().st_size for p in (neon.home / "storage").rglob("*") if p.is_file())


def test_a_receiver_gets_deltas_on_what_it_holds(
    homes: tuple[NeonCli, NeonCli], tmp_path: Path
) -> None:
    """have/want over neon://: the receiver lists the snapshots it received by their
    manifests, the pusher sends a delta on the newest it has, and the receiver puts it on a
    branch of its copy of the parent: it writes about the delta's size, not the snapshot's.
    Between the two: rows changed, a table dropped, one created, one truncated, one
    rewritten by VACUUM FULL, a database created. A delta on a parent it lacks is refused."""
    sender, receiver = homes
    c = str(sender.json("pg", "show", "pgdata1")["connstr"])
    rows = "FROM generate_series(1, 5000) g"
    psql(c, f"CREATE TABLE gone AS SELECT g {rows}; CREATE TABLE emptied AS SELECT g {rows};"
            f"CREATE TABLE rewritten AS SELECT g, md5(g::text) m {rows}")  # fmt: skip
    sender.run("snapshot", "create", "pgdata1@d1")
    psql(c, "UPDATE t SET v = 'changed' WHERE id <= 10; DROP TABLE gone; TRUNCATE emptied;"
            "DELETE FROM rewritten WHERE g % 2 = 0; VACUUM FULL rewritten;"
            "CREATE TABLE fresh AS SELECT g FROM generate_series(1, 3000) g")  # fmt: skip
    psql(c, "CREATE DATABASE newdb")
    psql(c, "CREATE TABLE there AS SELECT 42 AS answer", dbname="newdb")
    sender.run("snapshot", "create", "pgdata1@d2")
    psql(c, "UPDATE t SET v = 'later' WHERE id <= 10")
    try:
        showing = NeonCli(receiver.home, {**receiver.env_extra, PROGRESS_ENV: "json"})
        with receiving(showing, "--json") as recv:
            url = json.loads(recv.line())["url"]
            whole = sender.json("snapshot", "push", "--to", url, "pgdata1@d1")
            assert whole["parent"] is None
            got_whole = json.loads(recv.line())
            before = history_bytes(receiver)
            url = json.loads(recv.line())["url"]
            recv_before = written_by(recv.proc.pid)
            delta_push = sender.json("snapshot", "push", "--to", url, "pgdata1@d2")
            written = history_bytes(receiver) - before
            recv_wrote = written_by(recv.proc.pid) - recv_before
            assert delta_push["parent"] == "pgdata1@d1"
            assert delta_push["bytes_sent"] < 0.5 * whole["bytes_sent"]  # newdb's catalogs
            got_delta = json.loads(recv.line())
            recv.line()  # the next URL
            recv.proc.send_signal(signal.SIGTERM)
            _, err = recv.proc.communicate(timeout=60)
        # recv --json: the snapshot's size, as push says it, for a whole file; a delta's
        # tar is the pages it carries (its snapshot's size is the pusher's to say).
        assert got_whole["snapshot_bytes"] == got_whole["tar_bytes"] == whole["snapshot_bytes"]
        assert got_delta["snapshot_bytes"] is None
        assert 0 < got_delta["tar_bytes"] < got_whole["tar_bytes"]
        # The whole file came with its tar's size (its bar showed a percent); the delta,
        # pushed with no bar shown there, with none: its request went at once.
        reports = [r for r in map(ProgressReport.parse, err.splitlines()) if r is not None]
        ends = {r.what: (r.done, r.total) for r in reports}
        assert ends == {
            "Receiving pgdata1@d1.neon": (got_whole["tar_bytes"], got_whole["tar_bytes"]),
            "Receiving pgdata1@d2.neon": (got_delta["bytes_received"], None),
        }, ends
        # A rebuild of the whole directory would have written a whole image run.
        assert written < 0.5 * before, (written, before)
        # recv wrote the delta file as it came, still compressed, for the pageserver to read
        # as it grows (pageserver/ingest/import_delta.py `import_delta_file`), not its tar.
        sent = delta_push["bytes_sent"]
        assert sent <= recv_wrote < sent + 256 * 1024 < got_delta["tar_bytes"], (
            recv_wrote, sent, got_delta["tar_bytes"],
        )  # fmt: skip
        expected = dump(sender, "pgdata1@d2")
        assert dump(receiver, "pgdata1-d2") == expected
        ro = receiver.run("snapshot", "start", "pgdata1-d2").stdout.strip()
        try:
            assert psql(ro, "SELECT answer FROM there", dbname="newdb") == "42"
        finally:
            receiver.run("snapshot", "stop", "pgdata1-d2")
        # The same delta, damaged in a frame past its manifest, to a receiver holding its
        # parent: refused by the pageserver reading it, naming it; nothing left of it.
        dest = tmp_path / "dir"
        dest.mkdir()
        sender.run("snapshot", "push", "--to", f"{dest}/", "pgdata1@d1")
        sender.run("snapshot", "push", "--to", f"{dest}/", "pgdata1@d2")
        delta = (dest / "pgdata1@d2.neon").read_bytes()
        damaged = bytearray(delta)
        damaged[len(damaged) // 2] ^= 0x01
        kept, held = timelines(receiver), snapshots(receiver)
        with receiving(receiver) as recv:
            with pytest.raises(NeonError, match=r"damaged\.neon"):
                write_object(recv.line(), "damaged.neon", bytes(damaged))
            recv.proc.send_signal(signal.SIGTERM)
            _, err = recv.proc.communicate(timeout=60)
        assert "Traceback" not in err, err
        assert snapshots(receiver) == held
        assert timelines(receiver) == kept
        assert list((receiver.home / "storage" / "local").glob(".import-*")) == []
        receiver.run("snapshot", "destroy", "pgdata1-d1")  # the branch keeps what it reads
        assert dump(receiver, "pgdata1-d2") == expected
        # The same delta sent to a receiver that lacks its parent: refused by name.
        refused = pytest.raises(NeonError, match="this receiver does not have; push the snapshot")
        with receiving(receiver) as recv, refused:
            write_object(recv.line(), "pgdata1@d2b.neon", delta)
    finally:
        receiver.run("snapshot", "destroy", "pgdata1-d1", check=False)
        receiver.run("snapshot", "destroy", "pgdata1-d2", check=False)
        for snap in ("pgdata1@d1", "pgdata1@d2"):
            sender.run("snapshot", "destroy", snap)


def test_a_delta_received_into_another_storage_goes_on_its_parent(
    homes: tuple[NeonCli, NeonCli],
) -> None:
    """`recv -s other` takes a delta whose parent it received into the default storage: the
    pageserver reads the file in the work directory of `other` and puts it on a branch of
    the parent, where it lives."""
    sender, receiver = homes
    c = str(sender.json("pg", "show", "pgdata1")["connstr"])
    sender.run("snapshot", "create", "pgdata1@e1")
    psql(c, "UPDATE t SET v = 'other storage' WHERE id <= 5")
    sender.run("snapshot", "create", "pgdata1@e2")
    other = pg_reachable_tmpdir("neon-recv-other-") / "other"
    receiver.run("storage", "attach", "-t", "native", "-n", "other", "-c", f"path={other}")
    try:
        with receiving(receiver, "--once") as recv:
            assert (
                sender.json("snapshot", "push", "--to", recv.line(), "pgdata1@e1")["parent"] is None
            )
        with receiving(receiver, "--once", "-s", "other") as recv:
            pushed = sender.json("snapshot", "push", "--to", recv.line(), "pgdata1@e2")
        assert pushed["parent"] == "pgdata1@e1"
        assert dump(receiver, "pgdata1-e2") == dump(sender, "pgdata1@e2")
        assert list(other.glob(".import-*")) == []
    finally:
        receiver.run("snapshot", "destroy", "pgdata1-e2", check=False)
        receiver.run("snapshot", "destroy", "pgdata1-e1", check=False)
        receiver.run("storage", "detach", "other", check=False)
        shutil.rmtree(other.parent, ignore_errors=True)
        for snap in ("pgdata1@e1", "pgdata1@e2"):
            sender.run("snapshot", "destroy", snap)


@contextlib.contextmanager
def on_tty(neon: NeonCli, *args: str) -> Iterator[tuple[Recv, list[str]]]:
    """`neon snapshot recv ARGS` with its stderr on a pseudo-terminal: the receiver, and
    (once it exited: --once) what it showed there as the list's one item."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [NEON, "snapshot", "recv", *args], env=neon.env(), text=True,
        stdout=subprocess.PIPE, stderr=slave,
    )  # fmt: skip
    os.close(slave)
    shown: list[str] = []
    try:
        yield Recv(proc), shown
        assert proc.wait(timeout=60) == 0
        got = b""
        with contextlib.suppress(OSError):  # EIO once the child closed the terminal
            while chunk := os.read(master, 4096):
                got += chunk
        shown.append(got.decode(errors="replace"))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


KNOWN_TOTAL = r"\[[-=]*\] +\d+% \| .*B/s \| ETA "
"""A bar with a total (cli/progress.py's KNOWN_TOTAL): a percent, the rate, an ETA."""


@pytest.mark.parametrize("wire", ["neon", "http"])
def test_progress_with_a_percent_on_a_tty_only(homes: tuple[NeonCli, NeonCli], wire: str) -> None:
    """A transient bar while a snapshot arrives, on a terminal, with a percent and an ETA:
    the pusher sends the tar's size its daemon announced (`tar_total`, `X-Neon-Tar-Total`),
    though its own output is no terminal; the bar counts the tar bytes of the frames passed,
    never past 100%. None with --json or without a terminal (the other tests read recv's
    stderr through a pipe). This receiver listens where --listen and --port say, and its
    URL says so."""
    sender, receiver = homes
    port = free_port()
    args = ["--once", "tty", "--listen", "127.0.0.2", "--port", str(port)]
    try:
        with on_tty(receiver, *args, *(["--http"] if wire == "http" else [])) as (recv, shown):
            url = recv.line()
            assert re.match(rf"^{wire}://127\.0\.0\.2:{port}/\?token=[A-Za-z0-9_-]{{32}}$", url)
            sender.run("snapshot", "push", "--to", url, SNAP)
    finally:
        receiver.run("snapshot", "destroy", "tty", check=False)
    [text] = shown
    assert re.search(rf"Receiving pgdata1@snap1\.neon {KNOWN_TOTAL}", text), text
    assert not re.search(r"\b(10[1-9]|1[1-9]\d)%", text), text
    assert "Received snapshot tty" in text


@pytest.mark.parametrize("wire", ["neon", "http"])
def test_progress_without_a_total_shows_bytes(
    homes: tuple[NeonCli, NeonCli], tmp_path: Path, wire: str
) -> None:
    """What an older pusher sends (an upload with no total) or a plain PUT of the file (as
    `curl -T` sends it): the bar shows the bytes and their rate, and the snapshot is in."""
    sender, receiver = homes
    data, _ = exported(sender, tmp_path)
    try:
        with on_tty(receiver, "--once", "plain", *(["--http"] if wire == "http" else [])) as (
            recv,
            shown,
        ):
            url = recv.line()
            if wire == "neon":
                write_object(url, "old.neon", data)
            else:
                assert raw_put(url, {}, data, "old.neon")[0] == 201
    finally:
        receiver.run("snapshot", "destroy", "plain", check=False)
    [text] = shown
    assert re.search(r"Receiving old\.neon .*B \| .*B/s", text), text
    assert "%" not in text and "ETA" not in text, text
    assert "Received snapshot plain" in text


def test_serve_is_a_remote_storage(
    homes: tuple[NeonCli, NeonCli], reference: str, tmp_path: Path
) -> None:
    """`neon snapshot serve` on B, attached on A as a remote storage (its token from the
    server's 0600 file): push to it, pull from it (the .neon file export writes), a delta
    on what it holds; a wrong token is refused."""
    sender, server_home = homes
    token_file = tmp_path / "serve.token"
    proc = subprocess.Popen(
        [NEON, "snapshot", "serve", "--token-file", str(token_file), "--json"],
        env=server_home.env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        served = json.loads(Recv(proc).line())
        assert served["token_file"] == str(token_file) and "token" not in served["url"]
        assert token_file.stat().st_mode & 0o777 == 0o600
        attach = ("storage", "attach", "-t", "remote", "-c", f"url={served['url']}")
        sender.run(*attach, "-n", "zcloud", "-c", f"token=@{token_file}")
        (tmp_path / "wrong").write_text("wrong-token")
        sender.run(*attach, "-n", "zbad", "-c", f"token=@{tmp_path / 'wrong'}")
        pushed = sender.json("snapshot", "push", "--to", "zcloud", SNAP)
        assert pushed["url"].endswith("/pgdata1@snap1.neon") and pushed["parent"] is None
        refused = sender.fail("snapshot", "push", "--to", "zbad", SNAP)
        assert "wrong token for this server" in refused
        pulled = sender.json("snapshot", "pull", "--from", "zcloud:pgdata1-snap1.neon", "back")
        assert pulled["name"] == "back"
        assert dump(sender, "back") == reference
        # The token in the URL, as issue 12 writes it (not only an attached storage's).
        token = token_file.read_text().strip()
        by_url = sender.run(
            "snapshot", "pull", "--from", f"{served['url']}pgdata1-snap1.neon?token={token}",
            "back2", "--json",
        )  # fmt: skip
        assert token not in by_url.stdout + by_url.stderr
        assert json.loads(by_url.stdout)["url"] == f"{served['url']}pgdata1-snap1.neon"
        sender.run("snapshot", "create", "pgdata1@snap3")  # 500 rows more than snap1
        delta = sender.json("snapshot", "push", "--to", "zcloud", "pgdata1@snap3")
        assert delta["parent"] == SNAP and delta["bytes_sent"] < pushed["bytes_sent"] / 2
        missing = sender.fail("snapshot", "pull", "--from", "zcloud:nothing.neon")
        assert "no snapshot 'nothing' here" in missing
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "wrong token for this server" in err and "Traceback" not in err
        assert "neon snapshot serve: refused" in err and "neon snapshot recv:" not in err
        assert read_token_free(err, token_file)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for storage in ("zcloud", "zbad"):
            sender.run("storage", "detach", storage, check=False)
        sender.run("snapshot", "destroy", "back", check=False)
        sender.run("snapshot", "destroy", "back2", check=False)
        sender.run("snapshot", "destroy", "pgdata1@snap3", check=False)
        for name in ("pgdata1-snap1", "pgdata1-snap3"):
            server_home.run("snapshot", "destroy", name, check=False)


def read_token_free(text: str, token_file: Path) -> bool:
    """The server's output never shows its token."""
    return token_file.read_text().strip() not in text


def test_a_pulled_delta_goes_on_the_parent_held_here(
    homes: tuple[NeonCli, NeonCli], tmp_path: Path
) -> None:
    """A delta file pulled into a home that holds its parent (pulled before, so its origin
    is that parent) is imported on a branch of it: the store need not have the parent's
    file, and the home grows by about the delta."""
    sender, receiver = homes
    c = str(sender.json("pg", "show", "pgdata1")["connstr"])
    sender.run("snapshot", "create", "pgdata1@p1")
    psql(c, "UPDATE t SET v = 'pulled' WHERE id <= 20")
    sender.run("snapshot", "create", "pgdata1@p2")
    both, alone = tmp_path / "both", tmp_path / "alone"
    both.mkdir()
    alone.mkdir()
    try:
        sender.run("snapshot", "push", "--to", f"{both}/", "pgdata1@p1")
        assert sender.json("snapshot", "push", "--to", f"{both}/", "pgdata1@p2")["parent"]
        shutil.copy(both / "pgdata1@p2.neon", alone / "pgdata1@p2.neon")
        receiver.run("snapshot", "pull", "--from", str(both / "pgdata1@p1.neon"), "q1")
        before = history_bytes(receiver)
        receiver.run("snapshot", "pull", "--from", str(alone / "pgdata1@p2.neon"), "q2")
        assert history_bytes(receiver) - before < 0.5 * before
        assert dump(receiver, "q2") == dump(sender, "pgdata1@p2")
    finally:
        for name in ("q1", "q2"):
            receiver.run("snapshot", "destroy", name, check=False)
        for name in ("pgdata1@p1", "pgdata1@p2"):
            sender.run("snapshot", "destroy", name)


@contextlib.contextmanager
def storage_on_tmpfs(size: str) -> Iterator[tuple[NeonCli, Path]]:
    """A receiving home (its own pageserver) whose native storage `small` is on a tmpfs of
    `size`: the home and the tmpfs's mount point; its pageserver is stopped before the tmpfs
    is unmounted, both always."""
    base = pg_reachable_tmpdir("neon-recvfull-")
    home = NeonCli(base / "home", {})
    try:
        (base / "fs").mkdir()
        with mounted(["-t", "tmpfs", "-o", f"size={size},mode=0711", "tmpfs"], base / "fs") as fs:
            try:
                home.run("storage", "attach", "-t", "native", "-n", "small", "-c", f"path={fs}/s")
                yield home, fs
            finally:
                home.cleanup()  # the pageserver holds files there
    finally:
        shutil.rmtree(base, ignore_errors=True)


def full_disk_line(proc: subprocess.CompletedProcess[str], where: str, token: str, fs: Path) -> str:
    """A push refused for the receiver's full disk: one `neon: error:` line that names the
    receiver's URL `where` (no token), says whose disk is full and what to do, and names no
    path of the receiver's (its home and storage are beside its filesystem `fs`): they are
    not the pusher's to read (review L6)."""
    assert proc.returncode == 1 and proc.stdout == "", (proc.returncode, proc.stdout)
    assert "Traceback" not in proc.stderr and token not in proc.stderr, proc.stderr
    assert str(fs.parent) not in proc.stderr, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"neon: error: {where}: "), line
    assert "the receiver's disk is full (" in line and "No space left on device" in line, line
    assert "free space in its storage 'small' and push again" in line, line
    assert "/" not in line.partition("disk is full")[2], line
    assert "nothing of pgdata1@snap1.neon was kept there" in line, line
    return line


def logged_full(err: str, token: str) -> None:
    """The receiver's own log line of that refusal: the pusher's, then the whole cause."""
    [line] = [line for line in err.splitlines() if "disk is full" in line]
    assert f"refused {FILE}: the receiver's disk is full (" in line, line
    assert line.endswith("]") and "No space left on device" in line.rpartition(" [")[2], line
    assert "Traceback" not in err and token not in err, err


def left_in(storage: Path) -> list[str]:
    """What a refused push left in a storage: work directories, kept cut pushes, timelines."""
    return sorted(
        [p.name for p in storage.glob(".import-*")]
        + [p.name for p in storage.glob(f"{PARTIALS_DIR}/*")]
        + [p.name for p in storage.glob("pagestore/timelines/*")]
    )


def test_a_receiver_whose_disk_fills_keeps_nothing_and_serves_on(
    homes: tuple[NeonCli, NeonCli], tmp_path: Path
) -> None:
    """Issue 12's "remote disk full" over neon://: a push to `recv` whose storage fills is
    one line for the pusher naming the receiver's URL; the receiver names no snapshot, leaves
    no timeline or work directory, and keeps nothing of it: not even the bytes a cut push of
    the name had left to resume from (kept, they would hold the space the push needs:
    cli/receiver_partials.py keeps only cut pushes). Space freed, the same URL (its token
    unused) takes the same push, whole, and recv prints its next URL."""
    sender, _ = homes
    data, _ = exported(sender, tmp_path)
    with storage_on_tmpfs("64m") as (receiver, fs), receiving(receiver, "-s", "small") as recv:
        storage = fs / "s"
        url = recv.line()
        port, token = URL.match(url).groups()  # type: ignore[union-attr]
        write_object(url, FILE, data, abandon=True)  # a cut push: kept to resume from
        recv.wait_logged(f"refused {FILE}: ")
        assert left_in(storage) == [FILE]
        fill(fs / "filler", leave=1 << 20)
        refused = sender.run("snapshot", "push", "--to", url, SNAP, check=False)
        full_disk_line(refused, f"neon://127.0.0.1:{port}/{FILE}", token, fs)
        assert snapshots(receiver) == []
        assert left_in(storage) == []
        (fs / "filler").unlink()
        pushed = sender.json("snapshot", "push", "--to", url, SNAP)
        assert pushed["bytes_resumed"] == 0 and pushed["bytes_sent"] == len(data), pushed
        assert URL.match(recv.line()) and token not in recv.lines[-1]
        assert snapshots(receiver) == ["pgdata1-snap1"]
        recv.proc.send_signal(signal.SIGTERM)
        _, rest = recv.proc.communicate(timeout=60)
        receiver.run("snapshot", "destroy", "pgdata1-snap1")
    logged_full(recv.err + rest, token)


def test_a_receiver_over_http_whose_disk_fills(homes: tuple[NeonCli, NeonCli]) -> None:
    """The same over `recv --http`: a 507 whose reason is the receiver's line; nothing left
    there; the tmpfs remounted bigger, the same URL takes the push."""
    sender, _ = homes
    with (
        storage_on_tmpfs("6m") as (receiver, fs),
        receiving(receiver, "-s", "small", "--http") as recv,
    ):
        url = recv.line()
        token = url.partition("?token=")[2]
        refused = sender.run("snapshot", "push", "--to", url, SNAP, check=False)
        where = url.partition("?")[0] + "pgdata1%40snap1.neon?****"
        line = full_disk_line(refused, where, token, fs)
        assert "(HTTP 507)" in line, line
        assert snapshots(receiver) == []
        assert left_in(fs / "s") == []
        subprocess.run(["mount", "-o", "remount,size=64m", str(fs)], check=True)
        sender.run("snapshot", "push", "--to", url, SNAP)
        assert recv.line().startswith(url.partition("?")[0])
        assert snapshots(receiver) == ["pgdata1-snap1"]
        recv.proc.send_signal(signal.SIGTERM)
        _, err = recv.proc.communicate(timeout=60)
        receiver.run("snapshot", "destroy", "pgdata1-snap1")
    logged_full(err, token)
