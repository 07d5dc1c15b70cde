"""The console's web server: routes, the login and session checks, pages from templates.

Pages read the `--json` output of `neon` commands and actions run `neon` commands as jobs
(cli/console/commands.py), so this module only routes, checks and renders.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import webbrowser
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from aiohttp import web

from cli.console import actions
from cli.console.commands import (
    Cli,
    CliFailed,
    Job,
    Jobs,
    command_line,
    lsn_argument,
    progress_text,
)
from cli.console.graph import render_graph
from cli.console.session import COOKIE, Session, Sessions, cookie_attributes, csrf_ok
from cli.console.tables import parse_table
from cli.output import human_size
from cli.progress import ProgressReport
from pg15.lsn import format_lsn

HERE = Path(__file__).parent
RETRY_SECONDS = 5
"""A page whose reads failed (the pageserver unreachable, say) reloads itself this often."""

CLI_KEY = web.AppKey("cli", Cli)
JOBS_KEY = web.AppKey("jobs", Jobs)
SESSIONS_KEY = web.AppKey("sessions", Sessions)
HOSTS_KEY = web.AppKey("hosts", set[str])
TEMPLATES_KEY = web.AppKey("templates", jinja2.Environment)
SESSION_KEY = web.RequestKey("session", Session)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(
        action=lambda action_name, /, **form: actions.build(action_name, form),
        command_line=command_line,
        human_size=human_size,
        format_lsn=format_lsn,
        progress_text=progress_text,
    )
    return env


def create_app(home: Path, sessions: Sessions) -> web.Application:
    app = web.Application(middlewares=[_guard])
    app[CLI_KEY] = Cli(home)
    app[JOBS_KEY] = Jobs(app[CLI_KEY])
    app[SESSIONS_KEY] = sessions
    app[HOSTS_KEY] = set()
    app[TEMPLATES_KEY] = templates()
    app.router.add_get("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/", nodes_page)
    app.router.add_get("/snapshots", snapshots_page)
    app.router.add_get("/diff", diff_page)
    app.router.add_get("/pitr", pitr_page)
    app.router.add_post("/pitr/around", pitr_around)
    app.router.add_get("/storages", storages_page)
    app.router.add_get("/transfer", transfer_page)
    app.router.add_post("/actions/{name}", run_action)
    app.router.add_get("/jobs/{id}", job_page)
    app.router.add_get("/jobs/{id}/events", job_events)
    app.router.add_static("/static/", HERE / "static")
    app.on_shutdown.append(_stop_jobs)
    return app


async def _stop_jobs(app: web.Application) -> None:
    await app[JOBS_KEY].stop_all()


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Only this console's own address as Host (a page of another site that resolves its name
    to 127.0.0.1 gets nothing), and a session for everything but the login."""
    hosts = request.app[HOSTS_KEY]
    if hosts and request.host not in hosts:
        return web.Response(status=421, text="421: this console answers to 127.0.0.1 only\n")
    if request.path == "/login":
        return await handler(request)
    session = request.app[SESSIONS_KEY].get(request.cookies.get(COOKIE))
    if session is None:
        return web.Response(
            status=401, text="401: not logged in; open the URL `neon console` printed\n"
        )
    request[SESSION_KEY] = session
    return await handler(request)


async def login(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSIONS_KEY].exchange(request.query.get("token", ""))
    if session is None:
        return web.Response(
            status=401,
            text="401: this login token is wrong or was used already; "
            "run `neon console` again for a new URL\n",
        )
    response = web.Response(status=303, headers={"Location": "/"})
    response.set_cookie(COOKIE, session.id, **cookie_attributes())  # type: ignore[arg-type]
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    session: Session = request[SESSION_KEY]
    if not csrf_ok(session, _text(form.get("csrf"))):
        return _forbidden()
    request.app[SESSIONS_KEY].end(session.id)
    response = web.Response(text="Logged out. Run `neon console` again to log in.\n")
    response.del_cookie(COOKIE, path="/")
    return response


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _forbidden() -> web.Response:
    return web.Response(status=403, text="403: the form's CSRF token is missing or wrong\n")


def render(
    request: web.Request, template: str, *, status: int = 200, **context: Any
) -> web.Response:
    session: Session = request[SESSION_KEY]
    page = request.app[TEMPLATES_KEY].get_template(template)
    html = page.render(
        csrf=session.csrf,
        path=request.path_qs,
        here=request.path,
        home=str(request.app[CLI_KEY].home),
        retry=RETRY_SECONDS,
        **context,
    )
    return web.Response(status=status, text=html, content_type="text/html")


async def _read(request: web.Request, *commands: Sequence[str]) -> tuple[list[Any], str | None]:
    """The JSON of each `neon CMD --json`, read together; on a failure, empty lists and the
    CLI's error line (shown on the page, which then retries)."""
    cli = request.app[CLI_KEY]
    results = await asyncio.gather(*(cli.json(c) for c in commands), return_exceptions=True)
    for result in results:
        if isinstance(result, CliFailed):
            return [[] for _ in commands], f"`{result.command}` failed: {result.message}"
        if isinstance(result, BaseException):
            raise result
    return list(results), None


async def nodes_page(request: web.Request) -> web.StreamResponse:
    (nodes,), error = await _read(request, ["pg", "list"])
    return render(request, "nodes.html", nodes=nodes, error=error)


async def snapshots_page(request: web.Request) -> web.StreamResponse:
    (snaps, nodes), error = await _read(request, ["snapshot", "list"], ["pg", "list"])
    selected = request.query.get("select")
    return render(
        request,
        "snapshots.html",
        snapshots=snaps,
        nodes=nodes,
        graph=render_graph(snaps, selected=selected),
        selected=selected,
        seen=actions.snapshot_fingerprints(snaps),
        error=error,
    )


async def diff_page(request: web.Request) -> web.StreamResponse:
    (snaps,), error = await _read(request, ["snapshot", "list"])
    a, b = request.query.get("a", ""), request.query.get("b", "")
    mode = "schema" if request.query.get("mode") == "schema" else "stat"
    args: list[str] = []
    output = table = None
    if a and b and error is None:
        args = ["snapshot", "diff", a, b, f"--{mode}"]
        if a.startswith("-") or b.startswith("-"):
            error = "a snapshot name does not start with '-'"
        else:
            try:
                output = await request.app[CLI_KEY].output(args)
            except CliFailed as exc:
                error = f"`{exc.command}` failed: {exc.message}"
        if output is not None and mode == "stat":
            table = parse_table(output.splitlines()[1:-1])
    return render(
        request,
        "diff.html",
        snapshots=snaps,
        a=a,
        b=b,
        mode=mode,
        command=command_line(args) if args else None,
        output=output,
        table=table,
        error=error,
        retry_page=False,
    )


AROUND_LIMIT = 5
"""Transaction records the PITR page lists on each side of a chosen point."""


async def pitr_page(request: web.Request) -> web.StreamResponse:
    (areas, nodes), error = await _read(request, ["pitr", "list"], ["pg", "list"])
    pgdata = {n["id"]: n["pgdata"] for n in nodes}
    selected, at = request.query.get("area", ""), request.query.get("at", "").strip()
    area = next((a for a in areas if a["name"] == selected), None)
    commits = args = None
    if area is not None and at and error is None:
        args = ["pitr", "commits", area["node_id"], "--limit", str(AROUND_LIMIT)]
        if at.startswith("-"):
            error = f"a point does not start with '-': {at!r}"
        else:
            args += ["--around", lsn_argument(at)]
            (commits,), error = await _read(request, args)
    return render(
        request,
        "pitr.html",
        areas=areas,
        pgdata=pgdata,
        selected=selected,
        at=at,
        commits=commits or None,
        around_command=command_line(args) if args else None,
        error=error,
        retry_page=False,
    )


async def pitr_around(request: web.Request) -> web.StreamResponse:
    """The slider's (or the time field's) point chosen in a form: the PITR page listing the
    commits around it (POST, so the form's CSRF token stays out of the URL)."""
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    if not csrf_ok(request[SESSION_KEY], form.get("csrf")):
        return _forbidden()
    area = form.get("area", "")
    at = (form.get("time") or "").strip() or (form.get("lsn") or "").strip()
    query = urlencode({"area": area, "at": lsn_argument(at) if at.isdigit() else at})
    raise web.HTTPSeeOther(f"/pitr?{query}#area-{quote(area)}")


async def storages_page(request: web.Request) -> web.StreamResponse:
    (storages,), error = await _read(request, ["storage", "list"])
    return render(request, "storages.html", storages=storages, error=error)


async def transfer_page(request: web.Request) -> web.StreamResponse:
    (snaps, storages), error = await _read(request, ["snapshot", "list"], ["storage", "list"])
    return render(
        request,
        "transfer.html",
        snapshots=[s for s in snaps if not str(s["name"]).endswith("@CURRENT")],
        storages=storages,
        seen=actions.snapshot_fingerprints(snaps),
        error=error,
    )


async def run_action(request: web.Request) -> web.StreamResponse:
    form = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
    if not csrf_ok(request[SESSION_KEY], form.get("csrf")):
        return _forbidden()
    back = form.get("back", "/")
    if not back.startswith("/") or back.startswith("//"):
        back = "/"
    try:
        action = actions.build(request.match_info["name"], form)
    except actions.BadForm as exc:
        return render(request, "message.html", status=400, message=str(exc), back=back)
    if action.confirm and form.get("confirmed") != "1":
        return render(request, "confirm.html", action=action, form=form, back=back)
    refused = await _changed(request, action, form.get("seen"))
    if refused is not None:
        return render(request, "message.html", status=409, message=refused, back=back)
    job = request.app[JOBS_KEY].start(action.args, back)
    raise web.HTTPSeeOther(f"/jobs/{job.id}")


async def _changed(request: web.Request, action: actions.Action, seen: str | None) -> str | None:
    """Why the action's subject is not as the page showed it (read afresh), or None."""
    if action.subject is None or seen is None:
        return None
    if action.subject.startswith("node "):
        (listing,), error = await _read(request, ["pg", "list"])
        now = actions.node_fingerprints(listing)
    else:
        (listing,), error = await _read(request, ["snapshot", "list"])
        now = actions.snapshot_fingerprints(listing)
    return error or actions.changed(action, seen, now)


def _job(request: web.Request) -> Job:
    job = request.app[JOBS_KEY].get(request.match_info["id"])
    if job is None:
        raise web.HTTPNotFound(text="404: no such job (the console keeps the last 100)\n")
    return job


async def job_page(request: web.Request) -> web.StreamResponse:
    return render(request, "job.html", job=_job(request))


async def job_events(request: web.Request) -> web.StreamResponse:
    """The job's output lines as server-sent events, then a `done` event."""
    job = _job(request)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    try:
        async for item in job.follow():
            if isinstance(item, ProgressReport):
                data = {"percent": item.percent, "text": progress_text(item)}
                await response.write(f"event: progress\ndata: {json.dumps(data)}\n\n".encode())
            else:
                await response.write(f"data: {json.dumps(item)}\n\n".encode())
        done = {"returncode": job.returncode, "error": job.error}
        await response.write(f"event: done\ndata: {json.dumps(done)}\n\n".encode())
    except ConnectionResetError:
        pass  # the page was closed or left: the job goes on, its page shows it again
    return response


def serve(home: Path, port: int, *, open_browser: bool) -> None:
    """Run the console in the foreground until Ctrl-C (or SIGTERM)."""
    asyncio.run(_serve(home, port, open_browser))


async def _serve(home: Path, port: int, open_browser: bool) -> None:
    sessions = Sessions()
    app = create_app(home, sessions)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = _bound_port(runner, port)
    app[HOSTS_KEY].update({f"127.0.0.1:{bound}", f"localhost:{bound}"})
    url = f"http://127.0.0.1:{bound}/login?token={sessions.login_token}"
    print(url, flush=True)
    print("neon console: log in once with the URL above; Ctrl-C stops it", file=sys.stderr)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if open_browser:
        loop.run_in_executor(None, webbrowser.open, url)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
    print("neon console: stopped", file=sys.stderr)


def _bound_port(runner: web.AppRunner, asked: int) -> int:
    for address in runner.addresses:
        with contextlib.suppress(TypeError, IndexError):
            return int(address[1])
    return asked
