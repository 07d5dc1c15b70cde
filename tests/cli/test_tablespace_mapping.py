"""`--tablespace-mapping OLD=NEW` as pg_basebackup reads it (cli/tablespace_mapping.py): absolute
paths, `\\=` for an '=' in a path, canonical forms; every bad form is one InvalidArgument."""

from __future__ import annotations

import pytest

from cli.tablespace_mapping import check_mapped, mapped, parse_mappings
from proto.errors import InvalidArgument


def test_mappings_are_parsed_as_pg_basebackup_does() -> None:
    assert parse_mappings(["/srv/ts1=/new/ts1", "/a\\=b/=/c//d/"]) == {
        "/srv/ts1": "/new/ts1",
        "/a=b": "/c/d",
    }
    assert parse_mappings(["/x=/y", "/x=/y"]) == {"/x": "/y"}  # the same mapping twice
    assert parse_mappings([]) == {}


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("/only/old", "no OLD=NEW"),
        ("=/new", "no OLD=NEW"),
        ("/old=", "no OLD=NEW"),
        ("/a=/b=/c", "multiple '=' signs"),
        ("relative=/new", "the old directory 'relative' is not an absolute path"),
        ("/old=new", "the new directory 'new' is not an absolute path"),
    ],
)
def test_bad_mappings_are_refused_by_name(spec: str, says: str) -> None:
    with pytest.raises(InvalidArgument, match="--tablespace-mapping") as err:
        parse_mappings([spec])
    assert says in str(err.value)


def test_conflicting_mappings_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="mapped twice"):
        parse_mappings(["/x=/y", "/x=/z"])
    with pytest.raises(InvalidArgument, match="same directory"):
        parse_mappings(["/x=/y", "/w=/y"])


def test_old_must_be_a_location_of_the_snapshot() -> None:
    check_mapped({"/srv/ts1": "/n"}, ["", "/srv/ts1/"], "snapshot s")
    with pytest.raises(InvalidArgument, match="/srv/ts2 is not a tablespace location of s"):
        check_mapped({"/srv/ts2": "/n"}, ["", "/srv/ts1"], "s")
    with pytest.raises(InvalidArgument, match="locations: none"):
        check_mapped({"/srv/ts2": "/n"}, [""], "s")
    assert mapped({"/srv/ts1": "/n"}, "/srv/ts1/") == "/n"
    assert mapped({"/srv/ts1": "/n"}, "") == ""  # in place stays in place
    assert mapped({"/srv/ts1": "/n"}, "/other") == "/other"
