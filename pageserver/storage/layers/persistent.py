"""Reading a layer file as versions: the behaviour delta and image layers share.

The read operations mirror those of the in-memory layer (`collect`, `newest_versions`,
`iter_encoded`) so the layer map and compaction treat every source alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pageserver.storage.keys import Key, KeyRange
from pageserver.storage.layers.blocks import BlockCache, LayerCorrupt, LayerFile
from pageserver.storage.layers.names import LayerName
from pageserver.storage.values import Value, decode_value, tag_ends_chain


class PersistentLayer:
    """An immutable layer file on disk, opened and validated. Safe to read from any thread."""

    expected_kind = 0

    def __init__(self, directory: Path, name: LayerName, cache: BlockCache) -> None:
        self.name = name
        self.path = directory / name.file_name
        self.file = LayerFile(self.path, cache)
        h = self.file.header
        if (
            h.kind != self.expected_kind
            or h.key_range != name.key_range
            or (h.lsn_start, h.lsn_end) != (name.lsn_start, name.lsn_end)
        ):
            raise LayerCorrupt(self.path, "header does not match the file name")

    @property
    def key_range(self) -> KeyRange:
        return self.name.key_range

    @property
    def lsn_start(self) -> int:
        return self.name.lsn_start

    @property
    def lsn_end(self) -> int:
        return self.name.lsn_end

    @property
    def file_size(self) -> int:
        return self.file.header.file_size

    def release_index(self) -> None:
        """Unmap the pages of the file's index this process touched (LayerFile.release_index)."""
        self.file.release_index()

    def _last_at_or_below(self, versions: range, lsn: int) -> int:
        """Index of the newest version with LSN <= lsn, or versions.start - 1."""
        return self.file.last_at_or_below(versions, lsn)

    def collect(self, key: Key, lsn: int, floor: int) -> tuple[list[tuple[int, Value]], bool]:
        """Versions of `key` with floor < LSN <= lsn, newest first, up to the chain's start.

        Returns (versions, ended): ended when the last one returned needs nothing older.
        """
        f = self.file
        i = f.find_key(key)
        if i is None:
            return [], False
        out: list[tuple[int, Value]] = []
        for entry_lsn, tag, encoded in f.chain_newest_first(f.versions_of(i), lsn, floor):
            out.append((entry_lsn, decode_value(encoded)))
            if tag_ends_chain(tag):
                return out, True
        return out, False

    def newest_lsn(self, key: Key, lsn: int) -> int | None:
        """LSN of the newest version of `key` at or below lsn, from the index alone."""
        f = self.file
        i = f.find_key(key)
        if i is None:
            return None
        versions = f.versions_of(i)
        v = f.last_at_or_below(versions, lsn)
        return f.version_lsn(v) if v >= versions.start else None

    def newest_versions(self, key_range: KeyRange, lsn: int) -> Iterator[tuple[Key, int, int]]:
        """(key, LSN, tag) of the newest version <= lsn of every key in range that has one."""
        yield from self._newest_of_keys(key_range, lsn)

    def newer_keys(self, key_range: KeyRange, above: int, upto: int) -> list[Key]:
        """The keys of key_range whose newest version at or below upto is above `above`
        (a diff's keys written in a window), filtered in the C loop."""
        return [key for key, _lsn, _tag in self._newest_of_keys(key_range, upto, above)]

    def _newest_of_keys(
        self, key_range: KeyRange, lsn: int, above: int | None = None
    ) -> Iterator[tuple[Key, int, int]]:
        f = self.file
        # Every version visible: the newest is each key's last one; else the newest at or
        # below lsn (a layer spanning a basebackup's LSN), both in one C loop.
        bound = None if lsn >= self.lsn_end - 1 else lsn
        return f.newest_of_keys(f.lower_bound(key_range.start), key_range.end, bound, above)

    def has_keys_in(self, key_range: KeyRange) -> bool:
        """True if the layer holds at least one key of key_range (index only)."""
        f = self.file
        i = f.lower_bound(key_range.start)
        return i < f.n_keys and f.key_at(i) < key_range.end

    def raw_bytes_in(self, key_range: KeyRange) -> int:
        """About the uncompressed bytes of the layer's versions of key_range (index only)."""
        return self.file.raw_bytes_in(key_range)

    def iter_encoded(self) -> Iterator[tuple[Key, int, bytes]]:
        """Every (key, LSN, encoded value) in (key, LSN) order, for compaction."""
        return self.file.iter_encoded()

    def iter_key_groups(self) -> Iterator[tuple[Key, list[tuple[int, bytes]]]]:
        """(key, [(LSN, encoded value), ...]) per key in key order, for compaction."""
        return self.file.iter_key_groups()

    def close(self) -> None:
        self.file.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name.file_name})"
