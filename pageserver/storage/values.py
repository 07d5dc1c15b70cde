"""What the store keeps per (key, LSN): a whole image, a WAL delta, or a tombstone.

The engine never interprets the bytes: an Image is a page (or a metadata blob), a WalDelta is
a record that redo (elsewhere) applies on the previous version. The encoding is one tag byte
followed by the payload, so a value costs one byte over its data.
"""

from __future__ import annotations

from dataclasses import dataclass

from proto.errors import CorruptData


@dataclass(frozen=True, slots=True)
class Image:
    """A whole value: no older version is needed to know it."""

    data: bytes


@dataclass(frozen=True, slots=True)
class WalDelta:
    """A WAL record to replay on the previous version (will_init: the chain starts here)."""

    record: bytes
    will_init: bool = False


@dataclass(frozen=True, slots=True)
class Tombstone:
    """The key does not exist from this LSN on (e.g. a dropped relation's page).

    Reads stop at it (no older version, no ancestor) and return no data; key scans omit the
    key. Ingest may use it or may instead rely on its own metadata (relation sizes, directories).
    """


TOMBSTONE = Tombstone()

Value = Image | WalDelta | Tombstone

TAG_IMAGE = 1
TAG_DELTA = 2
TAG_DELTA_INIT = 3
TAG_TOMBSTONE = 4


def value_tag(value: Value) -> int:
    if isinstance(value, Image):
        return TAG_IMAGE
    if isinstance(value, WalDelta):
        return TAG_DELTA_INIT if value.will_init else TAG_DELTA
    return TAG_TOMBSTONE


def tag_ends_chain(tag: int) -> bool:
    """True when no older version is needed below a value with this tag."""
    return tag != TAG_DELTA


def encode_value(value: Value) -> bytes:
    if isinstance(value, Image):
        return bytes((TAG_IMAGE,)) + value.data
    if isinstance(value, WalDelta):
        return bytes((TAG_DELTA_INIT if value.will_init else TAG_DELTA,)) + value.record
    return bytes((TAG_TOMBSTONE,))


def decode_value(raw: bytes | memoryview) -> Value:
    if len(raw) == 0:
        raise CorruptData("empty value encoding")
    tag = raw[0]
    body = bytes(raw[1:])
    if tag == TAG_IMAGE:
        return Image(body)
    if tag == TAG_DELTA:
        return WalDelta(body, False)
    if tag == TAG_DELTA_INIT:
        return WalDelta(body, True)
    if tag == TAG_TOMBSTONE and not body:
        return TOMBSTONE
    raise CorruptData(f"unknown value tag {tag}")


def value_size(value: Value) -> int:
    """Encoded size, for memory accounting without encoding."""
    if isinstance(value, Image):
        return 1 + len(value.data)
    if isinstance(value, WalDelta):
        return 1 + len(value.record)
    return 1


@dataclass(frozen=True, slots=True)
class ReconstructData:
    """Everything needed to rebuild one key at one LSN.

    `image` is the newest whole value at or below the LSN (None if the chain starts with a
    will_init delta or nothing was found); `deltas` are the WAL deltas above it, oldest first.
    Both empty means the key has no value at that LSN (never written, or a tombstone).
    """

    image: tuple[int, bytes] | None
    deltas: tuple[tuple[int, WalDelta], ...]

    @property
    def is_empty(self) -> bool:
        return self.image is None and not self.deltas

    @property
    def is_complete(self) -> bool:
        """True when the chain has a base: an image or a will_init delta first."""
        return self.image is not None or (bool(self.deltas) and self.deltas[0][1].will_init)


EMPTY_RECONSTRUCT = ReconstructData(None, ())
