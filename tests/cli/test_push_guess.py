"""The guessed delta of `neon snapshot push` (cli/snapshot_transfer.py): which parent is
guessed, when the destination's files confirm it, and the held bytes: kept in order until
passed on, refused with an error that ends the download, the download waiting at the bound."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from cli import snapshot_transfer as st
from cli.context import App
from cli.pageserver_control import local_api
from cli.transport.base import Location, ObjectInfo, Store
from cli.transport.file import FileStore
from cli.transport.http import HttpStore
from cli.transport.s3 import S3Store
from pageserver_api.client import PageserverClient, SyncPageserverClient
from pageserver_api.models import (
    BasebackupPlan,
    BasebackupPlanRequest,
    SnapshotInfo,
    SnapshotShowRequest,
)
from snapfile.container import TarBytesPassed
from tests.neoncli import NeonCli
from tests.pgtest import free_port


def snap(name: str, lsn: int, timeline: str = "t1") -> SnapshotInfo:
    return SnapshotInfo(name=name, node_id="n", timeline_id=timeline, lsn=lsn, created_at=0.0)


def test_the_guess_is_the_newest_snapshot_below_on_the_timeline() -> None:
    target = snap("p@s3", 300)
    local = [
        snap("p@s1", 100), snap("p@s2", 200), target, snap("p@CURRENT", 310),
        snap("q@other", 250, timeline="t2"),
    ]  # fmt: skip
    assert st.guessed_parent(target, local) == "p@s2"
    assert st.guessed_parent(snap("p@s1", 100), local) is None
    assert st.guessed_parent(target, []) is None


def test_the_guess_holds_only_as_the_newest_candidate() -> None:
    local = {"s1": 100, "s2": 200, "other": 200, "old": 50}
    assert st.guess_holds("s2", ["s1", "s2"], local)
    assert st.guess_holds("s2", ["s2"], local)
    assert not st.guess_holds("s2", ["s1"], local)  # not there: a delta on s1 it is
    assert not st.guess_holds("s2", [], local)  # nothing there: a whole file
    # as new as the guess (another timeline's at the same LSN): the daemon's pick decides
    assert not st.guess_holds("s2", ["s2", "other"], local)


def test_a_directory_and_an_http_server_are_not_guessed_for() -> None:
    assert Store.guess_delta
    assert not FileStore.guess_delta and not HttpStore.guess_delta


class _Out:
    """A BlockingWriter's write, recorded."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self.chunks.append(bytes(data))
        return len(data)


def test_held_writes_pass_on_in_order() -> None:
    held = st._HeldWrites(limit=1 << 20)
    assert held.write(b"a") == 1 and held.write(memoryview(b"bc")) == 2
    out = _Out()
    held.pass_on(out)  # type: ignore[arg-type]
    held.write(b"d")
    assert out.chunks == [b"a", b"bc", b"d"]


def test_held_writes_refused_end_the_download() -> None:
    held = st._HeldWrites(limit=1 << 20)
    held.write(b"a")
    held.refuse()
    with pytest.raises(st._GuessRefused):
        held.write(b"b")


@pytest.mark.parametrize("then", ["pass_on", "refuse"])
def test_held_writes_wait_at_the_bound(then: str) -> None:
    """Past `limit` bytes held the download waits (memory stays bounded whatever the
    delta's size) until the answer comes, either way."""
    held = st._HeldWrites(limit=4)
    held.write(b"1234")
    outcome: list[object] = []

    def more() -> None:
        try:
            outcome.append(held.write(b"5"))
        except st._GuessRefused as exc:
            outcome.append(exc)

    writer = threading.Thread(target=more)
    writer.start()
    time.sleep(0.2)
    assert writer.is_alive() and outcome == []
    out = _Out()
    if then == "pass_on":
        held.pass_on(out)  # type: ignore[arg-type]
    else:
        held.refuse()
    writer.join(5)
    assert not writer.is_alive()
    if then == "pass_on":
        assert outcome == [1] and out.chunks == [b"1234", b"5"]
    else:
        assert isinstance(outcome[0], st._GuessRefused) and out.chunks == []


@pytest.mark.parametrize(("made_on", "kept"), [("p@s2", True), (None, True), ("p@s1", False)])
def test_a_guessed_delta_made_whole_is_kept(
    monkeypatch: pytest.MonkeyPatch, made_on: str | None, kept: bool
) -> None:
    """The guessed parent destroyed between the listing and the daemon's delta: the daemon
    sends a whole file, valid at any destination, so the push goes on with it (it failed
    with Conflict where asking with the destination's files succeeded); a delta on another
    parent than the one asked for is still refused."""

    def made(app: object, snap: object, out: st._HeldWrites, *args: object) -> object:
        out.write(b"file")
        return SimpleNamespace(parent=made_on)

    monkeypatch.setattr(st, "write_snapshot_file", made)
    guess = st._Guess(None, None, snap("p@s3", 300), None, "p@s2")  # type: ignore[arg-type]
    out = _Out()
    guess.held.pass_on(out)  # type: ignore[arg-type]
    if kept:
        assert guess.result().parent == made_on
    else:
        with pytest.raises(st.Conflict, match="made on p@s1, not on p@s2"):
            guess.result()
    assert out.chunks == [b"file"]


class _BusyStore(FileStore):
    """A directory whose first answer holds the event loop (s3 making its client: CPU on
    the loop) until the pageserver's answer was seen, or `hold` seconds."""

    def __init__(self, directory: Path, seen: threading.Event, hold: float) -> None:
        super().__init__(directory)
        self.seen, self.hold = seen, hold

    async def stat(self, name: str) -> ObjectInfo | None:
        self.seen.wait(self.hold)  # blocking on purpose: the loop is held
        return await super().stat(name)


def _two_snapshots(neon: NeonCli) -> SyncPageserverClient:
    """A node with snapshots pgdata1@s1 and pgdata1@s2; the daemon's API."""
    neon.run("pg", "create", "--port", str(free_port()))
    neon.run("snapshot", "create", "pgdata1@s1")
    neon.run("snapshot", "create", "pgdata1@s2")
    return local_api(App.open(neon.home), start=False)


def test_the_pageserver_answers_beside_a_destination_holding_the_loop(
    neon: NeonCli, tmp_path: Path
) -> None:
    """The guessed delta is asked from the pageserver's answer (`on_local`); a destination
    whose first answer keeps the loop busy does not hold that answer back (the pageserver
    was asked on the same loop, so the guess waited for the destination's CPU)."""
    api = _two_snapshots(neon)
    seen = threading.Event()
    hold = 3.0
    (tmp_path / "to").mkdir()
    location = Location(_BusyStore(tmp_path / "to", seen, hold), "pgdata1@s2.neon")
    guessed: list[tuple[str, float]] = []
    started = time.monotonic()

    def on_local(target: SnapshotInfo, plan: object, local: list[SnapshotInfo]) -> None:
        guessed.append((str(st.guessed_parent(target, local)), time.monotonic() - started))
        seen.set()

    planned = asyncio.run(st._plan_push(api, location, "pgdata1@s2", False, False, on_local))
    assert [parent for parent, _ in guessed] == ["pgdata1@s1"]
    assert guessed[0][1] < hold  # the guess did not wait for the busy destination
    assert planned.snap.name == "pgdata1@s2"
    assert {"pgdata1@s1", "pgdata1@s2"} <= set(planned.local)
    assert planned.candidates == []  # the destination holds nothing: a whole file after all


class _RecordingStore(FileStore):
    """A directory busy as it opens (as s3), noting whether the guess was made when it
    was first asked."""

    busy_opening = True

    def __init__(self, directory: Path, guessed: threading.Event) -> None:
        super().__init__(directory)
        self.guessed = guessed
        self.asked_after_guess: list[bool] = []

    async def stat(self, name: str) -> ObjectInfo | None:
        self.asked_after_guess.append(self.guessed.is_set())
        return await super().stat(name)


def test_the_destination_is_asked_once_the_guess_is_made(neon: NeonCli, tmp_path: Path) -> None:
    """When guessing, a store busy as it opens (s3 making its client on the loop: it held
    the GIL the pageserver's answer waited for, and the guess, the push's longest step,
    started later) is asked once the pageserver answered (the guess started)."""
    api = _two_snapshots(neon)
    guessed = threading.Event()
    (tmp_path / "to").mkdir()
    store = _RecordingStore(tmp_path / "to", guessed)

    def on_local(target: SnapshotInfo, plan: object, local: list[SnapshotInfo]) -> None:
        guessed.set()

    location = Location(store, "pgdata1@s2.neon")
    asyncio.run(st._plan_push(api, location, "pgdata1@s2", False, False, on_local))
    assert store.asked_after_guess == [True]
    assert S3Store.busy_opening and not FileStore.busy_opening


def _guessing_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "guessed-delta"]


def test_no_guess_is_left_once_the_push_failed(neon: NeonCli) -> None:
    """The push fails (the destination's error) before or after the plan's thread has the
    pageserver's answer: no guessed delta is left downloading, in either order."""
    api = _two_snapshots(neon)
    app = App.open(neon.home)

    async def ask(
        client: PageserverClient,
    ) -> tuple[SnapshotInfo, BasebackupPlan, list[SnapshotInfo]]:
        name = "pgdata1@s2"
        snap = await client.snapshot_show(SnapshotShowRequest(name))
        plan = await client.basebackup_plan(BasebackupPlanRequest(snapshot=name))
        return snap, plan, await client.snapshot_list()

    snap, plan, listed = api.run(ask)
    failed_first = st._Guesser(app, api)
    failed_first.end()  # the destination failed; the pageserver answers later
    failed_first.on_local(snap, plan, listed)
    assert failed_first.guess is None and not _guessing_threads()
    answered_first = st._Guesser(app, api)
    answered_first.on_local(snap, plan, listed)
    assert answered_first.guess is not None and answered_first.guess.parent == "pgdata1@s1"
    answered_first.end()
    assert not _guessing_threads()


def test_the_announced_tar_size_is_the_tar_streamed(neon: NeonCli) -> None:
    """Before a `.neon` file the daemon announces its tar's size (push's progress bar
    total): exactly the tar it then streams, for a whole file and a delta (pages written
    between the snapshots); the announcement is not part of the file."""
    import psycopg

    neon.run("pg", "create", "--port", str(free_port()))
    neon.run("snapshot", "create", "pgdata1@s1")
    with psycopg.connect(str(neon.json("pg", "show", "pgdata1")["connstr"])) as conn:
        conn.execute(
            "CREATE TABLE t AS SELECT g, repeat('x', 500) AS v FROM generate_series(1, 20000) g"
        )
    neon.run("snapshot", "create", "pgdata1@s2")
    api = local_api(App.open(neon.home), start=False)
    app = App.open(neon.home)
    snap = api.snapshot_show(SnapshotShowRequest("pgdata1@s2"))
    for delta_from, parent in (([], None), (["pgdata1@s1"], "pgdata1@s1")):
        announced: list[int] = []
        out = io.BytesIO()
        result = st.write_snapshot_file(
            app, snap, out, delta_from, api=api, on_total=announced.append
        )
        passed = TarBytesPassed()
        passed.feed(out.getvalue())
        assert result.parent == parent
        assert result.bytes == len(out.getvalue())
        assert announced == [result.tar_bytes] == [passed.tar_bytes]
        assert result.tar_bytes > 8 << 20  # the table's ~10 MiB of pages, in both
