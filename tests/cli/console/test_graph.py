"""The snapshot graph: rows, lanes and branches drawn from a listing, and its rendering time."""

from __future__ import annotations

import itertools
import re
import time
import xml.etree.ElementTree as ET
from typing import Any

from cli.console.graph import LANE, MARGIN, ROW, GraphSnapshot, render_graph

SVG = "{http://www.w3.org/2000/svg}"


def snap(name: str, timeline: str, lsn: int, parent: str | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "node_id": "primary1",
        "timeline_id": timeline,
        "lsn": lsn,
        "parent": parent,
        "size_bytes": 3 << 20,
    }


def dots(svg: str) -> dict[str, tuple[float, float, str]]:
    """name -> (x, y, classes) of each snapshot's dot."""
    root = ET.fromstring(svg)
    out = {}
    for a in root.iter(f"{SVG}a"):
        circle = a.find(f"{SVG}circle")
        assert circle is not None
        out[a.attrib["data-name"]] = (
            float(circle.attrib["cx"]),
            float(circle.attrib["cy"]),
            a.attrib["class"],
        )
    return out


def lane(x: float) -> int:
    return int((x - MARGIN - LANE // 2) / LANE)


# The listing after: s1, s2, checkout s1 (HEAD{0} is the state left), s3 on the new timeline.
CHECKED_OUT = [
    snap("pgdata1@s1", "t1", 100),
    snap("pgdata1@s2", "t1", 300),
    snap("pgdata1@s3", "t2", 150, "pgdata1@s1"),
    snap("pgdata1@HEAD{0}", "t1", 310),
    snap("pgdata1@CURRENT", "t2", 160, "pgdata1@s1"),
]


def test_rows_newest_first_and_a_lane_per_timeline() -> None:
    d = dots(render_graph(CHECKED_OUT))
    order = sorted(d, key=lambda n: d[n][1])
    assert order == [
        "pgdata1@HEAD{0}",
        "pgdata1@s2",
        "pgdata1@CURRENT",
        "pgdata1@s3",
        "pgdata1@s1",
    ]
    ys = sorted(y for _x, y, _c in d.values())
    assert all(b - a == ROW for a, b in itertools.pairwise(ys))
    lanes = {n: lane(x) for n, (x, _y, _c) in d.items()}
    assert lanes["pgdata1@s1"] == lanes["pgdata1@s2"] == lanes["pgdata1@HEAD{0}"] == 0
    assert lanes["pgdata1@s3"] == lanes["pgdata1@CURRENT"] == 1


def test_kinds_branch_points_and_selection_are_marked() -> None:
    d = dots(render_graph(CHECKED_OUT, selected="pgdata1@s2"))
    assert d["pgdata1@CURRENT"][2].split() == ["snap", "current"]
    assert d["pgdata1@HEAD{0}"][2].split() == ["snap", "head"]
    assert d["pgdata1@s1"][2].split() == ["snap", "snapshot", "branchpoint"]
    assert "selected" in d["pgdata1@s2"][2].split()
    imported = dots(render_graph([{**snap("movies", "t9", 5), "node_id": None}]))
    assert imported["movies"][2].split() == ["snap", "imported"]


def test_a_branch_curves_from_the_snapshot_it_left() -> None:
    svg = render_graph(CHECKED_OUT)
    d = dots(svg)
    (branch,) = re.findall(r'class="branch" d="M(\d+) (\d+) ', svg)
    assert (float(branch[0]), float(branch[1])) == d["pgdata1@s1"][:2]


def test_lanes_are_reused_once_a_timeline_is_past() -> None:
    """29 checkouts in a chain, each from the previous timeline: a timeline's lane is free
    again once its rows are past, so the picture stays three lanes wide, not 30."""
    chain = [snap("p@s0", "t0", 10)]
    for i in range(1, 30):
        chain.append(snap(f"p@s{i}", f"t{i}", 10 + i * 10, f"p@s{i - 1}"))
        chain.append(snap(f"p@x{i}", f"t{i}", 10 + i * 10 + 5, f"p@s{i - 1}"))
    lanes = {lane(x) for x, _y, _c in dots(render_graph(chain)).values()}
    assert lanes <= {0, 1, 2}


def test_histories_are_drawn_apart_with_titles() -> None:
    listing = [
        *CHECKED_OUT,
        {**snap("movies", "m1", 50), "node_id": None},
        {**snap("pgdata2@CURRENT", "n2", 70, "movies"), "node_id": "primary2"},
        snap("pgdata3@CURRENT", "n3", 70, "pgdata3@gone"),
    ]
    svg = render_graph(listing)
    titles = [t.text for t in ET.fromstring(svg).iter(f"{SVG}text") if t.get("class") == "history"]
    assert titles == [
        "pgdata1",
        "imported movies",
        "pgdata3 (branched from pgdata3@gone, not listed)",
    ]
    d = dots(svg)
    assert d["pgdata2@CURRENT"][1] < d["movies"][1]  # above the snapshot it was created from


def test_names_are_escaped_and_an_empty_listing_says_so() -> None:
    svg = render_graph([snap("p@<b>&", "t", 1)])
    ET.fromstring(svg)  # well-formed
    assert "<b>" not in svg
    assert "no snapshots yet" in render_graph([])


def test_graph_snapshot_from_listing_row() -> None:
    row = snap("pgdata1@HEAD{3}", "t1", 42)
    assert GraphSnapshot.from_listing(row).kind == "head"


def test_render_500_snapshots_prints_the_time() -> None:
    """A unit benchmark, not a timed test: the goal is < 200 ms (run with -s to see it)."""
    listing = []
    for i in range(500):
        if i % 10 == 0:  # a checkout every ten snapshots, from the snapshot five back
            parent = f"pgdata1@s{max(i - 5, 0)}" if i else None
        listing.append(snap(f"pgdata1@s{i}", f"t{i // 10}", 1000 + i * 100, parent))
    started = time.perf_counter()
    svg = render_graph(listing)
    elapsed = time.perf_counter() - started
    print(f"\nsnapshot graph: 500 snapshots rendered in {elapsed * 1000:.1f} ms ({len(svg)} bytes)")
    assert len(dots(svg)) == 500
