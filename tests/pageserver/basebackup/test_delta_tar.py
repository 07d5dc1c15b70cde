"""delta_tar's counting of tar bytes without building headers."""

from __future__ import annotations

import pytest

from pageserver.basebackup.delta_tar import tar_header_size
from pageserver.basebackup.tar_stream import tar_header

NAMES = [
    "base/16384/16397",
    "base/16384/16397_fsm.1",
    "pg_tblspc/16500/PG_15_202209061/16384/2619.delta",
    "x" * 99,
    "x" * 100,
    "x" * 101,  # past the ustar name field: a PAX header
    "base/16384/\u00e9t\u00e9",  # not ASCII: a PAX header
]
SIZES = [0, 8192, 1 << 30, 8**11 - 1, 8**11, 1 << 40]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mtime", [0, 1_700_000_000, 8**11])
def test_header_size_is_the_headers(name: str, size: int, mtime: int) -> None:
    assert tar_header_size(name, size, mtime) == len(tar_header(name, size, mtime))


def test_the_fast_path_is_taken_and_the_pax_path_too() -> None:
    """Both branches are exercised above: one plain block, and PAX ones larger than it."""
    assert tar_header_size("base/1/2", 8192, 0) == 512
    assert tar_header_size("x" * 101, 8192, 0) > 512
    assert tar_header_size("base/1/2", 8**11, 0) > 512
