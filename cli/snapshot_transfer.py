"""`neon snapshot push` and `neon snapshot pull`: a whole snapshot to and from another place,
as its `.neon` file, through any transport (cli/transport/: a path, file://, ssh://,
http(s)://, s3://).

push: the daemon's `.neon` stream, the very bytes `neon snapshot export` writes
(`write_snapshot_file`), goes straight into the transport's writer: nothing is staged, and the
file appears at the destination only once complete and checked there. The write is
resumable (`Store.open_resumable`): an error, SIGINT or SIGKILL leaves what was sent hidden
at the destination (file, ssh: `.NAME.partial`; s3: the pending multipart upload), and the
same push run again regenerates the same bytes (a snapshot's `.neon` file is the same at
every export) and sends only what the destination lacks, after checking what it holds is
those bytes (cli/transport/resume.py); neon:// and http to a receiver too (what a cut push
of a whole file sent is kept there: cli/receiver_partials.py); another http server gets
everything again.

Incremental: the pusher first reads the manifests of the `.neon` files at the destination
(`delta_candidates`); the snapshots of this home among them are offered to the daemon, which
writes a delta on the newest that is an ancestor of SNAP (only the pages written since), or a
whole file when none is; `--full` always sends a whole one. Where learning what the
destination holds takes a round trip (`Store.guess_delta`: ssh, s3, neon://), the pusher
asks for the delta on its own guess meanwhile (`_Guess`: this home's newest snapshot on
SNAP's timeline below it, the parent the daemon picks whenever the destination has it and
nothing newer), and holds what arrives until the answer: passed on if the guess is the
parent the destination's files call for, else dropped and the push asks again with them.

pull: `neon snapshot import` of the URL (`import_snapshot`): the file is read through the
transport, a cut stream is resumed where it stopped, every frame is verified before use, and
the snapshot appears only once the whole file checked out. What arrives is also kept in the
storage's private spool (cli/transport/spool.py), so a pull killed midway and run again reads
those bytes locally (verified again) and fetches only the rest; a spool that does not check
out is dropped and the pull runs once more from the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import click

from cli.context import App, get_app

if TYPE_CHECKING:
    from cli.neon_file_summary import NeonFileSummary
from cli.output import human_size, print_json
from cli.pageserver_control import local_api
from cli.progress import Progress
from cli.secrets import read_secret
from cli.snapshot_export import export_file_name, write_snapshot_file
from cli.snapshot_file_source import is_snapshot_file, resolve_chain, snapshots_in
from cli.storages import DEFAULT_STORAGE, secret_path
from cli.stream_count import NeonStreamCount
from cli.transport import is_transport_url, parse_location
from cli.transport.base import Location, already_exists, use_spool
from cli.transport.blocking import BlockingWriter
from cli.transport.file import FileStore

# The s3 and neon:// transports and the pull's spool are imported where they are used
# (`parse_location` imports the destination's scheme): a push to a file or over ssh imported
# all three, ~5 ms of its CLI's ~0.17 s of CPU.
from pageserver.history.snapshots import import_name_from
from pageserver_api.client import PageserverClient, SyncPageserverClient
from pageserver_api.models import (
    BasebackupPlan,
    BasebackupPlanRequest,
    BasebackupResponse,
    SnapshotInfo,
    SnapshotShowRequest,
)
from proto.client import tls_context
from proto.errors import Conflict, CorruptData, InvalidArgument, NotFound
from snapfile.delta import SnapshotIdentity
from snapfile.manifest import Manifest

URL_FORMS = (
    "a path, file:///PATH, ssh://[USER@]HOST[:PORT]/PATH, http(s)://HOST[:PORT]/PATH, "
    "s3://BUCKET/[PREFIX/]NAME or neon://HOST:PORT/[NAME][?token=TOKEN]"
)
PUSH_URL_HELP = (
    f"a .neon file or a directory (ending in '/'): {URL_FORMS} (what `neon snapshot recv` or "
    "`serve` printed), or an attached s3 or remote storage as STORAGE[:NAME]"
)
PULL_URL_HELP = (
    f"a .neon file: {URL_FORMS} (a `neon snapshot serve`: a receiver only takes pushes), or "
    "STORAGE:NAME in an attached s3 or remote storage"
)
ENDPOINT_HELP = (
    "for s3:// URLs: an S3-compatible service, http(s)://HOST[:PORT] (default: "
    "AWS_ENDPOINT_URL, else AWS)"
)


def parse_transfer_url(app: App, url: str, endpoint_url: str | None) -> Location:
    """The location `url` names: a URL, a path, or an attached s3 storage; `--endpoint-url`
    applies to s3 only."""
    location = storage_location(app, url) or parse_location(url)  # malformed: one line
    if endpoint_url is not None:
        from cli.transport.s3 import S3Store, use_endpoint_url  # on use: see the imports

        if not isinstance(location.store, S3Store):
            raise InvalidArgument(f"--endpoint-url is for s3:// URLs, not {location.url}")
        use_endpoint_url(endpoint_url)
    return location


def storage_location(app: App, spec: str) -> Location | None:
    """`STORAGE` or `STORAGE:NAME`, when STORAGE is an attached s3 storage (as a git remote;
    `./STORAGE` is the path): its bucket and prefix, reached with its endpoint, region, key
    id and secret access key (the AWS environment for those it lacks)."""
    storage, _, name = spec.partition(":")
    if not storage or "/" in storage:
        return None
    row = app.registry.find_storage(storage)
    if row is not None and row.type == "remote":
        return remote_location(app, row.name, row.options["url"], name)
    if row is None or row.type != "s3":
        return None  # a path (native storages are not reached by push and pull)
    secret_file = secret_path(app.home, storage, "secret_access_key")
    key_id = row.options.get("access_key_id") or None
    secret = read_secret(secret_file) if secret_file.exists() else None
    if (key_id is None) != (secret is None):
        given, missing = ("access_key_id", "secret_access_key")
        if key_id is None:
            given, missing = missing, given
        raise InvalidArgument(
            f"storage {storage} has {given} but no {missing}; detach it and attach it again "
            "with both (or neither, to use the AWS environment)"
        )
    from cli.transport.s3 import S3Settings, use_settings  # on use: see the imports

    use_settings(
        S3Settings(
            endpoint_url=row.options.get("endpoint") or None,
            region=row.options.get("region") or None,
            access_key_id=key_id,
            secret_access_key=secret,
        )
    )
    prefix = row.options.get("prefix", "").strip("/")
    directory = f"{prefix}/" if prefix else ""
    return parse_location(f"s3://{row.options['bucket']}/{directory}{name}")


def remote_location(app: App, storage: str, url: str, name: str) -> Location:
    """Object `name` (none: the storage) of the remote storage `storage`: a `neon snapshot
    serve` at `url` (neon://HOST:PORT), reached with the storage's token."""
    token_file = secret_path(app.home, storage, "token")
    if not token_file.exists():
        raise InvalidArgument(
            f"storage {storage} has no token; detach it and attach it again with "
            "-c token=@FILE (the server's token file)"
        )
    from cli.transport.neon import use_tls, use_token  # on use: see the imports

    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None  # validated at attach
    use_token(parts.hostname, parts.port, read_secret(token_file))
    if app.registry.get_storage(storage).options.get("tls") == "on":
        ca = app.registry.get_storage(storage).options.get("ca")
        use_tls(parts.hostname, parts.port, tls_context(ca))
    return parse_location(f"neon://{parts.netloc.rpartition('@')[2]}/{name}")


def snapshot_file_name(snapshot: str) -> str:
    """The file a push into a directory writes: `pgdata1@snap1.neon`, as export names it."""
    return export_file_name(snapshot, ".neon")


def snapshot_name_of(location: Location) -> str:
    """The snapshot a pull makes when given no NAME: the file's name without `.neon`, with
    what a bare snapshot name cannot hold ('@' of a node snapshot) made '-'."""
    name = import_name_from(location.object_name.removesuffix(".neon"))
    if name is None:
        raise InvalidArgument(f"no snapshot name can be made from {location.url}; give NAME")
    return name


def delta_candidates(
    files: dict[str, Manifest], target: str, system_identifier: int, local: dict[str, int]
) -> list[str]:
    """The snapshots of this home (`local`: name -> LSN) that `files` (the `.neon` files at
    the destination, by object name) hold, of the same system (by the name and LSN they were
    made from), each with its chain of parents complete there; `target`, about to be
    replaced, does not count."""
    found = set()
    for name, manifest in files.items():
        if name == target or manifest.system_identifier != system_identifier:
            continue
        if local.get(manifest.source) != manifest.lsn:
            continue
        try:
            chain = resolve_chain(name, manifest, files)
        except CorruptData:
            continue
        if not isinstance(chain, SnapshotIdentity):
            found.add(manifest.source)
    return sorted(found)


@dataclass(frozen=True, slots=True)
class _PushPlan:
    snap: SnapshotInfo
    plan: BasebackupPlan
    candidates: list[str]
    local: dict[str, int]
    """This home's snapshots (name -> LSN)."""


def guessed_parent(snap: SnapshotInfo, local: list[SnapshotInfo]) -> str | None:
    """This home's newest snapshot on `snap`'s timeline below it: an ancestor state of it
    (the daemon's delta_parent takes it wherever it is the newest candidate)."""
    below = [s for s in local if s.timeline_id == snap.timeline_id and s.lsn < snap.lsn]
    return max(below, key=lambda s: s.lsn).name if below else None


def guess_holds(guess: str, candidates: list[str], local: dict[str, int]) -> bool:
    """Whether the delta on `guess` is the one `candidates` call for: the guess is among
    them and no other is as new (the daemon takes the newest ancestor, and the guess is
    one: the same parent, the same bytes as asking with the candidates)."""
    return guess in candidates and all(local[c] < local[guess] for c in candidates if c != guess)


class _HeldWrites:
    """The `.neon` bytes of a guessed delta, held (up to `limit` bytes, then the writer
    waits) until the destination's answer: then passed on to the real writer in order
    (`pass_on`), or refused (`refuse`: the next write raises, which ends the download)."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._ready = threading.Condition()
        self._held: list[bytes] = []
        self._bytes = 0
        self._out: BlockingWriter | None = None
        self._refused = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        with self._ready:
            while self._out is None and not self._refused and self._bytes >= self._limit:
                self._ready.wait()
            if self._refused:
                raise _GuessRefused("the destination does not hold the guessed parent")
            if self._out is not None:
                return self._out.write(data)  # under the lock: after what pass_on wrote
            self._held.append(bytes(data))
            self._bytes += len(data)
            return len(data)

    def pass_on(self, out: BlockingWriter) -> None:
        with self._ready:
            for chunk in self._held:
                out.write(chunk)
            self._held.clear()
            self._out = out
            self._ready.notify_all()

    def refuse(self) -> None:
        with self._ready:
            self._refused = True
            self._held.clear()
            self._ready.notify_all()


class _GuessRefused(Exception):
    """The guessed delta's download ends: the destination called for another parent."""


HOLD_BYTES = 8 << 20
"""At most this much of a guessed delta waits for the destination's answer (a 1% change of
a 1 GiB database is ~0.9 MiB); then the download waits too."""


class _Guess:
    """The delta on a guessed parent, downloaded on a thread of its own into `_HeldWrites`
    while the destination says what it holds."""

    def __init__(
        self, app: App, api: SyncPageserverClient, snap: SnapshotInfo, plan: BasebackupPlan,
        parent: str, on_total: Callable[[int], None] | None = None,
    ) -> None:  # fmt: skip
        self.parent = parent
        self.held = _HeldWrites(HOLD_BYTES)
        self._result: BasebackupResponse | None = None
        self._error: BaseException | None = None

        def download() -> None:
            try:
                self._result = write_snapshot_file(
                    app, snap, self.held, [parent], plan, api, on_total
                )
            except BaseException as exc:  # handed to `result`
                self._error = exc

        self._thread = threading.Thread(target=download, name="guessed-delta")
        self._thread.start()

    def result(self) -> BasebackupResponse:
        """Once passed on: the download's response (its error raised). A whole file (the
        guessed parent destroyed before the daemon made the delta) is valid anywhere."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        assert self._result is not None
        if self._result.parent not in (self.parent, None):
            raise Conflict(f"the delta was made on {self._result.parent}, not on {self.parent}")
        return self._result

    def drop(self) -> None:
        """Refused: its download ends (its error, the refusal's or any, goes nowhere)."""
        self.held.refuse()
        self._thread.join()


class _Guesser:
    """Starts the guessed delta from the plan's pageserver part (`on_local`, on the plan's
    thread) unless the push has failed meanwhile (`end`): a guess not yet started never
    starts, one started is dropped."""

    def __init__(
        self, app: App, api: SyncPageserverClient, on_total: Callable[[int], None] | None = None
    ) -> None:
        self._app, self._api, self._on_total = app, api, on_total
        self._lock = threading.Lock()
        self._ended = False
        self.guess: _Guess | None = None

    def on_local(self, snap: SnapshotInfo, plan: BasebackupPlan, local: list[SnapshotInfo]) -> None:
        parent = guessed_parent(snap, local)
        with self._lock:
            if parent is not None and not self._ended:
                self.guess = _Guess(self._app, self._api, snap, plan, parent, self._on_total)

    def end(self) -> None:
        """The push failed (the plan's thread may still be about to guess)."""
        with self._lock:
            self._ended = True
        if self.guess is not None:
            self.guess.drop()


async def _plan_push(
    api: SyncPageserverClient, location: Location, name: str, force: bool, full: bool,
    on_local: Callable[[SnapshotInfo, BasebackupPlan, list[SnapshotInfo]], None] | None = None,
) -> _PushPlan:  # fmt: skip
    """What a push needs before the export: the snapshot and its plan (one connection to the
    pageserver) and what the destination holds (is the file there; the `.neon` files a delta
    may build on), asked at once (with `on_local`, a store that is `busy_opening` once the
    pageserver has answered): an incremental push is mostly these fixed costs. The
    pageserver's error (an unknown snapshot) wins over the destination's, at once.
    `on_local` is called with the pageserver's part as soon as it is there (the guess), on
    the thread that asked for it.

    The pageserver is asked on a thread of its own, not on this loop: a store's first
    answer may hold the loop with work of its own (s3: making its client, ~0.1 s of CPU at
    load 3), and the guessed delta, asked for once the pageserver answered, waited behind it
    (cut from the trace of `bench.exchange`'s incremental push over s3: the guess asked 92-141 ms
    after the command started, 20-65 ms over a directory)."""
    target = location.object_name

    def pageserver() -> tuple[SnapshotInfo, BasebackupPlan, dict[str, int]]:
        async def ask(
            client: PageserverClient,
        ) -> tuple[SnapshotInfo, BasebackupPlan, list[SnapshotInfo]]:
            # The plan first: an unknown snapshot is refused there as `show` would refuse it.
            # A delta's push takes the snapshot from the listing it needs anyway (one round
            # trip less on the way to the guess: ~3 ms of a ~0.1 s incremental push).
            plan = await client.basebackup_plan(BasebackupPlanRequest(snapshot=name))
            listed = [] if full else await client.snapshot_list()
            snap = next((s for s in listed if s.name == name), None)
            if snap is None:
                snap = await client.snapshot_show(SnapshotShowRequest(name))
            return snap, plan, listed

        snap, plan, listed = api.run(ask)
        if on_local is not None:
            on_local(snap, plan, listed)
        return snap, plan, {s.name: s.lsn for s in listed}

    async def destination() -> dict[str, Manifest]:
        if not force and await location.store.stat_for_write(target) is not None:
            raise already_exists(location.url)  # before the export starts, not after it
        if full:
            return {}
        try:
            return await snapshots_in(location.store)
        except InvalidArgument:
            return {}  # a store that cannot list its objects (a presigned http URL)

    local_part = asyncio.get_running_loop().run_in_executor(None, pageserver)
    if on_local is not None and location.store.busy_opening:
        # The guess first: what the store does on this loop as it starts (s3: its client,
        # ~13 ms of Python) held the GIL the pageserver's answers wait for, and the guess,
        # the push's longest step, started ~20 ms later (84-92 ms into bench.exchange's
        # incremental push over s3, against 61-67 over ssh); the store's questions take
        # less than the delta they are asked beside. Other stores are asked at once.
        await asyncio.wait({local_part})
    asking = asyncio.ensure_future(destination())
    try:
        snap, plan, local = await local_part
    except BaseException:
        asking.cancel()  # a destination slow to answer does not hold the error back
        with contextlib.suppress(BaseException):
            await asking
        raise
    candidates = delta_candidates(await asking, target, plan.system_identifier, local)
    return _PushPlan(snap, plan, candidates, local)


@click.command("push")
@click.option("--to", "url", required=True, metavar="URL", help=PUSH_URL_HELP)
@click.argument("name", metavar="SNAPSHOT")
@click.option("--force", is_flag=True, help="replace a file of the same name at the destination")
@click.option(
    "--full", is_flag=True, help="send the whole snapshot, not a delta on one the destination has"
)
@click.option("--endpoint-url", metavar="URL", help=ENDPOINT_HELP)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def snapshot_push(
    ctx: click.Context, url: str, name: str, force: bool, full: bool, endpoint_url: str | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Send a snapshot's .neon file to URL (a directory gets SNAPSHOT.neon): a delta on the
    newest snapshot of its history the destination has, unless --full."""
    app = get_app(ctx)
    location = parse_transfer_url(app, url, endpoint_url)
    name = app.registry.snapshot_name(name)
    location = location.named(snapshot_file_name(name))
    api = local_api(app)
    # The plan runs on the writer's loop: what the destination's store opened for the write
    # while it answered (ssh: the session that appends) serves the write.
    out = BlockingWriter(
        location, overwrite=force, on_write=lambda chunk: sent.add(chunk), resume=True,
        deferred=True,
    )  # fmt: skip
    progress = Progress(not as_json and sys.stderr.isatty(), f"Pushing {name}")
    sent = NeonStreamCount(progress)
    on_total = functools.partial(_expect_tar, sent if progress.shown else None, out)
    guesser = _Guesser(app, api, on_total if progress.shown else None)  # a delta: see below
    guessing = None if full or not location.store.guess_delta else guesser.on_local
    with out:
        try:
            prepared = out.run(_plan_push(api, location, name, force, full, guessing))
            snap = prepared.snap
            started = time.monotonic()
            guess = guesser.guess
            holds = guess is not None and guess_holds(
                guess.parent, prepared.candidates, prepared.local
            )
            # The tar's size (for this bar, and the receiver's: it goes with the upload's
            # request, which then waits for it) is asked for where a bar shows here or the
            # file is whole. The daemon lists the tar's members before the first byte for it
            # (+22 ms of a 1 GiB file's ~2 s, measured), and the receiver's work on the
            # request (its checks, its work directory) waits too, which a delta with no bar
            # here does not pay: its request goes at once (the receiver's bar: bytes, rate).
            asks = progress.shown or (not holds and not prepared.candidates)
            out.open(total_coming=asks)
            try:
                if holds:
                    assert guess is not None
                    guess.held.pass_on(out)
                    result = guess.result()
                else:
                    if guess is not None:
                        guess.drop()
                    result = write_snapshot_file(
                        app, snap, out, prepared.candidates, prepared.plan, api,
                        on_total if asks else None,
                    )  # fmt: skip
            finally:
                progress.close()
        except BaseException:
            guesser.end()
            raise
    seconds = time.monotonic() - started
    full_size = result.full_tar_bytes or result.tar_bytes
    resumed = out.bytes_skipped  # what an interrupted push left there: not sent again
    sent_bytes = sent.bytes - resumed
    if as_json:
        print_json(
            {
                "snapshot": name,
                "url": location.url,
                "bytes_sent": sent_bytes,
                "bytes_resumed": resumed,
                "file_bytes": sent.bytes,
                "snapshot_bytes": full_size,
                "seconds": round(seconds, 3),
                "sha256": sent.sha256.hexdigest(),
                "lsn": snap.lsn,
                "lsn_text": snap.lsn_text,
                "parent": result.parent,
            }
        )
        return
    share = f" ({100 * sent_bytes / full_size:.1f}%)" if full_size else ""
    how = f" (incremental on {result.parent})" if result.parent else ""
    again = f", resumed at {human_size(resumed)} ({resumed} bytes)" if resumed else ""
    click.echo(
        f"Pushed {name} to {location.url}{how}: {human_size(sent_bytes)} sent for "
        f"{human_size(full_size)} of data{share} in {seconds:.1f} s{again}"
    )


def _expect_tar(sent: NeonStreamCount | None, out: BlockingWriter, total: int) -> None:
    """The daemon announced the tar's size: the push's bar (`sent`, where one shows) and
    the receiver's (sent with the upload) show a percent and an ETA."""
    if sent is not None:
        sent.expect(total)
    out.expect_tar(total)


def _file_fields(summary: NeonFileSummary) -> dict[str, object]:
    """The pulled file as push --json describes the file it sent."""
    return {
        "file_bytes": summary.bytes,
        "sha256": summary.sha256,
        "tar_bytes": summary.tar_bytes,
        "snapshot_bytes": None if summary.delta else summary.tar_bytes,
    }


class _Received(Progress):
    """The progress bar, also counting the bytes read."""

    bytes = 0

    def update(self, done: int, total: int | None) -> None:
        self.bytes = done
        super().update(done, total)


@click.command("pull")
@click.option("--from", "url", required=True, metavar="URL", help=PULL_URL_HELP)
@click.argument("name", required=False)
@click.option("-s", "--storage", default=DEFAULT_STORAGE, show_default=True)
@click.option("--endpoint-url", metavar="URL", help=ENDPOINT_HELP)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def snapshot_pull(
    ctx: click.Context, url: str, name: str | None, storage: str, endpoint_url: str | None,
    as_json: bool,
) -> None:  # fmt: skip
    """Fetch a .neon file from URL as snapshot NAME (default: the file's name)."""
    # Imported here: cli.snapshot_commands imports this module to register the commands.
    from cli.neon_file_summary import summarize
    from cli.snapshot_commands import import_snapshot, native_storage_path, snapshot_json_row
    from cli.transport.neon import NeonStore, keep_token  # on use: see the imports
    from cli.transport.s3 import S3Store
    from cli.transport.spool import SPOOL_DIR, PullSpool

    app = get_app(ctx)
    app.require_own_pageserver("neon snapshot pull")
    location = parse_transfer_url(app, url, endpoint_url)
    location.object_name  # noqa: B018 (a directory URL: one line)
    if isinstance(location.store, NeonStore):
        keep_token(location.store)  # the import parses the shown URL again, without it
    source = location.url if isinstance(location.store, S3Store | NeonStore) else url
    if not is_transport_url(source):
        path = Path(url).absolute()
        if not is_snapshot_file(path):
            raise InvalidArgument(
                f"{path} is not a .neon snapshot file; `neon snapshot import --from` takes "
                "data directories and backups"
            )
        source = str(path)
    name = name if name is not None else snapshot_name_of(location)
    show = not as_json and sys.stderr.isatty()
    started = time.monotonic()
    # A local file is read again where it is; anything fetched goes through a spool.
    spool = None
    if not isinstance(location.store, FileStore):
        spool = PullSpool(native_storage_path(app, storage) / SPOOL_DIR)
        spool.prepare()
    use_spool(spool)
    progress = _Received(show, f"Pulling {name}")
    resumed = 0
    try:
        snap = import_snapshot(app, source, name, storage, progress)
    except CorruptData:
        if spool is None or not spool.resumed:
            raise
        spool.discard()  # what earlier runs kept did not check out: from the start
        progress = _Received(show, f"Pulling {name}")
        snap = import_snapshot(app, source, name, storage, progress)
    except (InvalidArgument, NotFound):
        if spool is not None:
            spool.discard()  # no run will use them
        raise
    finally:
        use_spool(None)
    received = progress.bytes
    if spool is not None:
        received, resumed = spool.fetched, spool.resumed
    seconds = time.monotonic() - started
    if as_json:
        if isinstance(location.store, FileStore):
            kept: Path | None = location.store.directory / location.object_name
        else:
            assert spool is not None
            kept = spool.kept(location.url)
        print_json(
            {
                **snapshot_json_row(snap.to_wire()),
                "url": location.url,
                "bytes_received": received,
                "bytes_resumed": resumed,
                "seconds": round(seconds, 3),
                **({} if kept is None else _file_fields(summarize(kept))),
            }
        )
    if spool is not None:
        spool.discard()
    if as_json:
        return
    again = f", resumed at {human_size(resumed)} ({resumed} bytes)" if resumed else ""
    click.echo(
        f"Pulled {location.url} as snapshot {snap.name}: {human_size(received)} in "
        f"{seconds:.1f} s{again}"
    )
