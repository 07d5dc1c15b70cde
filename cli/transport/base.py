"""The interface every transport implements: a store of named objects (a directory, a URL
prefix, a bucket prefix) that can write an object so that it appears only once complete,
read one from an offset, stat, list and delete.

Writers are async context managers: leaving the block normally commits (the object appears
at its name in one step: a rename, a completed PUT), leaving it by an exception aborts
(nothing appears; what was written is removed when the store can). A process killed while
writing leaves at most a hidden temporary object, never one at the final name.

A write may also be resumable (`Store.open_resumable`): the transports that can (file, ssh,
s3, and neon:// or http to a `neon snapshot recv`) keep what an interrupted write sent,
under a hidden name derived from the object's, and a later resumable write of the same name
skips what they hold after checking it is the very bytes being written again
(cli/transport/resume.py); another http server cannot (a PUT has no partial form) and gets
everything again.

Readers are async iterators of chunks. A stream cut in the middle (a dropped connection)
raises `StreamCut`; `read_object` reopens at the offset reached, so a transfer survives a
few cuts. What the bytes are is not checked here: a `.neon` file verifies itself
(snapfile/reader.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar

from proto.errors import AlreadyExists, InvalidArgument, ProtocolError, Unavailable

CHUNK = 1024 * 1024
REOPEN_ATTEMPTS = 5  # cuts survived by one read_object
REOPEN_DELAY = 0.5  # seconds before the first reopen, doubled after each
QUEUED_CHUNKS = 8  # chunks written and not yet sent by an upload: bounds its memory


class StreamCut(Unavailable):
    """A read stream ended before the object's end (connection dropped): retried at the
    offset reached."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    name: str
    size: int
    described: dict[str, Any] | None = None
    """What the far side says the object holds, when it can say so without the object being
    read (a `neon snapshot recv` describes each snapshot it has by its `.neon` manifest)."""

    def to_wire(self) -> dict[str, Any]:
        """As a listing sends it (neon://'s `object.list`, an http store's index)."""
        wire: dict[str, Any] = {"name": self.name, "size": self.size}
        if self.described is not None:
            wire["described"] = self.described
        return wire

    @classmethod
    def from_wire(cls, value: Any, url: str) -> ObjectInfo:
        """An entry of a listing `url` sent; ProtocolError for anything else."""
        if not (
            isinstance(value, dict)
            and isinstance(value.get("name"), str)
            and type(value.get("size")) is int  # not a bool
            and value["size"] >= 0
            and isinstance(value.get("described"), dict | None)
        ):
            raise ProtocolError(f"{url} described an object as {value!r:.80}")
        return cls(value["name"], value["size"], value.get("described"))


class ObjectWriter(ABC):
    """A stream to one object, visible at its name only after a successful block."""

    def __init__(self) -> None:
        self.bytes_written = 0
        self.bytes_skipped = 0
        """Of `bytes_written`, those the destination already held from an interrupted write
        (a resumed one): not sent again."""

    def expect_tar(self, total: int) -> None:
        """The tar bytes the `.neon` stream about to be written holds (its daemon announced
        them), told before the first `write`: a writer whose far side shows a progress bar
        (a `neon snapshot recv`) sends them with its request; the others need nothing."""
        return None

    def start_request(self) -> None:
        """Send now what this writer sends with its first chunk (an upload's request), no
        total to come: the far side readies itself while the bytes are being made."""
        return None

    @abstractmethod
    async def write(self, data: bytes) -> None:
        """Append `data` (waits while the far side is behind: memory stays bounded)."""

    @abstractmethod
    async def commit(self) -> None:
        """Make the object visible, after checking the far side has all of it."""

    @abstractmethod
    async def abort(self) -> None:
        """Remove what was written (best effort: it is not visible at the name anyway)."""

    async def __aenter__(self) -> ObjectWriter:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            await self.commit()
        else:
            await asyncio.shield(self.abort())


class QueuedUploadWriter(ObjectWriter):
    """A writer whose bytes feed one streamed upload request (`_upload`, sent with the first
    chunk, or at the commit of an empty object): `write` queues a chunk (waiting while
    QUEUED_CHUNKS are not yet sent: bounded memory), `commit` ends the body and awaits the
    far side's answer, `abort` cancels the request, which closes its connection mid-body so
    the far side keeps nothing.

    The request waits for the first chunk (or `start_request`), not the writer's opening,
    so that it can carry what is known only then: the tar's size a push learns from its
    daemon before the first byte (`expect_tar`, for the receiver's progress bar). What
    opening costs (neon://: the connection and its hello) is still paid while the daemon
    makes the file; what the far side does on the request (a receiver's checks and work
    directory) is paid after it, unless the request was started."""

    def __init__(self, shown: str) -> None:
        super().__init__()
        self._shown = shown
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(QUEUED_CHUNKS)
        self._request: asyncio.Future[None] | None = None
        self.tar_total: int | None = None
        """Sent with the request when known (`expect_tar`)."""

    def expect_tar(self, total: int) -> None:
        self.tar_total = total

    def start_request(self) -> None:
        self._started()

    @abstractmethod
    async def _upload(self, body: AsyncIterator[bytes]) -> None:
        """Send `body` as the object; raise the far side's refusal."""

    async def _unsent(self) -> None:
        """Let go of what was opened for a request never sent (an abort before any chunk)."""

    def _started(self) -> asyncio.Future[None]:
        if self._request is None:
            self._request = asyncio.ensure_future(self._upload(self._body()))
        return self._request

    async def _body(self) -> AsyncIterator[bytes]:
        while (chunk := await self._queue.get()) is not None:
            yield chunk

    async def _send(self, item: bytes | None) -> None:
        """Queue `item` for the body, or raise why the request ended first."""
        request = self._started()
        put = asyncio.ensure_future(self._queue.put(item))
        await asyncio.wait({put, request}, return_when=asyncio.FIRST_COMPLETED)
        if put.done():
            return
        put.cancel()
        request.result()  # the far side's refusal or the connection's error
        raise Unavailable(f"{self._shown}: the far side answered before the upload ended")

    async def write(self, data: bytes) -> None:
        await self._send(data)
        self.bytes_written += len(data)

    async def commit(self) -> None:
        try:
            await self._send(None)
            await self._started()
        except BaseException:
            await self.abort()
            raise

    async def abort(self) -> None:
        if self._request is None:
            await self._unsent()
            return
        self._request.cancel()
        with contextlib.suppress(BaseException):
            await self._request


class ObjectReader(ABC):
    """The bytes of one object from an offset, in chunks of at most CHUNK."""

    size: int | None = None
    """The whole object's size, when the transport knows it."""

    @abstractmethod
    def __aiter__(self) -> AsyncIterator[bytes]: ...

    @abstractmethod
    async def close(self) -> None: ...

    async def __aenter__(self) -> ObjectReader:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.shield(self.close())


class HeadReader(ObjectReader):
    """An object whose first bytes were brought along with its store's listing (`head`, of
    `size` bytes in all): those, then the rest through `store.open_read` only if the reader
    goes on (a manifest's reader stops after the head)."""

    def __init__(self, store: Store, name: str, size: int, head: bytes) -> None:
        self._store, self._name, self._head = store, name, head
        self.size = size
        self._rest: ObjectReader | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        if self._head:
            yield self._head
        if len(self._head) < (self.size or 0):
            self._rest = await self._store.open_read(self._name, len(self._head))
            async for chunk in self._rest:
                yield chunk

    async def close(self) -> None:
        if self._rest is not None:
            await self._rest.close()


class Store(ABC):
    """Named objects at one place; `url` is for messages (no secret in it)."""

    url: str
    guess_delta: ClassVar[bool] = True
    """Whether a push asks the pageserver for a delta on its own guess of the parent while
    this store says what it holds (cli/snapshot_transfer.py): worth it where that takes a
    round trip (ssh, s3, neon://); not for a directory here (it answers at once) nor, for
    now, an http server (its index, cli/transport/http.py, is one more GET; not measured)."""
    busy_opening: ClassVar[bool] = False
    """Whether its first answer keeps the event loop busy with CPU of its own (s3: making
    its client, ~13 ms of Python): a push that guesses asks it once the pageserver has
    answered, whose answers on the plan's thread waited for the GIL meanwhile."""

    @abstractmethod
    def object_url(self, name: str) -> str:
        """The URL of object `name`, for messages (no secret in it)."""

    @abstractmethod
    async def stat(self, name: str) -> ObjectInfo | None:
        """The object's size, or None when there is none of that name."""

    async def stat_for_write(self, name: str) -> ObjectInfo | None:
        """`stat`, before a resumable write of `name` on this event loop (a push): a store
        may keep what it opened for the write (ssh: the session that appends), until
        `open_resumable` takes it or `close` lets it go."""
        return await self.stat(name)

    async def close(self) -> None:
        """Let go of what `stat_for_write` kept and no write took (on its event loop)."""
        return None

    @abstractmethod
    async def list(self) -> list[ObjectInfo]:
        """The visible objects (temporary ones of unfinished writes are not listed)."""

    @abstractmethod
    async def open_write(self, name: str, *, overwrite: bool) -> ObjectWriter:
        """A writer for `name`; without `overwrite`, committing over an existing object is
        refused (AlreadyExists) and the existing one is kept."""

    async def open_resumable(self, name: str, *, overwrite: bool) -> ObjectWriter:
        """As `open_write`, but an error, a cancellation or a kill leaves what was sent for
        the next resumable write of `name`, which sends only what the destination lacks
        (`bytes_skipped`) once it checked that the bytes it holds are those written again;
        a different or damaged partial object is discarded. A store that cannot keep a
        partial object writes afresh."""
        return await self.open_write(name, overwrite=overwrite)

    @abstractmethod
    async def open_read(self, name: str, offset: int = 0) -> ObjectReader:
        """The object's bytes from `offset`; NotFound when there is no such object."""

    @abstractmethod
    async def delete(self, name: str) -> None:
        """Remove the object; NotFound when there is none."""


@dataclass(frozen=True, slots=True)
class Location:
    """What a URL names: a store, and an object in it (None: the URL names only the store,
    as `ssh://host/dir/` does; `named` then supplies a default)."""

    store: Store
    name: str | None

    def named(self, default: str) -> Location:
        return self if self.name is not None else Location(self.store, default)

    @property
    def object_name(self) -> str:
        if self.name is None:
            raise InvalidArgument(
                f"{self.store.url} names a directory; give the URL of a .neon file in it"
            )
        return self.name

    @property
    def url(self) -> str:
        return self.store.url if self.name is None else self.store.object_url(self.name)


def already_exists(url: str) -> AlreadyExists:
    return AlreadyExists(f"{url} already exists; choose another name or pass --force")


def check_object_name(name: str, url: str) -> str:
    """Object names are one path component: no '/', not '.', '..' or hidden."""
    if not name or "/" in name or "\0" in name or name.startswith("."):
        raise InvalidArgument(f"invalid object name {name!r} in {url}: use a plain file name")
    return name


Progress = Callable[[int, int | None], None]


class ReadSpool(ABC):
    """Where a process keeps the objects it reads as they arrive (cli/transport/spool.py),
    so that a read killed midway and run again fetches only the rest."""

    @abstractmethod
    def read(self, location: Location, progress: Progress | None) -> AsyncIterator[bytes]: ...


_spool: ReadSpool | None = None


def use_spool(spool: ReadSpool | None) -> None:
    """Read every object through `spool` in this process from now on (`neon snapshot pull`)."""
    global _spool
    _spool = spool


def read_object(location: Location, progress: Progress | None = None) -> AsyncIterator[bytes]:
    """The whole object, reopened at the offset reached when its stream is cut (up to
    REOPEN_ATTEMPTS times, waiting a little longer each time); through this process's spool
    when it has one (`use_spool`)."""
    if _spool is not None:
        return _spool.read(location, progress)
    return read_from(location, 0, progress)


async def read_from(
    location: Location,
    start: int,
    progress: Progress | None = None,
    on_size: Callable[[int | None], None] | None = None,
) -> AsyncIterator[bytes]:
    """The object from offset `start` to its end, reopened where a cut stopped it;
    `progress` gets the offset reached, `on_size` the object's size (when the transport
    knows it) at each opening, before any byte."""
    name = location.object_name
    done = start
    cuts = 0
    while True:
        try:
            async with await location.store.open_read(name, done) as reader:
                total = reader.size
                if on_size is not None:
                    on_size(total)
                async for chunk in reader:
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
                    yield chunk
            return
        except StreamCut:
            cuts += 1
            if cuts > REOPEN_ATTEMPTS:
                raise
            await asyncio.sleep(REOPEN_DELAY * 2 ** (cuts - 1))
