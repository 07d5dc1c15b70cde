"""A PostgREST-style read request (path and query string) as one parameterized SQL statement.

Sans-I/O: nothing here talks to a server. Identifiers are accepted only when the catalog has
them (the caller passes the table's columns) and are quoted anyway; every value is a bound
parameter, cast from text to the column's type by PostgreSQL. The only text taken from
outside and written into SQL is a column or table name the catalog confirmed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

COMPARISONS = {
    "eq": "=",
    "neq": "<>",
    "gt": ">",
    "gte": ">=",
    "lt": "<",
    "lte": "<=",
    "like": "LIKE",
    "ilike": "ILIKE",
}
IS_VALUES = {"null": "NULL", "true": "TRUE", "false": "FALSE", "unknown": "UNKNOWN"}
OPERATORS = (*COMPARISONS, "in", "is")
RESERVED = ("select", "order", "limit", "offset")
MAX_NAME = 63  # NAMEDATALEN - 1: no catalog name is longer

_LSN = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\Z")


class QueryError(Exception):
    """A request that cannot be answered, with the HTTP status it earns and a one-line
    message naming what is wrong."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class Filter:
    column: str
    op: str  # one of OPERATORS
    value: str | tuple[str, ...]  # `in`: the list; `is`: a key of IS_VALUES
    negated: bool = False


@dataclass(frozen=True, slots=True)
class Order:
    column: str
    descending: bool = False
    nulls: str | None = None  # "FIRST" | "LAST" | None (PostgreSQL's default)


@dataclass(frozen=True, slots=True)
class ReadRequest:
    select: tuple[str, ...] | None  # None: every column
    filters: tuple[Filter, ...] = ()
    order: tuple[Order, ...] = ()
    limit: int | None = None
    offset: int = 0


@dataclass(frozen=True, slots=True)
class Target:
    """What a path names: a state (`@SNAPSHOT`, `@LSN` or the live node) and a table (None:
    the OpenAPI document)."""

    snapshot: str | None = None
    lsn: str | None = None  # as written, X/Y
    schema: str | None = None
    table: str | None = None


@dataclass(frozen=True, slots=True)
class Relation:
    """A table as the catalog has it: column name -> type (regtype text, used in casts)."""

    schema: str
    name: str
    columns: Mapping[str, str]
    not_null: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Statement:
    sql: str
    params: tuple[object, ...]


def quote_ident(name: str) -> str:
    """PostgreSQL's quote_ident, always quoting; NUL cannot be in a name."""
    if "\x00" in name:
        raise QueryError("a name holds a NUL character")
    return '"' + name.replace('"', '""') + '"'


def parse_path(path: str) -> Target:
    """`/`, `/TABLE`, `/SCHEMA.TABLE`, each optionally after `/@SNAPSHOT` or `/@X/Y` (an LSN;
    the OpenAPI document at an LSN is `/@X/Y/`, with the slash). `path` is percent-decoded."""
    rest = path.lstrip("/")
    snapshot = lsn = None
    if rest.startswith("@"):
        parts = rest[1:].split("/")
        if len(parts) >= 3 and _LSN.match(f"{parts[0]}/{parts[1]}"):
            lsn = f"{parts[0]}/{parts[1]}".upper()
            rest = "/".join(parts[2:])
        else:
            snapshot, rest = parts[0], "/".join(parts[1:])
            if not snapshot:
                raise QueryError("empty snapshot name after '@'")
    rest = rest.rstrip("/")
    if not rest:
        return Target(snapshot, lsn)
    if "/" in rest:
        raise QueryError(f"no such resource: /{rest} (a table is /TABLE or /SCHEMA.TABLE)", 404)
    schema, dot, table = rest.partition(".")
    if not dot:
        schema, table = "", rest
    for what, name in (("schema", schema), ("table", table)):
        if dot and not name:
            raise QueryError(f"empty {what} name in {rest!r}")
        if name:
            _check_name(name, what)
    return Target(snapshot, lsn, schema or None, table)


def parse_query(pairs: Iterable[tuple[str, str]]) -> ReadRequest:
    """The query string's (decoded) pairs: select, order, limit, offset, and COLUMN=OP.VALUE
    filters (ANDed)."""
    seen: dict[str, str] = {}
    filters: list[Filter] = []
    for key, value in pairs:
        if key in RESERVED:
            if key in seen:
                raise QueryError(f"{key} is given twice")
            seen[key] = value
        else:
            filters.append(parse_filter(key, value))
    return ReadRequest(
        select=_parse_select(seen["select"]) if "select" in seen else None,
        filters=tuple(filters),
        order=_parse_order(seen["order"]) if "order" in seen else (),
        limit=_parse_count("limit", seen["limit"]) if "limit" in seen else None,
        offset=_parse_count("offset", seen["offset"]) if "offset" in seen else 0,
    )


def parse_filter(column: str, expression: str) -> Filter:
    """`COLUMN=[not.]OP.VALUE`: eq, neq, gt, gte, lt, lte, like, ilike (`*` is the wildcard),
    in.(a,b,"c,d"), is.null|true|false|unknown."""
    _check_name(column, "column")
    negated = expression.startswith("not.")
    if negated:
        expression = expression[4:]
    op, dot, value = expression.partition(".")
    if not dot or op not in OPERATORS:
        raise QueryError(
            f"malformed filter on {column}: {expression!r} (expected OP.VALUE, OP one of "
            f"{', '.join(OPERATORS)})"
        )
    if op == "in":
        return Filter(column, op, _parse_list(column, value), negated)
    if op == "is":
        if value.lower() not in IS_VALUES:
            raise QueryError(
                f"malformed filter on {column}: is.{value} (expected is.null, is.true, "
                "is.false or is.unknown)"
            )
        return Filter(column, op, value.lower(), negated)
    if op in ("like", "ilike"):
        value = value.replace("*", "%")
    return Filter(column, op, value, negated)


def _parse_list(column: str, text: str) -> tuple[str, ...]:
    """`(a,b,"c,d","e\\"f")`: PostgREST's list syntax; double quotes keep commas and
    parentheses, a backslash escapes the next character inside them."""
    if not (text.startswith("(") and text.endswith(")")):
        raise QueryError(f"malformed filter on {column}: in.{text} (expected in.(v1,v2,...))")
    body = text[1:-1]
    items: list[str] = []
    i, n = 0, len(body)
    if not body:
        return ()
    while True:
        if i < n and body[i] == '"':
            i += 1
            chars: list[str] = []
            while i < n and body[i] != '"':
                if body[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(body[i])
                i += 1
            if i >= n:
                raise QueryError(f"malformed filter on {column}: unterminated quote in in.{text}")
            i += 1
            items.append("".join(chars))
            if i < n and body[i] != ",":
                raise QueryError(
                    f"malformed filter on {column}: text after a quoted value in in.{text}"
                )
        else:
            end = body.find(",", i)
            end = n if end < 0 else end
            items.append(body[i:end])
            i = end
        if i >= n:
            return tuple(items)
        i += 1  # the comma


def _parse_select(text: str) -> tuple[str, ...] | None:
    if text.strip() == "*":
        return None
    names = tuple(part.strip() for part in text.split(","))
    for name in names:
        if not name:
            raise QueryError(f"malformed select={text!r}: an empty column name")
        _check_name(name, "column")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise QueryError(f"column {duplicates[0]} is selected twice")
    return names


def _parse_order(text: str) -> tuple[Order, ...]:
    terms: list[Order] = []
    for term in text.split(","):
        column, *modifiers = term.strip().split(".")
        if not column:
            raise QueryError(f"malformed order={text!r}: an empty column name")
        _check_name(column, "column")
        descending, nulls = False, None
        for i, modifier in enumerate(modifiers):
            if i == 0 and modifier in ("asc", "desc"):
                descending = modifier == "desc"
            elif i == len(modifiers) - 1 and modifier in ("nullsfirst", "nullslast"):
                nulls = "FIRST" if modifier == "nullsfirst" else "LAST"
            else:
                raise QueryError(
                    f"malformed order term {term!r} (expected COLUMN[.asc|.desc]"
                    "[.nullsfirst|.nullslast])"
                )
        terms.append(Order(column, descending, nulls))
    return tuple(terms)


def _parse_count(what: str, text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        raise QueryError(f"{what}={text!r} is not a non-negative integer")
    return int(text)


def _check_name(name: str, what: str) -> None:
    if len(name.encode()) > MAX_NAME or "\x00" in name:
        raise QueryError(f"{what} name {name[:80]!r} is not a valid name")


def check_columns(request: ReadRequest, relation: Relation) -> None:
    """Every column the request names must be the table's (400 naming the first one not)."""
    named = [
        *(request.select or ()),
        *(f.column for f in request.filters),
        *(o.column for o in request.order),
    ]
    for column in named:
        if column not in relation.columns:
            raise QueryError(
                f"column {column!r} does not exist in {relation.schema}.{relation.name}"
            )


def select_statement(request: ReadRequest, relation: Relation) -> Statement:
    """One row: the JSON array of the rows (each as PostgreSQL's row_to_json renders it, as
    PostgREST does; compact) and how many there are."""
    check_columns(request, relation)
    params: list[object] = []
    columns = request.select or tuple(relation.columns)
    inner = f"SELECT {', '.join(quote_ident(c) for c in columns)} FROM {_table(relation)}"
    inner += _where(request, relation, params)
    if request.order:
        inner += " ORDER BY " + ", ".join(_order_term(o) for o in request.order)
    if request.limit is not None:
        params.append(request.limit)
        inner += f" LIMIT ${len(params)}::bigint"
    if request.offset:
        params.append(request.offset)
        inner += f" OFFSET ${len(params)}::bigint"
    rows = "'[' || string_agg(row_to_json(_r.*)::text, ',') || ']'"
    sql = f"SELECT coalesce({rows}, '[]'), count(*) FROM ({inner}) AS _r"
    return Statement(sql, tuple(params))


def count_statement(request: ReadRequest, relation: Relation) -> Statement:
    """The exact count of the rows the filters admit (limit and offset aside)."""
    check_columns(request, relation)
    params: list[object] = []
    sql = f"SELECT count(*) FROM {_table(relation)}" + _where(request, relation, params)
    return Statement(sql, tuple(params))


def _table(relation: Relation) -> str:
    return f"{quote_ident(relation.schema)}.{quote_ident(relation.name)}"


def _where(request: ReadRequest, relation: Relation, params: list[object]) -> str:
    if not request.filters:
        return ""
    clauses = [_condition(f, relation.columns[f.column], params) for f in request.filters]
    return " WHERE " + " AND ".join(clauses)


def _condition(item: Filter, column_type: str, params: list[object]) -> str:
    column = quote_ident(item.column)
    if item.op == "is":
        clause = f"{column} IS {IS_VALUES[str(item.value)]}"
    elif item.op == "in":
        params.append(list(item.value))
        clause = f"{column} = ANY(${len(params)}::text[]::{column_type}[])"
    elif item.op in ("like", "ilike"):
        params.append(item.value)
        clause = f"{column}::text {COMPARISONS[item.op]} ${len(params)}::text"
    else:
        params.append(item.value)
        clause = f"{column} {COMPARISONS[item.op]} ${len(params)}::text::{column_type}"
    return f"NOT ({clause})" if item.negated else clause


def _order_term(order: Order) -> str:
    term = quote_ident(order.column) + (" DESC" if order.descending else " ASC")
    return term + (f" NULLS {order.nulls}" if order.nulls else "")


def content_range(offset: int, returned: int, total: int | None) -> str:
    """`0-9/123` (PostgREST's Content-Range): the rows returned, and the exact count when asked
    (else `*`); `*/123` when no row is returned."""
    span = f"{offset}-{offset + returned - 1}" if returned else "*"
    return f"{span}/{total if total is not None else '*'}"
