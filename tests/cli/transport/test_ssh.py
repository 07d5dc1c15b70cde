"""ssh:// against a real sshd on 127.0.0.1: what ssh refuses is one clear line and never a
prompt (an unknown host key, a refused key, a closed port), paths are never parsed as shell,
and URLs are checked before anything runs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from cli.home import NeonHome
from cli.snapshot_file_source import snapshots_in
from cli.transport import parse_location, ssh
from cli.transport.base import CHUNK, ObjectInfo, read_object
from cli.transport.resume import RESUME_BLOCK
from cli.transport.ssh import (
    _MUX_DIRS,
    APPEND_WAITING,
    KEPT_DIR_PREFIX,
    PERSIST_ENV,
    SMALL_WRITE,
    SshStore,
    SshWriter,
    close_connections,
    kept_dir,
    stop_kept_connections,
    sweep_dead_mux_dirs,
)
from proto.errors import (
    AlreadyExists,
    AuthFailed,
    Conflict,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from snapfile.writer import write_snapshot_file
from tests.cli.transport.conftest import entries
from tests.pgtest import free_port
from tests.snapfile.snapfile_helpers import generated_bytes, make_manifest
from tests.sshd import SshServer


def store_of(url: str) -> tuple[SshStore, str | None]:
    loc = parse_location(url)
    assert isinstance(loc.store, SshStore)
    return loc.store, loc.name


@pytest.mark.parametrize(
    ("url", "user", "port", "directory", "name"),
    [
        ("ssh://backup@db.example:2222/srv/snaps/x.neon", "backup", 2222, "/srv/snaps", "x.neon"),
        ("ssh://host", None, None, ".", None),  # the proposal's ssh://user@host: login dir
        ("ssh://host/", None, None, "/", None),
        ("ssh://host/~/", None, None, ".", None),
        ("ssh://host/~/x.neon", None, None, ".", "x.neon"),
        ("ssh://host/~/sub/dir/", None, None, "sub/dir", None),
        ("ssh://host/x.neon", None, None, "/", "x.neon"),
        ("ssh://[::1]:22/a%20b/x%40y.neon", None, 22, "/a b", "x@y.neon"),
    ],
)
def test_urls(
    url: str, user: str | None, port: int | None, directory: str, name: str | None
) -> None:
    store, got = store_of(url)
    assert (store.user, store.port, store.directory, got) == (user, port, directory, name)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ssh://host:99999/x", "bad port"),
        ("ssh://host:ab/x", "bad port"),
        ("ssh:///x.neon", "no host"),
        ("ssh://-oProxyCommand=touch%20x/y", "no host"),
        ("ssh://me:hunter2@host/x", "takes no password"),
        ("ssh://host/~bob/x.neon", "/~USER paths are not supported"),
        ("ssh://host/x.neon?a=1", "query"),
        ("ssh://host/dir/.hidden", "invalid object name"),
    ],
)
def test_malformed_urls_are_one_line(url: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as raised:
        parse_location(url)
    text = str(raised.value)
    assert "\n" not in text and "hunter2" not in text


def test_unknown_host_key_fails_without_prompting(sshd: SshServer, remote_dir: Path) -> None:
    """A known_hosts without the server's key: ssh's default check refuses it in batch mode,
    and a terminal-less run ends at once (a prompt would hang until the timeout)."""
    env = {**os.environ, "NEON_SSH_COMMAND": f"ssh -F {sshd.config_without_host_key()}"}
    code = (
        "import asyncio, sys\n"
        "from cli.transport import parse_location\n"
        "loc = parse_location(sys.argv[1])\n"
        "asyncio.run(loc.store.stat(loc.name))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, sshd.url(f"{remote_dir}/x.neon")],
        env={**env, "PYTHONPATH": str(Path(__file__).parents[3])},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,  # no controlling terminal: ssh could not even try to ask
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "AuthFailed" in last and "host key verification failed" in last, proc.stderr
    assert "known_hosts" in last


async def test_refused_key_and_closed_port(
    sshd: SshServer, remote_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEON_SSH_COMMAND", f"ssh -F {sshd.config_with_other_key()}")
    store, _ = store_of(sshd.url(f"{remote_dir}/x.neon"))
    with pytest.raises(AuthFailed, match=r"refused the login .*Permission denied"):
        await store.stat("x.neon")
    monkeypatch.setenv("NEON_SSH_COMMAND", sshd.ssh_command)
    closed, _ = store_of(f"ssh://127.0.0.1:{free_port()}/tmp/x.neon")
    with pytest.raises(Unavailable, match=r"cannot reach ssh://127\.0\.0\.1:\d+/tmp/x\.neon"):
        await closed.stat("x.neon")


async def test_missing_directory_and_directory_name(ssh_env: SshServer, remote_dir: Path) -> None:
    store, _ = store_of(ssh_env.url(f"{remote_dir}/nodir/x.neon"))
    writer = await store.open_write("x.neon", overwrite=False)
    with pytest.raises(NotFound, match=r"nodir/x\.neon: no such directory"):
        async with writer:
            await writer.write(b"x" * 100)
    (remote_dir / "sub").mkdir()
    store, name = store_of(ssh_env.url(f"{remote_dir}/sub"))
    assert name == "sub"
    writer = await store.open_write("sub", overwrite=False)
    with pytest.raises(Conflict, match="is a directory; end the URL with '/'"):
        async with writer:
            await writer.write(b"x")
    assert entries(remote_dir) == ["sub"]
    assert entries(remote_dir / "sub") == []


async def test_paths_are_never_shell(ssh_env: SshServer, remote_dir: Path) -> None:
    """Quotes, spaces, `$(...)`, globs and a leading '-' reach the far side as names."""
    nasty = remote_dir / "it's a $(touch PWNED) dir"
    nasty.mkdir()

    for name in ("-x y*.neon", "a'b;rm -rf ~.neon", "$HOME`id`.neon"):
        store, got = store_of(ssh_env.url(quote(f"{nasty}/{name}")))
        assert got == name
        async with await store.open_write(name, overwrite=False) as w:
            await w.write(b"data")
        assert (nasty / name).read_bytes() == b"data"
    assert sorted(o.name for o in await store.list()) == sorted(entries(nasty))
    assert not list(remote_dir.rglob("PWNED")) and not Path("PWNED").exists()


async def test_cut_ssh_stream_is_resumed(ssh_env: SshServer, remote_dir: Path) -> None:
    """The reader of a stream whose ssh dies mid-way reports a cut, and read_object carries
    on from the offset it reached."""
    data = os.urandom(5 * 1024 * 1024)
    (remote_dir / "x.neon").write_bytes(data)
    loc = parse_location(ssh_env.url(f"{remote_dir}/x.neon"))
    got = bytearray()
    killed = False
    async for chunk in read_object(loc):
        got += chunk
        if not killed and len(got) >= 1 << 20:
            killed = True
            for pid in _ssh_clients():
                os.kill(pid, 9)  # the ssh client of this read, as a dropped link ends it
    assert killed and bytes(got) == data


async def test_a_read_hands_on_whole_chunks(
    ssh_env: SshServer, remote_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read over ssh hands on CHUNK-sized chunks (the last one shorter), not each pipe
    read's 32-64 KiB: every chunk costs a pull's spool and growing file a write on a thread.
    (The wait for a whole chunk is made long here, so a loaded box cannot cut it.)"""
    monkeypatch.setattr(ssh, "GATHER_SECONDS", 30.0)
    data = os.urandom(5 * CHUNK + 123)
    (remote_dir / "x.neon").write_bytes(data)
    loc = parse_location(ssh_env.url(f"{remote_dir}/x.neon"))
    chunks = [chunk async for chunk in read_object(loc)]
    assert b"".join(chunks) == data
    assert [len(c) for c in chunks] == [CHUNK] * 5 + [123]


async def test_a_slow_stream_is_handed_on_as_it_comes() -> None:
    """What came is handed on after GATHER_SECONDS without a whole chunk (a slow link: the
    progress and the import go on); a stream's end hands on what is left, then b""."""
    stream = asyncio.StreamReader(limit=CHUNK)
    stream.feed_data(b"x" * 1000)
    started = time.monotonic()
    assert await ssh._gathered(stream) == b"x" * 1000
    assert ssh.GATHER_SECONDS <= time.monotonic() - started < 5
    pending = asyncio.ensure_future(ssh._gathered(stream))
    await asyncio.sleep(ssh.GATHER_SECONDS * 3)
    assert not pending.done()  # nothing came: it waits for a first byte
    stream.feed_data(b"y")
    assert await pending == b"y"
    stream.feed_data(b"z" * 10)
    stream.feed_eof()
    assert await ssh._gathered(stream) == b"z" * 10
    assert await ssh._gathered(stream) == b""


def _ssh_clients() -> list[int]:
    """PIDs of this process's ssh clients (not the sshd, also its child)."""
    me = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me and (entry / "comm").read_text().strip() == "ssh":
                found.append(int(entry.name))
    return found


def _logins(sshd: SshServer) -> int:
    """Logins the server accepted so far (its VERBOSE log has a line for each)."""
    return (sshd.root / "sshd.log").read_text().count("Accepted publickey")


async def test_a_command_logs_in_once(ssh_env: SshServer, remote_dir: Path) -> None:
    """Every step of a transfer (write, commit, stat, list, read, delete) runs over one shared
    connection (an ssh login each cost a handshake); at exit the master is told to go and its
    private socket directory is removed; the next command logs in afresh."""
    close_connections()
    before = _logins(ssh_env)
    store, _ = store_of(ssh_env.url(f"{remote_dir}/x.neon"))
    async with await store.open_write("x.neon", overwrite=False) as writer:
        await writer.write(b"y" * 300_000)
    info = await store.stat("x.neon")
    assert info is not None and info.size == 300_000
    assert [o.name for o in await store.list()] == ["x.neon"]
    got = b"".join(
        [chunk async for chunk in read_object(parse_location(store.object_url("x.neon")))]
    )
    assert got == b"y" * 300_000
    await store.delete("x.neon")
    assert _logins(ssh_env) == before + 1
    dirs = list(_MUX_DIRS.values())
    assert len(dirs) == 1 and os.stat(dirs[0]).st_mode & 0o777 == 0o700
    assert [p.is_socket() for p in Path(dirs[0]).iterdir()] == [True]
    close_connections()
    assert not Path(dirs[0]).exists() and not _MUX_DIRS
    assert await store.stat("x.neon") is None
    assert _logins(ssh_env) == before + 2
    close_connections()


def test_a_killed_command_s_socket_directory_is_swept() -> None:
    """A SIGKILLed command cannot remove its socket directory; the next command that opens one
    removes the directories of PIDs that no longer run, and only those (a living process's,
    another name, a symlink stay)."""
    parent = Path(tempfile.mkdtemp(prefix="nsw-"))  # short: socket paths have a limit
    try:
        child = subprocess.Popen(
            [sys.executable, "-c", "import os, signal\n"
             "from cli.transport.ssh import _multiplexed\n"
             "_multiplexed(['ssh'], 'host')\n"
             "os.kill(os.getpid(), signal.SIGKILL)\n"],
            env={**os.environ, "TMPDIR": str(parent)}, cwd=Path(__file__).parents[3],
        )  # fmt: skip
        assert child.wait(timeout=60) == -signal.SIGKILL
        [left] = list(parent.iterdir())
        assert left.name.startswith(f"neon-ssh-{child.pid}-") and left.is_dir()
        living = parent / f"neon-ssh-{os.getpid()}-abcd"
        living.mkdir()
        other = parent / "neon-ssh-notapid"
        other.mkdir()
        link = parent / f"neon-ssh-{child.pid}-link"
        link.symlink_to(living)
        assert sweep_dead_mux_dirs(str(parent)) == [str(left)]
        assert sorted(p.name for p in parent.iterdir()) == sorted(
            [living.name, other.name, link.name]
        )
    finally:
        shutil.rmtree(parent)


def _commands(sshd: SshServer) -> int:
    """Remote commands the server ran so far (a session each, in its VERBOSE log)."""
    return (sshd.root / "sshd.log").read_text().count("Starting session: command")


def _neon_file(manifest_lsn: int, size: int) -> bytes:
    out = io.BytesIO()
    tar = generated_bytes(size, manifest_lsn % 1000)
    write_snapshot_file(out, make_manifest(lsn=manifest_lsn), [tar])
    return out.getvalue()


async def test_a_push_asks_its_questions_in_one_command(
    ssh_env: SshServer, remote_dir: Path
) -> None:
    """The stat before a push also brings the listing, each `.neon` file's manifest and the
    target's partial file, so the listing, the manifest reads and the resumable open after it
    run no remote command; their answers are those of the plain commands, each answer is used
    once, and a partial file of another stream is still cut."""
    heads = {"a.neon": _neon_file(0x1_0000_0000, 50_000), "b.neon": _neon_file(0x2_0000_0000, 9)}
    for name, data in heads.items():
        (remote_dir / name).write_bytes(data)
    (remote_dir / "notes.txt").write_bytes(b"x" * 10)
    (remote_dir / ".c.neon.partial").write_bytes(b"z" * (RESUME_BLOCK + 5))  # another stream
    store, _ = store_of(ssh_env.url(f"{remote_dir}/c.neon"))
    plain, _ = store_of(ssh_env.url(f"{remote_dir}/c.neon"))
    expected_list = await plain.list()
    expected = await snapshots_in(plain)
    assert sorted(expected) == ["a.neon", "b.neon"]
    before = _commands(ssh_env)
    assert await store.stat("c.neon") is None
    assert await store.list() == expected_list
    assert await store.stat("a.neon") == ObjectInfo("a.neon", len(heads["a.neon"]))
    assert await snapshots_in(store) == expected
    assert _commands(ssh_env) == before + 2  # the two stats, nothing else
    assert await store.list() == expected_list  # used once: this one asks again
    assert _commands(ssh_env) == before + 3
    await store.stat("c.neon")
    data = _neon_file(0x3_0000_0000, RESUME_BLOCK + 100_000)
    asked = _commands(ssh_env)
    async with await store.open_resumable("c.neon", overwrite=False) as writer:
        for at in range(0, len(data), 300_000):
            await writer.write(data[at : at + 300_000])
    assert _commands(ssh_env) == asked + 2  # the append and the commit: no DIGESTS
    assert writer.bytes_skipped == 0  # the partial file held other bytes
    assert (remote_dir / "c.neon").read_bytes() == data
    assert not (remote_dir / ".c.neon.partial").exists()
    # The target now exists: a resumable open of it is refused as DIGESTS refuses it.
    await store.stat("c.neon")
    with pytest.raises(AlreadyExists):
        await store.open_resumable("c.neon", overwrite=False)


async def _taken_meanwhile_is_refused(store: SshStore, remote_dir: Path, data: bytes) -> None:
    """A resumable write of t.neon whose name another writer takes before its commit: the
    commit is refused and the other file kept."""
    writer = await store.open_resumable("t.neon", overwrite=False)
    await writer.write(data)
    (remote_dir / "t.neon").write_bytes(b"someone else's")
    with pytest.raises(AlreadyExists):
        await writer.commit()
    assert (remote_dir / "t.neon").read_bytes() == b"someone else's"


async def test_a_small_write_is_appended_and_published_in_one_command(
    ssh_env: SshServer, remote_dir: Path
) -> None:
    """A resumable write of up to SMALL_WRITE bytes (a delta's size) after the push's stat
    runs one remote command: the append started ahead also checks the size and publishes the
    file (the commit was a session of its own, and one more round trip at the end). A target
    taken meanwhile is refused there and no partial file is left."""
    store, _ = store_of(ssh_env.url(f"{remote_dir}/s.neon"))
    data = _neon_file(0x4_0000_0000, 900_000)
    assert len(data) <= SMALL_WRITE
    assert await store.stat("s.neon") is None
    asked = _commands(ssh_env)
    async with await store.open_resumable("s.neon", overwrite=False) as writer:
        for at in range(0, len(data), 64 * 1024):
            await writer.write(data[at : at + 64 * 1024])
    assert _commands(ssh_env) == asked + 1
    assert (remote_dir / "s.neon").read_bytes() == data
    assert entries(remote_dir) == ["s.neon"]
    await _taken_meanwhile_is_refused(store, remote_dir, data)
    assert entries(remote_dir) == ["s.neon", "t.neon"]


async def test_a_push_s_stat_goes_on_as_its_append(ssh_env: SshServer, remote_dir: Path) -> None:
    """The stat of a push (`stat_for_write`) runs in the session that then appends: the
    manifests at the destination and a small write after it run no other remote command (one
    session for the push, not two); a big write streams through it. A target taken after the
    stat is refused with no partial file left, and a session no write took does nothing."""
    heads = {"a.neon": _neon_file(0x1_0000_0000, 50_000)}
    (remote_dir / "a.neon").write_bytes(heads["a.neon"])
    store, _ = store_of(ssh_env.url(f"{remote_dir}/s.neon"))
    plain, _ = store_of(ssh_env.url(f"{remote_dir}/s.neon"))
    expected = await snapshots_in(plain)
    data = _neon_file(0x4_0000_0000, 900_000)
    assert len(data) <= SMALL_WRITE
    before = _commands(ssh_env)
    assert await store.stat_for_write("s.neon") is None
    assert await snapshots_in(store) == expected
    async with await store.open_resumable("s.neon", overwrite=False) as writer:
        for at in range(0, len(data), 64 * 1024):
            await writer.write(data[at : at + 64 * 1024])
    await store.close()
    assert _commands(ssh_env) == before + 1
    assert (remote_dir / "s.neon").read_bytes() == data
    big = _neon_file(0x5_0000_0000, SMALL_WRITE + 300_000)
    assert await store.stat_for_write("b.neon") is None
    asked = _commands(ssh_env)
    async with await store.open_resumable("b.neon", overwrite=False) as writer:
        await writer.write(big)
    assert _commands(ssh_env) == asked + 1  # the commit session of a streamed write
    assert (remote_dir / "b.neon").read_bytes() == big
    assert await store.stat_for_write("t.neon") is None
    await _taken_meanwhile_is_refused(store, remote_dir, data)
    assert entries(remote_dir) == ["a.neon", "b.neon", "s.neon", "t.neon"]
    assert await store.stat_for_write("u.neon") is None
    await store.close()
    assert await store.stat_for_write("v.neon") is None
    async with await store.open_resumable("w.neon", overwrite=False) as writer:
        await writer.write(b"another name: a session of its own")
    await store.close()
    assert entries(remote_dir) == ["a.neon", "b.neon", "s.neon", "t.neon", "w.neon"]
    assert (remote_dir / "w.neon").read_bytes() == b"another name: a session of its own"


async def test_a_small_write_cut_short_is_kept_and_not_published(
    ssh_env: SshServer, remote_dir: Path
) -> None:
    """The append session given a size publishes nothing when fewer bytes arrive (the pusher
    died while sending): the partial file keeps them for the next run."""
    store, _ = store_of(ssh_env.url(f"{remote_dir}/u.neon"))
    proc = await store._spawn(
        APPEND_WAITING, str(remote_dir), f"{remote_dir}/.u.neon.partial", f"{remote_dir}/u.neon",
        "0", stdin=True,
    )  # fmt: skip
    await proc.communicate(b"0 100\n" + b"x" * 60)
    assert proc.returncode == 5  # SHORT
    assert entries(remote_dir) == [".u.neon.partial"]
    assert (remote_dir / ".u.neon.partial").read_bytes() == b"x" * 60


async def test_sessions_started_ahead_and_never_used_do_nothing(
    ssh_env: SshServer, remote_dir: Path
) -> None:
    """An append and a commit started ahead, then abandoned (an export that failed before its
    first byte, or after its last): nothing appears at the name, an empty partial file is
    removed, and a kept one is not cut."""
    store, _ = store_of(ssh_env.url(f"{remote_dir}/d.neon"))
    writer = await store.open_resumable("d.neon", overwrite=False)
    await writer.abort()
    assert entries(remote_dir) == []
    writer = await store.open_resumable("d.neon", overwrite=False)
    await writer.write(b"k" * (RESUME_BLOCK + 1))
    await writer.abort()  # the committer started with the append goes unused
    assert entries(remote_dir) == [".d.neon.partial"]
    assert (remote_dir / ".d.neon.partial").stat().st_size == RESUME_BLOCK + 1


async def test_a_write_does_not_wait_for_ssh_to_take_it(
    ssh_env: SshServer, remote_dir: Path
) -> None:
    """A chunk is queued for `ssh`, not handed over, before `write` returns (up to
    WRITE_BUFFER): with the ssh client stopped (SIGSTOP), 3 MiB are still taken at once; the
    export behind a push no longer stalls while ssh sends. Continued, the object is whole."""
    store, _ = store_of(ssh_env.url(f"{remote_dir}/e.neon"))
    writer = await store.open_write("e.neon", overwrite=False)
    assert isinstance(writer, SshWriter)
    pid = writer._proc.pid
    os.kill(pid, signal.SIGSTOP)
    data = os.urandom(3 * 1024 * 1024)
    try:
        await asyncio.wait_for(writer.write(data), 10)
    except BaseException:
        os.kill(pid, signal.SIGCONT)
        await writer.abort()
        raise
    os.kill(pid, signal.SIGCONT)
    await writer.commit()
    assert (remote_dir / "e.neon").read_bytes() == data


CANCELLED_STAT = """
import asyncio, gc, os, socket
from pathlib import Path
from typing import Any
from cli.transport import parse_location
def children():
    return sorted(p for t in Path(f"/proc/{os.getpid()}/task").iterdir()
                  for p in (t / "children").read_text().split())
with socket.create_server(("127.0.0.1", 0)) as silent:
    location = parse_location(f"ssh://127.0.0.1:{silent.getsockname()[1]}/x/")
    async def main():
        asking = asyncio.ensure_future(location.store.stat("a.neon"))
        await asyncio.sleep(0.5)
        assert children(), "ssh was started"
        asking.cancel()
        try:
            await asking
        except asyncio.CancelledError:
            print("cancelled, children:", children())
    asyncio.run(main())
    gc.collect()
"""


def test_a_cancelled_command_leaves_no_ssh_behind() -> None:
    """A push cancels the destination's stat when the pageserver's answer fails: the ssh
    process (here, waiting on a server that never answers) is killed and reaped before the
    loop ends, not left to ConnectTimeout with its transport collected on a closed loop (an
    'Event loop is closed' traceback after the push's one error line)."""
    for _ in range(3):
        proc = subprocess.run(
            [sys.executable, "-c", CANCELLED_STAT], capture_output=True, text=True, timeout=60
        )
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "cancelled, children: []\n", "")


# A command of a home: stat over ssh, as `neon snapshot push` begins (argv: home, URL).
_COMMAND = (
    "import asyncio, sys\n"
    "from pathlib import Path\n"
    "from cli.home import NeonHome, use_home\n"
    "from cli.transport import parse_location\n"
    "use_home(NeonHome(Path(sys.argv[1])))\n"
    "loc = parse_location(sys.argv[2])\n"
    "print(asyncio.run(loc.store.stat(loc.object_name)))\n"
)


def _command(home: Path, url: str, **env: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _COMMAND, str(home), url], capture_output=True, text=True,
        timeout=60, cwd=Path(__file__).parents[3], env={**os.environ, **env},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def _masters(sock: Path) -> list[int]:
    """PIDs of ssh masters serving the control socket `sock` (`ssh: SOCK [mux]`)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "cmdline").read_bytes().startswith(f"ssh: {sock} ".encode()):
                    found.append(int(entry.name))
    return found


@pytest.fixture
def home() -> Iterator[NeonHome]:
    """A home with a short path (tmp_path's is too long for a socket in it)."""
    root = Path(tempfile.mkdtemp(prefix="nk-"))
    yield NeonHome(root)
    shutil.rmtree(root)


def test_commands_of_a_home_share_one_kept_connection(
    ssh_env: SshServer, remote_dir: Path, home: NeonHome
) -> None:
    """A command's connection outlives it (ControlPersist) in the home's private ssh/
    directory: the next command logs in no more; stop_kept_connections ends the master (by
    `ssh -O exit`), after which a command logs in again; with NEON_SSH_PERSIST=0 every
    command logs in and leaves nothing (fails on the old code: a login per command)."""
    assert kept_dir(home) == home.ssh_dir
    url = ssh_env.url(f"{remote_dir}/x.neon")
    before = _logins(ssh_env)
    try:
        _command(home.root, url)
        _command(home.root, url)
        assert _logins(ssh_env) == before + 1
        [sock] = list(home.ssh_dir.iterdir())
        assert sock.is_socket() and os.stat(home.ssh_dir).st_mode & 0o777 == 0o700
        assert _masters(sock)  # it outlived both commands
    finally:
        stopped = stop_kept_connections(home)
    assert stopped == [str(sock)]
    for _ in range(100):  # the master exits once told to, and removes its socket
        if not _masters(sock) and not sock.exists():
            break
        time.sleep(0.05)
    assert not _masters(sock) and not sock.exists()
    _command(home.root, url, **{PERSIST_ENV: "0"})
    _command(home.root, url, **{PERSIST_ENV: "0"})
    assert _logins(ssh_env) == before + 3
    assert list(home.ssh_dir.iterdir()) == []


def test_a_kept_connection_needs_a_private_directory(
    ssh_env: SshServer, remote_dir: Path, home: NeonHome
) -> None:
    """A home's ssh/ directory others may enter is not used: each command has its own
    connection, ended at its exit, as with NEON_SSH_PERSIST=0."""
    home.ssh_dir.mkdir()
    home.ssh_dir.chmod(0o755)
    url = ssh_env.url(f"{remote_dir}/x.neon")
    before = _logins(ssh_env)
    _command(home.root, url)
    _command(home.root, url)
    assert _logins(ssh_env) == before + 2
    assert list(home.ssh_dir.iterdir()) == []


def test_kept_sockets_of_a_long_home_path_go_to_the_temp_dir(tmp_path: Path) -> None:
    """A socket path holds at most ~100 bytes: a home too deep for one keeps its sockets in
    a directory of the temp dir named by the home, one per home."""
    short = NeonHome(Path("/srv/neon"))
    assert kept_dir(short) == Path("/srv/neon/ssh")
    deep = NeonHome(tmp_path / ("d" * 80))
    other = NeonHome(tmp_path / ("e" * 80))
    assert kept_dir(deep).name.startswith(KEPT_DIR_PREFIX)
    assert kept_dir(deep).parent == Path(tempfile.gettempdir())
    assert kept_dir(deep) != kept_dir(other)


def test_a_home_path_ssh_would_split_keeps_its_connection_in_the_temp_dir(
    ssh_env: SshServer, remote_dir: Path
) -> None:
    """`-o ControlPath=` cannot carry a blank, a quote or a `%` (ssh splits the value there
    or expands a token: "keyword controlpath extra arguments at end of line", exit 255):
    such a home keeps its sockets in the temp dir, and its commands work (fail on 773adc1)."""
    root = Path(tempfile.mkdtemp(prefix="nk %d "))
    home = NeonHome(root)
    try:
        assert kept_dir(home).parent == Path(tempfile.gettempdir())
        url = ssh_env.url(f"{remote_dir}/x.neon")
        before = _logins(ssh_env)
        _command(root, url)
        _command(root, url)
        assert _logins(ssh_env) == before + 1
    finally:
        stop_kept_connections(home)
        shutil.rmtree(root)
        shutil.rmtree(kept_dir(home), ignore_errors=True)


def test_a_verbose_ssh_keeps_no_connection(home: NeonHome, monkeypatch: pytest.MonkeyPatch) -> None:
    """A master started with -v (or a LogLevel) keeps the starting command's stderr open for
    its ControlPersist seconds: a command reading ssh's stderr to its end would wait them."""
    from cli.transport import ssh as ssh_module

    monkeypatch.setattr(ssh_module, "current_home", lambda: home)
    monkeypatch.delenv(PERSIST_ENV, raising=False)
    assert ssh_module._kept(["ssh", "-F", "/dev/null", "-i", "/k/v"], "h") is not None
    for program in (["ssh", "-v"], ["ssh", "-Cvv"], ["ssh", "-o", "LogLevel=DEBUG3"]):
        assert ssh_module._kept(program, "h") is None, program


def test_bad_persist_setting_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.transport.ssh import persist_seconds

    monkeypatch.setenv(PERSIST_ENV, "soon")
    with pytest.raises(InvalidArgument, match="NEON_SSH_PERSIST='soon': expected seconds"):
        persist_seconds()
    monkeypatch.setenv(PERSIST_ENV, "")
    assert persist_seconds() == 60


async def test_a_push_s_stat_that_fails_dismisses_its_waiting_session(
    ssh_env: SshServer, remote_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`stat_for_write` whose reading of the PROBE's answer raises (an answer it cannot
    parse, then a STAT that fails) ends the session waiting to append: not kept for a
    write, and not left running on either side (the old code left it waiting)."""
    store, _ = store_of(ssh_env.url(f"{remote_dir}/f.neon"))
    spawned: list[asyncio.subprocess.Process] = []
    spawn = store._spawn

    async def spawning(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await spawn(*args, **kwargs)
        spawned.append(proc)
        return proc

    async def unreadable(name: str, out: bytes) -> None:
        raise Unavailable("the STAT after an unreadable answer failed")

    monkeypatch.setattr(store, "_spawn", spawning)
    monkeypatch.setattr(store, "_probed", unreadable)
    with pytest.raises(Unavailable, match="STAT after"):
        await store.stat_for_write("f.neon")
    assert len(spawned) == 1
    assert spawned[0].returncode is not None  # dismissed: it ended
    assert store._appending is None
    assert entries(remote_dir) == []
