"""How an import's image layers are written: the store's settings, with bigger blocks
compressed faster.

Compression is most of an import's CPU in the pageserver, on cores it shares with the source
server and the CLI's extraction (an import is CPU-bound on two cores). Measured on a 545 MiB
pgbench directory (in process, compression CPU on the pool, layers written):

| blocks, zstd level | compression CPU | layers |
|---|---|---|
| 32 KiB, 3 (the store's) | 0.61 s | 37 MiB |
| 32 KiB, 1 | 0.47-0.52 s | 38 MiB |
| 128 KiB, 1 | 0.36 s | 31 MiB |

A reader takes blocks of any size (the block table gives each one's length), so only reads
of imported pages change: a cold GetPage decompresses 128 KiB (about 60 us) instead of
24 KiB, and the cache (bounded in bytes) holds the same bytes in fewer, bigger blocks; a bulk
read (basebackup, export) decompresses fewer, bigger frames, which zstd does faster.
"""

from __future__ import annotations

import dataclasses

from pageserver.storage.settings import StoreSettings

IMPORT_ZSTD_LEVEL = 1
"""zstd level of the image layers an import writes (the store's, if lower)."""
IMPORT_BLOCK_SIZE = 128 * 1024
"""Uncompressed size of their value blocks (the store's, if larger): 15 pages, and their image
blocks too (the store's image_block_size, if larger), so an import's layers are written
without the dictionary of smaller image blocks (StoreSettings.image_block_size) as long as
block_size is not larger: an import is a bulk write, and small blocks compress slower (in a
test on 1 GiB of pgbench pages at level 2: 1.6 s in 4-page blocks, 1.2 s in 15-page ones)."""


def import_settings(settings: StoreSettings) -> StoreSettings:
    """The store's settings, as an import's image runs use them."""
    return dataclasses.replace(
        settings,
        zstd_level=min(settings.zstd_level, IMPORT_ZSTD_LEVEL),
        block_size=max(settings.block_size, IMPORT_BLOCK_SIZE),
        image_block_size=max(settings.image_block_size, IMPORT_BLOCK_SIZE),
    )
