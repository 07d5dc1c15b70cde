"""Resuming a write into a partial object that an interrupted write of the same name left
(file and ssh: a hidden `.NAME.partial` beside the target; a `neon snapshot recv`: what it
kept of a cut push, cli/receiver_partials.py).

Why regenerate and compare rather than trust: the writer never knows what the partial object
holds (another snapshot, a full file where this is a delta, a torn tail, damage). A `.neon`
stream is a pure function of the snapshot (docs/snapshot-format.md, Reproducibility), so the
pusher produces it again from its first byte and `PrefixMatcher` compares it, block by block,
with the SHA-256 of each RESUME_BLOCK of the partial object, computed where it lies (locally
or by the far side's `sha256sum`): only digests cross the link. The blocks that match are
kept and not sent; at the first block that differs (or where the partial object ends) it is
cut, and everything from there is written. Memory: one block. So the finished object is the
very bytes of an uninterrupted write, or the write fails its size check; a partial object of
another stream is cut at its first block, i.e. discarded.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cli.transport.base import ObjectWriter

RESUME_BLOCK = 4 * 1024 * 1024
PARTIAL_SUFFIX = ".partial"


def partial_name(name: str) -> str:
    """The hidden name a resumable write of `name` keeps its bytes under until it commits:
    one per target, so that a re-run finds it (a write of another stream discards it)."""
    return f".{name}{PARTIAL_SUFFIX}"


@dataclass(frozen=True, slots=True)
class Partial:
    """What a partial object holds: its size and the SHA-256 (hex) of each of its
    RESUME_BLOCK-sized blocks (the last one may be shorter)."""

    size: int
    digests: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.digests) != -(-self.size // RESUME_BLOCK):
            raise ValueError(f"{len(self.digests)} block digests for {self.size} bytes")


NO_PARTIAL = Partial(0)


class PrefixMatcher:
    """Compares the stream being written with a partial object's blocks (sans I/O).

    `feed` returns None while the stream matches (its bytes need not be sent); then, once,
    `(keep, data)`: keep the partial object's first `keep` bytes, cut the rest, and send
    `data` after them (the bytes of the first block that differed, or those past the partial
    object's end). `finish`, at the stream's end while still matching, returns the same."""

    def __init__(self, partial: Partial) -> None:
        self._partial = partial
        self._block = 0
        self._buffer = bytearray()
        self.kept = 0

    def _expected(self) -> int:
        """The length of the partial object's current block (0: past its end)."""
        return max(0, min(RESUME_BLOCK, self._partial.size - self._block * RESUME_BLOCK))

    def feed(self, data: bytes) -> tuple[int, bytes] | None:
        view = memoryview(data)
        while view:
            expected = self._expected()
            if expected == 0:
                return self._diverge(bytes(view))
            take = expected - len(self._buffer)
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) < expected:
                return None
            if hashlib.sha256(self._buffer).hexdigest() != self._partial.digests[self._block]:
                return self._diverge(bytes(view))
            self.kept += expected
            self._block += 1
            self._buffer.clear()
        return None

    def _diverge(self, rest: bytes) -> tuple[int, bytes]:
        data = bytes(self._buffer) + rest
        self._buffer.clear()
        return self.kept, data

    def finish(self) -> tuple[int, bytes]:
        return self._diverge(b"")


class PartialAppender(ABC):
    """A transport's partial object, written by `ResumingWriter`."""

    def expect_tar(self, total: int) -> None:
        """As `ObjectWriter.expect_tar`, told before `start`."""
        return None

    @abstractmethod
    async def start(self, keep: int) -> None:
        """Keep the partial object's first `keep` bytes (cut now, or by the transport's
        first write or commit: ssh holds a small write until then); later writes append."""

    @abstractmethod
    async def write(self, data: bytes) -> None: ...

    @abstractmethod
    async def commit(self, size: int) -> None:
        """Check the partial object holds `size` bytes and put it at its name, raising when
        it cannot be (a wrong size, the name taken meanwhile); whether the partial then
        stays for a resume is the transport's (ssh keeps a short one's bytes)."""

    @abstractmethod
    async def abort(self) -> None:
        """Stop writing and keep what the partial object holds for the next write (an
        empty one is removed)."""


class ResumingWriter(ObjectWriter):
    """An ObjectWriter that skips the bytes a partial object already holds (`PrefixMatcher`),
    then appends to it through a `PartialAppender`."""

    def __init__(self, partial: Partial, appender: PartialAppender) -> None:
        super().__init__()
        self._matcher: PrefixMatcher | None = PrefixMatcher(partial)
        self._appender = appender

    def expect_tar(self, total: int) -> None:
        self._appender.expect_tar(total)

    async def _start(self, keep: int, data: bytes) -> None:
        self._matcher = None
        self.bytes_skipped = keep
        await self._appender.start(keep)
        if data:
            await self._appender.write(data)

    async def write(self, data: bytes) -> None:
        self.bytes_written += len(data)
        if self._matcher is None:
            await self._appender.write(data)
        elif (diverged := self._matcher.feed(data)) is not None:
            await self._start(*diverged)

    async def commit(self) -> None:
        try:
            if self._matcher is not None:
                await self._start(*self._matcher.finish())
            await self._appender.commit(self.bytes_written)
        except BaseException:
            await self.abort()
            raise

    async def abort(self) -> None:
        await self._appender.abort()


class RemoteAppender(PartialAppender):
    """A partial object the far side keeps itself (a `neon snapshot recv`, over neon:// or
    http): `start` opens a write of the bytes from `keep` on (`open_from`), ahead of which
    the far side puts its first `keep` kept bytes; it verifies the whole at the commit. The
    tar's size goes with it: the far side's bar counts the kept bytes too."""

    def __init__(self, open_from: Callable[[int], Awaitable[ObjectWriter]]) -> None:
        self._open_from = open_from
        self._writer: ObjectWriter | None = None
        self._tar_total: int | None = None

    def expect_tar(self, total: int) -> None:
        self._tar_total = total

    async def start(self, keep: int) -> None:
        self._writer = await self._open_from(keep)
        if self._tar_total is not None:
            self._writer.expect_tar(self._tar_total)

    async def write(self, data: bytes) -> None:
        assert self._writer is not None
        await self._writer.write(data)

    async def commit(self, size: int) -> None:
        assert self._writer is not None
        await self._writer.commit()

    async def abort(self) -> None:
        if self._writer is not None:
            await self._writer.abort()
