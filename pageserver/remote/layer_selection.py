"""Which layer files reading a whole data directory at one LSN needs (the layers an
extraction downloads from the bucket).

A read at LSN L on a timeline looks at its layers that start at or below L; where image
layers at one LSN X <= L together cover the whole key space, every key's chain ends at X or
above (a key such layers do not hold does not exist: storage/timeline.py, plan_range_read), so
the layers that end at or below X and the ancestors are not read. Otherwise the ancestor is
read at min(L, the branch LSN), the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

from pageserver.storage.keys import FULL_KEYSPACE, ranges_cover
from pageserver.storage.layers.names import LayerName


def image_horizon(layers: Iterable[LayerName], lsn: int) -> int | None:
    """The newest LSN X <= lsn at which image layers cover the whole key space."""
    by_lsn: dict[int, list[LayerName]] = {}
    for name in layers:
        if name.is_image and name.lsn_start <= lsn:
            by_lsn.setdefault(name.lsn_start, []).append(name)
    for at in sorted(by_lsn, reverse=True):
        if ranges_cover(FULL_KEYSPACE, (n.key_range for n in by_lsn[at])):
            return at
    return None


def layers_for_read(
    layers: Iterable[LayerName], lsn: int, since: int | None = None
) -> tuple[list[LayerName], bool]:
    """The layers of one timeline a read at `lsn` needs, and whether it reads the ancestor;
    with `since` <= lsn, those a read at any LSN in [since, lsn] needs (an extraction that
    snaps `lsn` down to a record end it only knows once it has read the WAL)."""
    names = list(layers)
    horizon = image_horizon(names, lsn if since is None else since)
    floor = -1 if horizon is None else horizon
    needed = [n for n in names if n.lsn_start <= lsn and n.lsn_end > floor]
    return needed, horizon is None
