"""Every key of a key range rebuilt at one LSN in bulk, for image creation (compaction, GC).

The per-key path (`Timeline.get_reconstruct_data` + `apply_delta.reconstruct`) costs a layer
map walk, a decoded Value object per version and a DecodedRecord per delta: image creation
spent most of a flush there (issue 10: 10.8 s of 15.5 s, for 484k versions of 6950 pages).
Here each layer covering the range is walked once, in key order, alongside the range's keys;
a key's version entries and decompressed blocks go as they are stored to the C chain redo
(`pageserver/redo/_redo.c` rebuild_page), which picks the chain's base, decodes the records
and redoes them (heap, btree, full-page images, CLOG commit/abort bits). What it does not
handle it hands back: the rest of the chain (`apply_delta.continue_chain`), or the whole key
(`reference`: the per-key path, which also reads the ancestors and raises the errors).

A key's layers are asked newest first, and only from its newest chain start on: the C redo
starts from the newest image, will_init delta or tombstone among the versions it is given, so
the versions below it, in that layer and in every older one (and the image layer's), are never
used. The version entries' tags say where it is (index only), so their blocks are not
decompressed: after a pgbench run most pages have a full-page image after each checkpoint, and
image creation over an L1 layer spanning several checkpoints decompressed all of them.

The walk over the layers runs in C (`_redo.rebuild_run`, RUN_KEYS keys a call: the index
read in place, only block decompression called back) with `_walk_python` its reference; the
Python per-key path stays the reference of both (NEON_PURE_PYTHON=1 runs it alone); the tests
compare the two walks, and image layers written with and without them, on real WAL
(tests/pageserver/reconstruct/test_range_rebuild.py).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from pageserver.reconstruct.apply_delta import continue_chain, reconstruct_uncached
from pageserver.redo.native import redo as _native
from pageserver.storage.keys import KEY_SIZE, Key, KeyRange, key_successor
from pageserver.storage.layers.blocks import RunInput
from pageserver.storage.layers.delta import DeltaLayer
from pageserver.storage.layers.image import ImageLayer
from pageserver.storage.layers.layer_map import image_tiles
from pageserver.storage.layers.persistent import PersistentLayer
from pageserver.storage.timeline import PersistentView, Timeline
from pageserver.storage.values import TAG_DELTA, TAG_IMAGE, WalDelta
from pg15.constants import BLCKSZ

Reference = Callable[[Key], "bytes | None"]
"""The per-key path for one key at the range's LSN."""

Part = tuple[bytes, int, list[bytes], int]
"""One layer's share of a key for `_redo.rebuild_page`: (version entries, number of the first
block they reference, those blocks decompressed, floor + 1: versions at or below floor are
shadowed by an image layer)."""

_ENTRY_TAG = 8  # offset of the tag in a version entry (pageserver/storage/layers/blocks.py)
_ENTRY_BLOCK = 9  # offset of its block number (big-endian u32)
_ENTRY_SIZE = 21  # format version 1's entry, which key_versions_raw returns
_DELTA_TAG = bytes((TAG_DELTA,))
_rebuild_run = getattr(_native, "rebuild_run", None)
"""The C walk (`_walk_native`); None: the Python one (an extension built before it, or a
test of the reference)."""


def chain_start(raw: bytes) -> int:
    """Index of the newest of `raw`'s version entries that starts a chain (an image, a
    will_init delta, a tombstone: every tag but TAG_DELTA, as `_redo.rebuild_page` picks its
    base), -1 if none does."""
    return len(raw[_ENTRY_TAG::_ENTRY_SIZE].rstrip(_DELTA_TAG)) - 1


_PAST_END = Key(b"\xff" * (KEY_SIZE + 1))  # sorts after every key


class _Cursor:
    """One layer walked forward over ascending keys, keeping only the blocks of the last key.
    `next` is the first key not yet passed, so a key the layer does not hold costs the caller
    one comparison (most layers hold few of a range's keys)."""

    def __init__(self, layer: PersistentLayer, start: Key) -> None:
        self.file = layer.file
        self.lsn_end = layer.lsn_end
        self.i = self.file.lower_bound(start)
        self.n = self.file.n_keys
        self.next = self._key()
        self.blocks: dict[int, bytes] = {}

    def _key(self) -> Key:
        return self.file.key_at(self.i) if self.i < self.n else _PAST_END

    def versions(
        self, key: Key, floor: int, lsn: int, whole: bool = False
    ) -> tuple[bytes, int, list[bytes], bool] | None:
        """(entries, first block, blocks, based) of `key`'s versions in (floor, lsn] from the
        newest one starting a chain on (`based`: there is one; else, or `whole`, all of
        them), or None if the layer holds none."""
        if self.next > key:
            return None
        f = self.file
        if self.next < key:
            self.i = f.lower_bound(key)
            self.next = self._key()
            if self.next != key:
                return None
        raw, first, last = f.key_versions_raw(self.i, floor, lsn)
        self.i += 1
        self.next = self._key()
        if not raw:
            return None
        start = chain_start(raw)
        if start > 0 and not whole:  # the versions below it are never used: blocks unread
            raw = raw[start * _ENTRY_SIZE :]
            first = int.from_bytes(raw[_ENTRY_BLOCK : _ENTRY_BLOCK + 4], "big")
        held = self.blocks
        blocks = [held[b] if b in held else f.read_block(b) for b in range(first, last + 1)]
        self.blocks = {last: blocks[-1]}
        return raw, first, blocks, start >= 0


def rebuild_range(
    timeline: Timeline,
    key_range: KeyRange,
    keys: list[Key],
    lsn: int,
    reference: Reference,
    view: PersistentView | None = None,
    scattered: bool = False,
) -> Iterator[tuple[Key, bytes | None]]:
    """(key, value at lsn, None if it has none) for each of `keys` (sorted, inside
    key_range), equal to `reference(key)` for every key.

    `view` (`Timeline.persistent_view` over a range holding key_range, at lsn) lets a reader
    of a timeline that is still ingesting scan the layer files for the keys no in-memory
    layer holds; without it, the files must hold every version (`Timeline.persistent_map`).
    `scattered`: the keys lie apart (a checkout's or a delta's pages, fork sizes), their
    blocks read in C (`LayerFile.run_input`'s `native`)."""
    walk = (
        None
        if _native is None or not keys
        else _walk_of(timeline, key_range, keys, lsn, view, scattered)
    )
    if walk is None:
        for key in keys:
            yield key, reference(key)
        return
    walked = _walk_python if _rebuild_run is None else _walk_native
    for key, value in walked(walk):
        yield key, _settled(key, value, reference)


def _walk_of(
    timeline: Timeline,
    key_range: KeyRange,
    keys: list[Key],
    lsn: int,
    view: PersistentView | None,
    scattered: bool = False,
) -> Walk | None:
    """What rebuild_range walks for `keys` (None: no layer map to walk, the per-key path)."""
    in_memory: frozenset[Key] = frozenset()
    layer_map = view.layer_map if view is not None else timeline.persistent_map(lsn)
    if layer_map is None:
        return None
    if view is not None:
        in_memory = view.in_memory
    images, covered = layer_map.images_over(key_range, lsn)
    tiles = image_tiles(key_range, tuple(images))
    above = min((image.lsn for _, image in tiles), default=-1) if covered else -1
    deltas = layer_map.deltas_overlapping(key_range, above, lsn)
    root = timeline.ancestor is None
    return Walk(key_range, keys, lsn, tiles, deltas, in_memory, root, scattered and _READS)


def _settled(key: Key, value: bytes | bool | Chain | None, reference: Reference) -> bytes | None:
    """A walked key's value: False goes to the per-key path, (page, rest) to the Python redo."""
    if isinstance(value, bool):  # False
        return reference(key)
    if isinstance(value, tuple):
        page, rest = value
        return continue_chain(key, page, [(d_lsn, WalDelta(rec, i)) for d_lsn, i, rec in rest])
    return value


Tiles = list[tuple[KeyRange, ImageLayer]]


@dataclass(frozen=True, slots=True)
class Walk:
    """What a walk over the layers rebuilds: `keys` (sorted, inside key_range) at lsn, the
    image layers covering pieces of the range (`tiles`), the delta layers above the oldest
    of them (newest first), the keys an in-memory layer holds (the per-key path's) and
    whether the timeline is a root (a chain without a base starts from nothing)."""

    key_range: KeyRange
    keys: list[Key]
    lsn: int
    tiles: Tiles
    deltas: list[DeltaLayer]
    in_memory: frozenset[Key]
    root: bool
    native_reads: bool = False
    """Blocks read in C (`LayerFile.run_input`'s `native`): scattered keys, a C walk."""


Walked = Iterator[tuple[Key, "bytes | bool | Chain | None"]]
"""(key, `_redo.rebuild_page`'s outcome): the value, None, False (the per-key path decides)
or (page, rest) (the Python redo goes on)."""
Chain = tuple["bytes | None", list[tuple[int, bool, bytes]]]

RUN_KEYS = 256
"""Keys one `_redo.rebuild_run` call rebuilds: their pages are held at once (2 MiB), and a
caller checks between two runs whether it is cancelled (compaction.CHECK_EVERY)."""


RunInputs = tuple[list[RunInput], list[RunInput], list[tuple[bytes, bytes, int, int]]]
"""A walk's layers as `_redo.rebuild_run` takes them: deltas, images, tiles."""


def _run_inputs(w: Walk) -> RunInputs:
    """The walk's layers as this thread's `_redo.rebuild_run` takes them."""
    native = w.native_reads
    layers = [
        layer.file.run_input(w.key_range.start, layer.lsn_end, native=native) for layer in w.deltas
    ]
    numbered: dict[int, int] = {}
    image_inputs: list[RunInput] = []
    tile_inputs: list[tuple[bytes, bytes, int, int]] = []
    for tile_range, image in w.tiles:
        n = numbered.get(id(image))
        if n is None:
            n = numbered[id(image)] = len(image_inputs)
            image_inputs.append(
                image.file.run_input(tile_range.start, image.lsn_end, native=native)
            )
        tile_inputs.append((tile_range.start, tile_range.end, image.lsn, n))
    return layers, image_inputs, tile_inputs


def _walk_native(w: Walk) -> Walked:
    """`_walk_python` in C (`_redo.rebuild_run`), RUN_KEYS keys a call: the per-key Python
    of the walk (a cursor step per layer, the version entries sliced and widened, a part
    tuple per layer) was most of image creation's CPU besides zstd (issue 10)."""
    assert _rebuild_run is not None
    layers, image_inputs, tile_inputs = _run_inputs(w)
    owner = threading.get_ident()
    for at in range(0, len(w.keys), RUN_KEYS):
        run = w.keys[at : at + RUN_KEYS]
        if w.native_reads and threading.get_ident() != owner:  # its decompressors: this one's
            layers, image_inputs, tile_inputs = _run_inputs(w)
            owner = threading.get_ident()
        values = _rebuild_run(run, w.lsn, layers, image_inputs, tile_inputs, w.in_memory, w.root)
        yield from zip(run, values, strict=True)


_READS = _rebuild_run is not None and getattr(_native, "REBUILD_RUN_READS", 0) >= 1
"""Whether the C walk can read a layer's blocks itself (`_redo.REBUILD_RUN_READS`)."""
_FILLS = _rebuild_run is not None and getattr(_native, "REBUILD_RUN_INTO", 0) >= 2
"""Whether the C walk writes pages into a buffer of records (`_redo.REBUILD_RUN_INTO` 2: an
extension built before it has none, or writes pages only, 1)."""


class PageFill:
    """`rebuild_keys` of consecutive pieces of a key range written into buffers (a
    basebackup's chunk of a fork): the C walk writes each whole page at its place
    (`_redo.rebuild_run`'s `into`), where the values path made a bytes object of every page
    and the tar maker then copied it into its chunk (two user-space copies of each page of
    a 1 GiB extraction, ~10% of its CPU with the objects' churn). The walk's layers are
    opened once for the range and go on from piece to piece. Only where `rebuild_keys` is
    one walk, a root timeline, and with the C walk (`usable`)."""

    __slots__ = ("_inputs", "_lsn", "_reference", "_walk")

    def __init__(
        self, timeline: Timeline, lsn: int, view: PersistentView, key_range: KeyRange
    ) -> None:
        """A fill of key_range's keys at lsn (`usable(timeline)` must be true)."""

        def reference(key: Key) -> bytes | None:
            return reconstruct_uncached(key, lsn, timeline.get_reconstruct_data(key, lsn))

        walk = _walk_of(timeline, key_range, [], lsn, view)
        assert walk is not None  # with a view, always
        self._walk = walk
        self._inputs = _run_inputs(walk)
        self._lsn = lsn
        self._reference = reference

    @staticmethod
    def usable(timeline: Timeline) -> bool:
        """Whether a fill can read the timeline's keys (see the class)."""
        return _FILLS and _native is not None and timeline.ancestor is None

    def into(
        self, keys: list[Key], out: memoryview | bytearray, stride: int = BLCKSZ
    ) -> list[tuple[int, bytes | None]]:
        """Write the values of `keys` (ascending, after those of the calls before, at most
        RUN_KEYS) into `out`, a record of `stride` bytes each, key i's page at the end of
        record i (i * stride + stride - BLCKSZ) where it is a whole page; the others as
        (i, value) (None: the key has none), for the caller to place or refuse."""
        assert _rebuild_run is not None
        w = self._walk
        layers, images, tiles = self._inputs
        values = _rebuild_run(
            keys, self._lsn, layers, images, tiles, w.in_memory, w.root, out, stride
        )
        return [
            (i, _settled(keys[i], value, self._reference))
            for i, value in enumerate(values)
            if value is not True
        ]


def _walk_python(w: Walk) -> Walked:
    """Each key's versions, newest layer first, to `_redo.rebuild_page`: the reference of
    `_walk_native`."""
    assert _native is not None
    key_range, lsn, tiles, in_memory = w.key_range, w.lsn, w.tiles, w.in_memory
    newest_first = [_Cursor(layer, key_range.start) for layer in w.deltas]
    image_cursors: dict[int, _Cursor] = {}
    t = 0
    for key in w.keys:
        if key in in_memory:
            yield key, False
            continue
        while t < len(tiles) and tiles[t][0].end <= key:
            t += 1
        image: ImageLayer | None = None
        if t < len(tiles) and tiles[t][0].start <= key:
            image = tiles[t][1]
        floor_plus_one = image.lsn + 1 if image is not None else 0
        # Newest layer first, down to the one holding the chain's start (see the docstring).
        parts: list[Part] = []
        based = False
        for cursor in newest_first:
            # A layer wholly at or below the key's image holds nothing the chain uses: its
            # blocks are not decompressed (images are written partition by partition, so
            # most of a range's keys have newer images than the oldest one).
            if cursor.next <= key and cursor.lsn_end > floor_plus_one:
                held = cursor.versions(key, floor_plus_one - 1, lsn)
                if held is not None:
                    raw, first, blocks, based = held
                    parts.append((raw, first, blocks, floor_plus_one))
                    if based:
                        break
        parts.reverse()
        if image is not None and not based:
            image_cursor = image_cursors.get(id(image))
            if image_cursor is None:
                image_cursor = image_cursors[id(image)] = _Cursor(image, tiles[t][0].start)
            held = image_cursor.versions(key, -1, image.lsn, whole=True)  # checked as it is
            if held is not None:
                raw, first, blocks, _ = held
                if len(raw) != _ENTRY_SIZE or raw[_ENTRY_TAG] != TAG_IMAGE:
                    yield key, False  # not one image: LayerCorrupt there
                    continue
                parts.insert(0, (raw, first, blocks, image.lsn))
        yield key, _native.rebuild_page(key, lsn, parts, image is not None or w.root)


def rebuild_keys(
    timeline: Timeline,
    lsn: int,
    view: PersistentView | None,
    keys: list[Key],
    scattered: bool = False,
) -> Iterator[bytes | None]:
    """The values of `keys` (sorted) at lsn, in order, rebuilt in bulk over the range they
    span (a basebackup's slow keys: `range_reads.SlowValues` with the first three bound).

    On a branch, the keys its own layers hold nothing of (and no image layer of its covers)
    have the ancestor's value at the branch point (as `Timeline.get_reconstruct_data` reads
    them): they are rebuilt in bulk there, the rest here, where a chain going on into the
    ancestor takes the per-key path. `scattered`: as for `rebuild_range` (keys far apart,
    each in a block of its own: a checkout's pages, fork sizes, a delta's candidates), not a
    basebackup's runs of slow keys, whose blocks the thread's recent blocks serve again."""
    if not keys:
        return iter(())
    span = KeyRange(keys[0], key_successor(keys[-1]))
    ancestor = timeline.ancestor
    if ancestor is None or view is None:
        return _rebuilt(timeline, lsn, view, span, keys, scattered)
    own = _own_keys(timeline, view, span, keys, lsn)
    inherited = [key for key in keys if key not in own]
    if not inherited:
        return _rebuilt(timeline, lsn, view, span, keys, scattered)
    at = min(lsn, timeline.ancestor_lsn)
    theirs = rebuild_keys(ancestor, at, ancestor.persistent_view(span, at), inherited, scattered)
    ours = _rebuilt(timeline, lsn, view, span, [key for key in keys if key in own], scattered)
    return (next(ours) if key in own else next(theirs) for key in keys)


def _rebuilt(
    timeline: Timeline,
    lsn: int,
    view: PersistentView | None,
    span: KeyRange,
    keys: list[Key],
    scattered: bool,
) -> Iterator[bytes | None]:
    def reference(key: Key) -> bytes | None:
        return reconstruct_uncached(key, lsn, timeline.get_reconstruct_data(key, lsn))

    walked = rebuild_range(timeline, span, keys, lsn, reference, view, scattered)
    return (value for _, value in walked)


def _own_keys(
    timeline: Timeline, view: PersistentView, span: KeyRange, keys: list[Key], lsn: int
) -> set[Key]:
    """Those of `keys` (inside span) the timeline's own layers may decide at lsn (a superset:
    a delta layer's key whose versions are all newer counts): versions in its delta or
    in-memory layers, or an image layer of its covering them."""
    layer_map = view.layer_map
    held: set[Key] = set(view.in_memory)
    for delta in layer_map.deltas_overlapping(span, -1, lsn):
        f = delta.file
        held.update(key for key, _, _ in f.newest_of_keys(f.lower_bound(span.start), span.end))
    images, _ = layer_map.images_over(span, lsn)
    ranges = [image.key_range for image in images]
    return {k for k in keys if k in held or any(r.start <= k < r.end for r in ranges)}
