"""A hostile local user (`nobody`) and a careless operator against a live home (issue 16).

One home per module, made with the real CLI: a node with some writes, a snapshot, a stop and a
start. Then `nobody` tries to read what pg-neon keeps (every mode is checked, and real reads are
attempted with runuser), and `storage attach` is pointed at directories it must not take over.
Runs as root, as CI does: PostgreSQL runs as `postgres`, the intruder as `nobody`.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.neoncli import NeonCli, psql
from tests.pgtest import free_port

INTRUDER = "nobody"
SNAPSHOT = "pgdata1@before"


@dataclass(frozen=True, slots=True)
class LiveHome:
    neon: NeonCli
    base: Path  # the test's own directory, holding the home and the directories it attacks
    outside_before: dict[Path, tuple[int, int, int]]


def _outside_dirs(base: Path) -> list[Path]:
    """Directories outside the home that no command may change."""
    return [Path("/"), Path("/etc"), Path(tempfile.gettempdir()), *base.parents, base]


def _identity(paths: list[Path]) -> dict[Path, tuple[int, int, int]]:
    """Mode, owner and group: what a take-over changes."""
    out = {}
    for path in paths:
        st = path.lstat()
        out[path] = (st.st_mode, st.st_uid, st.st_gid)
    return out


@pytest.fixture(scope="module")
def live() -> Iterator[LiveHome]:
    assert os.geteuid() == 0, "these tests run as root: they switch to `nobody` with runuser"
    base = Path(tempfile.mkdtemp(prefix="neon-hostile-"))
    os.chmod(base, 0o711)  # the test's own directory: PostgreSQL's account must enter it
    outside_before = _identity(_outside_dirs(base))
    neon = NeonCli(base / "home", {})
    try:
        neon.run("pg", "create", "--port", str(free_port()))  # 5432 may be another test's
        connstr = neon.json("pg", "show", "pgdata1")["connstr"]
        psql(
            connstr,
            "CREATE TABLE t AS SELECT g, 'canary-' || g AS v FROM generate_series(1, 5000) g",
        )
        neon.run("snapshot", "create", SNAPSHOT)
        psql(connstr, "UPDATE t SET v = v || '!' WHERE g % 7 = 0")
        neon.run("pg", "stop", "pgdata1")
        neon.run("pg", "start", "pgdata1")
        neon.run("snapshot", "start", SNAPSHOT)  # a read-only server's directory, running
        yield LiveHome(neon, base, outside_before)
    finally:
        neon.run("snapshot", "stop", SNAPSHOT, check=False)
        neon.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def as_intruder(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", INTRUDER, "--", *cmd], capture_output=True, text=True, timeout=60
    )


def _native_storages(neon: NeonCli) -> list[Path]:
    return [Path(s["path"]) for s in neon.json("storage", "list") if s["type"] == "native"]


def test_nobody_reads_nothing_under_the_home(live: LiveHome) -> None:
    neon = live.neon
    trees = [neon.home, *_native_storages(neon)]
    # Only the way to PostgreSQL's own directories may be entered by others, never listed.
    servers = neon.home / "snapshot-servers"
    enterable = {neon.home, neon.home / "logs", neon.home / "storage", *trees[1:], servers}
    enterable.update(servers.iterdir())
    assert any(servers.glob("*/pgdata")), "the read-only server's directory is missing"
    seen = 0
    for tree in trees:
        for dirpath, dirnames, filenames in os.walk(tree):
            for name in [*dirnames, *filenames]:
                path = Path(dirpath) / name
                st = path.lstat()
                mode = stat.S_IMODE(st.st_mode)
                seen += 1
                if stat.S_ISSOCK(st.st_mode):
                    continue  # PostgreSQL's sockets, in its 0700 socket directory
                if stat.S_ISDIR(st.st_mode):
                    allowed = 0o011 if path in enterable else 0
                    assert mode & 0o077 & ~allowed == 0, f"{path} is {mode:04o}"
                else:
                    assert mode & 0o077 == 0, f"{path} is {mode:04o}"
        root_mode = stat.S_IMODE(tree.stat().st_mode)
        assert root_mode & 0o066 == 0, f"{tree} is {root_mode:04o}"
    assert seen > 100

    # And for real: the intruder reads no page, no WAL, no listing, no secret, no log.
    history = _native_storages(neon)[0] / "pagestore"
    layer = next(p for p in (history / "timelines").glob("*/*") if "__" in p.name)
    wal = next((history / "wal").glob("*/*/0000000*"))
    targets = [
        ["cat", str(layer)],
        ["cat", str(wal)],
        ["cat", str(history / "snapshots.json")],
        ["ls", str(history)],
        ["ls", str(neon.home)],
        ["cat", str(neon.home / "registry.db")],
        ["cat", str(neon.home / "pageserver" / "pageserver.log")],
        ["ls", str(neon.home / "secrets")],
        ["cat", str(neon.home / "logs" / "primary1" / "postgresql.log")],
        *(["cat", str(log)] for log in servers.glob("*/postgres.log")),
        *(["ls", str(datadir)] for datadir in servers.glob("*/pgdata")),
    ]
    for cmd in targets:
        proc = as_intruder(*cmd)
        assert proc.returncode != 0 and "Permission denied" in proc.stderr, (cmd, proc)
        assert not proc.stdout, cmd


def test_history_of_an_older_home_is_made_private(live: LiveHome) -> None:
    """Homes written before the umask have a 0755 pagestore: the pageserver closes it."""
    neon = live.neon
    history = _native_storages(neon)[0] / "pagestore"
    neon.run("pageserver", "stop")
    os.chmod(history, 0o755)
    neon.run("pageserver", "start")
    assert stat.S_IMODE(history.stat().st_mode) == 0o700
    assert as_intruder("ls", str(history)).returncode != 0


def test_storage_attach_takes_over_no_directory(live: LiveHome) -> None:
    neon, base = live.neon, live.base
    # A private directory with an empty one inside (the repro), a non-empty directory,
    # an empty one owned by someone else, a link to /etc.
    private = base / "private"
    private.mkdir(mode=0o700)
    (private / "d").mkdir()
    full = base / "full"
    full.mkdir()
    (full / "precious").write_text("keep me")
    foreign = base / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)
    (base / "to-etc").symlink_to("/etc")
    watched = [private, private / "d", full, full / "precious", foreign, Path("/mnt")]
    before = _identity(watched)

    refusals = {
        "/": "system directory",
        "/etc": "system directory",
        "/etc/neon-storage": "system directory",
        "/mnt": "system directory",
        str(base / "to-etc"): "system directory",
        "relative/dir": "is relative",
        str(full): "not empty",
        str(neon.home): "not empty",
        str(private / "d"): f"cannot enter {private}",
        str(private / "new"): f"cannot enter {private}",
        str(foreign): "not to us",
    }
    for path, reason in refusals.items():
        line = neon.fail("storage", "attach", "-n", "grab", "-c", f"path={path}")
        assert reason in line, (path, line)
    assert [s["name"] for s in neon.json("storage", "list")] == ["local"]
    assert _identity(watched) == before
    assert sorted(os.listdir(private)) == ["d"] and os.listdir(private / "d") == []
    assert (full / "precious").read_text() == "keep me"
    assert not Path("/etc/neon-storage").exists()

    # What pg-neon may use: a new directory (it creates the missing parents, enterable by
    # PostgreSQL's account, not listable), or an empty one of ours.
    fresh = base / "new" / "deeper" / "store"
    neon.run("storage", "attach", "-n", "fresh", "-c", f"path={fresh}")
    assert "already the directory of storage 'fresh'" in neon.fail(
        "storage", "attach", "-n", "again", "-c", f"path={fresh}"
    )
    for created in (base / "new", base / "new" / "deeper", fresh):
        assert stat.S_IMODE(created.stat().st_mode) == 0o711, created
    empty = base / "empty"
    empty.mkdir()
    neon.run("storage", "attach", "-n", "empty", "-c", f"path={empty}")
    neon.run("pg", "create", "-n", "elsewhere", "--no-start", "-s", "fresh")
    assert (fresh / "elsewhere" / "PG_VERSION").exists()
    neon.run("pg", "destroy", "--yes", "elsewhere")
    # Detach removes nothing; the directory it set up can be attached again.
    assert "nothing was removed" in neon.run("storage", "detach", "empty").stdout
    assert empty.is_dir()
    neon.run("storage", "attach", "-n", "empty", "-c", f"path={empty}")
    neon.run("storage", "detach", "empty")
    neon.run("storage", "detach", "fresh")


def test_home_takes_over_no_directory(live: LiveHome) -> None:
    full = live.base / "someones-dir"
    full.mkdir(mode=0o755)
    (full / "notes").write_text("mine")
    before = _identity([full])
    assert "not empty" in NeonCli(full, {}).fail("storage", "list")
    assert "system directory" in NeonCli(Path("/etc"), {}).fail("storage", "list")
    assert _identity([full]) == before and os.listdir(full) == ["notes"]


def test_no_directory_outside_the_home_changed(live: LiveHome) -> None:
    """Runs last: after every command above, nothing outside the home changed owner or mode."""
    assert _identity(list(live.outside_before)) == live.outside_before
