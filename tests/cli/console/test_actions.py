"""The console's actions: the `neon` command line each form makes, and the refusal of an
action whose node or snapshot changed since the page showed it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cli.console import actions
from cli.console.commands import (
    Cli,
    Job,
    Jobs,
    _lines,
    cli_argv,
    command_line,
    error_line,
    failure,
    lsn_argument,
    progress_text,
)
from cli.progress import ProgressReport


def test_command_lines_are_quoted_for_a_shell() -> None:
    assert command_line(["pg", "start", "primary1"]) == "neon pg start primary1"
    assert command_line(["pg", "checkout", "pgdata1@HEAD{0}"]) == (
        "neon pg checkout 'pgdata1@HEAD{0}'"
    )
    assert command_line(["snapshot", "create", "a b@x;rm"]) == "neon snapshot create 'a b@x;rm'"


@pytest.mark.parametrize(
    ("name", "form", "command"),
    [
        ("pg-start", {"node": "primary1"}, "neon pg start primary1"),
        ("pg-stop", {"node": "primary2"}, "neon pg stop primary2"),
        ("snapshot-create", {"pgdata": "pgdata1", "tag": "s1"}, "neon snapshot create pgdata1@s1"),
        ("pg-checkout", {"snapshot": "pgdata1@s1"}, "neon pg checkout pgdata1@s1"),
        ("snapshot-destroy", {"snapshot": "pgdata1@s1"}, "neon snapshot destroy pgdata1@s1"),
        ("snapshot-start", {"snapshot": "movies"}, "neon snapshot start movies"),
        ("snapshot-stop", {"snapshot": "movies"}, "neon snapshot stop movies"),
        (
            "pitr-extract",
            {"area": "a1", "lsn": str(0x1_0000_0028)},
            "neon pitr extract-snapshot a1 --lsn 1/00000028",
        ),
        (
            "pitr-extract",
            {"area": "a1", "lsn": "0/1500028", "tag": "before"},
            "neon pitr extract-snapshot a1 --lsn 0/1500028 --as before",
        ),
        (
            "pitr-extract",
            {"area": "a1", "lsn": "", "time": "2026-11-01T12:00:00+00:00"},
            "neon pitr extract-snapshot a1 --time 2026-11-01T12:00:00+00:00",
        ),
        (
            "snapshot-import",
            {"source": "/backups/base", "name": "movies", "storage": ""},
            "neon snapshot import --from /backups/base movies",
        ),
        (
            "snapshot-import",
            {"source": "basebackup://u@db:5433/", "name": "m", "storage": "fast"},
            "neon snapshot import --from basebackup://u@db:5433/ m -s fast",
        ),
        (
            "snapshot-push",
            {"to": "s3://b/p", "snapshot": "pgdata1@s1"},
            "neon snapshot push --to s3://b/p pgdata1@s1",
        ),
        (
            "snapshot-push",
            {"to": "/mnt/x y", "snapshot": "pgdata1@s1", "full": "1"},
            "neon snapshot push --to '/mnt/x y' pgdata1@s1 --full",
        ),
        (
            "snapshot-pull",
            {"source": "ssh://h/x.neon", "name": "", "storage": ""},
            "neon snapshot pull --from ssh://h/x.neon",
        ),
        (
            "snapshot-pull",
            {"source": "backup:s1", "name": "s1copy", "storage": "local"},
            "neon snapshot pull --from backup:s1 s1copy -s local",
        ),
    ],
)
def test_each_action_is_the_command_it_shows(name: str, form: dict[str, str], command: str) -> None:
    action = actions.build(name, form)
    assert action.command == command
    assert cli_argv(action.args)[-len(action.args) :] == list(action.args)


def test_forms_that_make_no_command_are_refused() -> None:
    with pytest.raises(actions.BadForm, match="node is missing"):
        actions.build("pg-start", {})
    with pytest.raises(actions.BadForm, match="may not start with '-'"):
        actions.build("pg-stop", {"node": "--help"})
    with pytest.raises(actions.BadForm, match="not a node's snapshot"):
        actions.build("pg-checkout", {"snapshot": "movies"})
    with pytest.raises(actions.BadForm, match="no action"):
        actions.build("pg-destroy", {"node": "primary1"})
    with pytest.raises(actions.BadForm, match="to may not start with '-'"):
        actions.build("snapshot-push", {"to": "--upload-pack=x", "snapshot": "s"})
    with pytest.raises(actions.BadForm, match="source is missing"):
        actions.build("snapshot-pull", {"name": "x"})


def test_only_destroy_asks_first() -> None:
    asking = [n for n in actions.BUILDERS if n != "pitr-extract" and _confirm(n)]
    assert asking == ["snapshot-destroy"]


def _confirm(name: str) -> str | None:
    form = {
        "node": "n",
        "snapshot": "p@s",
        "pgdata": "p",
        "tag": "t",
        "area": "a",
        "lsn": "1",
        "source": "s",
        "name": "n",
        "to": "t",
    }
    return actions.build(name, form).confirm


NODES = [{"id": "primary1", "state": "running"}, {"id": "primary2", "state": "stopped"}]
SNAPS = [
    {"name": "pgdata1@s1", "timeline_id": "t1", "lsn": 100},
    {"name": "pgdata1@CURRENT", "timeline_id": "t2", "lsn": 180},
]


def test_an_action_on_a_changed_node_is_refused_with_a_message() -> None:
    now = actions.node_fingerprints(NODES)
    stop = actions.build("pg-stop", {"node": "primary1"})
    assert actions.changed(stop, "running", now) is None
    message = actions.changed(stop, "stopped", now)
    assert message == (
        "node primary1 changed since the page was shown (it is running now, the page showed "
        "it stopped); nothing was done."
    )
    gone = actions.build("pg-start", {"node": "primary3"})
    assert actions.changed(gone, "stopped", now) == (
        "node primary3 no longer exists; nothing was done."
    )
    assert actions.changed(stop, None, now) is None  # a form without what it saw: the CLI decides


def test_a_checkout_after_another_checkout_is_refused() -> None:
    now = actions.snapshot_fingerprints(SNAPS)
    assert now == {"snapshot pgdata1@s1": "t1/100", "snapshot pgdata1@CURRENT": "t2"}
    checkout = actions.build("pg-checkout", {"snapshot": "pgdata1@s1"})
    assert checkout.subject == "snapshot pgdata1@CURRENT"
    assert actions.changed(checkout, "t2", now) is None  # writes moved CURRENT's LSN: fine
    message = actions.changed(checkout, "t1", now)
    assert message is not None and message.startswith("snapshot pgdata1@CURRENT changed since")
    destroy = actions.build("snapshot-destroy", {"snapshot": "pgdata1@s1"})
    assert actions.changed(destroy, "t1/99", now) is not None  # destroyed and made again


def test_cli_output_helpers() -> None:
    assert error_line("x\nneon: error: node 'p' does not exist\n") == "node 'p' does not exist"
    assert error_line("fine\n") is None
    assert failure("neon: error: gone\n", 1) == "gone"
    crash = "Traceback (most recent call last):\n  File x\nImportError: no name y\n"
    assert failure(crash, 1) == "neon failed: ImportError: no name y (exit 1)"
    assert failure("", 2) == "exit 2"
    assert lsn_argument("22027736") == "0/01501DD8"
    assert lsn_argument(" 0/1501DD8 ") == "0/1501DD8"


async def test_a_job_keeps_progress_apart_from_its_output() -> None:
    """Progress lines update the job's progress (followed as reports), the rest is output."""
    job = Job("1", ("snapshot", "pull", "--from", "x"), "/transfer")
    await job._add("Resuming")
    await job._add(ProgressReport("Pulling x", 50, 200).line())
    await job._add(ProgressReport("Pulling x", 100, 200).line())
    await job._add("Pulled x")
    await job._finish(0)
    assert job.lines == ["Resuming", "Pulled x"]
    assert job.progress == ProgressReport("Pulling x", 100, 200)
    assert [item async for item in job.follow()] == [job.progress, "Resuming", "Pulled x"]
    assert progress_text(ProgressReport("Pulling x", 100, 200)) == "Pulling x: 50% (100B of 200B)"
    assert progress_text(ProgressReport("Pushing x", 3072, None)) == "Pushing x: 3.0K"


async def test_a_job_whose_output_has_a_long_line_ends(tmp_path: Path) -> None:
    """A line longer than asyncio's 64 KiB line limit (here click's error naming a long
    command) is output like any other: iterated line by line, the stream raised, the job
    stayed 'running' for ever and the command blocked once the pipe was full."""
    job = Jobs(Cli(tmp_path)).start(["x" * 70_000], "/")
    async with asyncio.timeout(60):
        while not job.done:
            await asyncio.sleep(0.05)
    assert job.returncode == 2  # click's usage error
    assert any("x" * 70_000 in line for line in job.lines), job.lines


async def test_output_lines_are_those_a_line_iteration_gives() -> None:
    """`_lines` splits as StreamReader's iteration did (less the newline), whatever the
    chunks: empty lines kept, a last line without a newline given too."""
    data = b"a\n\nprogress\rdone\n" + b"y" * 200_000 + b"\nlast"
    for cut in (1, 7, 65_536, len(data)):
        stream = asyncio.StreamReader()
        for at in range(0, len(data), cut):
            stream.feed_data(data[at : at + cut])
        stream.feed_eof()
        got = [line async for line in _lines(stream)]
        assert got == [b"a", b"", b"progress\rdone", b"y" * 200_000, b"last"], cut
