"""The console's gate, over real HTTP on 127.0.0.1: without the session nothing but 401, the
login token works once, the cookie is HttpOnly and SameSite=Strict, POSTs need the CSRF
token, and another Host is refused."""

from __future__ import annotations

import re
import shutil
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer

from cli.console.app import HOSTS_KEY, SESSIONS_KEY, create_app
from cli.console.session import COOKIE, Sessions
from tests.pgtest import pg_reachable_tmpdir


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    app = create_app(tmp_path / "home", Sessions("login-token"))
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client


PAGES = [
    "/",
    "/snapshots",
    "/diff",
    "/pitr",
    "/storages",
    "/transfer",
    "/jobs/1",
    "/static/console.js",
]


async def test_everything_but_the_login_is_401_without_a_session(client: TestClient) -> None:
    for path in PAGES:
        response = await client.get(path, allow_redirects=False)
        assert response.status == 401, path
        assert (await response.text()).startswith("401: not logged in")
    for path in ["/actions/pg-stop", "/logout", "/pitr/around"]:
        response = await client.post(path, data={"node": "primary1"})
        assert response.status == 401, path
    forged = await client.get("/", cookies={COOKIE: "made-up"})
    assert forged.status == 401


async def test_the_login_token_works_once(client: TestClient) -> None:
    wrong = await client.get("/login?token=guess", allow_redirects=False)
    assert wrong.status == 401
    response = await client.get("/login?token=login-token", allow_redirects=False)
    assert response.status == 303 and response.headers["Location"] == "/"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    again = await client.get("/login?token=login-token", allow_redirects=False)
    assert again.status == 401
    assert "used already" in await again.text()
    static = await client.get("/static/console.css")  # the client keeps the cookie
    assert static.status == 200


async def test_posts_need_the_csrf_token(client: TestClient) -> None:
    await client.get("/login?token=login-token", allow_redirects=False)
    for data in ({"node": "primary1"}, {"node": "primary1", "csrf": "wrong"}):
        response = await client.post("/actions/pg-stop", data=data, allow_redirects=False)
        assert response.status == 403
        assert "CSRF" in await response.text()
    logout = await client.post("/logout", data={}, allow_redirects=False)
    assert logout.status == 403
    around = await client.post("/pitr/around", data={"area": "a", "lsn": "1"})
    assert around.status == 403


async def test_a_bad_form_is_a_message_not_a_traceback(client: TestClient) -> None:
    await client.get("/login?token=login-token", allow_redirects=False)
    assert "no such job" in await (await client.get("/jobs/999")).text()
    cookie = client.session.cookie_jar.filter_cookies(client.make_url("/"))[COOKIE].value
    session = client.app[SESSIONS_KEY].get(cookie)
    assert session is not None
    for name, form, says in [
        ("pg-start", {"node": "--force"}, "may not start with"),
        ("pg-destroy", {"node": "primary1"}, "no action"),
    ]:
        response = await client.post(f"/actions/{name}", data={"csrf": session.csrf, **form})
        assert response.status == 400
        text = await response.text()
        assert says in text and "Traceback" not in text
        assert session.csrf in text  # the page's own forms carry it


async def test_another_host_is_refused(client: TestClient) -> None:
    client.app[HOSTS_KEY].add(f"127.0.0.1:{client.port}")
    async with ClientSession() as session:
        url = f"http://127.0.0.1:{client.port}/login?token=login-token"
        response = await session.get(url, headers={"Host": "evil.example:80"})
        assert response.status == 421
    ok = await client.get("/login?token=login-token", allow_redirects=False)
    assert ok.status == 303
    assert re.match(r"^[\w-]+$", ok.cookies[COOKIE].value)


async def test_a_failed_read_is_said_on_the_page_which_retries(tmp_path: Path) -> None:
    """The CLI's one line (here: a home that cannot be used), no traceback, and a page that
    reloads itself until the reads work again."""
    home = tmp_path / "not-a-directory"
    home.write_text("")
    app = create_app(home, Sessions("t"))
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        await client.get("/login?token=t", allow_redirects=False)
        response = await client.get("/")
        assert response.status == 200
        page = await response.text()
        assert 'id="read-error"' in page and "`neon pg list --json` failed: " in page
        assert "(retrying every 5 s)" in page and 'http-equiv="refresh" content="5"' in page
        assert "Traceback" not in page
        # Every page renders with no data; the snapshots page also with a selection its list
        # lacks (the read failed, or a job destroyed it: the page reloads itself with its URL).
        for path in ("/pitr", "/storages", "/transfer", "/snapshots?select=pgdata1@gone"):
            response = await client.get(path)
            assert response.status == 200, path
            assert 'id="read-error"' in await response.text()
        transfer = await (await client.get("/transfer")).text()
        for command in (
            "neon snapshot import --from SOURCE NAME",
            "neon snapshot push --to URL SNAPSHOT",
            "neon snapshot pull --from URL",
        ):
            assert f'<code class="cmd">{command}</code>' in transfer


async def test_a_chosen_point_redirects_to_the_commits_around_it(client: TestClient) -> None:
    """The slider's integer becomes an LSN in the page's URL (the form's CSRF token does not
    travel into it); a time is passed on as typed."""
    await client.get("/login?token=login-token", allow_redirects=False)
    cookie = client.session.cookie_jar.filter_cookies(client.make_url("/"))[COOKIE].value
    session = client.app[SESSIONS_KEY].get(cookie)
    assert session is not None
    for form, location in [
        ({"area": "a1", "lsn": str(0x1_0000_00A8)}, "/pitr?area=a1&at=1/000000A8#area-a1"),
        ({"area": "a1", "time": "2026-01-02T03:04:05+00:00"},
         "/pitr?area=a1&at=2026-01-02T03:04:05%2B00:00#area-a1"),
    ]:  # fmt: skip
        data = {"csrf": session.csrf, **form}
        response = await client.post("/pitr/around", data=data, allow_redirects=False)
        assert response.status == 303
        assert response.headers["Location"] == location
        assert session.csrf not in location


async def test_an_unreachable_pageserver_is_said_on_the_page_which_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CLI's commands go to a pageserver nothing listens for (NEON_PAGESERVER, which the
    console's children inherit): the page names it, without a traceback, and reloads."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("NEON_PAGESERVER", f"neon://127.0.0.1:{port}/?token=t")
    base = pg_reachable_tmpdir("neon-console-")  # a home PostgreSQL's OS user can enter
    try:
        app = create_app(base / "home", Sessions("t"))
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            await client.get("/login?token=t", allow_redirects=False)
            page = await (await client.get("/snapshots")).text()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert "`neon snapshot list --json` failed: cannot connect to the pageserver at " in page
    assert f"127.0.0.1:{port}" in page and "is it running?" in page
    assert 'http-equiv="refresh" content="5"' in page and "Traceback" not in page
