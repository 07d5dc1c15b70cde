"""`neon snapshot import`: bring an existing PostgreSQL 15 database into the page history.

Sources: a running server (`basebackup://USER[:PASSWORD]@HOST[:PORT]/`, a BASE_BACKUP over our
own replication client), a stopped cluster's data directory, `pg_basebackup` output (a plain
directory with backup_label, or `-F tar`: base.tar[.gz|.zst] and pg_wal.tar), or a `.neon`
snapshot file, local or at a URL: file://, ssh://, http(s):// (cli/snapshot_file_source.py).

A stopped, cleanly shut-down data directory is imported as it is. A backup is fuzzy (its files
were copied while the server wrote) and becomes a clean directory by recovery, done by stock
PostgreSQL itself: the backup is unpacked into a private directory under the storage, a
temporary server (PostgreSQL's OS user, unix socket in a private directory only, no TCP, no
archiving, no autovacuum) replays the backup's WAL, and a fast shutdown leaves a shutdown
checkpoint; that directory is imported, then the server is stopped and the directory removed
whatever happens (errors, SIGINT).

Why the result is exactly the source at the backup's end LSN: recovery from a backup_label
replays WAL from the backup's start (its checkpoint's redo point) and is consistent once it
has replayed the backup-end record (what `end_lsn` of BASE_BACKUP, and `End-LSN` of
pg_basebackup's manifest, point just past); stock recovery stops at the end of the WAL it has.
The WAL of a backup can hold records written after that point (fetched segments are copied
whole; the server switches segment only after the backup-end record), so the bytes after the
end LSN are zeroed before recovery: replay then ends exactly at the end LSN, the state that
PostgreSQL's own recovery defines for this backup. `pg_basebackup -X stream` without a
manifest already stops its WAL there. The shutdown checkpoint adds no change to data.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO
from urllib.parse import unquote, urlsplit

import zstandard

from cli import postmaster
from cli.backup_tablespaces import (
    check_catalog_tablespaces,
    check_in_place,
    check_tablespace_links,
    move_in_place,
    plain_tablespace_locations,
    refuse_replayed_locations,
    tablespace_archives,
    tablespace_target,
    take_tablespace_map,
    write_tablespace_locations,
)
from cli.live_import import LiveImport, announced
from cli.progress import Progress
from cli.snapshot_file_source import (
    ParentHere,
    is_snapshot_file,
    is_url_source,
    unpack_snapshot_file,
)
from cli.storages import mask_url
from cli.tablespace_mapping import check_mapped, mapped
from cli.tablespace_settings import in_place_tablespace_settings
from datadir_files.pg_account import give_to_pg_user, make_pg_dir, pg_os_user
from datadir_files.untar import extract_basebackup, extract_stream
from pageserver.pid_file import pid_alive
from pg15.lsn import parse_lsn, segment_file_name
from pg15.pg_control import DB_SHUTDOWNED, read_control_file
from proto.errors import Conflict, CorruptData, InvalidArgument, NotFound
from snapfile.manifest import origin_of

if TYPE_CHECKING:  # the replication client (~50-130 ms of imports): a server's backup only
    from walreceiver.base_backup import (
        BackupArchive,
        BaseBackupOptions,
        BaseBackupProgress,
        BaseBackupResult,
    )
    from walreceiver.receiver import ConnParams

SCHEME = "basebackup"
DEFAULT_PORT = 5432
URL_FORM = "basebackup://USER[:PASSWORD]@HOST[:PORT]/"
RECOVERY_TIMEOUT = 24 * 3600
TMP_PREFIX = ".import-"


@dataclass(frozen=True, slots=True)
class ServerSource:
    """A running server to take a BASE_BACKUP of; the password is never shown."""

    user: str
    host: str
    port: int
    password: str | None

    @property
    def shown(self) -> str:
        return f"{SCHEME}://{self.user}@{self.host}:{self.port}/"


def parse_server_url(url: str) -> ServerSource:
    """Parse basebackup://USER[:PASSWORD]@HOST[:PORT][/]; the password falls back to
    PGPASSWORD, then ~/.pgpass (for the replication pseudo-database)."""
    masked = mask_url(url)
    bad = f"invalid source {masked!r}: expected {URL_FORM}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidArgument(f"{bad} ({exc})") from None
    if parts.scheme != SCHEME or not parts.username or not parts.hostname:
        raise InvalidArgument(bad)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise InvalidArgument(f"{bad} (nothing may follow the host and port)")
    user, host = unquote(parts.username), parts.hostname
    port = port or DEFAULT_PORT
    password = unquote(parts.password) if parts.password is not None else None
    if password is None:
        password = os.environ.get("PGPASSWORD") or pgpass_lookup(host, port, user)
    return ServerSource(user, host, port, password)


def _pgpass_fields(line: str) -> list[str]:
    """The fields of a .pgpass line (`\\:` and `\\\\` escaped)."""
    fields, cur, chars = [], "", iter(line)
    for ch in chars:
        if ch == "\\":
            cur += next(chars, "")
        elif ch == ":":
            fields.append(cur)
            cur = ""
        else:
            cur += ch
    return [*fields, cur]


def pgpass_lookup(host: str, port: int, user: str, passfile: Path | None = None) -> str | None:
    """The password the passfile (`passfile`, else PGPASSFILE, else ~/.pgpass) gives for a
    replication connection, as libpq looks it up."""
    path = passfile or Path(os.environ.get("PGPASSFILE") or Path.home() / ".pgpass")
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    wanted = (host, str(port), "replication", user)
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = _pgpass_fields(line)
        if len(fields) != 5:
            continue
        if all(
            f in ("*", w) or (w == "127.0.0.1" and f == "localhost")
            for f, w in zip(fields[:4], wanted, strict=True)
        ):
            return fields[4]
    return None


def check_path_source(path: Path) -> None:
    """Refuse what cannot be imported: a missing path, a running cluster's directory."""
    if not path.exists():
        raise NotFound(f"{path} does not exist; give a data directory, pg_basebackup output, "
                       f"a .neon file or {URL_FORM}")  # fmt: skip
    if path.is_dir() and (path / "global" / "pg_control").is_file() and _is_running(path):
        raise Conflict(
            f"{path} is the data directory of a running PostgreSQL; stop it or use {URL_FORM}"
        )


def _is_running(datadir: Path) -> bool:
    pid = postmaster.read_pid_file(datadir)
    return pid is not None and pid_alive(pid)


def is_clean_datadir(path: Path) -> bool:
    """A stopped cluster's directory that can be imported as it is (no recovery needed)."""
    if not (path / "global" / "pg_control").is_file() or (path / "backup_label").exists():
        return False
    return read_control_file(path).state == DB_SHUTDOWNED


# Unpacking a backup


def _open_archive(path: Path) -> BinaryIO:
    raw = path.open("rb")
    if path.name.endswith(".zst"):
        return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return raw  # tarfile's r|* reads plain and gzip tars alike


def _archive(directory: Path, stem: str) -> Path | None:
    for suffix in (".tar", ".tar.gz", ".tar.zst"):
        if (directory / f"{stem}{suffix}").is_file():
            return directory / f"{stem}{suffix}"
    return None


def _extract_file(path: Path, target: Path) -> None:
    with _open_archive(path) as stream:
        try:
            extract_basebackup(stream, target)
        except zstandard.ZstdError as exc:
            raise CorruptData(f"{path} is not a valid zstd file: {exc}") from None


def _merge_into(source: Path, target: Path) -> None:
    """Move the files of an extracted pg_wal.tar into the data directory's pg_wal/."""
    for entry in source.rglob("*"):
        dest = target / entry.relative_to(source)
        if entry.is_dir():
            if not dest.is_dir():
                dest.mkdir(mode=0o700)
                give_to_pg_user(dest)
        else:
            os.replace(entry, dest)


def unpack_tar_backup(directory: Path, pgdata: Path, progress: Progress) -> None:
    """pg_basebackup -F tar output into `pgdata`: base.tar[.gz|.zst], each tablespace's
    OID.tar[...] in place (cli/backup_tablespaces.py) and pg_wal.tar[...]."""
    base = _archive(directory, "base")
    if base is None:
        raise NotFound(f"{directory} has no base.tar, base.tar.gz or base.tar.zst")
    progress.update(0, base.stat().st_size)
    _extract_file(base, pgdata)
    for oid, archive in tablespace_archives(directory).items():
        _extract_file(archive, tablespace_target(pgdata, oid))
    wal = _archive(directory, "pg_wal")
    if wal is not None:
        staging = pgdata.parent / "wal"
        _extract_file(wal, staging)
        _merge_into(staging, pgdata / "pg_wal")
        shutil.rmtree(staging)
    progress.update(base.stat().st_size, base.stat().st_size)


def copy_plain_backup(
    source: Path, pgdata: Path, mappings: Mapping[str, str] | None = None
) -> None:
    """A plain pg_basebackup directory (or a stopped one), copied (the user's files are never
    changed); the tablespaces its pg_tblspc symlinks lead to are copied in place (from NEW
    for a link to a mapped OLD: cli/tablespace_mapping.py), their locations kept as a
    tablespace_map (cli/backup_tablespaces.py)."""
    locations = plain_tablespace_locations(source)
    mappings = mappings or {}
    check_mapped(mappings, locations.values(), str(source))
    check_tablespace_links(source, mappings)
    moved = {oid: new for oid, loc in locations.items() if (new := mapped(mappings, loc)) != loc}

    def elsewhere(directory: str, names: list[str]) -> list[str]:
        here = Path(directory) == source / "pg_tblspc"
        return [name for name in names if here and name.isdigit() and int(name) in moved]

    copy = _copy_owned_by(source.stat().st_uid)
    shutil.copytree(source, pgdata, symlinks=False, ignore=elsewhere, copy_function=copy)
    for oid, new in moved.items():
        shutil.copytree(new, tablespace_target(pgdata, oid), symlinks=False, copy_function=copy)
    write_tablespace_locations(pgdata, {**locations, **take_tablespace_map(pgdata)})
    os.chmod(pgdata, 0o700)
    give_to_pg_user(pgdata)
    for root, dirs, files in os.walk(pgdata):
        for name in dirs + files:
            give_to_pg_user(Path(root) / name)


def _foreign_owned(path: Path) -> bool:
    """A directory another account owns, while we run as root: importing it as it is would
    read, as root, whatever links that account put in it (cli/pg_files.py)."""
    return pg_os_user() is not None and path.stat().st_uid != os.geteuid()


def _copy_owned_by(owner: int) -> Callable[[str, str], object]:
    """A copy function for shutil.copytree that copies only regular files owned by `owner`
    (the source directory's) or by PostgreSQL's account (its tablespaces, its pg_wal
    elsewhere), when we run as root; anything when we do not (then we read nothing we could
    not read anyway, and hand nothing over).

    Links are followed, as PostgreSQL's own layout needs (pg_wal and pg_tblspc entries, a
    linked postgresql.conf), but what a link names is checked after it is opened (fstat,
    no window to swap it): a link the cluster's account put in its directory copies only
    what it owns itself, never root's file into the page history (and from it to a node).
    It is opened O_PATH first, which opens no device and no FIFO (opening /dev/watchdog
    arms it, a tape device rewinds, a FIFO's writer is released), and only a regular file
    that passed the checks is then opened for reading, through /proc/self/fd (the same
    inode: no window either)."""
    user = pg_os_user()
    allowed = None if user is None else {owner, user.uid}

    def copy(src: str, dst: str) -> object:
        pinned = os.open(src, os.O_PATH | os.O_CLOEXEC)
        try:
            st = os.fstat(pinned)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidArgument(f"{src} is not a regular file; remove it and retry")
            if allowed is not None and st.st_uid not in allowed:
                raise InvalidArgument(
                    f"{src} is owned by uid {st.st_uid}, not by the data directory's owner "
                    f"(uid {owner}) or PostgreSQL's account: pg-neon does not copy it into "
                    "page history (a link there could name any file); give it to the owner "
                    "or remove it"
                )
            fd = os.open(f"/proc/self/fd/{pinned}", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(pinned)
        try:
            out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                while os.sendfile(out, fd, None, 1 << 30):
                    pass
            finally:
                os.close(out)
        finally:
            os.close(fd)
        return dst

    return copy


def manifest_end_lsn(pgdata: Path) -> int | None:
    """The End-LSN of the backup's WAL range from pg_basebackup's backup_manifest, if any."""
    try:
        ranges = json.loads((pgdata / "backup_manifest").read_text())["WAL-Ranges"]
        return parse_lsn(ranges[-1]["End-LSN"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def cut_wal_after(pgdata: Path, end_lsn: int, timeline: int) -> None:
    """Zero the WAL after `end_lsn` in its segment (see the module docstring)."""
    segment_size = read_control_file(pgdata).wal_segment_size
    segno, offset = divmod(end_lsn, segment_size)
    path = pgdata / "pg_wal" / segment_file_name(timeline, segno, segment_size)
    if not path.is_file() or offset == 0:
        return
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(bytes(segment_size - offset))


# Recovery by a temporary server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def recover(pgdata: Path, workdir: Path) -> None:
    """Run stock crash recovery from the backup_label to the end of the WAL, then a fast
    shutdown: `pgdata` is left cleanly shut down. The server is stopped whatever happens."""
    from cli.snapshot_commands import standby_minimums  # prepared transactions must fit

    for name in ("recovery.signal", "standby.signal"):
        (pgdata / name).unlink(missing_ok=True)  # -R output would wait for a primary forever
    sockdir = workdir / "sock"
    make_pg_dir(sockdir)
    for name in ("postgresql.conf", "postgresql.auto.conf"):  # the source's settings: not ours
        (pgdata / name).unlink(missing_ok=True)
    postmaster.write_config(
        pgdata,
        {
            "port": _free_port(),
            "listen_addresses": "",
            "unix_socket_directories": str(sockdir),
            "archive_mode": False,
            "autovacuum": False,
            "logging_collector": False,
            "fsync": False,  # read back through the same page cache, then discarded
            **standby_minimums(pgdata),
            **in_place_tablespace_settings(pgdata),
        },
        ["local all all peer"],
    )
    log = workdir / "recovery.log"
    try:
        postmaster.start(pgdata, log, timeout=RECOVERY_TIMEOUT)
    finally:
        postmaster.stop(pgdata, "fast", timeout=RECOVERY_TIMEOUT)
    state = read_control_file(pgdata).state
    if state != DB_SHUTDOWNED:
        raise CorruptData(f"recovery of the backup did not end in a clean shutdown; see {log}")


@contextlib.contextmanager
def import_workdir(storage_path: Path) -> Iterator[Path]:
    """A private directory under the storage for one import, removed at the end (its server
    stopped first); those of dead imports are removed first."""
    remove_stale_workdirs(storage_path)
    workdir = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=storage_path))
    os.chmod(workdir, 0o711)  # PostgreSQL's account enters it to reach pgdata and sock
    try:
        yield workdir
    finally:
        with contextlib.suppress(Exception):
            postmaster.stop(workdir / "pgdata", "immediate")
        shutil.rmtree(workdir, ignore_errors=True)


def remove_stale_workdirs(storage_path: Path) -> None:
    for path in storage_path.glob(f"{TMP_PREFIX}*"):
        pid = path.name[len(TMP_PREFIX) :].partition("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(Exception):
                postmaster.stop(path / "pgdata", "immediate")
            shutil.rmtree(path, ignore_errors=True)


def server_params(source: ServerSource, application_name: str = "neon import") -> ConnParams:
    from walreceiver.receiver import ConnParams

    return ConnParams(
        source.host, source.port, source.user, source.password, application_name=application_name
    )


async def fetch_base_backup(
    params: ConnParams,
    pgdata: Path,
    progress: Progress,
    options: BaseBackupOptions | None = None,
    live: LiveImport[Any] | None = None,
) -> BaseBackupResult:
    """BASE_BACKUP from the server into `pgdata`, its WAL cut at the backup's end LSN (`live`
    begun and its big relation files announced as they come: cli/live_import.py)."""
    from walreceiver.base_backup import BaseBackupOptions, run_base_backup

    staged: dict[int, Path] = {}  # tablespace archives come before base.tar
    links: dict[int, str] = {}  # base.tar's pg_tblspc/OID symlinks: the source's locations

    async def sink(archive: BackupArchive, chunks: AsyncIterator[bytes | memoryview]) -> None:
        if archive.tablespace_location is None:
            if live is not None:
                chunks = announced(chunks, live, backup_label=True)
            await extract_stream(chunks, pgdata, tablespace_links=links)
            return
        if archive.tablespace_oid is None:
            raise CorruptData(f"the server sent archive {archive.name!r} for no tablespace")
        staged[archive.tablespace_oid] = pgdata.parent / "tablespaces" / str(archive.tablespace_oid)
        await extract_stream(chunks, staged[archive.tablespace_oid])

    def on_progress(p: BaseBackupProgress) -> None:
        progress.update(p.bytes_done, p.bytes_total)

    # No TABLESPACE_MAP: with it the server leaves pg_tblspc's directories, hence in-place
    # tablespaces, out of base.tar (basebackup.c sendDir); without it, base.tar has them and a
    # symlink per other tablespace, which the extractor records instead of creating.
    options = dataclasses.replace(options or BaseBackupOptions(), tablespace_map=False)
    result = await run_base_backup(params, sink, options=options, on_progress=on_progress)
    move_in_place(pgdata, staged)
    write_tablespace_locations(pgdata, links)
    cut_wal_after(pgdata, result.end_lsn, result.end_timeline)
    return result


@dataclass(frozen=True, slots=True)
class CleanDatadir:
    path: Path
    origin: str | None = None
    """For a `.neon` source: `origin_of` its manifest."""
    delta_on: str | None = None
    """Set when `path` holds a delta's tar as it is, to import on a branch of this snapshot
    (cli/delta_import.py); unset, `path` is a data directory."""


def prepare_clean_datadir(
    source: str,
    storage_path: Path,
    workdir: Path,
    progress: Progress,
    mappings: Mapping[str, str] | None = None,
    parent_here: ParentHere | None = None,
    live: LiveImport[Any] | None = None,
) -> CleanDatadir:
    """The cleanly shut-down data directory to import for `source`: the source itself when
    it is one (a copy when tablespaces are mapped), else a recovered copy in `workdir`; for a
    delta `.neon` file whose parent this home holds (`parent_here`), the delta as it is. A
    server's backup or a whole `.neon` file begins `live` (cli/live_import.py)."""
    pgdata = workdir / "pgdata"
    mappings = mappings or {}
    if is_url_source(source) or is_snapshot_file(Path(source)):
        check_mapped(mappings, (), f"{source} (a .neon file has its tablespaces in place)")
        unpacked = asyncio.run(unpack_snapshot_file(source, pgdata, progress, parent_here, live))
        if live is not None:
            live.extracted()
        progress.close()
        origin = origin_of(unpacked.manifest)
        if unpacked.delta_on is not None:
            return CleanDatadir(pgdata, origin, unpacked.delta_on)
        if not is_clean_datadir(pgdata):
            raise CorruptData(f"{source} does not hold a cleanly shut-down data directory")
        return CleanDatadir(pgdata, origin)
    if is_server_source(source):
        params = server_params(parse_server_url(source))
        asyncio.run(fetch_base_backup(params, pgdata, progress, live=live))
        if live is not None:
            live.extracted()  # before recovery writes to it
        end_lsn = None
    else:
        path = Path(source).absolute()
        check_path_source(path)
        if path.is_dir() and is_clean_datadir(path):
            check_tablespace_links(path, mappings)
            if not mappings and not _foreign_owned(path):
                return CleanDatadir(path)
            copy_plain_backup(path, pgdata, mappings)
            remap_tablespace_locations(pgdata, mappings)
            return CleanDatadir(pgdata)
        if path.is_dir() and _archive(path, "base") is not None:
            unpack_tar_backup(path, pgdata, progress)
        elif path.is_file() and path.name.startswith("base.tar"):
            unpack_tar_backup(path.parent, pgdata, progress)
        elif path.is_dir() and (path / "backup_label").is_file():
            copy_plain_backup(path, pgdata, mappings)
        elif path.is_dir() and (path / "global" / "pg_control").is_file():
            state = read_control_file(path).state_name
            raise Conflict(
                f"{path} was not shut down cleanly (state: {state}); start it and stop it "
                f"with a fast shutdown, or use {URL_FORM}"
            )
        else:
            raise InvalidArgument(
                f"{path} is neither a PostgreSQL data directory, pg_basebackup output nor a "
                ".neon snapshot file"
            )
        end_lsn = manifest_end_lsn(pgdata)
        if end_lsn is not None:
            control = read_control_file(pgdata)
            cut_wal_after(pgdata, end_lsn, control.checkpoint.this_timeline)
    progress.close()
    recover_backup(pgdata, workdir, source, mappings)
    return CleanDatadir(pgdata)


def is_server_source(source: str) -> bool:
    return source.startswith(f"{SCHEME}:")


def recover_backup(
    pgdata: Path, workdir: Path, source: str, mappings: Mapping[str, str] | None = None
) -> None:
    """Make the base backup unpacked in `pgdata` a cleanly shut-down data directory: its
    tablespaces checked and put in place, then stock recovery (`recover`)."""
    mappings = mappings or {}
    if not (pgdata / "backup_label").is_file():
        raise CorruptData(f"{source} has no backup_label: it is not a base backup")
    locations = take_tablespace_map(pgdata)
    check_mapped(mappings, locations.values(), source)
    refuse_replayed_locations(pgdata)
    check_in_place(pgdata, locations)
    recover(pgdata, workdir)
    check_catalog_tablespaces(pgdata)
    write_tablespace_locations(
        pgdata, {oid: mapped(mappings, loc) for oid, loc in locations.items()}
    )


def remap_tablespace_locations(pgdata: Path, mappings: Mapping[str, str]) -> None:
    """The locations a copied directory's tablespace_map records, each mapped OLD as NEW."""
    locations = take_tablespace_map(pgdata)
    write_tablespace_locations(
        pgdata, {oid: mapped(mappings, loc) for oid, loc in locations.items()}
    )
