"""The sans-I/O query parser: query strings to parameterized SQL, malformed input refused
naming the problem, and injection attempts kept as data (values only ever bound, names only
ever quoted catalog names)."""

from __future__ import annotations

import pytest

from cli.rest.query import (
    Filter,
    Order,
    QueryError,
    ReadRequest,
    Relation,
    Target,
    content_range,
    count_statement,
    parse_filter,
    parse_path,
    parse_query,
    quote_ident,
    select_statement,
)

T = Relation(
    "public",
    "t",
    {"id": "integer", "name": "text", "n": "numeric", "ts": "timestamp with time zone"},
)


def inner(request: ReadRequest, relation: Relation = T) -> tuple[str, tuple[object, ...]]:
    """The statement's inner SELECT (what is aggregated into JSON), and its parameters."""
    statement = select_statement(request, relation)
    prefix = (
        "SELECT coalesce('[' || string_agg(row_to_json(_r.*)::text, ',') || ']', '[]'), "
        "count(*) FROM ("
    )
    assert statement.sql.startswith(prefix) and statement.sql.endswith(") AS _r")
    return statement.sql[len(prefix) : -len(") AS _r")], statement.params


def where(query: str) -> tuple[str, tuple[object, ...]]:
    pairs = [tuple(p.split("=", 1)) for p in query.split("&")]
    sql, params = inner(parse_query(pairs))  # type: ignore[arg-type]
    return sql.split(" WHERE ", 1)[1], params


ALL = 'SELECT "id", "name", "n", "ts" FROM "public"."t"'


@pytest.mark.parametrize(
    ("query", "sql", "params"),
    [
        ("id=eq.5", '"id" = $1::text::integer', ("5",)),
        ("id=neq.5", '"id" <> $1::text::integer', ("5",)),
        ("id=gt.5", '"id" > $1::text::integer', ("5",)),
        ("id=gte.5", '"id" >= $1::text::integer', ("5",)),
        ("id=lt.5", '"id" < $1::text::integer', ("5",)),
        ("id=lte.5", '"id" <= $1::text::integer', ("5",)),
        ("name=like.a*b*", '"name"::text LIKE $1::text', ("a%b%",)),
        ("name=ilike.*X", '"name"::text ILIKE $1::text', ("%X",)),
        ("id=in.(1,2,3)", '"id" = ANY($1::text[]::integer[])', (["1", "2", "3"],)),
        ("name=in.()", '"name" = ANY($1::text[]::text[])', ([],)),
        ("n=is.null", '"n" IS NULL', ()),
        ("n=is.NULL", '"n" IS NULL', ()),
        ("n=is.true", '"n" IS TRUE', ()),
        ("n=is.false", '"n" IS FALSE', ()),
        ("n=is.unknown", '"n" IS UNKNOWN', ()),
        ("id=not.eq.5", 'NOT ("id" = $1::text::integer)', ("5",)),
        ("n=not.is.null", 'NOT ("n" IS NULL)', ()),
        ("ts=gt.2024-01-01", '"ts" > $1::text::timestamp with time zone', ("2024-01-01",)),
        ("id=eq.", '"id" = $1::text::integer', ("",)),
        ("name=eq.a.b.c", '"name" = $1::text::text', ("a.b.c",)),
    ],
)
def test_every_operator(query: str, sql: str, params: tuple[object, ...]) -> None:
    assert where(query) == (sql, params)


def test_filters_are_anded_and_numbered_in_order() -> None:
    assert where("id=gt.1&name=eq.x&id=lt.9&n=is.null") == (
        '"id" > $1::text::integer AND "name" = $2::text::text AND "id" < $3::text::integer '
        'AND "n" IS NULL',
        ("1", "x", "9"),
    )


def test_in_list_quoting() -> None:
    f = parse_filter("name", 'in.("a,b","c\\"d",e f,"(x)",)')
    assert f == Filter("name", "in", ("a,b", 'c"d', "e f", "(x)", ""))
    assert parse_filter("name", 'in.("")').value == ("",)


def test_select_order_limit_offset() -> None:
    request = parse_query(
        [
            ("select", "name, id"),
            ("order", "n.desc.nullslast,id,name.asc.nullsfirst"),
            ("limit", "10"),
            ("offset", "20"),
        ]
    )
    assert request.select == ("name", "id")
    assert request.order == (Order("n", True, "LAST"), Order("id"), Order("name", False, "FIRST"))
    sql, params = inner(request)
    assert sql == (
        'SELECT "name", "id" FROM "public"."t" ORDER BY "n" DESC NULLS LAST, "id" ASC, '
        '"name" ASC NULLS FIRST LIMIT $1::bigint OFFSET $2::bigint'
    )
    assert params == (10, 20)


def test_defaults() -> None:
    request = parse_query([])
    assert request == ReadRequest(select=None)
    assert inner(request) == (ALL, ())
    assert parse_query([("select", "*")]).select is None
    assert inner(parse_query([("limit", "0"), ("offset", "0")])) == (
        ALL + " LIMIT $1::bigint",
        (0,),
    )


def test_count_ignores_limit_offset_order() -> None:
    request = parse_query(
        [("id", "gt.3"), ("order", "id.desc"), ("limit", "1"), ("offset", "2"), ("select", "id")]
    )
    statement = count_statement(request, T)
    assert statement.sql == 'SELECT count(*) FROM "public"."t" WHERE "id" > $1::text::integer'
    assert statement.params == ("3",)


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([("id", "5")], "malformed filter on id: '5'"),
        ([("id", "xx.5")], "malformed filter on id: 'xx.5'"),
        ([("id", "eq")], "malformed filter on id: 'eq'"),
        ([("id", "not.5")], "malformed filter on id: '5'"),
        ([("n", "is.maybe")], "malformed filter on n: is.maybe"),
        ([("id", "in.1,2")], "malformed filter on id: in.1,2"),
        ([("id", 'in.("a)')], "unterminated quote"),
        ([("id", 'in.("a"b)')], "text after a quoted value"),
        ([("limit", "-1")], "limit='-1' is not a non-negative integer"),
        ([("limit", "ten")], "limit='ten' is not a non-negative integer"),
        ([("offset", "1.5")], "offset='1.5' is not a non-negative integer"),
        ([("limit", "\uff11")], "limit='\uff11' is not a non-negative integer"),
        ([("limit", "1"), ("limit", "2")], "limit is given twice"),
        ([("select", "id,,name")], "an empty column name"),
        ([("select", "id,id")], "column id is selected twice"),
        ([("order", "id.up")], "malformed order term 'id.up'"),
        ([("order", "id.nullsfirst.desc")], "malformed order term"),
        ([("order", ",id")], "an empty column name"),
        ([("x" * 64, "eq.1")], "is not a valid name"),
    ],
)
def test_malformed_is_400_naming_the_problem(pairs: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(QueryError) as caught:
        parse_query(pairs)
    assert caught.value.status == 400
    assert message in caught.value.message


@pytest.mark.parametrize(
    "pairs",
    [
        [("select", "id,nope")],
        [("nope", "eq.1")],
        [("order", "nope.desc")],
        [("select", 'id" FROM pg_authid --')],
        [('id" = 1 OR "1', "eq.1")],
        [("order", "id; DROP TABLE t")],
    ],
)
def test_unknown_columns_are_refused_by_name(pairs: list[tuple[str, str]]) -> None:
    request = parse_query(pairs)
    with pytest.raises(QueryError) as caught:
        select_statement(request, T)
    assert caught.value.status == 400
    assert "does not exist in public.t" in caught.value.message
    with pytest.raises(QueryError):
        count_statement(request, T)


@pytest.mark.parametrize(
    "value",
    [
        "1 OR 1=1",
        "1'; DROP TABLE t; --",
        "$9",
        '"id"',
        "x) OR (1=1",
        "\\'",
    ],
)
def test_values_are_only_ever_parameters(value: str) -> None:
    for op in ("eq", "gt", "like", "ilike"):
        sql, params = where(f"name={op}.{value}")
        assert value.replace("*", "%") in params
        assert value not in sql
    sql, params = where(f"name=in.({value})")
    assert value not in sql and params


def test_catalog_names_are_quoted() -> None:
    odd = Relation('s"x', 'ta"ble', {'co"l': "integer", "Mixed Case": "text"})
    request = parse_query([('co"l', "eq.1"), ("order", "Mixed Case.desc")])
    sql, params = inner(request, odd)
    assert sql == (
        'SELECT "co""l", "Mixed Case" FROM "s""x"."ta""ble" WHERE "co""l" = '
        '$1::text::integer ORDER BY "Mixed Case" DESC'
    )
    assert params == ("1",)
    assert quote_ident("a") == '"a"'
    with pytest.raises(QueryError):
        quote_ident("a\x00b")


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/", Target()),
        ("", Target()),
        ("/t", Target(table="t")),
        ("/t/", Target(table="t")),
        ("/s.t", Target(schema="s", table="t")),
        ("/@pgdata1@snap1/t", Target(snapshot="pgdata1@snap1", table="t")),
        ("/@pgdata1@snap1/", Target(snapshot="pgdata1@snap1")),
        ("/@pgdata1@snap1", Target(snapshot="pgdata1@snap1")),
        ("/@imported/s.t", Target(snapshot="imported", schema="s", table="t")),
        ("/@0/16b3748/t", Target(lsn="0/16B3748", table="t")),
        ("/@0/16B3748/", Target(lsn="0/16B3748")),
        ("/@0/abc", Target(snapshot="0", table="abc")),  # an LSN's document ends with '/'
        ("/@1F/FFFFFFFF/s.t", Target(lsn="1F/FFFFFFFF", schema="s", table="t")),
    ],
)
def test_paths(path: str, target: Target) -> None:
    assert parse_path(path) == target


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("/@/t", 400, "empty snapshot name"),
        ("/a/b", 404, "no such resource: /a/b"),
        ("/s./", 400, "empty table name"),
        ("/.t", 400, "empty schema name"),
        ("/" + "t" * 64, 400, "is not a valid name"),
    ],
)
def test_bad_paths(path: str, status: int, message: str) -> None:
    with pytest.raises(QueryError) as caught:
        parse_path(path)
    assert caught.value.status == status
    assert message in caught.value.message


def test_content_range() -> None:
    assert content_range(0, 10, 123) == "0-9/123"
    assert content_range(20, 5, None) == "20-24/*"
    assert content_range(0, 0, 0) == "*/0"
    assert content_range(50, 0, 10) == "*/10"
