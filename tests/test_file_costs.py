"""tests.file_costs: the order xdist hands the suite's files out in."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests import file_costs


@dataclass(frozen=True, slots=True)
class Node:
    nodeid: str


def test_files_go_costliest_first_each_in_its_own_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured files by their seconds, the others by their tests (here a second each,
    twenty end to end)."""
    monkeypatch.setattr(file_costs, "SECONDS", {"b.py": 10.0, "d.py": 300.0, "f.py": 0.5})
    monkeypatch.setattr(file_costs, "UNMEASURED_PER_TEST", 1.0)
    monkeypatch.setattr(file_costs, "UNMEASURED_E2E_PER_TEST", 20.0)
    items = [Node(n) for n in ("a.py::1", "b.py::1", "c.py::1", "c.py::2", "a.py::2")]
    items += [Node("d.py::x[2]"), Node("d.py::x[1]"), Node("e.py::1")]
    items += [Node("f.py::1"), Node("f.py::2"), Node("tests/e2e/g.py::1")]
    ordered = [n.nodeid for n in file_costs.costliest_first(items)]
    assert ordered == [
        "d.py::x[2]", "d.py::x[1]",  # 300 s
        "tests/e2e/g.py::1",  # 20 s: one end-to-end test
        "b.py::1",  # 10 s
        "a.py::1", "a.py::2", "c.py::1", "c.py::2",  # two tests each, as found
        "e.py::1", "f.py::1", "f.py::2",  # 1 s (a test), 0.5 s (measured)
    ]  # fmt: skip


def test_the_suite_is_collected_in_that_order(request: pytest.FixtureRequest) -> None:
    """The conftest hook ran: this session's items are costliest_first's order, and xdist
    does not reorder them by test count."""
    items = request.session.items
    assert [i.nodeid for i in items] == [i.nodeid for i in file_costs.costliest_first(items)]
    assert getattr(request.config.option, "loadscopereorder", False) is False
