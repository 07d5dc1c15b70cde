"""`pg checkout`'s target pages rebuilt while PostgreSQL stops (prepared_pages.py), with real
PostgreSQL: the checkout's result and its delta's bytes are the same with and without them;
and a snapshot's pages kept as image layers at its LSN, which the prepare reads."""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from cli.context import App
from cli.pageserver_control import local_api
from pageserver.storage.layers.names import parse_layer_name
from pageserver_api.models import (
    BasebackupRequest,
    NodeBranchRequest,
    SnapshotCreateRequest,
    SnapshotShowRequest,
)
from proto.errors import InvalidArgument, NotFound
from tests.e2e.test_checkout_delta import (
    AFTER,
    BEFORE,
    MTIME,
    connstr,
    download_file,
    fork_pages,
    node_dumps,
    started_dumps,
)
from tests.e2e.test_pitr_faithfulness import amcheck, assert_same_dumps
from tests.neoncli import NeonCli, psql

USED = "pageserver_prepared_pages_used_total"
HELD = "pageserver_prepared_pages_bytes"
ENDED = "pageserver_prepared_pages_prepares_total"


def metric(neon: NeonCli, name: str) -> float:
    ports = json.loads((neon.home / "pageserver" / "pageserver.ports.json").read_text())
    url = f"http://127.0.0.1:{ports['http_port']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    values = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(values[0]) if values else 0.0


def wait_prepared(neon: NeonCli, prepares: float) -> float:
    """The bytes held once the prepare after the first `prepares` ended (at most 60 s)."""
    deadline = time.monotonic() + 60
    while metric(neon, ENDED) <= prepares:
        assert time.monotonic() < deadline, "the prepare did not end"
        time.sleep(0.1)
    return metric(neon, HELD)


@pytest.mark.parametrize("cache", ["on", "off"])
def test_checkout_with_and_without_prepared_pages(neon: NeonCli, cache: str) -> None:
    """The same checkout with the cache and without it (`prepared_pages_bytes` 0): the node
    equals the target either way, and only the first took prepared pages."""
    if cache == "off":
        neon.env_extra["NEON_STORE_PREPARED_PAGES_BYTES"] = "0"
    neon.run("pg", "create")
    c = connstr(neon)
    psql(c, BEFORE)
    neon.run("snapshot", "create", "pgdata1@s1")
    psql(c, AFTER)
    neon.run("pg", "checkout", "pgdata1@s1")
    used = metric(neon, USED)
    assert (used > 0) == (cache == "on"), used
    amcheck(c)
    assert_same_dumps(node_dumps(c), started_dumps(neon, "pgdata1@s1"), "back to s1")


def test_the_delta_is_the_same_with_prepared_pages(neon: NeonCli, tmp_path: Path) -> None:
    """A checkout's steps by hand: the prepare named while the node runs, writes after it
    (their keys are rebuilt by the delta, not taken), stop, HEAD, branch, then the delta
    twice: with the prepared pages (taken: the second finds none) and without. Same bytes."""
    neon.run("pg", "create")
    c = connstr(neon)
    psql(c, BEFORE)
    neon.run("snapshot", "create", "pgdata1@s1")
    psql(c, AFTER)
    app = App.open(neon.home)
    api = local_api(app)
    # Naming an unknown node (or an unknown snapshot, as before) does not prepare anything.
    assert api.snapshot_show(SnapshotShowRequest("pgdata1@s1", checkout_node="nosuch")).lsn
    with pytest.raises(NotFound):
        api.snapshot_show(SnapshotShowRequest("pgdata1@nosuch", checkout_node="primary1"))
    assert metric(neon, HELD) == 0
    ended = metric(neon, ENDED)
    api.snapshot_show(SnapshotShowRequest("pgdata1@s1", checkout_node="primary1"))
    held = wait_prepared(neon, ended)
    assert held > 0
    psql(c, "UPDATE ins SET v = 'late' WHERE id % 500 = 0")  # after the prepare's plan
    neon.run("pg", "stop", "pgdata1")
    api.snapshot_create(SnapshotCreateRequest("primary1", "pgdata1@h"))
    api.node_branch(NodeBranchRequest("primary1", "pgdata1@s1", checkout=True))
    request = BasebackupRequest(
        node_id="primary1", snapshot_file=True, checkout_from="pgdata1@h", hints_logged_from=0,
        mtime=MTIME, created_at=MTIME,  # else the manifest's time is each download's second
    )  # fmt: skip
    with_cache, without = tmp_path / "with.neon", tmp_path / "without.neon"
    # A delta that gives up before it starts (only a full rebuild is right) leaves the pages.
    unsure = replace(request, hints_logged_from=1 << 62)
    with pytest.raises(InvalidArgument, match="hints are WAL-logged"):
        download_file(app, unsure, tmp_path / "refused.neon")
    assert metric(neon, HELD) == held
    download_file(app, request, with_cache)
    used = metric(neon, USED)
    assert metric(neon, HELD) == 0  # taken
    download_file(app, request, without)
    assert metric(neon, USED) == used  # nothing left to take
    assert with_cache.read_bytes() == without.read_bytes()
    pages = sum(carried for carried, _nblocks in fork_pages(without).values())
    assert 0 < used < pages  # the late writes' keys were rebuilt
    assert used * 8192 <= held


def image_lsns(neon: NeonCli) -> set[int]:
    names = (parse_layer_name(p.name) for p in (neon.home / "storage").rglob("*__*"))
    return {name.lsn_start for name in names if name is not None and name.is_image}


def test_a_snapshot_gets_image_layers_at_its_lsn(neon: NeonCli) -> None:
    """`snapshot create` asks the daemon for image layers at the snapshot's LSN (where due:
    every partition written since, here), written by the compaction after it, though the
    node wrote on (without: at later LSNs only, which serve no read of the snapshot); the
    checkout back to it equals it."""
    neon.env_extra["NEON_STORE_IMAGE_CREATION_THRESHOLD"] = "1"
    neon.run("pg", "create")
    c = connstr(neon)
    psql(c, BEFORE)
    lsn = int(neon.json("snapshot", "create", "pgdata1@s1")["lsn"])
    psql(c, AFTER)
    deadline = time.monotonic() + 60
    while lsn not in image_lsns(neon):
        assert time.monotonic() < deadline, f"no image layer at {lsn:X}: {image_lsns(neon)}"
        time.sleep(0.2)
    neon.run("pg", "checkout", "pgdata1@s1")
    assert_same_dumps(node_dumps(c), started_dumps(neon, "pgdata1@s1"), "back to s1")
