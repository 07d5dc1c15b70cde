"""What `neon snapshot recv` does with what it is sent, whatever the wire (neon:// or http):
one-time tokens, and a `.neon` stream made into a snapshot of this home.

A token admits one snapshot: it is consumed when a snapshot sent with it is imported, and a
fresh one is issued for the next pusher (a push cut short does not consume it, so it can be
run again). Tokens are compared in constant time; a used one is refused as used, any other as
wrong.

A whole `.neon` file is taken in as `neon snapshot pull` takes a fetched one
(cli/neon_file_import.py): written, still compressed, into a private work directory of the
storage while the pageserver reads it as it grows, verifying every frame before using it
(pageserver/ingest/import_neon.py); the file ends for the pageserver only under the commit
lock, after the token's second check, and the snapshot is named only once the whole file
checked out. A delta on a snapshot held here is taken in the same way, the pageserver putting
its pages on a branch of the parent as they arrive (pageserver/ingest/import_delta.py
`import_delta_file`). Either way a cut, tampered or oversized stream leaves nothing but a
removed work directory (and a deleted timeline).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

from cli.context import App
from cli.delta_import import parent_here
from cli.neon_file_import import FETCHED_NAME, GrowingFile
from cli.pageserver_control import local_api
from cli.progress import Progress
from cli.receiver_partials import Partials
from cli.snapshot_commands import (
    check_new_import,
    native_storage_path,
    register_delta_file,
    register_import,
    register_neon_file,
)
from cli.snapshot_file_source import (
    chained,
    missing_parent,
    peek_manifest,
    unpack_snapshot_stream,
)
from cli.snapshot_import import import_workdir, is_clean_datadir
from cli.stream_count import NeonStreamCount
from cli.transport.base import ObjectInfo, check_object_name
from cli.transport.resume import Partial
from pageserver.history.snapshots import import_name_from
from pageserver_api.errors import FREE_SPACE_HINT, FULL_ERRNOS, is_full
from pageserver_api.models import (
    BasebackupPlanRequest,
    BasebackupRequest,
    SnapshotInfo,
    SnapshotShowRequest,
)
from proto.errors import (
    AuthFailed,
    CorruptData,
    InvalidArgument,
    NeonError,
    NoSpace,
    NotFound,
    ProtocolError,
)
from proto.server import token_matches
from snapfile.delta import SnapshotIdentity
from snapfile.manifest import encode_manifest, origin_of, snapshot_manifest
from snapfile.verified import check_manifest

FILE_SUFFIX = ".neon"
T = TypeVar("T")


def new_token() -> str:
    return secrets.token_urlsafe(24)


class Tokens(Protocol):
    current: str

    def check(self, given: str | None) -> None:
        """Refuse (AuthFailed, saying why) a token that does not admit a snapshot now."""

    def consume(self, given: str) -> str:
        """A snapshot came with `given`: the token for the next one."""


class StandingToken:
    """One token for every client (`neon snapshot serve`: a home others push to and pull
    from), compared in constant time."""

    def __init__(self, token: str) -> None:
        self.current = token

    def check(self, given: str | None) -> None:
        if given is None:
            raise AuthFailed("this server needs a token (URL ?token=... or NEON_TOKEN)")
        if not token_matches(self.current, given):
            raise AuthFailed("wrong token for this server")

    def consume(self, given: str) -> str:
        self.check(given)
        return self.current


class OneTimeTokens:
    """The token the next pusher must present; those already used are remembered to say so."""

    def __init__(self, first: str | None = None) -> None:
        self.current = first or new_token()
        self._used: list[str] = []

    def check(self, given: str | None) -> None:
        if given is None:
            raise AuthFailed("this receiver needs the token it printed (URL ?token=...)")
        if token_matches(self.current, given):
            return
        if any(token_matches(used, given) for used in self._used):
            raise AuthFailed(
                "this one-time token was already used for a snapshot; use the URL the "
                "receiver printed last"
            )
        raise AuthFailed("wrong token for this receiver; use the URL it printed")

    def consume(self, given: str) -> str:
        """Retire `given` (the current token) and return the next one."""
        self.check(given)
        self._used.append(self.current)
        self.current = new_token()
        return self.current


def snapshot_name_for(file_name: str) -> str:
    """The snapshot a received `pgdata1@snap1.neon` becomes, as pull names it."""
    name = import_name_from(file_name.removesuffix(FILE_SUFFIX))
    if name is None:
        raise InvalidArgument(f"no snapshot name can be made from {file_name!r}; name it")
    return name


@dataclass(frozen=True, slots=True)
class Received:
    snapshot: SnapshotInfo
    bytes: int
    sha256: str
    """Of the `.neon` file received (the pusher's `sha256`)."""
    seconds: float
    next_token: str
    tar_bytes: int | None = None
    """Of the tar the file holds (a delta's: the pages it carries), counted from its frames'
    headers as they passed."""
    delta: bool = False
    """A delta file (its tar is not the whole snapshot's)."""

    @property
    def snapshot_bytes(self) -> int | None:
        """The whole snapshot's tar size, as the push's `snapshot_bytes` (known for a whole
        file only, as `neon snapshot pull --json` says it)."""
        return None if self.delta else self.tar_bytes


class Receiver:
    """Makes the `.neon` streams pushers send into snapshots of `app`'s home, in `storage`;
    `name` (when given) names every snapshot instead of the sent file's name. Pageserver
    calls (blocking) run on worker threads, so the loop goes on serving other connections."""

    def __init__(
        self, app: App, storage: str, name: str | None, tokens: Tokens,
        on_refused: Callable[[str], None] = lambda reason: None, show_progress: bool = False,
        serves: bool = False,
    ) -> None:  # fmt: skip
        self.name, self.tokens = name, tokens
        self.on_refused = on_refused
        """Told why a push was refused (the receiving side's log)."""
        self.show_progress = show_progress
        """A transient bar (bytes, rate) on stderr while a snapshot arrives."""
        self.serves = serves
        """Also serve this home's snapshots (reads, every snapshot described in listings)."""
        # Resolved here, on the CLI's thread: the registry's SQLite connection is not shared
        # with the worker threads the pageserver calls run on.
        self.storage = storage
        self.storage_path = native_storage_path(app, storage)
        self.api = local_api(app)
        self._commit = asyncio.Lock()
        self.partials = Partials(self.storage_path)
        self.partials.sweep(time.time())

    def authenticate(self, token: str | None) -> None:
        """The hello's check: the current one-time token, else refused (and reported)."""
        try:
            self.tokens.check(token)
        except AuthFailed as exc:
            self.on_refused(f"refused a connection: {exc.message}")
            raise

    def snapshot_name(self, file_name: str) -> str:
        check_object_name(file_name, "the pushed file name")
        return self.name or snapshot_name_for(file_name)

    async def stat(self, file_name: str) -> ObjectInfo | None:
        """A snapshot of the name the file would get, if one exists (push refuses to
        replace it)."""
        name = self.snapshot_name(file_name)
        try:
            await asyncio.to_thread(self.api.snapshot_show, SnapshotShowRequest(name))
        except NotFound:
            return None
        return ObjectInfo(file_name, 0)

    async def partial(self, file_name: str) -> Partial:
        """What a cut push of `file_name` left here (cli/receiver_partials.py): the push run
        again sends from the first byte that differs."""
        check_object_name(file_name, "the pushed file name")
        return await asyncio.to_thread(self.partials.describe, file_name)

    async def list(self) -> list[ObjectInfo]:
        """The snapshots held here, as the files that would make them, described by their
        manifests (what a pusher sends deltas on): those received from a `.neon` file by the
        manifest they came with; when serving, the others by the one a read would send."""
        snaps = await asyncio.to_thread(self.api.snapshot_list)
        return [
            ObjectInfo(s.name + FILE_SUFFIX, s.size_bytes or 0, await self._described(s))
            for s in snaps
            if "@HEAD{" not in s.name
        ]

    async def _described(self, snap: SnapshotInfo) -> dict[str, Any] | None:
        if snap.origin is not None:
            described: dict[str, Any] = json.loads(snap.origin)
            return described
        if not self.serves:
            return None
        plan = await asyncio.to_thread(
            self.api.basebackup_plan, BasebackupPlanRequest(snapshot=snap.name)
        )
        created = int(snap.created_at)  # as the read sends it: see read()
        manifest = snapshot_manifest(
            plan.system_identifier, plan.lsn, plan.pg_timeline, snap.name, created
        )
        return cast(dict[str, Any], json.loads(encode_manifest(manifest)))

    async def read(self, file_name: str, offset: int) -> AsyncIterator[bytes]:
        """The `.neon` file of the snapshot `file_name` names (`pgdata1@snap1.neon`), from
        `offset`: the bytes `neon snapshot export` writes for it, the same at every read."""
        if not self.serves:
            raise InvalidArgument(
                "this receiver only takes pushes; pull from a `neon snapshot serve`"
            )
        check_object_name(file_name, "the file name")
        stem = file_name.removesuffix(FILE_SUFFIX)
        try:
            snap = await asyncio.to_thread(self.api.snapshot_show, SnapshotShowRequest(stem))
        except NotFound:
            raise NotFound(f"no snapshot {stem!r} here; see `neon snapshot list`") from None
        created = int(snap.created_at)
        request = BasebackupRequest(
            snapshot=snap.name, mtime=created, snapshot_file=True, created_at=created
        )
        skip = offset
        async with await self.api.connect() as client, client.basebackup(request) as download:
            async for chunk in download:
                if skip >= len(chunk):
                    skip -= len(chunk)
                    continue
                yield chunk[skip:]
                skip = 0

    async def receive(
        self, file_name: str, chunks: AsyncIterator[bytes], token: str | None, resume_at: int = 0,
        tar_total: int | None = None,
    ) -> Received:  # fmt: skip
        """Import the `.neon` stream `chunks` (after the first `resume_at` bytes a cut push
        of the name left here) as a snapshot; raises (and names nothing) unless the whole
        stream checked out. A cut upload's bytes are kept for the push run again.

        `tar_total`: the tar bytes the pusher's daemon announced, the progress bar's total
        (the kept bytes of a resumed push count towards it). A hint, not a limit: a stream
        holding more is not refused for that (the manifest's SHA-256s are what is checked),
        and the bar's total grows."""
        try:
            return await self._receive(file_name, chunks, token, resume_at, tar_total)
        except (NeonError, OSError) as exc:
            if is_full(exc):
                full = self._full(file_name, exc)
                self.on_refused(f"refused {file_name}: {full.message} [{self._cause(exc)}]")
                raise full from None
            reason = exc.message if isinstance(exc, NeonError) else str(exc)
            self.on_refused(f"refused {file_name}: {reason}")
            raise

    def _full(self, file_name: str, exc: NeonError | OSError) -> NoSpace:
        """A push refused for this side's full disk (its own write's, or the pageserver's
        import's), said for the pusher: whose disk, what to do, and that nothing of it
        stays here (a cut push's bytes are kept, these are not: they would hold the space
        the push run again needs). The error's kind only: where this side keeps its files
        and how much room is left there are not the pusher's to read (review L6, session
        25); `_cause` says them in this side's own log."""
        said = exc.message if isinstance(exc, NeonError) else os.strerror(exc.errno or 0)
        kinds = [os.strerror(number) for number in sorted(FULL_ERRNOS)]
        kind = next((k for k in kinds if k in said), os.strerror(errno.ENOSPC))
        return NoSpace(
            f"the receiver's disk is full ({kind}); "
            f"free space in its storage {self.storage!r} and push again (nothing of "
            f"{file_name} was kept there)"
        )

    def _cause(self, exc: NeonError | OSError) -> str:
        """The full disk's whole cause (the file, the room left), for this side's log."""
        if isinstance(exc, NeonError):
            return exc.message.removesuffix(FREE_SPACE_HINT)
        return f"{exc.strerror or exc} writing in {exc.filename or self.storage_path}"

    async def _receive(
        self, file_name: str, chunks: AsyncIterator[bytes], token: str | None, resume_at: int,
        tar_total: int | None,
    ) -> Received:  # fmt: skip
        self.tokens.check(token)
        assert token is not None
        name = self.snapshot_name(file_name)
        started = time.monotonic()
        await asyncio.to_thread(check_new_import, self.api, name)
        if resume_at:
            chunks = self.partials.prefixed(file_name, resume_at, chunks)
        progress = Progress(self.show_progress, f"Receiving {file_name}", transient=True)
        counted = NeonStreamCount(progress, count_tar=True)
        if tar_total is not None:
            counted.expect(tar_total)
        label = f"the pushed {file_name}"
        with import_workdir(self.storage_path) as workdir, contextlib.closing(progress):
            try:
                async with contextlib.AsyncExitStack() as imports:  # each ends in the block
                    register, delta = await self._unpack(
                        _counting(chunks, counted), label, name, workdir, imports
                    )
                    snap, next_token = await publish_once(
                        self._commit, self.tokens, token, register
                    )
            except ProtocolError:  # the upload was cut: kept for the push run again
                self.partials.keep(file_name, workdir / FETCHED_NAME)
                raise
            except BaseException:
                self.partials.drop(file_name)
                raise
        self.partials.drop(file_name)
        seconds = time.monotonic() - started
        return Received(
            snap, counted.bytes, counted.sha256.hexdigest(), seconds, next_token,
            counted.tar_bytes, delta,
        )  # fmt: skip

    async def _unpack(
        self, chunks: AsyncIterator[bytes], label: str, name: str, workdir: Path,
        imports: contextlib.AsyncExitStack,
    ) -> tuple[Callable[[], SnapshotInfo], bool]:  # fmt: skip
        """Take the pushed `.neon` file in under `workdir`; return what imports it as `name`
        (called only under the commit lock: nothing is named before), and whether the file
        is a delta. A whole file is written
        there as it comes and read by the pageserver as it grows (cli/neon_file_import.py: it
        verifies every frame, and the file ends only when the returned call says so); a delta
        on a snapshot received here before likewise, the pageserver putting what changed on
        a branch of it. The imports begun end (fail, unless finished) as `imports` closes."""
        head, first = await peek_manifest(chunks, label)
        rest = chained(first, chunks)
        parent = None if head is None else SnapshotIdentity.parent_of(head)
        if head is not None and parent is None:
            check_manifest(head, label)
            send = functools.partial(register_neon_file, self.api, name, workdir, self.storage_path)
            growing = GrowingFile(workdir / FETCHED_NAME, label, origin_of(head), send)
            await imports.enter_async_context(growing)
            await growing.write(rest)
            return growing.finish, False
        if head is None:  # no manifest at its head: the extraction says what is wrong
            pgdata = workdir / "pgdata"
            manifest = await unpack_snapshot_stream(rest, label, pgdata, head)
            if not is_clean_datadir(pgdata):
                raise CorruptData(f"{label} does not hold a cleanly shut-down data directory")
            register = functools.partial(
                register_import, self.api, name, pgdata, self.storage_path, origin_of(manifest)
            )
            return register, False
        assert parent is not None
        base = await parent_here(self.api, parent)
        if base is None:
            raise missing_parent(label, parent, "this receiver")
        send_delta = functools.partial(
            register_delta_file, self.api, name, workdir, self.storage_path, base
        )
        delta = GrowingFile(workdir / FETCHED_NAME, label, origin_of(head), send_delta)
        await imports.enter_async_context(delta)
        await delta.write(rest)
        return delta.finish, True


async def publish_once(
    lock: asyncio.Lock, tokens: Tokens, token: str, register: Callable[[], T]
) -> tuple[T, str]:
    """A receive's final step: under `lock`, check `token` again (another push with it may
    have finished meanwhile), make the snapshot visible (`register`, blocking) and consume
    the token; the register's answer and the next token.

    Once `register` began, the step runs to its end even when cancelled (the cancellation is
    raised after): the register goes on on its thread whatever happens here, and left there
    the snapshot became visible with its token still valid (a second push with it made a
    second snapshot) and the lock was let go meanwhile (helper-56's review). So a cancelled
    step either made nothing visible (cancelled waiting for the lock, or `register` failed:
    the token stays for a push run again) or named the snapshot and consumed the token."""
    async with lock:
        tokens.check(token)
        registering = asyncio.ensure_future(asyncio.to_thread(register))
        cancelled = False
        while not registering.done():
            try:
                await asyncio.wait({registering})  # cancelled itself, it leaves `registering`
            except asyncio.CancelledError:
                cancelled = True
        snap = registering.result()  # its error: nothing visible, the token kept
        next_token = tokens.consume(token)
        if cancelled:
            raise asyncio.CancelledError
        return snap, next_token


async def _counting(chunks: AsyncIterator[bytes], count: NeonStreamCount) -> AsyncIterator[bytes]:
    """`chunks`, each counted (and shown) as it passes."""
    async for chunk in chunks:
        count.add(chunk)
        yield chunk
