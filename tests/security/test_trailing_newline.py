"""A name or number with a newline after it is refused like any other stray character.

Python's `$` matches before a final newline, so `re.match(r"^[a-z]+$", "x\\n")` succeeds: a
snapshot tag, storage name, timeline id or layer file name ending in a newline passed the
checks and reached paths and JSON. The patterns end in `\\Z` instead; these cases fail with `$`.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cli.nodes import NODE_ID_PREFIX, NODE_ID_RE
from cli.storages import validate_name, validate_s3_bucket
from pageserver.history.snapshots import check_user_tag, is_valid_name
from pageserver.storage.layers.names import parse_layer_name
from pageserver.storage.retention import parse_duration, parse_size
from pageserver.storage.timeline_store import check_timeline_id
from pg15.datadir_layout import SLRU_SEGMENT_FILE, TWOPHASE_FILE
from pg15.lsn import parse_segment_file_name
from proto.errors import InvalidArgument
from snapfile.container import frame_index

REFUSERS: list[tuple[str, Callable[[str], object], str]] = [
    ("snapshot tag", check_user_tag, "s1"),
    ("storage name", validate_name, "local2"),
    ("s3 bucket", validate_s3_bucket, "my-bucket"),
    ("timeline id", check_timeline_id, "0a1b2c"),
    ("WAL segment name", parse_segment_file_name, "000000010000000000000002"),
]


@pytest.mark.parametrize(("what", "check", "good"), REFUSERS, ids=[r[0] for r in REFUSERS])
def test_a_final_newline_is_refused(what: str, check: Callable[[str], object], good: str) -> None:
    check(good)  # the same text without the newline passes
    with pytest.raises(InvalidArgument):
        check(good + "\n")


def test_names_matched_as_files_or_snapshots_take_no_final_newline() -> None:
    assert is_valid_name("s1") and not is_valid_name("s1\n")
    node_id = f"{NODE_ID_PREFIX}12"
    assert NODE_ID_RE.match(node_id) and not NODE_ID_RE.match(node_id + "\n")
    assert SLRU_SEGMENT_FILE.match("0000") and not SLRU_SEGMENT_FILE.match("0000\n")
    assert TWOPHASE_FILE.match("000002E5") and not TWOPHASE_FILE.match("000002E5\n")
    assert frame_index("frames/00000001.zst") == 1 and frame_index("frames/00000001.zst\n") is None
    image = "0" * 36 + "-" + "F" * 36 + "__" + "0000000001000028"
    assert parse_layer_name(image) is not None and parse_layer_name(image + "\n") is None


def test_settings_still_take_surrounding_spaces() -> None:
    """What a user types in a setting is stripped first: a newline around it is fine there."""
    assert parse_duration(" 30d\n") == 30 * 86400
    assert parse_size("10G\n") == 10 * 1024**3
