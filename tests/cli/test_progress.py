"""Progress under NEON_PROGRESS=json (what the console parses): one JSON line per state on
stderr, at most every JSON_INTERVAL seconds, the complete and the last state always, with or
without a terminal; a total only grows; nothing else is taken for a report."""

from __future__ import annotations

import pytest

from cli import progress
from cli.progress import PROGRESS_ENV, Progress, ProgressReport


def reports(err: str) -> list[ProgressReport]:
    found = [ProgressReport.parse(line) for line in err.splitlines()]
    assert None not in found, err
    return [r for r in found if r is not None]


def test_json_lines_are_throttled_and_end_with_the_last_state(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(PROGRESS_ENV, "json")
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    bar = Progress(False, "Pulling s1")  # not enabled (no TTY, or --json): JSON still
    bar.update(10, 100)
    bar.update(20, 100)  # within the interval: not written
    clock[0] += progress.JSON_INTERVAL
    bar.update(30, None)  # the total stays known
    bar.update(40, 50)  # a total only grows
    bar.update(100, 100)  # complete: written at once
    bar.update(100, 100)  # the same state: not again
    bar.close()
    out, err = capsys.readouterr()
    assert out == ""
    assert reports(err) == [
        ProgressReport("Pulling s1", 10, 100),
        ProgressReport("Pulling s1", 30, 100),
        ProgressReport("Pulling s1", 100, 100),
    ]
    assert reports(err)[-1].percent == 100.0


def test_an_unknown_total_has_no_percent_and_close_writes_the_last_state(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(PROGRESS_ENV, "json")
    clock = [5.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    bar = Progress(True, "Pushing s1")
    bar.update(4096, None)
    bar.update(8192, None)
    bar.close()
    got = reports(capsys.readouterr().err)
    assert got == [
        ProgressReport("Pushing s1", 4096, None),
        ProgressReport("Pushing s1", 8192, None),
    ]
    assert got[0].percent is None


def test_without_the_variable_nothing_is_written_off_a_terminal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    bar = Progress(False, "Importing")
    bar.update(1, 2)
    bar.close()
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    "line",
    [
        "Pulled s1 (1.0M)",
        '{"progress": 1, "done": 2, "total": 3}',
        '{"progress": "x", "done": "2", "total": 3}',
        '{"progress": "x"}',
        '{"progress": "x", "done": 2',
        '{"name": "x", "progress": "y", "done": 1, "total": 2}',
    ],
)
def test_other_lines_are_not_reports(line: str) -> None:
    assert ProgressReport.parse(line) is None
