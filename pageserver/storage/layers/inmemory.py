"""The in-memory layer: recent versions, before they are flushed to a delta layer.

Per key, a list of (LSN, value) appended in LSN order, so a put is a dict lookup and an
append (no sorted insert, no file I/O); keys are sorted once, when the layer is written out.
The open layer is mutated by puts, so its owner (the timeline) guards it with its lock; once
frozen it never changes and may be read from any thread.

`InMemoryLayer` (a dict of per-key lists) is the reference; `ArenaLayer` keeps the same versions
in C (`_inmem.c`: encoded values in one buffer, no Python object per version) and is what
`new_layer` makes when the extension is built (NEON_PURE_PYTHON=1: the reference). Both give
the same reads and write the same L0 file.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from pageserver.storage.keys import Key, KeyRange, describe
from pageserver.storage.layers import native as _native
from pageserver.storage.values import (
    Value,
    decode_value,
    encode_value,
    tag_ends_chain,
    value_size,
    value_tag,
)
from pg15.lsn import format_lsn
from proto.errors import InvalidArgument

if TYPE_CHECKING:
    from pageserver.storage.layers.blocks import VersionList
    from pageserver.storage.layers.delta import DeltaLayerWriter

_lsn_of = itemgetter(0)

VERSION_OVERHEAD = 48
"""Approximate bytes of bookkeeping per version (list slot, tuple, index entry)."""


class InMemoryLayer:
    """Versions with LSNs in [lsn_start, lsn_end); lsn_end is set when the layer is frozen."""

    def __init__(self, lsn_start: int) -> None:
        self.lsn_start = lsn_start
        self.lsn_end: int | None = None
        self.prev_record_lsn: int | None = None
        """At freeze: the prev_record_lsn that goes with lsn_end - 1 (for the manifest)."""
        self._versions: dict[Key, list[tuple[int, Value]]] = {}
        self.size = 0
        self.n_versions = 0
        self.max_lsn = -1

    @property
    def frozen(self) -> bool:
        return self.lsn_end is not None

    def put(self, key: Key, lsn: int, value: Value) -> None:
        """Append a version; per key, LSNs must not decrease (equal LSNs keep put order)."""
        self._check_put(lsn)
        chain = self._versions.get(key)
        if chain is None:
            self._versions[key] = [(lsn, value)]
        else:
            if lsn < chain[-1][0]:
                raise _below_previous(key, lsn, chain[-1][0])
            chain.append((lsn, value))
        self._counted(lsn, value_size(value))

    def _check_put(self, lsn: int) -> None:
        if self.lsn_end is not None:
            raise InvalidArgument("cannot put into a frozen in-memory layer")
        if lsn < self.lsn_start:
            raise InvalidArgument(
                f"LSN {format_lsn(lsn)} is below the in-memory layer's start "
                f"{format_lsn(self.lsn_start)}"
            )

    def _counted(self, lsn: int, size: int) -> None:
        self.size += size + VERSION_OVERHEAD
        self.n_versions += 1
        if lsn > self.max_lsn:
            self.max_lsn = lsn

    def versions_for_append(self) -> Any:
        """Where the C ingest path appends whole records (the timeline holds its lock; the
        appender keeps `put`'s rules and reports to `account`): the arena of an ArenaLayer;
        this reference layer's dict, which the C path does not take (it leaves the records
        to Python)."""
        if self.lsn_end is not None:
            raise InvalidArgument("cannot put into a frozen in-memory layer")
        return self._versions

    def account(self, size: int, n_versions: int, max_lsn: int) -> None:
        """Count versions appended through versions_for_append."""
        self.size += size
        self.n_versions += n_versions
        self.max_lsn = max(self.max_lsn, max_lsn)

    def prefault(self) -> bool:
        """Have the layer's value memory mapped in ahead of its writer, off this thread (a
        catch-up fills a layer in a fraction of a second); whether that was started (never
        for the reference, whose values are Python objects)."""
        return False

    def freeze(self, lsn_end: int, prev_record_lsn: int | None) -> None:
        if lsn_end <= self.max_lsn:
            raise InvalidArgument("freezing would cut below versions the layer holds")
        self.lsn_end = lsn_end
        self.prev_record_lsn = prev_record_lsn

    def split_above(self, cut: int) -> InMemoryLayer | None:
        """Move the versions with LSN > cut into a new layer starting at cut + 1.

        Used when freezing at last_record_lsn while a record's puts are in progress.
        """
        if self.max_lsn <= cut:
            return None
        rest = InMemoryLayer(cut + 1)
        for key in list(self._versions):
            chain = self._versions[key]
            i = bisect_right(chain, cut, key=_lsn_of)
            if i == len(chain):
                continue
            for lsn, value in chain[i:]:
                rest.put(key, lsn, value)
                self.size -= value_size(value) + VERSION_OVERHEAD
                self.n_versions -= 1
            if i:
                del chain[i:]
            else:
                del self._versions[key]
        self.max_lsn = max((c[-1][0] for c in self._versions.values()), default=-1)
        return rest

    def __len__(self) -> int:
        return self.n_versions

    # --- reads (same shape as PersistentLayer) ---------------------------------------------

    def collect(self, key: Key, lsn: int, floor: int) -> tuple[list[tuple[int, Value]], bool]:
        """Versions of `key` with floor < LSN <= lsn, newest first, up to the chain's start."""
        chain = self._versions.get(key)
        if not chain:
            return [], False
        out: list[tuple[int, Value]] = []
        for i in range(bisect_right(chain, lsn, key=_lsn_of) - 1, -1, -1):
            version = chain[i]
            if version[0] <= floor:
                break
            out.append(version)
            if tag_ends_chain(value_tag(version[1])):
                return out, True
        return out, False

    def newer_keys(self, key_range: KeyRange, above: int, upto: int) -> list[Key]:
        """The keys of key_range whose newest version at or below upto is above `above`."""
        return [key for key, lsn, _tag in self.newest_versions(key_range, upto) if lsn > above]

    def newest_versions(self, key_range: KeyRange, lsn: int) -> Iterator[tuple[Key, int, int]]:
        """(key, LSN, tag) of the newest version <= lsn of each key in range, in key order."""
        for key in sorted(k for k in self._versions if key_range.start <= k < key_range.end):
            chain = self._versions[key]
            i = bisect_right(chain, lsn, key=_lsn_of)
            if i:
                version_lsn, value = chain[i - 1]
                yield key, version_lsn, value_tag(value)

    def newest_lsn(self, key: Key, lsn: int) -> int | None:
        """LSN of the newest version of `key` at or below lsn, if the layer has one."""
        chain = self._versions.get(key)
        if not chain:
            return None
        if chain[-1][0] <= lsn:
            return chain[-1][0]
        i = bisect_right(chain, lsn, key=_lsn_of)
        return chain[i - 1][0] if i else None

    def iter_encoded(self) -> Iterator[tuple[Key, int, bytes]]:
        """Every (key, LSN, encoded value) in (key, LSN) order, for flushing."""
        for key, versions in self.iter_key_groups():
            for lsn, encoded in versions:
                yield key, lsn, encoded

    def iter_chains(self) -> Iterator[tuple[Key, VersionList]]:
        """(key, [(LSN, value), ...] in LSN order) per key in key order, for flushing: the
        lists themselves, not copies (a frozen layer never changes)."""
        chains = self._versions
        for key in sorted(chains):
            yield key, chains[key]

    def iter_key_groups(self) -> Iterator[tuple[Key, list[tuple[int, bytes]]]]:
        """(key, [(LSN, encoded value), ...] in LSN order) per key in key order."""
        chains = self._versions
        for key in sorted(chains):
            yield key, [(lsn, encode_value(value)) for lsn, value in chains[key]]

    def write_to(self, writer: DeltaLayerWriter) -> None:
        """Every version into an empty delta layer writer (the L0 flush of a frozen layer)."""
        for key, versions in self.iter_chains():
            writer.add_key(key, versions)


def _below_previous(key: Key, lsn: int, previous: int) -> InvalidArgument:
    return InvalidArgument(
        f"{describe(key)}: LSN {format_lsn(lsn)} is below its previous version "
        f"at {format_lsn(previous)}"
    )


class ArenaLayer(InMemoryLayer):
    """InMemoryLayer with its versions in C (`_inmem.Arena`, see `_inmem.c`): the C ingest
    path appends records' values there without making Python objects, and the L0 flush packs
    the value blocks and index tables in C. Reads decode the values they return."""

    def __init__(self, lsn_start: int, arena: Any = None, expect: int = 0) -> None:
        """`expect`: about how many bytes of values the layer will hold (allocated at once)."""
        super().__init__(lsn_start)
        inmem = _native.inmem
        if inmem is None:
            raise InvalidArgument("the C in-memory layer (_inmem) is not built or is off")
        self._arena = arena if arena is not None else inmem.Arena(expect)

    def put(self, key: Key, lsn: int, value: Value) -> None:
        self._check_put(lsn)
        encoded = encode_value(value)
        previous = self._arena.put(key, lsn, encoded)
        if previous is not None:
            raise _below_previous(key, lsn, previous)
        self._counted(lsn, len(encoded))

    def versions_for_append(self) -> Any:
        if self.lsn_end is not None:
            raise InvalidArgument("cannot put into a frozen in-memory layer")
        return self._arena

    def prefault(self) -> bool:
        """A thread maps the arena's fresh value buffer in (`_inmem.c`, Arena.prefault): the
        first copy of each value into it faulted its pages in one by one on the decode thread
        (23% of a catch-up's page faults). False for a dead arena's buffer (mapped already)
        or once started."""
        return bool(self._arena.prefault())

    @property
    def arena(self) -> Any:
        """The C storage (read by compaction.merge_frozen once the layer is frozen)."""
        return self._arena

    def split_above(self, cut: int) -> InMemoryLayer | None:
        if self.max_lsn <= cut:
            return None
        arena, moved, moved_bytes, max_lsn = self._arena.split_above(cut)
        rest = ArenaLayer(cut + 1, arena)
        rest.size = moved_bytes + moved * VERSION_OVERHEAD
        rest.n_versions = moved
        rest.max_lsn = self.max_lsn  # the newest version is above the cut: it moved
        self.size -= rest.size
        self.n_versions -= moved
        self.max_lsn = max_lsn
        return rest

    def collect(self, key: Key, lsn: int, floor: int) -> tuple[list[tuple[int, Value]], bool]:
        found, ended = self._arena.collect(key, lsn, floor)
        return [(version_lsn, decode_value(encoded)) for version_lsn, encoded in found], ended

    def newest_versions(self, key_range: KeyRange, lsn: int) -> Iterator[tuple[Key, int, int]]:
        for key, version_lsn, tag in self._arena.newest_versions(
            key_range.start, key_range.end, lsn
        ):
            yield Key(key), version_lsn, tag

    def newest_lsn(self, key: Key, lsn: int) -> int | None:
        found: int | None = self._arena.newest_lsn(key, lsn)
        return found

    def iter_chains(self) -> Iterator[tuple[Key, VersionList]]:
        yield from self.iter_key_groups()

    def iter_key_groups(self) -> Iterator[tuple[Key, list[tuple[int, bytes]]]]:
        for key, versions in self._arena.key_groups():
            yield Key(key), versions

    def write_to(self, writer: DeltaLayerWriter) -> None:
        writer.add_packed(self._arena)


def new_layer(lsn_start: int, expect: int = 0) -> InMemoryLayer:
    """An empty open layer: in C when the extension is built (room for about `expect` bytes
    of values, the checkpoint_distance it will be frozen at), else the reference."""
    if _native.inmem is None:
        return InMemoryLayer(lsn_start)
    return ArenaLayer(lsn_start, expect=expect)
