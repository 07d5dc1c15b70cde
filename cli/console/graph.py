"""The snapshot graph as SVG: a pure function from `neon snapshot list --json` to markup.

Drawn like `git log --graph`: one row per snapshot, newest on top; one lane (column) per
timeline, a branch curving out of the snapshot it was checked out from. Lanes are reused once
a timeline's rows are past, so a history of many checkouts stays narrow. Every dot links to
the snapshot's actions on the snapshots page.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any
from urllib.parse import quote

from cli.output import human_size
from pg15.lsn import format_lsn

ROW = 24
"""Pixels per snapshot row."""
LANE = 16
"""Pixels per timeline lane."""
MARGIN = 12
HEADER = 26
"""Pixels for a history's title row."""
CHAR = 7.2
"""Width of a label character (13px monospace), for the picture's width."""
DOT = 5


@dataclass(frozen=True, slots=True)
class GraphSnapshot:
    """One row of the listing, as the graph needs it."""

    name: str
    node_id: str | None
    timeline_id: str
    lsn: int
    parent: str | None = None
    size_bytes: int | None = None

    @classmethod
    def from_listing(cls, row: Mapping[str, Any]) -> GraphSnapshot:
        return cls(
            name=str(row["name"]),
            node_id=row.get("node_id"),
            timeline_id=str(row.get("timeline_id") or row["name"]),
            lsn=int(row["lsn"]),
            parent=row.get("parent"),
            size_bytes=row.get("size_bytes"),
        )

    @property
    def kind(self) -> str:
        """current (a node's live state), head (a state left by a checkout), imported
        (a bare name) or snapshot."""
        _ref, at, tag = self.name.rpartition("@")
        if not at:
            return "imported"
        if tag == "CURRENT":
            return "current"
        return "head" if tag.startswith("HEAD{") else "snapshot"


@dataclass(slots=True)
class _Timeline:
    id: str
    snaps: list[GraphSnapshot] = field(default_factory=list)
    parent: GraphSnapshot | None = None
    """The snapshot it branched from, when it is listed."""
    parent_name: str | None = None
    children: list[_Timeline] = field(default_factory=list)
    depth: int = 0
    top: int = 0
    bottom: int = 0
    lane: int = 0


@dataclass(frozen=True, slots=True)
class _Tree:
    title: str
    timelines: list[_Timeline]
    rows: list[GraphSnapshot]
    row_of: dict[str, int]
    lanes: int


def render_graph(
    listing: Iterable[Mapping[str, Any]], *, selected: str | None = None, link: str = "/snapshots"
) -> str:
    """The SVG of the histories in a snapshot listing; `selected` is ringed."""
    return render_snapshots(
        [GraphSnapshot.from_listing(r) for r in listing], selected=selected, link=link
    )


def render_snapshots(
    snaps: Sequence[GraphSnapshot], *, selected: str | None = None, link: str = "/snapshots"
) -> str:
    trees = _trees(snaps)
    lanes = max((t.lanes for t in trees), default=1)
    label_x = MARGIN + lanes * LANE + 8
    longest = max((len(_label(s)) for s in snaps), default=20)
    width = int(label_x + longest * CHAR + MARGIN)
    height = sum(HEADER + len(t.rows) * ROW for t in trees) + MARGIN
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="graph" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="snapshot graph">'
    ]
    if not trees:
        out.append(f'<text x="{MARGIN}" y="{HEADER}" class="meta">no snapshots yet</text>')
    y0 = 0
    for tree in trees:
        out.extend(_draw_tree(tree, y0, label_x, selected, link))
        y0 += HEADER + len(tree.rows) * ROW
    out.append("</svg>")
    return "".join(out)


def _trees(snaps: Sequence[GraphSnapshot]) -> list[_Tree]:
    """Timelines joined into histories (a timeline hangs under the one holding the snapshot
    it branched from), each laid out in rows and lanes."""
    by_name = {s.name: s for s in snaps}
    timelines: dict[str, _Timeline] = {}
    for snap in snaps:
        timeline = timelines.setdefault(snap.timeline_id, _Timeline(snap.timeline_id))
        timeline.snaps.append(snap)
        if snap.parent and timeline.parent_name is None:
            timeline.parent_name = snap.parent
    roots: list[_Timeline] = []
    for timeline in timelines.values():
        parent = by_name.get(timeline.parent_name or "")
        if parent is not None and parent.timeline_id != timeline.id:
            timeline.parent = parent
            timelines[parent.timeline_id].children.append(timeline)
        else:
            roots.append(timeline)
    return [_layout(root) for root in roots]


def _layout(root: _Timeline) -> _Tree:
    members: list[_Timeline] = []
    stack = [root]
    while stack:  # depth first, iteratively: a long chain of checkouts is deep
        timeline = stack.pop()
        members.append(timeline)
        for child in timeline.children:
            child.depth = timeline.depth + 1
            stack.append(child)
    # Newest on top; at one LSN a branch's snapshots sit above the one it branched from.
    depth = {t.id: t.depth for t in members}
    rows = sorted(
        (s for t in members for s in t.snaps),
        key=lambda s: (-s.lsn, -depth[s.timeline_id], s.name),
    )
    row_of = {s.name: i for i, s in enumerate(rows)}
    for timeline in members:
        own = [row_of[s.name] for s in timeline.snaps]
        timeline.top = min(own)
        timeline.bottom = row_of[timeline.parent.name] if timeline.parent else max(own)
    lanes: list[list[tuple[int, int]]] = []
    for timeline in [root, *sorted(members[1:], key=lambda t: (t.top, t.bottom))]:
        free = (
            i
            for i, spans in enumerate(lanes)
            if all(timeline.bottom < top or timeline.top > bottom for top, bottom in spans)
        )
        timeline.lane = next(free, len(lanes))
        if timeline.lane == len(lanes):
            lanes.append([])
        lanes[timeline.lane].append((timeline.top, timeline.bottom))
    return _Tree(_title(root), members, rows, row_of, len(lanes))


def _title(root: _Timeline) -> str:
    first = root.snaps[0]
    ref, at, _tag = first.name.rpartition("@")
    title = f"{ref}" if at else f"imported {first.name}"
    if root.parent_name is not None:
        title += f" (branched from {root.parent_name}, not listed)"
    return title


def _label(snap: GraphSnapshot) -> str:
    return f"{snap.name}  {format_lsn(snap.lsn)}  {human_size(snap.size_bytes)}"


def _draw_tree(tree: _Tree, y0: int, label_x: float, selected: str | None, link: str) -> list[str]:
    out = [f'<text x="{MARGIN}" y="{y0 + HEADER - 9}" class="history">{escape(tree.title)}</text>']

    def x(lane: int) -> int:
        return MARGIN + lane * LANE + LANE // 2

    def y(row: int) -> int:
        return y0 + HEADER + row * ROW + ROW // 2

    lane_of = {t.id: t.lane for t in tree.timelines}
    branch_points = {t.parent.name for t in tree.timelines if t.parent is not None}
    for timeline in tree.timelines:
        cx = x(timeline.lane)
        own = [tree.row_of[s.name] for s in timeline.snaps]
        low = max(own)
        if timeline.parent is not None:
            px, py = x(lane_of[timeline.parent.timeline_id]), y(tree.row_of[timeline.parent.name])
            bend = py - ROW // 2
            out.append(
                f'<path class="branch" d="M{px} {py} C{px} {bend} {cx} {py} {cx} {bend} '
                f'L{cx} {y(low)}"/>'
            )
        if min(own) < low:
            out.append(f'<path class="timeline" d="M{cx} {y(min(own))} L{cx} {y(low)}"/>')
    for row, snap in enumerate(tree.rows):
        cx, cy = x(lane_of[snap.timeline_id]), y(row)
        kind = snap.kind + (" branchpoint" if snap.name in branch_points else "")
        if snap.name == selected:
            kind += " selected"
        name = escape(snap.name)
        href = escape(f"{link}?select={quote(snap.name, safe='')}")
        out.append(
            f'<a href="{href}" class="snap {kind}" data-name="{name}">'
            f"<title>{name} at {format_lsn(snap.lsn)}</title>"
            f'<circle cx="{cx}" cy="{cy}" r="{DOT}"/>'
            f'<text x="{label_x}" y="{cy + 4}">{name}<tspan class="meta" dx="10">'
            f"{format_lsn(snap.lsn)}  {escape(human_size(snap.size_bytes))}</tspan></text></a>"
        )
    return out
