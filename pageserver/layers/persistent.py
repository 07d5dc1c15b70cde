"""Reading a layer file as versions: the behaviour delta and image layers share.

The read operations mirror those of the in-memory layer (`collect`, `newest_versions`,
`iter_encoded`) so the layer map and compaction treat every source alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pageserver.keys import Key, KeyRange
from pageserver.layers.blocks import BlockCache, LayerCorrupt, LayerFile
from pageserver.layers.names import LayerName
from pageserver.values import Value, decode_value, tag_ends_chain


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

    def _last_at_or_below(self, versions: range, lsn: int) -> int:
        """Index of the newest version with LSN <= lsn, or versions.start - 1."""
        lo, hi = versions.start, versions.stop
        while lo < hi:
            mid = (lo + hi) // 2
            if self.file.version(mid).lsn <= lsn:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    def collect(self, key: Key, lsn: int, floor: int) -> tuple[list[tuple[int, Value]], bool]:
        """Versions of `key` with floor < LSN <= lsn, newest first, up to the chain's start.

        Returns (versions, ended): ended when the last one returned needs nothing older.
        """
        i = self.file.find_key(key)
        if i is None:
            return [], False
        versions = self.file.versions_of(i)
        out: list[tuple[int, Value]] = []
        v = self._last_at_or_below(versions, lsn)
        while v >= versions.start:
            entry = self.file.version(v)
            if entry.lsn <= floor:
                break
            out.append((entry.lsn, decode_value(self.file.read_encoded(entry))))
            if tag_ends_chain(entry.tag):
                return out, True
            v -= 1
        return out, False

    def newest_versions(self, key_range: KeyRange, lsn: int) -> Iterator[tuple[Key, int, int]]:
        """(key, LSN, tag) of the newest version <= lsn of every key in range that has one."""
        f = self.file
        i = f.lower_bound(key_range.start)
        while i < f.n_keys:
            key = f.key_at(i)
            if key >= key_range.end:
                break
            versions = f.versions_of(i)
            v = self._last_at_or_below(versions, lsn)
            if v >= versions.start:
                entry = f.version(v)
                yield key, entry.lsn, entry.tag
            i += 1

    def iter_encoded(self) -> Iterator[tuple[Key, int, bytes]]:
        """Every (key, LSN, encoded value) in (key, LSN) order, for compaction."""
        return self.file.iter_encoded()

    def close(self) -> None:
        self.file.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name.file_name})"
