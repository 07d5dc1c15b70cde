"""The byte offsets a receiver takes from a pusher or puller (review L5): a `recv --http`
PUT's `X-Neon-Resume-At` header and neon://'s `resume_at` / `offset` params are byte counts
or a clear InvalidArgument, never a ValueError (an HTTP 500 and a traceback in recv's log)
nor a bool taken as 1."""

from __future__ import annotations

from typing import Any

import pytest

from cli.receiver_http import resume_offset
from cli.receiver_proto import byte_offset
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
