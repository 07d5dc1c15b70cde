"""`neon pg start-rest` through the real CLI on one node: every operator answers what the same
query answers in SQL (psql), exact counts, the OpenAPI document, 401/405/404/400, injection
attempts in values and identifiers changing nothing, time travel to a snapshot and to an LSN
(a PITR extraction) while the node has changed since, and stop-rest (and pg stop) stopping the
daemon by PID, its port closed and its read-only servers gone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from pageserver.pid_file import pid_alive
from tests.neoncli import NeonCli, free_port, psql, wait_gone
from tests.pgtest import pg_reachable_tmpdir

SNAP = "pgdata1@before"
SETUP = """
CREATE TABLE items (
    id int PRIMARY KEY,
    name text,
    big bigint,
    price numeric(10, 2),
    score double precision,
    flag boolean,
    ts timestamptz,
    d date,
    doc jsonb,
    tags int[]
);
INSERT INTO items
SELECT g,
       CASE g % 4 WHEN 0 THEN 'plain' || g WHEN 1 THEN 'Banana ' || g
                  WHEN 2 THEN 'comma, name' ELSE 'Ünïcödé' END,
       g::bigint * 1000000000,
       CASE WHEN g % 5 = 0 THEN NULL ELSE g * 2.25 END,
       g / 7.0,
       CASE WHEN g % 3 = 0 THEN NULL ELSE g % 2 = 0 END,
       '2024-01-01 00:00:00+00'::timestamptz + g * interval '13 hours',
       '2024-01-01'::date + g,
       jsonb_build_object('g', g, 'even', g % 2 = 0),
       ARRAY[g, g + 1]
FROM generate_series(1, 30) g;
CREATE SCHEMA other;
CREATE TABLE other.things (k text PRIMARY KEY, v int);
INSERT INTO other.things VALUES ('a', 1), ('b', 2);
CREATE TABLE log (n int);
CREATE FUNCTION bump() RETURNS int LANGUAGE sql AS 'INSERT INTO log VALUES (1) RETURNING 1';
CREATE VIEW writer AS SELECT bump() AS b;
CREATE VIEW session AS SELECT current_setting('default_transaction_read_only') AS ro,
    current_setting('transaction_read_only') AS tro,
    current_setting('statement_timeout') AS timeout;
CREATE VIEW slow AS SELECT 1 AS x FROM pg_sleep(5);
"""
CHANGE = """
UPDATE items SET name = 'changed' WHERE id <= 5;
DELETE FROM items WHERE id > 25;
INSERT INTO items (id, name) VALUES (100, 'new');
"""
LATER = "DELETE FROM items WHERE id = 100; INSERT INTO items (id, name) VALUES (101, 'later');"
ROWS_SQL = "SELECT coalesce(json_agg(i ORDER BY id), '[]') FROM items i"


@dataclass
class Rest:
    neon: NeonCli
    connstr: str
    info: dict[str, Any]
    snapshot_rows: list[dict[str, Any]]
    lsn: str
    lsn_rows: list[dict[str, Any]]

    @property
    def url(self) -> str:
        return str(self.info["url"]).rstrip("/")

    def get(
        self,
        path: str,
        *,
        method: str = "GET",
        token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], Any]:
        """Status, headers and JSON body of one request (with the token unless given)."""
        auth = {"Authorization": f"Bearer {token if token is not None else self.info['token']}"}
        request = urllib.request.Request(
            self.url + path, method=method, headers={**auth, **(headers or {})}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, dict(response.headers), json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), json.loads(exc.read())

    def rows(self, path: str) -> Any:
        status, _headers, body = self.get(path)
        assert status == 200, body
        return body


def sql_rows(connstr: str, sql: str = ROWS_SQL) -> Any:
    return json.loads(psql(connstr, sql))


@pytest.fixture(scope="module")
def rest() -> Iterator[Rest]:
    base = pg_reachable_tmpdir("neon-rest-")
    neon = NeonCli(base / "home", {})
    started: Rest | None = None
    try:
        neon.run("pg", "create", "--port", str(free_port()))
        connstr = str(neon.json("pg", "show", "pgdata1")["connstr"])
        psql(connstr, SETUP)
        snapshot_rows = sql_rows(connstr)
        neon.run("snapshot", "create", SNAP)
        neon.run("pitr", "create", "area1", "--pg", "pgdata1")
        psql(connstr, CHANGE)
        lsn_rows = sql_rows(connstr)
        lsn = psql(connstr, "SELECT pg_current_wal_lsn()")
        psql(connstr, LATER)
        info = neon.json(
            "pg", "start-rest", "pgdata1", "--port", str(free_port()), "--statement-timeout", "2"
        )
        started = Rest(neon, connstr, info, snapshot_rows, lsn, lsn_rows)
        yield started
    finally:
        # Tests start more servers (rest.info is the last one's): stopped by PID either way.
        neon.run("pg", "stop-rest", "pgdata1", check=False)
        pid = int(started.info["pid"]) if started is not None else 0
        if pid and pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
        neon.cleanup()
        shutil.rmtree(base, ignore_errors=True)


def test_start_rest_prints_url_and_keeps_token_private(rest: Rest) -> None:
    assert rest.info["url"] == f"http://127.0.0.1:{rest.info['port']}/"
    token_file = rest.neon.home / "secrets" / "node.primary1.rest-token"
    assert str(token_file) == rest.info["token_file"]
    assert token_file.read_text() == rest.info["token"]
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert rest.neon.json("pg", "show", "pgdata1")["rest"] == rest.info["url"]
    assert pid_alive(rest.info["pid"])
    # A second start is refused, naming the running one.
    error = rest.neon.fail("pg", "start-rest", "pgdata1")
    assert "already runs on " + rest.info["url"] in error
    assert rest.info["token"] not in error


def test_rows_render_as_postgresql_json(rest: Rest) -> None:
    """Every type as PostgreSQL's to_json renders it (numeric as a number, timestamps ISO)."""
    live = sql_rows(rest.connstr)
    assert rest.rows("/items?order=id") == live
    row = next(r for r in live if r["id"] == 7)
    assert row == {
        "id": 7,
        "name": "Ünïcödé",
        "big": 7000000000,
        "price": 15.75,
        "score": pytest.approx(1.0),
        "flag": False,
        "ts": "2024-01-04T19:00:00+00:00",
        "d": "2024-01-08",
        "doc": {"g": 7, "even": False},
        "tags": [7, 8],
    }
    assert rest.rows("/public.items?order=id&select=id") == [{"id": r["id"]} for r in live]
    assert rest.rows("/other.things?order=k.desc") == [{"k": "b", "v": 2}, {"k": "a", "v": 1}]


OPERATORS = [
    ("id=eq.3", "id = 3"),
    ("id=neq.3", "id <> 3"),
    ("id=gt.20", "id > 20"),
    ("id=gte.20", "id >= 20"),
    ("id=lt.4", "id < 4"),
    ("id=lte.4", "id <= 4"),
    ("name=like.*an*", "name LIKE '%an%'"),
    ("name=like.Banana_1*", "name LIKE 'Banana_1%'"),
    ("name=ilike.*BANANA*", "name ILIKE '%BANANA%'"),
    ("id=in.(1,3,5,1000)", "id IN (1, 3, 5, 1000)"),
    ('name=in.("comma, name",changed)', "name IN ('comma, name', 'changed')"),
    ("price=is.null", "price IS NULL"),
    ("flag=is.true", "flag IS TRUE"),
    ("flag=is.false", "flag IS FALSE"),
    ("flag=is.null", "flag IS NULL"),
    ("id=not.in.(1,2,3)", "NOT (id IN (1, 2, 3))"),
    ("price=not.is.null", "price IS NOT NULL"),
    ("name=eq.Ünïcödé", "name = 'Ünïcödé'"),
    ("big=gt.20000000000", "big > 20000000000"),
    ("price=gte.20.25", "price >= 20.25"),
    ("score=lt.1.5", "score < 1.5"),
    ("ts=gte.2024-01-10T00:00:00Z", "ts >= '2024-01-10T00:00:00Z'"),
    ("d=lte.2024-01-05", "d <= '2024-01-05'"),
    ("id=gt.3&id=lt.9&flag=is.true", "id > 3 AND id < 9 AND flag IS TRUE"),
    ("name=eq.nobody", "name = 'nobody'"),
]


@pytest.mark.parametrize(("query", "where"), OPERATORS)
def test_every_operator_equals_sql(rest: Rest, query: str, where: str) -> None:
    path = "/items?" + urllib.parse.quote(query, safe="=&.,()*:") + "&order=id"
    expected = sql_rows(
        rest.connstr, f"SELECT coalesce(json_agg(i ORDER BY id), '[]') FROM items i WHERE {where}"
    )
    assert rest.rows(path) == expected
    assert expected or query == "name=eq.nobody"  # each filter selects something


def test_select_order_limit_offset_equal_sql(rest: Rest) -> None:
    path = "/items?select=name,id,price&order=price.desc.nullslast,id.asc&limit=7&offset=3"
    expected = sql_rows(
        rest.connstr,
        "SELECT json_agg(r) FROM (SELECT name, id, price FROM items "
        "ORDER BY price DESC NULLS LAST, id ASC LIMIT 7 OFFSET 3) r",
    )
    assert rest.rows(path) == expected
    assert list(rest.rows(path)[0]) == ["name", "id", "price"]
    assert rest.rows("/items?order=flag.asc.nullsfirst,id.desc&select=id&limit=3") == sql_rows(
        rest.connstr,
        "SELECT json_agg(r) FROM (SELECT id FROM items ORDER BY flag ASC NULLS FIRST, id DESC "
        "LIMIT 3) r",
    )


def test_exact_counts(rest: Rest) -> None:
    total = int(psql(rest.connstr, "SELECT count(*) FROM items WHERE id > 4"))
    exact = {"Prefer": "count=exact"}
    status, headers, body = rest.get("/items?id=gt.4&limit=5&offset=2", headers=exact)
    assert status == 200 and len(body) == 5
    assert headers["Content-Range"] == f"2-6/{total}"
    _status, headers, _body = rest.get("/items?id=gt.4&limit=5")
    assert headers["Content-Range"] == "0-4/*"
    _status, headers, body = rest.get("/items?id=gt.4&offset=1000", headers=exact)
    assert body == [] and headers["Content-Range"] == f"*/{total}"
    _status, headers, body = rest.get("/items", headers=exact)
    count = int(psql(rest.connstr, "SELECT count(*) FROM items"))
    assert headers["Content-Range"] == f"0-{count - 1}/{count}" and len(body) == count


def test_openapi_lists_tables_and_columns(rest: Rest) -> None:
    status, headers, doc = rest.get("/")
    assert status == 200 and headers["Content-Type"].startswith("application/openapi+json")
    assert doc["openapi"].startswith("3.")
    assert {"/items", "/log", "/writer", "/session", "/slow"} <= set(doc["paths"])
    assert "/things" not in doc["paths"]  # other.things is outside the search_path
    items = doc["components"]["schemas"]["public.items"]
    assert list(items["properties"]) == [
        "id",
        "name",
        "big",
        "price",
        "score",
        "flag",
        "ts",
        "d",
        "doc",
        "tags",
    ]
    assert items["properties"]["id"]["type"] == "integer"
    assert items["properties"]["big"]["format"] == "int64"
    assert items["properties"]["price"]["type"] == "number"
    assert items["properties"]["flag"]["type"] == "boolean"
    assert items["properties"]["ts"]["format"] == "date-time"
    assert items["properties"]["tags"] == {
        "type": "array",
        "items": {"type": "integer", "format": "int32", "description": "integer"},
        "description": "integer[]",
    }
    assert items["required"] == ["id"]
    get = doc["paths"]["/items"]["get"]
    assert {p["name"] for p in get["parameters"]} >= {"select", "order", "limit", "id", "tags"}


def test_missing_or_wrong_token_is_401(rest: Rest) -> None:
    for token in ("", "wrong", rest.info["token"] + "x", rest.info["token"][:-1]):
        status, headers, body = rest.get("/items", token=token)
        assert status == 401 and body == {"message": "missing or wrong token"}
        assert headers["WWW-Authenticate"] == "Bearer"
    request = urllib.request.Request(rest.url + "/items")  # no header at all
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 401
    basic = {"Authorization": f"Basic {rest.info['token']}"}
    request = urllib.request.Request(rest.url + "/", headers=basic)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 401


def test_write_methods_are_405_and_change_nothing(rest: Rest) -> None:
    before = sql_rows(rest.connstr)
    for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        status, headers, body = rest.get("/items?id=eq.1", method=method)
        assert status == 405, (method, body)
        assert headers["Allow"] == "GET, HEAD"
        assert method in body["message"] and "read-only" in body["message"]
    # A view whose function writes: the read-only transaction refuses it.
    status, _headers, body = rest.get("/writer")
    assert status == 405 and "read-only transaction" in body["message"]
    assert psql(rest.connstr, "SELECT count(*) FROM log") == "0"
    assert sql_rows(rest.connstr) == before


def test_connections_are_read_only_and_time_limited(rest: Rest) -> None:
    assert rest.rows("/session") == [{"ro": "on", "tro": "on", "timeout": "2s"}]
    started = time.monotonic()
    status, _headers, body = rest.get("/slow")
    assert status == 504 and "statement timeout" in body["message"]
    assert time.monotonic() - started < 4.5


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/nope", 404, "table 'nope' does not exist"),
        ("/other.nope", 404, "table 'other.nope' does not exist"),
        ("/pg_catalog.pg_authid", 404, "table 'pg_catalog.pg_authid' does not exist"),
        ("/things", 404, "table 'things' does not exist"),
        ("/items?select=id,nope", 400, "column 'nope' does not exist in public.items"),
        ("/items?nope=eq.1", 400, "column 'nope' does not exist in public.items"),
        ("/items?order=nope", 400, "column 'nope' does not exist in public.items"),
        ("/items?id=5", 400, "malformed filter on id: '5'"),
        ("/items?id=between.1", 400, "malformed filter on id: 'between.1'"),
        ("/items?id=in.1,2", 400, "malformed filter on id: in.1,2"),
        ("/items?flag=is.maybe", 400, "malformed filter on flag: is.maybe"),
        ("/items?limit=-1", 400, "limit='-1' is not a non-negative integer"),
        ("/items?order=id.sideways", 400, "malformed order term 'id.sideways'"),
        ("/items?id=eq.abc", 400, 'invalid input syntax for type integer: "abc"'),
        ("/items?ts=gt.yesterday-ish", 400, "invalid input syntax for type timestamp"),
        ("/a/b/c", 404, "no such resource"),
    ],
)
def test_errors_name_the_problem(rest: Rest, path: str, status: int, message: str) -> None:
    got, headers, body = rest.get(path)
    assert got == status, body
    assert headers["Content-Type"].startswith("application/json")
    assert message in body["message"]


INJECTED_VALUES = [
    "x' OR '1'='1",
    "x'; DELETE FROM items; --",
    "1 OR 1=1",
    "1); DELETE FROM items; --",
    "$1",
]


@pytest.mark.parametrize("value", INJECTED_VALUES)
def test_injection_in_values_is_data(rest: Rest, value: str) -> None:
    before = sql_rows(rest.connstr)
    quoted = urllib.parse.quote(value, safe="")
    for query in (f"name=eq.{quoted}", f"name=like.{quoted}", f"name=in.({quoted})"):
        assert rest.rows(f"/items?{query}") == []
    status, _headers, body = rest.get(f"/items?id=eq.{quoted}")
    assert status == 400 and "invalid input syntax for type integer" in body["message"]
    assert sql_rows(rest.connstr) == before
    assert psql(rest.connstr, "SELECT count(*) FROM log") == "0"


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/items?select=" + urllib.parse.quote('id" FROM pg_authid --'), 400),
        ("/items?select=" + urllib.parse.quote("id,(SELECT 1)"), 400),
        ("/items?" + urllib.parse.quote('id" = 1 OR "id') + "=eq.1", 400),
        ("/items?order=" + urllib.parse.quote("id; DELETE FROM items"), 400),
        ("/" + urllib.parse.quote("items; DELETE FROM items"), 404),
        ("/" + urllib.parse.quote('public"."items'), 404),
        ("/" + urllib.parse.quote("items WHERE 1=1 --"), 404),
    ],
)
def test_injection_in_identifiers_is_refused(rest: Rest, path: str, status: int) -> None:
    before = sql_rows(rest.connstr)
    got, _headers, body = rest.get(path)
    assert got == status, body
    assert "does not exist" in body["message"]
    assert sql_rows(rest.connstr) == before


def test_snapshot_time_travel(rest: Rest) -> None:
    live = sql_rows(rest.connstr)
    assert live != rest.snapshot_rows
    assert rest.rows(f"/@{SNAP}/items?order=id") == rest.snapshot_rows
    encoded = urllib.parse.quote(f"@{SNAP}", safe="")
    assert rest.rows(f"/{encoded}/items?order=id") == rest.snapshot_rows
    assert rest.rows("/@primary1@before/items?id=lte.2&order=id") == rest.snapshot_rows[:2]
    status, headers, body = rest.get(
        f"/@{SNAP}/items?name=like.Banana*&limit=2", headers={"Prefer": "count=exact"}
    )
    bananas = [r for r in rest.snapshot_rows if r["name"].startswith("Banana")]
    assert status == 200 and body == bananas[:2]
    assert headers["Content-Range"] == f"0-1/{len(bananas)}"
    _status, _headers, doc = rest.get(f"/@{SNAP}/")
    assert "/items" in doc["paths"] and SNAP in doc["info"]["title"]
    # The live node still answers live rows.
    assert rest.rows("/items?order=id") == live
    status, _headers, body = rest.get("/@pgdata1@nosuch/items")
    assert status == 404 and "pgdata1@nosuch" in body["message"]
    # Served read-only, over `snapshot start`'s server (which refuses a second start).
    error = rest.neon.fail("snapshot", "start", SNAP)
    assert "already runs over pgdata1@before" in error


def test_lsn_time_travel(rest: Rest) -> None:
    assert sql_rows(rest.connstr) != rest.lsn_rows
    assert rest.rows(f"/@{rest.lsn}/items?order=id") == rest.lsn_rows
    assert rest.rows(f"/@{rest.lsn}/items?id=eq.100&select=name") == [{"name": "new"}]
    assert rest.rows("/items?id=eq.100") == []
    status, _headers, body = rest.get("/@FF/FFFFFFFF/items")
    assert status in (400, 404) and body["message"]


def test_survives_a_checkout(rest: Rest) -> None:
    """A checkout restarts the node: the next request reconnects and reads the new state."""
    assert rest.rows("/items?id=eq.1&select=name") == [{"name": "changed"}]
    rest.neon.run("pg", "checkout", SNAP)
    assert rest.rows("/items?order=id") == rest.snapshot_rows
    assert sql_rows(rest.connstr) == rest.snapshot_rows


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_stop_rest_stops_daemon_and_its_servers(rest: Rest) -> None:
    pid, port = int(rest.info["pid"]), int(rest.info["port"])
    assert _port_open(port)
    out = rest.neon.run("pg", "stop-rest", "pgdata1").stdout
    assert out.strip() == "Stopped the REST server of pgdata1."
    assert not pid_alive(pid)
    assert not _port_open(port)
    assert not (rest.neon.home / "secrets" / "node.primary1.rest-token").exists()
    assert rest.neon.json("pg", "show", "pgdata1")["rest"] is None
    # Its read-only servers are stopped, the extracted snapshot destroyed, the snapshot kept.
    error = rest.neon.fail("snapshot", "stop", SNAP)
    assert "no read-only server runs over pgdata1@before" in error
    names = {s["name"] for s in rest.neon.json("snapshot", "list")}
    assert SNAP in names and not any("@rest-" in n for n in names)
    assert rest.neon.run("pg", "stop-rest", "pgdata1").stdout.startswith("No REST server")


def test_pg_stop_stops_rest(rest: Rest) -> None:
    info = rest.neon.json("pg", "start-rest", "pgdata1", "--port", str(free_port()))
    assert info["token"] != rest.info["token"]
    rest.info = info
    assert rest.rows("/items?id=eq.1&select=id") == [{"id": 1}]
    out = rest.neon.run("pg", "stop", "pgdata1").stdout
    assert "Stopped the REST server of pgdata1." in out
    assert not pid_alive(int(info["pid"]))
    assert not _port_open(int(info["port"]))
    assert "is not running" in rest.neon.fail("pg", "start-rest", "pgdata1")


def test_a_killed_daemons_servers_are_stopped_by_stop_rest(rest: Rest) -> None:
    rest.neon.run("pg", "start", "pgdata1")
    rest.info = rest.neon.json("pg", "start-rest", "pgdata1", "--port", str(free_port()))
    assert rest.rows(f"/@{SNAP}/items?id=eq.1&select=name") == [
        {"name": rest.snapshot_rows[0]["name"]}
    ]
    pid = int(rest.info["pid"])
    os.kill(pid, signal.SIGKILL)
    wait_gone(pid, timeout=5)
    assert rest.neon.json("pg", "show", "pgdata1")["rest"] is None
    out = rest.neon.run("pg", "stop-rest", "pgdata1").stdout
    assert out.startswith("No REST server was running")
    error = rest.neon.fail("snapshot", "stop", SNAP)  # the killed daemon's server is gone
    assert "no read-only server runs over pgdata1@before" in error
    assert not (rest.neon.home / "rest" / "primary1" / "rest.json").exists()


def test_role_limits_what_is_read(rest: Rest) -> None:
    psql(
        rest.connstr,
        "CREATE ROLE reader NOLOGIN; GRANT USAGE ON SCHEMA public TO reader; "
        "GRANT SELECT ON items TO reader; GRANT SELECT (k) ON other.things TO reader; "
        "GRANT USAGE ON SCHEMA other TO reader",
    )
    args = ("pg", "start-rest", "pgdata1", "--port", str(free_port()), "--role", "reader")
    rest.info = rest.neon.json(*args)
    try:
        assert rest.rows("/items?id=eq.2&select=id") == [{"id": 2}]
        status, _headers, body = rest.get("/log")
        assert status == 403 and "permission denied for table log" in body["message"]
        status, _headers, body = rest.get("/other.things?select=v")
        assert status == 403 and "permission denied" in body["message"]
        assert rest.rows("/other.things?select=k&order=k") == [{"k": "a"}, {"k": "b"}]
        _status, _headers, doc = rest.get("/")
        assert set(doc["paths"]) == {"/items"}
        # The snapshot predates the role: refused in one message naming it.
        status, _headers, body = rest.get(f"/@{SNAP}/items")
        assert status == 400 and 'role "reader" does not exist' in body["message"]
    finally:
        rest.neon.run("pg", "stop-rest", "pgdata1")


def test_pg_destroy_stops_rest(rest: Rest) -> None:
    rest.info = rest.neon.json("pg", "start-rest", "pgdata1", "--port", str(free_port()))
    pid, port = int(rest.info["pid"]), int(rest.info["port"])
    assert rest.rows("/items?id=eq.2&select=id") == [{"id": 2}]
    rest.neon.run("pg", "destroy", "--yes", "pgdata1")
    assert not pid_alive(pid)
    assert not _port_open(port)
    assert not (rest.neon.home / "rest" / "primary1").exists()
    assert not (rest.neon.home / "secrets" / "node.primary1.rest-token").exists()
