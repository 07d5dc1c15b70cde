"""`neon pitr ...` limits through the real CLI: a TTL or size limit beyond the maximum is one
clear line and changes nothing; an area stored with a huge TTL before the limit existed leaves
every PITR command working."""

from __future__ import annotations

import json

from tests.neoncli import NeonCli, free_port


def test_pitr_ranges_are_checked_and_a_stored_huge_ttl_still_works(neon: NeonCli) -> None:
    neon.run("pg", "create", "--port", str(free_port()))
    line = neon.fail("pitr", "create", "p", "--pg", "primary1", "--ttl", "800000d")
    assert "TTL '800000d' is too long: the maximum is 36500d" in line
    line = neon.fail("pitr", "create", "p", "--size-limit", "9" * 40 + "T")
    assert "the maximum is 1048576T" in line
    assert neon.json("pitr", "list") == []

    neon.run("pitr", "create", "p", "--ttl", "36500d", "--size-limit", "1048576T")
    # An area written by an older version, before the range check: its TTL reaches before
    # year 1. Every command that computes its window must still answer.
    (registry,) = neon.home.glob("storage/**/pitr.json")
    areas = json.loads(registry.read_text())
    areas[0]["ttl"] = "800000d"
    registry.write_text(json.dumps(areas))

    (area,) = neon.json("pitr", "list")
    assert area["ttl"] == "800000d" and area["from_lsn"] <= area["to_lsn"]
    assert neon.json("pg", "show", "primary1")["history"]["pitr"][0]["name"] == "p"
    assert neon.run("pitr", "gc", "p").stdout.startswith("GC removed")
    out = neon.run("pitr", "extract-snapshot", "p", "--lsn", area["to"], "--as", "x").stdout
    assert out.startswith("pgdata1@x at ")
    assert "Traceback" not in neon.run("pageserver", "status").stderr
