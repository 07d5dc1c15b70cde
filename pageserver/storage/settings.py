"""Storage-engine tunables, with laptop-sized defaults.

Neon's production defaults (its pageserver's docs/settings.md) are sized for many tenants:
checkpoint_distance 256 MiB, compaction_target_size 128 MiB, compaction_threshold 10 L0
layers, image_creation_threshold 3. Here one pageserver follows a few local nodes, so the
in-memory layer and the files are smaller (a flush every 32 MiB of WAL values keeps memory
and crash re-ingest short), and L0 layers are merged after 4 of them, not 10 (see below).
"""

from __future__ import annotations

from dataclasses import dataclass

from pg15.constants import BLCKSZ
from proto.errors import InvalidArgument

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class StoreSettings:
    checkpoint_distance: int = 32 * MiB
    """Freeze the in-memory layer once its values take this many bytes."""
    checkpoint_timeout: int = 10
    """Or once this many seconds of ingest passed since the last flush, however small it is
    (Neon's tenant setting of the name): how far the history on disk, and what an upload to
    a bucket can take, trails ingest on a quiet node."""
    compaction_threshold: int = 4
    """Merge the L0 delta layers into L1 layers once there are this many. Neon's 10 is for
    256 MiB L0 layers; here an L1 layer of 10 small L0 layers still spans ~800 MiB of WAL,
    all of which a bulk read at an LSN inside it decompresses for its keys (an L1 file is
    key-major), and an L0 layer costs every read a lookup until merged."""
    compaction_target_size: int = 32 * MiB
    """Approximate uncompressed size of each L1 delta layer written by compaction."""
    image_creation_threshold: int = 3
    """Write an image layer for a key partition with this many delta layers above its image."""
    image_creation_delta_percent: int = 100
    """Also write one where the versions above its image (uncompressed) are this percentage
    of the bytes its image layers hold of it, and at least a quarter of image_layer_target_size:
    keys written after their range's image (a bulk load, one L1 layer deep) would otherwise
    be rebuilt from their WAL by every read until three layers pile up there."""
    snapshot_image_pages_percent: int = 5
    """At a named snapshot's LSN (compaction's `image_lsns`), also write an image layer for
    a partition where this percentage of its keys were written since its images (the
    regular rules above apply there too). Reads at a snapshot are what a delta push of it,
    a checkout back to it and an extraction of it do, and a page written since its image is
    rebuilt from its WAL (a full-page image, then every record since). bench.exchange's 1%
    change (70,000 accounts in a row: 2,689 pages, 5-17% of the keys of the partitions they
    lie in, none due by the rules above): its delta push's tar made in 80-110 ms with 10%
    (3 partitions imaged), 55-80 ms with images at the snapshot everywhere, 90-110 ms with
    none (the same bytes). Scattered changes (a 1% checkout's every Nth page, ~1% of each
    partition's keys) image nothing; an image costs its partition's pages, compressed (~1
    MB for 4096 pgbench pages), kept while the snapshot is, and a pass at a snapshot's LSN
    scans the keys: under a write load that touches most partitions between two snapshots,
    each snapshot costs an image of the database (a larger percentage images less)."""
    image_layer_target_size: int = 32 * MiB
    """Approximate uncompressed size of one image layer (4096 pages of 8 KiB)."""
    block_size: int = 128 * 1024
    """Uncompressed size of a value block in layer files (the unit of zstd and of the cache).
    Against 32 KiB, on the L1 blocks of a pgbench backlog: compression 28% and decompression
    24% faster, 5% smaller (zstd builds its tables per frame), which is most of compaction's
    CPU; a cold read decompresses ~0.1 ms more per block."""
    image_block_size: int = 8 * (BLCKSZ + 1)
    """Uncompressed size of a value block in image layers (at most block_size): eight pages
    (each stored with a 1-byte tag), compressed with the layer's first block as their zstd
    dictionary where smaller than block_size (layers/blocks.py, format versions 3 and 4).
    Image blocks are read scattered (GetPage, a delta push's pages, a checkout's), and a page
    read decompresses its whole block. The image layers of a 1 GiB pgbench node rewritten so
    (nothing else changed), against 15-page blocks without a dictionary, each in its own
    process, the three interleaved, load ~1: a 1% checkout's 1393 pages rebuilt in 87-130 ms
    against 170-277 (6 runs each); a whole basebackup of the node 1.38-1.71 s against
    1.11-1.65 (6 runs each). Four pages: 63-112 ms, but the basebackup 1.47-2.07 s (four
    times the blocks, each with its Python overhead). image_block_size >= block_size writes
    image layers as delta layers are (no dictionary: format versions 1 and 2, which pg-neon
    before it reads)."""
    zstd_level: int = 2
    """zstd level of the files kept (L1 and image layers). On pgbench WAL and its pages,
    level 2 compresses as small as level 3 (L1 blocks 0.1156 of their bytes against 0.1140,
    image blocks 0.1169 against 0.1168) in 14% less time: compaction's CPU is mostly zstd."""
    l0_zstd_level: int = -1
    """zstd level of the L0 files a flush writes: compaction rewrites them soon (after the
    final compaction none is left), so they are written fast rather than small. On the L0
    blocks of a 315 MiB pgbench backlog, level -1 against level 1: compression 20% and the
    L0 merge's decompression 30% faster, the files 14% larger (0.156 of the raw bytes
    against 0.136)."""
    block_cache_bytes: int = 64 * MiB
    """Bound on decompressed blocks cached across all layers of a store."""
    prepared_pages_bytes: int = 32 * MiB
    """Bound on the checkout target's pages the daemon rebuilds ahead of a checkout's delta
    (pageserver/basebackup/prepared_pages.py; ~11 MiB for a 1% checkout of 1 GiB); 0: none."""
    prepared_pages_seconds: int = 30
    """How long prepared pages wait for the delta that takes them before they are dropped."""

    @property
    def image_blocks(self) -> int:
        """The value block size image layers are written with."""
        return min(self.block_size, self.image_block_size)

    def __post_init__(self) -> None:
        for name in (
            "checkpoint_distance",
            "checkpoint_timeout",
            "compaction_threshold",
            "compaction_target_size",
            "image_creation_threshold",
            "image_creation_delta_percent",
            "snapshot_image_pages_percent",
            "image_layer_target_size",
            "block_size",
            "image_block_size",
        ):
            if getattr(self, name) <= 0:
                raise InvalidArgument(f"storage setting {name} must be positive")
        if self.compaction_threshold < 2:
            raise InvalidArgument("storage setting compaction_threshold must be at least 2")
        for name in ("block_cache_bytes", "prepared_pages_bytes", "prepared_pages_seconds"):
            if getattr(self, name) < 0:
                raise InvalidArgument(f"storage setting {name} must not be negative")


DEFAULT_SETTINGS = StoreSettings()
