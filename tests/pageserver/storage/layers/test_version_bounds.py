"""`LayerFile.key_versions_raw` with LSN bounds: the entries of (floor, lsn] only, and the
blocks they reference, so a bulk rebuild at a past LSN does not decompress the blocks of a
key's newer versions (nor those under its image)."""

from __future__ import annotations

import struct
from pathlib import Path

from pageserver.storage.layers.blocks import BlockCache
from tests.pageserver.storage.layers.test_layers import sample_versions, write_delta

_ENTRY = struct.Struct(">QBIII")


def test_bounds_keep_the_versions_in_the_window_and_their_blocks(tmp_path: Path) -> None:
    versions = sample_versions(seed=3, n_keys=60)
    layer = write_delta(tmp_path, versions, BlockCache(0))
    f = layer.file
    lsns = sorted({lsn for _, lsn, _ in versions})
    windows = [(-1, None), (-1, lsns[len(lsns) // 2]), (lsns[2], None), (lsns[1], lsns[-3])]
    trimmed = 0
    for i in range(f.n_keys):
        whole, _, _ = f.key_versions_raw(i)
        entries = [_ENTRY.unpack_from(whole, o) for o in range(0, len(whole), _ENTRY.size)]
        for floor, lsn in windows:
            raw, first, last = f.key_versions_raw(i, floor, lsn)
            want = [e for e in entries if e[0] > floor and (lsn is None or e[0] <= lsn)]
            got = [_ENTRY.unpack_from(raw, o) for o in range(0, len(raw), _ENTRY.size)]
            assert got == want, (i, floor, lsn)
            if want:
                assert (first, last) == (want[0][2], want[-1][2])
            else:
                assert (raw, first, last) == (b"", -1, -2)
            trimmed += len(entries) - len(want)
    assert trimmed > 0
    layer.close()
