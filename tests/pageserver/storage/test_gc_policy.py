"""The GC policy as a pure function: every PITR area of a node keeps its window (the longest
wins), `inf` keeps the node's whole history, TTLs follow commit times, size limits weigh delta
layers; snapshots and child branch points are retained on their timelines; and a real GC run
with two areas keeps every read inside the longer window."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pageserver.ingest.lsn_index import LsnIndex, datetime_to_pg_time
from pageserver.storage.gc import gc_timeline
from pageserver.storage.gc_policy import NodeTip, TimelineFacts, area_window, plan_gc
from pageserver.storage.retention import Retention, RetentionPolicy, size_window_start
from pageserver.storage.timeline_store import TimelineStore
from pg15.constants import RM_XACT_ID
from pg15.records import DecodedRecord
from pg15.rmgr.xact import XLOG_XACT_COMMIT
from tests.pageserver.storage.test_gc import EAGER, SMALL, fake_redo, history, page, state

T0 = datetime(2024, 5, 1, tzinfo=UTC)
NOW = T0 + timedelta(hours=23, minutes=30)


@dataclass(frozen=True, slots=True)
class Area:
    node_id: str
    ttl: str = "inf"
    size_limit: str = "inf"

    def policy(self) -> RetentionPolicy:
        return RetentionPolicy.parse(self.ttl, self.size_limit)


@dataclass(frozen=True, slots=True)
class Snap:
    timeline_id: str
    lsn: int


def commit(lsn: int, when: datetime) -> DecodedRecord:
    """A COMMIT record ending at `lsn` with commit time `when` (what the LSN index keeps)."""
    main = datetime_to_pg_time(when).to_bytes(8, "little")
    return DecodedRecord(max(lsn - 40, 0), lsn, 40, 7, 0, XLOG_XACT_COMMIT, RM_XACT_ID, (), main)


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here simulates a crash; fsync only costs time."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TimelineStore]:
    s = TimelineStore(tmp_path / "store", SMALL)
    yield s
    s.close()


@pytest.fixture
def index(tmp_path: Path) -> LsnIndex:
    """Commits at LSN 1000 * (i + 1), one an hour from T0, for i in 0..23."""
    idx = LsnIndex(tmp_path / "idx", 16 << 20)
    for i in range(24):
        idx.observe(commit(1000 * (i + 1), T0 + timedelta(hours=i)))
    return idx


def facts(
    tid: str, tip: int = 24_000, ancestor_id: str | None = None, ancestor_lsn: int = 0
) -> TimelineFacts:
    return TimelineFacts(tid, ancestor_id, ancestor_lsn, tip)


def test_two_areas_on_one_node_keep_the_longer_window(index: LsnIndex) -> None:
    node = NodeTip("n1", "t1", 500, index)
    timelines = [facts("t1")]
    for areas in ([Area("n1", "inf"), Area("n1", "1s")], [Area("n1", "1s"), Area("n1", "inf")]):
        plan = plan_gc(timelines, (), areas, [node], NOW)
        assert plan == {"t1": Retention((), 500, 24_000)}
    # Two TTLs: the older cutoff wins (now - 330m = T0 + 18h: commit #18, ending at 19000).
    plan = plan_gc(timelines, (), [Area("n1", "1h"), Area("n1", "330m")], [node], NOW)
    assert plan["t1"].window_start == 19_000


def test_ttl_inf_keeps_the_whole_history_of_the_node(index: LsnIndex) -> None:
    # A branch's history starts at its branch point even when the node says earlier.
    branch = facts("t2", ancestor_id="t1", ancestor_lsn=7_000)
    assert area_window(RetentionPolicy(), branch, NodeTip("n1", "t2", 0, index), NOW) == 7_000
    imported = facts("t1")
    assert area_window(RetentionPolicy(), imported, NodeTip("n1", "t1", 500, index), NOW) == 500


def test_ttl_follows_commit_times(index: LsnIndex) -> None:
    node = NodeTip("n1", "t1", 0, index)
    # now - 5h = T0 + 18h30: the last commit before the first later one is #18 (ends at 19000).
    assert area_window(RetentionPolicy(ttl=5 * 3600), facts("t1"), node, NOW) == 19_000
    # Younger than the TTL: everything is kept.
    assert area_window(RetentionPolicy(ttl=30 * 86400), facts("t1"), node, NOW) == 0
    # Never beyond the tip.
    assert area_window(RetentionPolicy(ttl=1), facts("t1", tip=3_000), node, NOW) == 3_000


def test_size_limits_weigh_delta_layers(index: LsnIndex) -> None:
    deltas = ((4_001, 100), (8_001, 100), (12_001, 100), (16_001, 100))
    timeline = TimelineFacts("t1", None, 0, 24_000, deltas)
    node = NodeTip("n1", "t1", 0, index)
    assert size_window_start(deltas, 400, 0) == 0
    assert size_window_start(deltas, 250, 0) == 8_000
    assert size_window_start(deltas, 250, 9_000) == 9_000
    assert area_window(RetentionPolicy(size_limit=250), timeline, node, NOW) == 8_000
    assert area_window(RetentionPolicy(size_limit=1 << 40), timeline, node, NOW) == 0
    # Both limits: the higher start wins (a quota overrides a TTL) ...
    assert area_window(RetentionPolicy(ttl=5 * 3600, size_limit=250), timeline, node, NOW) == 19_000
    assert (
        area_window(RetentionPolicy(ttl=30 * 86400, size_limit=250), timeline, node, NOW) == 8_000
    )
    # ... while a second area without the quota keeps the longer window.
    plan = plan_gc([timeline], (), [Area("n1", size_limit="250"), Area("n1")], [node], NOW)
    assert plan["t1"].window_start == 0


def test_snapshots_branch_points_and_other_nodes(index: LsnIndex) -> None:
    timelines = [
        facts("t1"),
        facts("t2", tip=9_000, ancestor_id="t1", ancestor_lsn=6_000),
        facts("t3", tip=8_000, ancestor_id="t1", ancestor_lsn=2_000),
    ]
    snaps = [Snap("t1", 3_000), Snap("t1", 3_000), Snap("t2", 8_500), Snap("gone", 1)]
    nodes = [NodeTip("n1", "t1", 0, index), NodeTip("n2", "t2", 6_000, index)]
    areas = [Area("n2"), Area("unknown-node")]
    plan = plan_gc(timelines, snaps, areas, nodes, NOW)
    assert plan == {
        "t1": Retention((2_000, 3_000, 6_000), None, 24_000),
        "t2": Retention((8_500,), 6_000, 9_000),
        "t3": Retention((), None, 8_000),
    }


def test_gc_with_two_areas_keeps_every_read_of_the_longer_one(
    store: TimelineStore, tmp_path: Path
) -> None:
    tl = store.create_timeline("aa")
    lsns = history(tl, 24)
    index = LsnIndex(tmp_path / "real-idx", 16 << 20)
    for i, lsn in enumerate(lsns):
        index.observe(commit(lsn, T0 + timedelta(hours=i)))
    keys = [page(i) for i in range(6)]
    before = state(tl, lsns, keys)
    node = NodeTip("n1", "aa", 0, index)
    areas = [Area("n1", "inf"), Area("n1", "1h")]
    plan = plan_gc([TimelineFacts.of(tl)], (), areas, [node], NOW)
    assert plan["aa"].window_start == 0
    gc_timeline(
        tl, plan["aa"].retain_lsns, plan["aa"].window_start, materialize=fake_redo, settings=EAGER
    )
    assert state(tl, lsns, keys) == before
    # The short area alone lets the same GC drop the early history (the test is not vacuous).
    short = plan_gc([TimelineFacts.of(tl)], (), areas[1:], [node], NOW)["aa"]
    assert short.window_start == lsns[22]
    result = gc_timeline(
        tl, short.retain_lsns, short.window_start, materialize=fake_redo, settings=EAGER
    )
    assert result.removed_layers
    assert state(tl, lsns[22:], keys) == {lsn: before[lsn] for lsn in lsns[22:]}
