"""tablespace_map as do_pg_backup_start writes it and read_tablespace_map reads it."""

from __future__ import annotations

import pytest

from pg15.tablespace_map import format_tablespace_map, parse_tablespace_map
from proto.errors import CorruptData


def test_what_postgresql_writes_parses() -> None:
    data = b"16385 /srv/ts1\n16386  leading space\n"
    assert parse_tablespace_map(data) == {16385: "/srv/ts1", 16386: " leading space"}


def test_escaped_newlines_and_backslashes_round_trip() -> None:
    locations = {7: "/x\\y\nz\r", 16385: "/srv/a b"}
    data = format_tablespace_map(locations)
    assert data == b"7 /x\\\\y\\\nz\\\r\n16385 /srv/a b\n"
    assert parse_tablespace_map(data) == locations


def test_crlf_line_ends_are_accepted() -> None:
    assert parse_tablespace_map(b"1 /a\r\n2 /b\r\n") == {1: "/a", 2: "/b"}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"16385 /srv/ts1", "not terminated"),
        (b"16385 /srv\\", "not terminated"),
        (b"16385\n", "invalid line"),
        (b"ts1 /srv\n", "invalid tablespace OID"),
        (b"0 /srv\n", "invalid tablespace OID"),
        (b"5 \xff\n", "not UTF-8"),
    ],
)
def test_what_postgresql_refuses_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(CorruptData, match=message):
        parse_tablespace_map(data, "backup/tablespace_map")
