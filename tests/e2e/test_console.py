"""`neon console` in a real headless Chromium (Debian's, driven by Playwright): log in with
the printed URL, two nodes, a snapshot made with the button and seen in the graph, a PITR
extraction at a point chosen on the slider, a diff, a checkout whose data psql checks, a
destroy after its confirmation, an action on a node that changed meanwhile, and 401 without
the session. A screenshot of every page shown is kept under the test's tmp dir, which pytest
keeps when the test fails."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.neoncli import NEON, NeonCli, free_port, psql

CHROMIUM = "/usr/bin/chromium"
# As the machine's notes say: no sandbox as root, and no background connections (the
# network is closed; Chromium would retry them at every start).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def console(neon: NeonCli) -> Iterator[str]:
    """A running `neon console --no-browser`; its login URL. Stopped by its PID (SIGINT,
    as Ctrl-C)."""
    proc = subprocess.Popen(
        [NEON, "console", "--no-browser"],
        env=neon.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and "/login?token=" in url, url
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        assert proc.returncode == 0, err
        assert "Traceback" not in err, err


@pytest.fixture
def browser() -> Iterator[Browser]:
    assert os.access(CHROMIUM, os.X_OK), f"{CHROMIUM} is missing: run scripts/setup.sh"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


class Shots:
    """Screenshots of the pages shown, numbered, in the test's tmp dir."""

    def __init__(self, page: Page, directory: Path) -> None:
        self.page, self.directory, self.count = page, directory, 0
        directory.mkdir()

    def take(self, what: str) -> None:
        self.count += 1
        self.page.screenshot(path=self.directory / f"{self.count:02d}-{what}.png", full_page=True)


def wait_for_job(page: Page, shots: Shots, what: str, neon: NeonCli) -> str:
    """Wait on a job page until its command ended (the page reloads itself); its output. A
    job still running then fails the test with where its processes wait."""
    try:
        expect(page.locator("#job-status")).to_have_text(re.compile("done|failed"), timeout=120_000)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{_where_stuck(page, neon)}") from None
    shots.take(what)
    return page.locator("#job-output").inner_text()


def _where_stuck(page: Page, neon: NeonCli) -> str:
    """The stacks of the console's running `neon` commands (in the job's output) and of the
    pageserver, and its log's tail (NeonCli.dump_stacks)."""
    jobs = [pid for pid in _descendants(os.getpid()) if b"neon" in _cmdline(pid)]
    pageserver = neon.dump_stacks(jobs)
    return f"job output:\n{page.locator('#job-output').inner_text()}\n{pageserver}"


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def status_without_session(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_console_in_chromium(neon: NeonCli, console: str, browser: Browser, tmp_path: Path) -> None:
    base = console.split("/login")[0]
    neon.run("pg", "create", "--port", str(free_port()))
    neon.run("pg", "create", "--port", str(free_port()))
    c1 = neon.json("pg", "show", "pgdata1")["connstr"]
    neon.run("pitr", "create", "area1", "--pg", "pgdata1")
    psql(c1, "CREATE TABLE t AS SELECT generate_series(1, 10) a")
    neon.run("snapshot", "create", "pgdata1@ten")
    psql(c1, "ALTER TABLE t ADD COLUMN b int")  # for the schema diff
    xid, after = psql(c1, "BEGIN; INSERT INTO t SELECT generate_series(11, 25);\n"
                      "SELECT txid_current(); COMMIT;\n"
                      "SELECT pg_current_wal_insert_lsn() - '0/0';").splitlines()  # fmt: skip

    page = browser.new_page(viewport={"width": 1300, "height": 900})
    # Pages that run commands (the schema diff starts two read-only servers and dumps them)
    # took over Playwright's default 30 s on a box at load 15 (a click waits for the
    # navigation it started): the same bound as a job's (wait_for_job).
    page.set_default_timeout(120_000)
    shots = Shots(page, tmp_path / "screenshots")
    try:
        _walk_through(neon, page, shots, console, base, c1, int(xid), int(after), tmp_path / "out")
    except BaseException:
        with contextlib.suppress(Exception):
            shots.take("failure")
        raise


def _walk_through(
    neon: NeonCli,
    page: Page,
    shots: Shots,
    console: str,
    base: str,
    c1: str,
    xid: int,
    after: int,
    out_dir: Path,
) -> None:
    # Nothing without the session, and the login URL works once.
    for path in ("/", "/snapshots", "/pitr", "/static/console.js"):
        status, body = status_without_session(base + path)
        assert status == 401, path
        assert "pgdata1" not in body and "primary1" not in body
    page.goto(console)
    assert page.url == base + "/"
    assert status_without_session(console)[0] == 401  # the token is used up

    # Two nodes, running, with their endpoints and WAL positions.
    rows = page.locator("tr[data-node]")
    expect(rows).to_have_count(2)
    shots.take("nodes")
    for node in ("primary1", "primary2"):
        row = page.locator(f'tr[data-node="{node}"]')
        expect(row.locator("td.state")).to_have_text("running")
        expect(row.locator("code.cmd")).to_have_text(f"neon pg stop {node}")
    assert "/0" in page.locator('tr[data-node="primary1"] td').nth(6).inner_text()

    # An action on a node that changed since the page was shown: refused, said plainly.
    neon.run("pg", "stop", "primary2")
    page.locator('tr[data-node="primary2"] button').click()
    expect(page.locator("#message")).to_contain_text(
        "node primary2 changed since the page was shown (it is stopped now"
    )
    shots.take("changed-meanwhile")
    assert "Traceback" not in page.content()
    page.locator("#back").click()
    page.locator('tr[data-node="primary2"] button', has_text="Start").click()
    out = wait_for_job(page, shots, "start", neon)
    assert "Started postgres on localhost:" in out
    expect(page.locator("h1 code.cmd")).to_have_text("neon pg start primary2")

    # A snapshot made with the button appears in the graph.
    page.goto(base + "/snapshots")
    shots.take("snapshots")
    form = page.locator('form[data-node="primary1"]')
    form.locator("input[name=tag]").fill("clicked")
    expect(form.locator("code.cmd")).to_have_text("neon snapshot create pgdata1@clicked")
    form.locator("button").click()
    wait_for_job(page, shots, "snapshot-create", neon)
    expect(page.locator("#job-status")).to_have_text("done")
    page.locator("#back").click()
    expect(page.locator('svg.graph a[data-name="pgdata1@clicked"]')).to_have_count(1)
    shots.take("graph")
    assert "pgdata1@clicked" in {s["name"] for s in neon.json("snapshot", "list")}

    # PITR: a point chosen on the slider is extracted as a snapshot there.
    page.goto(base + "/pitr")
    area = page.locator('section[data-area="area1"] form.extract')
    slider = area.locator("input.lsn-slider")
    box = slider.bounding_box()
    assert box is not None
    page.mouse.click(box["x"] + box["width"] * 0.6, box["y"] + box["height"] / 2)
    chosen = int(slider.input_value())
    low, high = int(slider.get_attribute("min") or 0), int(slider.get_attribute("max") or 0)
    assert low < chosen < high
    area.locator("input[name=tag]").fill("onslider")
    lsn_text = area.locator("output.lsn-text").inner_text()
    expect(area.locator("code.cmd")).to_have_text(
        f"neon pitr extract-snapshot area1 --lsn {lsn_text} --as onslider"
    )
    shots.take("pitr")
    area.get_by_role("button", name="Extract snapshot").click()
    out = wait_for_job(page, shots, "pitr-extract", neon)
    assert out.startswith("pgdata1@onslider at "), out
    extracted = {s["name"]: s for s in neon.json("snapshot", "list")}["pgdata1@onslider"]
    assert low <= extracted["lsn"] <= chosen

    # The commits around a point set on the slider just after the INSERT's commit (other
    # transactions may follow it): that transaction is the last before the point, and its
    # row extracts the state just after it.
    page.goto(base + "/pitr")
    area = page.locator('section[data-area="area1"]')
    area.locator("input.lsn-slider").fill(str(after))
    area.locator("form.extract button.around").click()
    expect(area.locator("table.commits")).to_be_visible()
    shots.take("pitr-commits")
    expect(area.locator("p code.cmd")).to_contain_text(
        "neon pitr commits primary1 --limit 5 --around "
    )
    row = area.locator(f'tr.xact.commit[data-xid="{xid}"]')
    expect(row).to_have_count(1)
    expect(area.locator("tr.point").locator("xpath=preceding-sibling::tr[1]")).to_have_attribute(
        "data-xid", str(xid)
    )
    end_lsn = row.get_attribute("data-end-lsn") or ""
    expect(row.locator("code.cmd")).to_have_text(
        f"neon pitr extract-snapshot area1 --lsn {end_lsn}"
    )
    listing = neon.json("pitr", "commits", "pgdata1", "--around", end_lsn, "--limit", "1")
    assert [r["xid"] for r in listing["before"]] == [xid]
    row.locator("button").click()
    out = wait_for_job(page, shots, "pitr-extract-commit", neon)
    assert out.rstrip().endswith(f" at {end_lsn}"), out

    # A diff between two snapshots: the --stat table names the table that changed.
    page.goto(base + "/diff")
    page.select_option("select[name=a]", "pgdata1@ten")
    page.select_option("select[name=b]", "pgdata1@clicked")
    page.get_by_role("button", name="Compare").click()
    table = page.locator("table.diff-stat")
    expect(table).to_contain_text("public.t")
    expect(page.locator("p code.cmd")).to_have_text(
        "neon snapshot diff pgdata1@ten pgdata1@clicked --stat"
    )
    shots.take("diff")
    # ... and the schema diff: the column added in between.
    page.locator("input[name=mode][value=schema]").check()
    page.get_by_role("button", name="Compare").click()
    expect(page.locator("pre.diff span.add", has_text="b integer")).to_have_count(1)
    expect(page.locator("p code.cmd")).to_have_text(
        "neon snapshot diff pgdata1@ten pgdata1@clicked --schema"
    )
    shots.take("diff-schema")

    # Checkout from the graph: the data is the snapshot's again.
    assert psql(c1, "SELECT count(*) FROM t") == "25"
    page.goto(base + "/snapshots")
    page.locator('svg.graph a[data-name="pgdata1@ten"]').click()
    expect(page.locator("#selected")).to_have_text("pgdata1@ten")
    page.get_by_role("button", name="Check out").click()
    out = wait_for_job(page, shots, "checkout", neon)
    assert "Rolling back pgdata1@CURRENT to pgdata1@ten." in out
    assert psql(c1, "SELECT count(*) FROM t") == "10"
    page.locator("#back").click()
    graph = page.locator("svg.graph")
    expect(graph.locator('a[data-name="pgdata1@HEAD{0}"]')).to_have_count(1)
    expect(graph.locator('a.branchpoint[data-name="pgdata1@ten"]')).to_have_count(1)
    shots.take("after-checkout")

    # Destroy asks first, then runs.
    page.locator('svg.graph a[data-name="pgdata1@onslider"]').click()
    page.get_by_role("button", name="Destroy…").click()
    expect(page.locator("h1")).to_contain_text("Destroy snapshot pgdata1@onslider?")
    shots.take("confirm")
    assert "pgdata1@onslider" in {s["name"] for s in neon.json("snapshot", "list")}
    page.locator("#confirm").click()
    wait_for_job(page, shots, "destroy", neon)
    expect(page.locator("#job-status")).to_have_text("done")
    assert "pgdata1@onslider" not in {s["name"] for s in neon.json("snapshot", "list")}

    # Storages show their usage.
    page.goto(base + "/storages")
    local = page.locator('section[data-storage="local"]')
    expect(local.locator(".bar .part").first).to_be_visible()
    # ... and what each snapshot and area keeps, as `storage show --json` lists them.
    expect(local.locator('tr[data-retained="area1"] .hbar.referenced')).to_be_visible()
    shown = set(
        local.locator("tr[data-retained]").evaluate_all("rs => rs.map(r => r.dataset.retained)")
    )
    listed = {r["name"] for r in neon.json("storage", "show", "local")["retained"]}
    assert shown == listed and {"area1", "pgdata1@ten", "pgdata1@clicked"} <= shown
    shots.take("storages")

    # Push, pull and import from the forms, with their progress on the job page.
    out_dir.mkdir()
    page.goto(base + "/transfer")
    shots.take("transfer")
    push = page.locator("form[data-command='snapshot push']")
    push.locator("input[name=to]").fill(str(out_dir))
    push.locator("select[name=snapshot]").select_option("pgdata1@ten")
    expect(push.locator("code.cmd")).to_have_text(f"neon snapshot push --to {out_dir} pgdata1@ten")
    push.get_by_role("button", name="Push").click()
    wait_for_job(page, shots, "push", neon)
    expect(page.locator("#job-status")).to_have_text("done")
    expect(page.locator("#job-progress-text")).to_contain_text("Pushing pgdata1@ten: ")
    (pushed,) = out_dir.glob("*.neon")

    page.goto(base + "/transfer")
    pull = page.locator("form[data-command='snapshot pull']")
    pull.locator("input[name=source]").fill(str(pushed))
    pull.locator("input[name=name]").fill("pulled")
    expect(pull.locator("code.cmd")).to_have_text(f"neon snapshot pull --from {pushed} pulled")
    pull.get_by_role("button", name="Pull").click()
    wait_for_job(page, shots, "pull", neon)
    expect(page.locator("#job-status")).to_have_text("done")
    expect(page.locator("#job-progress-text")).to_contain_text("Pulling pulled: 100%")
    assert page.locator("#job-progress-bar").get_attribute("value") == "100.0"

    page.goto(base + "/transfer")
    imp = page.locator("form[data-command='snapshot import']")
    imp.locator("input[name=source]").fill(str(pushed))
    imp.locator("input[name=name]").fill("imported")
    imp.locator("select[name=storage]").select_option("local")
    expect(imp.locator("code.cmd")).to_have_text(
        f"neon snapshot import --from {pushed} imported -s local"
    )
    imp.get_by_role("button", name="Import").click()
    wait_for_job(page, shots, "import", neon)
    expect(page.locator("#job-status")).to_have_text("done")
    expect(page.locator("#job-progress-text")).to_contain_text("%")
    names = {s["name"] for s in neon.json("snapshot", "list")}
    assert {"pulled", "imported"} <= names
