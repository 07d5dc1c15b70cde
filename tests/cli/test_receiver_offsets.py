"""The byte offsets and counts a receiver takes from a pusher or puller (review L5): a `recv
--http` PUT's `X-Neon-Resume-At` and `X-Neon-Tar-Total` headers and neon://'s `resume_at` /
`offset` / `tar_total` params are byte counts or a clear InvalidArgument, never a ValueError
(an HTTP 500 and a traceback in recv's log) nor a bool taken as 1."""

from __future__ import annotations

from typing import Any

import pytest

from cli.receiver_http import byte_header, resume_offset
from cli.receiver_proto import byte_count, byte_offset
from cli.transport.http import TAR_TOTAL
from proto.errors import InvalidArgument


def test_resume_header() -> None:
    assert resume_offset(None) == 0
    assert resume_offset("0") == 0
    assert resume_offset("4194304") == 4194304
    for bad in ("²", "١٢", "-1", "+1", " 1", "1e3", "", "0x10"):
        with pytest.raises(InvalidArgument, match="X-Neon-Resume-At must be a byte count"):
            resume_offset(bad)


@pytest.mark.parametrize("bad", [True, False, -1, 1.0, "1", None, [1]])
def test_neon_offsets(bad: Any) -> None:
    assert byte_offset({}, "resume_at", "object.write") == 0
    assert byte_offset({"offset": 7}, "offset", "object.read") == 7
    with pytest.raises(InvalidArgument, match=r"object\.write: resume_at must be a byte count"):
        byte_offset({"resume_at": bad}, "resume_at", "object.write")


def test_tar_total_header() -> None:
    """Absent: no total (an older pusher, a plain PUT); else a byte count."""
    assert byte_header(None, TAR_TOTAL) is None
    assert byte_header("0", TAR_TOTAL) == 0
    assert byte_header("1133773312", TAR_TOTAL) == 1133773312
    for bad in ("²", "-1", " 1", "1.5", ""):
        with pytest.raises(InvalidArgument, match="X-Neon-Tar-Total must be a byte count"):
            byte_header(bad, TAR_TOTAL)


@pytest.mark.parametrize("bad", [True, -1, 1.0, "1", None])
def test_neon_tar_total(bad: Any) -> None:
    """Absent: None; present: a byte count (JSON null is no count), else refused."""
    assert byte_count({"name": "x.neon"}, "tar_total", "object.write") is None
    assert byte_count({"tar_total": 0}, "tar_total", "object.write") == 0
    with pytest.raises(InvalidArgument, match=r"object\.write: tar_total must be a byte count"):
        byte_count({"tar_total": bad}, "tar_total", "object.write")
