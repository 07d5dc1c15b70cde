"""What the CLI (maybe root) writes into a data directory that PostgreSQL's OS user owns goes
through cli/pg_files.py: a link that user puts at a file's name, at the temporary name beside
it, or in place of a directory never makes root write, read, truncate or hand over the file a
link names. Runs as root, as CI does (PostgreSQL's account is `postgres`)."""

from __future__ import annotations

import os
import pwd
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from cli import checkout, postmaster, replicas
from cli.checkout import COMPLETE_MARKER
from cli.checkout_delta import _roles_kept
from cli.datadir_roles import bootstrap_superuser
from cli.delta_apply import DeltaApplier
from cli.hints_mark import HINTS_MARK, hints_logged_from, write_mark
from cli.nodes import copy_config_files
from cli.pg_files import read_pg_file, write_pg_file
from cli.slot_file import write_physical_slot
from cli.snapshot_commands import standby_minimums
from datadir_files.pg_account import pg_os_user
from durable_files import TEMP_SUFFIX, fsync_tree
from pg15.pg_control import read_control_file
from proto.errors import CorruptData

SECRET = "root's own secret\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_text(SECRET)
    path.chmod(0o600)
    return path


@pytest.fixture
def datadir(tmp_path: Path) -> Path:
    """A data directory as PostgreSQL's account has it: its own, mode 0700."""
    assert os.geteuid() == 0, "these tests run as root, as CI does"
    user = pg_os_user()
    assert user is not None and user.name == pwd.getpwuid(user.uid).pw_name
    path = tmp_path / "pgdata"
    (path / "global").mkdir(parents=True)
    for d in (path, path / "global"):
        os.chown(d, user.uid, user.gid)
        d.chmod(0o700)
    return path


def _untouched(victim: Path) -> None:
    st = victim.stat()
    assert victim.read_text() == SECRET
    assert (st.st_uid, st.st_gid, st.st_nlink) == (0, 0, 1)


def _pg_owned_file(path: Path) -> None:
    user = pg_os_user()
    assert user is not None
    st = path.lstat()
    assert not path.is_symlink() and path.is_file()
    assert (st.st_uid, st.st_gid, st.st_nlink) == (user.uid, user.gid, 1)


def _returns_without_hanging(call: Callable[[], object], fifo: Path, what: str) -> object:
    """`call()`'s result, or the CorruptData it raised, asserting it did not hang on `fifo`
    (released before failing, so the thread ends)."""
    result: list[object] = []

    def run() -> None:
        try:
            result.append(call())
        except CorruptData as exc:
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(5)
    hung = thread.is_alive()
    while thread.is_alive():  # release each open before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(0.2)
    assert not hung, f"a FIFO at {what} hung the read"
    return result[0]


Plant = Callable[[Path, Path], None]
PLANTS: dict[str, Plant] = {
    "symlink": lambda name, target: name.symlink_to(target),
    "hard link": lambda name, target: os.link(target, name),
}


@pytest.mark.parametrize("plant", PLANTS.values(), ids=PLANTS.keys())
@pytest.mark.parametrize("at", ["name", "temporary name"])
def test_a_link_at_the_name_or_its_temporary_is_replaced(
    datadir: Path, victim: Path, plant: Plant, at: str
) -> None:
    name = "standby.signal"
    plant(datadir / (name if at == "name" else f"{name}.tmp"), victim)
    write_pg_file(datadir, name, b"")
    _untouched(victim)
    _pg_owned_file(datadir / name)
    assert (datadir / name).read_bytes() == b""
    assert not os.path.lexists(datadir / f"{name}.tmp")


def test_a_link_in_place_of_a_directory_fails_the_write(datadir: Path, tmp_path: Path) -> None:
    ours = tmp_path / "ours"
    ours.mkdir()
    (datadir / "global").rmdir()
    (datadir / "global").symlink_to(ours)
    with pytest.raises(CorruptData, match="'global' in the data directory is not a directory"):
        write_pg_file(datadir, "global/pg_control", b"x" * 8192)
    assert list(ours.iterdir()) == []
    # The same for a replication slot's directories (cli/slot_file.py).
    (datadir / "pg_replslot").symlink_to(ours)
    with pytest.raises(CorruptData, match="not a directory"):
        write_physical_slot(datadir, "neon_slot", 0x1000000)
    assert list(ours.iterdir()) == []


def test_reads_never_go_through_a_link_a_fifo_or_someone_elses_file(
    datadir: Path, victim: Path
) -> None:
    assert read_pg_file(datadir, "postgresql.conf") is None
    (datadir / "postgresql.conf").symlink_to(victim)
    with pytest.raises(CorruptData, match=r"postgresql\.conf is not a regular file"):
        read_pg_file(datadir, "postgresql.conf")
    os.mkfifo(datadir / "pg_hba.conf")
    read = _returns_without_hanging(
        lambda: read_pg_file(datadir, "pg_hba.conf"), datadir / "pg_hba.conf", "pg_hba.conf"
    )
    assert isinstance(read, CorruptData)
    # A second name of a file neither ours nor PostgreSQL's account's (here `nobody`'s).
    others = victim.with_name("others")
    others.write_text(SECRET)
    os.chown(others, pwd.getpwnam("nobody").pw_uid, -1)
    os.link(others, datadir / "pg_ident.conf")
    with pytest.raises(CorruptData, match=r"pg_ident\.conf belongs to uid [0-9]+, neither"):
        read_pg_file(datadir, "pg_ident.conf")
    # A second name of one of root's own files (PostgreSQL's account can make one where
    # fs.protected_hardlinks is 0): root reading its own file for the node is a leak.
    os.link(victim, datadir / "postgresql.auto.conf")
    with pytest.raises(CorruptData, match=r"postgresql\.auto\.conf belongs to uid 0 and has 2"):
        read_pg_file(datadir, "postgresql.auto.conf")


def test_callers_write_config_marks_and_copies_through_pg_files(
    datadir: Path, victim: Path, tmp_path: Path
) -> None:
    # postmaster.write_config: links at its files' temporary names, and at postgresql.conf.
    for name in ("postgresql.conf.tmp", "neon.conf.tmp", "pg_hba.conf.tmp"):
        (datadir / name).symlink_to(victim)
    postmaster.write_config(datadir, {"port": 5999}, ["local all all trust"])
    _untouched(victim)
    for name in ("postgresql.conf", "neon.conf", "pg_hba.conf", "pg_ident.conf"):
        _pg_owned_file(datadir / name)
    (datadir / "postgresql.conf").unlink()
    (datadir / "postgresql.conf").symlink_to(victim)
    with pytest.raises(CorruptData, match=r"postgresql\.conf is not a regular file"):
        postmaster.write_config(datadir, {"port": 5999}, ["local all all trust"])
    _untouched(victim)
    # hints_mark: a link at the mark is replaced; a link there reads as no mark.
    (datadir / HINTS_MARK).symlink_to(victim)
    assert hints_logged_from(datadir) is None
    write_mark(datadir, 0x2000000)
    _untouched(victim)
    _pg_owned_file(datadir / HINTS_MARK)
    assert hints_logged_from(datadir) == 0x2000000
    # copy_config_files: a link in the old directory is refused, not copied.
    target = tmp_path / "target"
    target.mkdir()
    with pytest.raises(CorruptData, match=r"postgresql\.conf is not a regular file"):
        copy_config_files(datadir, target)
    assert not any(SECRET in p.read_text() for p in target.iterdir())
    (datadir / "postgresql.conf").unlink()
    copy_config_files(datadir, target)
    assert sorted(p.name for p in target.iterdir()) == [
        "pg_hba.conf",
        "pg_ident.conf",
        "postgresql.auto.conf",
    ]
    for p in target.iterdir():
        _pg_owned_file(p)
        assert p.read_bytes() == (datadir / p.name).read_bytes()


def test_the_pid_file_is_read_neither_through_a_link_nor_without_end(datadir: Path) -> None:
    """postmaster.pid, read by root's status, start, stop and import checks: a link to a
    FIFO there hung the read, one to /dev/zero read until memory ran out; a sparse config
    file of a terabyte was read whole."""
    pid = datadir / "postmaster.pid"
    fifo = datadir.parent / "fifo"
    os.mkfifo(fifo)
    pid.symlink_to(fifo)
    read = _returns_without_hanging(
        lambda: postmaster.read_pid_file(datadir), fifo, "postmaster.pid"
    )
    assert read is None
    pid.unlink()
    pid.symlink_to("/dev/zero")
    assert postmaster.read_pid_file(datadir) is None
    pid.unlink()
    pid.write_text("4242\n/var/lib/x\n")
    os.chown(pid, pwd.getpwnam("nobody").pw_uid, -1)  # another account's cluster: still read
    assert postmaster.read_pid_file(datadir) == 4242
    # remove_stale_locks reads the socket's lock file too, in PostgreSQL's socket directory.
    sockets = datadir.parent / "run"
    sockets.mkdir()
    (sockets / ".s.PGSQL.5999.lock").symlink_to(fifo)
    remover = threading.Thread(
        target=postmaster.remove_stale_locks, args=(datadir, sockets, 5999, 4242), daemon=True
    )
    remover.start()
    remover.join(5)
    hung = remover.is_alive()
    if hung:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        remover.join(10)
    assert not hung, "a FIFO at the socket's lock file hung remove_stale_locks"
    assert not pid.exists()  # it named 4242, no postmaster: removed, the FIFO's link kept
    assert (sockets / ".s.PGSQL.5999.lock").is_symlink()
    conf = datadir / "postgresql.conf"
    with open(conf, "wb") as f:
        f.truncate(1 << 40)
    with pytest.raises(CorruptData, match=r"postgresql\.conf is 1099511627776 bytes, more than"):
        read_pg_file(datadir, "postgresql.conf")


def test_pg_control_is_read_neither_through_a_link_nor_without_end(datadir: Path) -> None:
    """global/pg_control, read by root's status, checkout and import: a link to a FIFO hung
    the read, one to /dev/zero read until memory ran out."""
    control = datadir / "global" / "pg_control"
    fifo = datadir.parent / "fifo"
    os.mkfifo(fifo)
    control.symlink_to(fifo)
    read = _returns_without_hanging(lambda: read_control_file(datadir), fifo, "global/pg_control")
    assert "symbolic links" in str(read)
    control.unlink()
    control.symlink_to("/dev/zero")
    with pytest.raises(CorruptData, match="cannot read"):
        read_control_file(datadir)
    control.unlink()
    os.mkfifo(control)
    with pytest.raises(CorruptData, match="is not a regular file"):
        read_control_file(datadir)


def test_catalog_reads_of_a_live_directory_never_hang(datadir: Path) -> None:
    """pg_filenode.map and pg_authid (the bootstrap superuser's name, read by root for a
    running server) and a primary's live pg_control (a replica's seed): links to a FIFO
    hung them."""
    fifo = datadir.parent / "fifo"
    os.mkfifo(fifo)
    (datadir / "global" / "pg_filenode.map").symlink_to(fifo)
    (datadir / "global" / "pg_control").symlink_to(fifo)
    superuser = _returns_without_hanging(lambda: bootstrap_superuser(datadir), fifo, "global/")
    assert superuser is None
    control = _returns_without_hanging(
        lambda: replicas._live_control_file(datadir), fifo, "global/pg_control"
    )
    assert isinstance(control, CorruptData)


def test_the_checkout_marker_is_written_and_read_through_pg_files(
    datadir: Path, victim: Path
) -> None:
    """A checkout seals a directory with a marker (in place: the node's own directory): a
    link PostgreSQL's account put at the marker's fixed temporary name made root truncate
    and write the file it named."""
    journal = '{"snapshot": "pgdata1@s1"}'
    (datadir / (COMPLETE_MARKER + TEMP_SUFFIX)).symlink_to(victim)
    (datadir / (COMPLETE_MARKER + ".tmp")).symlink_to(victim)
    checkout._mark(datadir, journal)
    _untouched(victim)
    _pg_owned_file(datadir / COMPLETE_MARKER)
    assert checkout._marker(datadir) == journal
    assert checkout._marker(datadir / "missing") is None
    (datadir / COMPLETE_MARKER).unlink()
    (datadir / COMPLETE_MARKER).symlink_to(victim)
    with pytest.raises(CorruptData, match="is not a regular file"):
        checkout._marker(datadir)


def test_making_the_directory_durable_skips_a_fifo(datadir: Path) -> None:
    """fsync_tree (a checkout seals the node's directory, or the rebuilt one): a FIFO
    PostgreSQL's account put in it hung the open."""
    fifo = datadir / "global" / "fifo"
    os.mkfifo(fifo)
    (datadir / "global" / "pg_control").write_bytes(b"x" * 8192)
    syncer = threading.Thread(target=fsync_tree, args=(datadir,), daemon=True)
    syncer.start()
    syncer.join(5)
    hung = syncer.is_alive()
    while syncer.is_alive():  # release it before failing
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        syncer.join(0.2)
    assert not hung, "a FIFO in the directory hung fsync_tree"


def test_standby_settings_and_the_roles_check_never_hang(datadir: Path) -> None:
    """A read-only server's settings (standby_minimums reads pg_control) and a checkout's
    roles check (pg_filenode.map) read by root in PostgreSQL's directory: links to a FIFO
    fail them at once (as no mapping: the single-user step runs), never hang them."""
    fifo = datadir.parent / "fifo"
    os.mkfifo(fifo)
    (datadir / "global" / "pg_control").symlink_to(fifo)
    (datadir / "global" / "pg_filenode.map").symlink_to(fifo)
    read = _returns_without_hanging(lambda: standby_minimums(datadir), fifo, "pg_control")
    assert isinstance(read, CorruptData)
    applier = cast(DeltaApplier, None)  # not reached: the map is refused first
    assert (
        _returns_without_hanging(lambda: _roles_kept(datadir, applier), fifo, "pg_filenode.map")
        is False
    )


def test_a_directory_at_the_temporary_name_is_a_clear_error(datadir: Path) -> None:
    (datadir / "standby.signal.tmp").mkdir()
    with pytest.raises(CorruptData, match=r"standby\.signal\.tmp in the data directory is a "):
        write_pg_file(datadir, "standby.signal", b"")
    assert not (datadir / "standby.signal").exists()
