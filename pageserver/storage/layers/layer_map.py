"""Which layers hold key K at LSN L, and walking a key's version chain through them.

A LayerMap is an immutable snapshot of one timeline's layer files: changes (a flush, a
compaction) build a new map that the timeline swaps in under its lock, so a reader holding a
map keeps a consistent view without locks. Layer counts stay small (compaction bounds them),
so lookups are linear scans over lists sorted newest first.

Invariant the flush and compaction paths keep: the delta layers covering any one key have
disjoint LSN ranges (L0 layers are LSN-disjoint; an L1 set replaces an LSN-contiguous run of
L0 layers, or of frozen in-memory layers in a catch-up's merged flush, and splits it by key;
an L0 merge takes only a run no such flush interrupts, compaction.level0_run). A chain is
therefore walked layer by layer, newest first.

Visibility: a read at L sees versions with LSN <= L. An image layer at LSN I covering K
supersedes every version of K at or below I; if it does not hold K, K does not exist at I.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from pageserver.storage.keys import Key, KeyRange, ranges_cover
from pageserver.storage.layers.delta import DeltaLayer
from pageserver.storage.layers.image import ImageLayer
from pageserver.storage.layers.persistent import PersistentLayer
from pageserver.storage.values import TAG_TOMBSTONE, Image, Value


class VersionSource(Protocol):
    """A layer that can be walked: in-memory (frozen) or a delta file."""

    @property
    def lsn_start(self) -> int: ...

    def collect(self, key: Key, lsn: int, floor: int) -> tuple[list[tuple[int, Value]], bool]: ...

    def newest_versions(self, key_range: KeyRange, lsn: int) -> Iterator[tuple[Key, int, int]]: ...

    def newer_keys(self, key_range: KeyRange, above: int, upto: int) -> list[Key]: ...


class ChainEnd(enum.Enum):
    ENDED = "ended"
    """The versions end with an image, a will_init delta or a tombstone."""
    ABSENT_BELOW = "absent_below"
    """An image layer covers the key without holding it: nothing exists below the versions."""
    OPEN = "open"
    """No base on this timeline: continue in the ancestor at the branch point."""


@dataclass(frozen=True, slots=True)
class LayerMap:
    deltas: tuple[DeltaLayer, ...] = ()
    """Sorted by lsn_end, newest first."""
    images: tuple[ImageLayer, ...] = ()
    """Sorted by LSN, newest first."""

    @staticmethod
    def build(layers: Iterable[PersistentLayer]) -> LayerMap:
        deltas: list[DeltaLayer] = []
        images: list[ImageLayer] = []
        for layer in layers:
            if isinstance(layer, ImageLayer):
                images.append(layer)
            elif isinstance(layer, DeltaLayer):
                deltas.append(layer)
            else:
                raise TypeError(f"not a layer: {layer!r}")
        deltas.sort(key=lambda d: (d.lsn_end, d.lsn_start), reverse=True)
        images.sort(key=lambda i: i.lsn, reverse=True)
        return LayerMap(tuple(deltas), tuple(images))

    def replace(
        self, add: Iterable[PersistentLayer] = (), remove: Iterable[PersistentLayer] = ()
    ) -> LayerMap:
        gone = {id(layer) for layer in remove}
        kept = [layer for layer in self.layers() if id(layer) not in gone]
        return LayerMap.build([*kept, *add])

    def layers(self) -> list[PersistentLayer]:
        return [*self.deltas, *self.images]

    def level0(self) -> list[DeltaLayer]:
        """The L0 delta layers, oldest first."""
        return sorted((d for d in self.deltas if d.name.is_l0), key=lambda d: d.lsn_start)

    def newest_image(self, key: Key, lsn: int) -> ImageLayer | None:
        for image in self.images:
            if image.lsn <= lsn and key in image.key_range:
                return image
        return None

    def newest_image_covering(self, key_range: KeyRange, lsn: int) -> ImageLayer | None:
        for image in self.images:
            if image.lsn <= lsn and image.key_range.covers(key_range):
                return image
        return None

    def deltas_for(self, key: Key, lsn: int, floor: int) -> Iterator[DeltaLayer]:
        """Delta layers that may hold versions of key in (floor, lsn], newest first."""
        for delta in self.deltas:
            if delta.lsn_end - 1 <= floor:
                break
            if delta.lsn_start <= lsn and key in delta.key_range:
                yield delta

    def deltas_overlapping(self, key_range: KeyRange, above: int, lsn: int) -> list[DeltaLayer]:
        """Delta layers overlapping key_range with versions possibly in (above, lsn]."""
        return [
            d
            for d in self.deltas
            if d.lsn_end - 1 > above and d.lsn_start <= lsn and d.key_range.overlaps(key_range)
        ]

    # --- one timeline's part of a read -----------------------------------------------------

    def read_chain(
        self,
        key: Key,
        lsn: int,
        image: ImageLayer | None,
        frozen: Sequence[VersionSource],
        head: list[tuple[int, Value]],
        head_ended: bool,
    ) -> tuple[list[tuple[int, Value]], ChainEnd]:
        """Continue a chain begun in the open layer (`head`) through frozen and delta layers.

        `image` is `newest_image(key, lsn)`, looked up with the same snapshot. Returns the
        versions newest first and how the chain ends on this timeline.
        """
        versions = head
        if head_ended:
            return versions, ChainEnd.ENDED
        floor = image.lsn if image is not None else -1
        sources: list[VersionSource] = [s for s in frozen if s.lsn_start <= lsn]
        sources.extend(self.deltas_for(key, lsn, floor))
        for source in sources:
            found, ended = source.collect(key, lsn, floor)
            versions.extend(found)
            if ended:
                return versions, ChainEnd.ENDED
        if image is None:
            return versions, ChainEnd.OPEN
        data = image.get(key)
        if data is None:
            return versions, ChainEnd.ABSENT_BELOW
        versions.append((image.lsn, Image(data)))
        return versions, ChainEnd.ENDED

    def images_over(self, key_range: KeyRange, lsn: int) -> tuple[list[ImageLayer], bool]:
        """The newest image layers at or below lsn overlapping key_range, newest first, until
        they cover it (older ones are shadowed for every key); and whether they do."""
        images: list[ImageLayer] = []
        for image in self.images:  # newest first
            if image.lsn <= lsn and image.key_range.overlaps(key_range):
                images.append(image)
                if ranges_cover(key_range, (i.key_range for i in images)):
                    return images, True
        return images, False

    def newest_versions_above(
        self,
        key_range: KeyRange,
        lsn: int,
        floor: int,
        frozen: Sequence[VersionSource],
        head: Iterable[tuple[Key, int, int]],
    ) -> list[Iterable[tuple[Key, int, int]]]:
        """(key, LSN, tag) of each source's newest version <= lsn of the keys of key_range:
        the open layer's (`head`), the frozen layers', and the delta layers' that may hold
        versions above `floor`."""
        sources: list[Iterable[tuple[Key, int, int]]] = [head]
        sources.extend(s.newest_versions(key_range, lsn) for s in frozen if s.lsn_start <= lsn)
        sources.extend(
            d.newest_versions(key_range, lsn)
            for d in self.deltas_overlapping(key_range, floor, lsn)
        )
        return sources

    def scan_keys(
        self,
        key_range: KeyRange,
        lsn: int,
        frozen: Sequence[VersionSource],
        head: Iterable[tuple[Key, int, int]],
    ) -> tuple[dict[Key, bool], list[KeyRange]]:
        """Which keys of key_range this timeline decides at lsn, and the ranges it covers.

        Returns ({key: exists}, covered): a key in the dict is decided here (False: tombstone
        or hidden by an image layer); a key in a covered range (under an image layer at or
        below lsn) that is not in the dict does not exist; any other key is the ancestor's.
        """
        # Only the newest image layers until they cover the range matter, and only versions
        # above the oldest of those: older layers are shadowed for every key of the range.
        images, all_covered = self.images_over(key_range, lsn)
        floor = images[-1].lsn if all_covered else -1
        newest: dict[Key, tuple[int, int]] = {}
        for source in self.newest_versions_above(key_range, lsn, floor, frozen, head):
            for key, version_lsn, tag in source:
                seen = newest.get(key)
                if seen is None or version_lsn > seen[0]:
                    newest[key] = (version_lsn, tag)
        held: list[set[Key]] = [
            {k for k, _, _ in i.newest_versions(key_range, lsn)} for i in images
        ]
        # (start, end, LSN, keys held) of each image, newest first, read once (not per key)
        bounds = [
            (i.key_range.start, i.key_range.end, i.lsn, keys)
            for i, keys in zip(images, held, strict=True)
        ]
        decided: dict[Key, bool] = {}
        for key in set(newest).union(*held):
            image_lsn, in_image = -1, False
            for start, end, i_lsn, keys in bounds:
                if start <= key < end:
                    image_lsn, in_image = i_lsn, key in keys
                    break
            version = newest.get(key)
            if version is not None and version[0] > image_lsn:
                decided[key] = version[1] != TAG_TOMBSTONE
            else:
                decided[key] = in_image
        covered = [r for i in images if (r := i.key_range.intersection(key_range)) is not None]
        return decided, covered


def image_tiles(
    key_range: KeyRange, images: tuple[ImageLayer, ...]
) -> list[tuple[KeyRange, ImageLayer]]:
    """key_range cut into pieces, each with the newest image layer covering it (images are
    newest first), in key order; pieces no layer covers are left out (their keys are absent)."""
    uncovered = [key_range]
    tiles: list[tuple[KeyRange, ImageLayer]] = []
    for image in images:
        rest: list[KeyRange] = []
        for piece in uncovered:
            start = max(piece.start, image.key_range.start)
            end = min(piece.end, image.key_range.end)
            if start >= end:
                rest.append(piece)
                continue
            tiles.append((KeyRange(start, end), image))
            if piece.start < start:
                rest.append(KeyRange(piece.start, start))
            if end < piece.end:
                rest.append(KeyRange(end, piece.end))
        uncovered = rest
        if not uncovered:
            break
    tiles.sort(key=lambda tile: tile[0].start)
    return tiles
