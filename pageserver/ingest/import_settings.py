"""How an import's image layers are written: the store's settings, compressed faster."""

from __future__ import annotations

import dataclasses

from pageserver.storage.settings import StoreSettings

IMPORT_ZSTD_LEVEL = 1
"""zstd level of the image layers an import writes (the store's, if lower). Compression is
most of an import's CPU in the pageserver, which shares the cores with the source server and
the CLI's extraction; on a pgbench directory level 1 takes 0.85 of level 3's CPU for 4%
larger layers (0.52 s against 0.61 s, 38 MiB against 37 MiB, for 545 MiB)."""


def import_settings(settings: StoreSettings) -> StoreSettings:
    """The store's settings, as an import's image runs use them (IMPORT_ZSTD_LEVEL)."""
    if settings.zstd_level <= IMPORT_ZSTD_LEVEL:
        return settings
    return dataclasses.replace(settings, zstd_level=IMPORT_ZSTD_LEVEL)
