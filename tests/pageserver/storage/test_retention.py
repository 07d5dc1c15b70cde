"""Retention ranges: a new PITR area's TTL and size limit are bounded at the edge, and an area
stored with a huge TTL (before the bound existed) still computes a window instead of raising
OverflowError in every PITR command and in background GC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from pageserver.history.pitr import PitrArea, new_area
from pageserver.storage.retention import (
    MAX_SIZE_LIMIT_BYTES,
    MAX_TTL_SECONDS,
    RetentionPolicy,
    parse_size,
)
from proto.errors import InvalidArgument


def test_new_area_refuses_ttl_and_size_beyond_the_maximum() -> None:
    for ttl in ("800000d", "36501d", "9" * 400 + "d"):
        with pytest.raises(InvalidArgument, match=r"too long: the maximum is 36500d"):
            new_area("p", "primary1", ttl, "inf")
    for size in ("1048577T", "9" * 400):
        with pytest.raises(InvalidArgument, match=r"too large: the maximum is 1048576T"):
            new_area("p", "primary1", "inf", size)
    assert new_area("p", "primary1", "36500d", "1048576T").policy() == RetentionPolicy(
        MAX_TTL_SECONDS, MAX_SIZE_LIMIT_BYTES
    )
    # A 400-digit size parses exactly (no float overflow) and is then refused by range.
    assert parse_size("9" * 400) == int("9" * 400)


def test_a_stored_huge_ttl_keeps_everything_instead_of_overflowing() -> None:
    now = datetime(2026, 12, 3, tzinfo=UTC)
    assert RetentionPolicy(ttl=3600).ttl_cutoff(now) == now - timedelta(hours=1)
    assert RetentionPolicy(ttl=MAX_TTL_SECONDS).ttl_cutoff(now) is not None
    assert RetentionPolicy().ttl_cutoff(now) is None
    for ttl in ("800000d", "9" * 400 + "d"):
        stored = PitrArea("p", "primary1", ttl, "inf", 0.0)  # as loaded from an old registry
        assert stored.policy().ttl_cutoff(now) is None
