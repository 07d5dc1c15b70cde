"""A request still running after SLOW_REQUEST_SECONDS leaves the threads' stacks and the
tasks' awaits on stderr, once; one that ends in time leaves nothing."""

from __future__ import annotations

import asyncio
import logging

import pytest

from pageserver.api import slow_requests
from pageserver.api.slow_requests import reported_if_slow


async def _branch_waiting(seconds: float) -> None:
    with reported_if_slow("node.branch"):
        await asyncio.sleep(seconds)


def test_a_slow_request_leaves_its_stacks_once(
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(slow_requests, "SLOW_REQUEST_SECONDS", 0.05)
    with caplog.at_level(logging.WARNING, logger=slow_requests.__name__):
        asyncio.run(_branch_waiting(0.3))
    err = capfd.readouterr().err
    assert "most recent call first" in err  # faulthandler's dump of the threads
    assert "_branch_waiting" in err  # the task's chain of awaits names the waiting request
    assert err.count("asyncio tasks (") == 1  # once, not every SLOW_REQUEST_SECONDS
    assert [r.getMessage()[:32] for r in caplog.records] == ["request node.branch has run for "]


def test_a_request_that_ends_in_time_reports_nothing(
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(slow_requests, "SLOW_REQUEST_SECONDS", 0.2)

    async def request_then_idle() -> None:
        await _branch_waiting(0.01)
        await asyncio.sleep(0.4)  # the same loop goes on past the threshold

    with caplog.at_level(logging.WARNING, logger=slow_requests.__name__):
        asyncio.run(request_then_idle())
    assert "asyncio tasks" not in capfd.readouterr().err
    assert caplog.records == []
