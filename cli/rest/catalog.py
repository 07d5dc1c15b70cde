"""Tables and columns as the catalog has them: the only names a request may use.

Only ordinary, partitioned and foreign tables, views and materialized views outside the
system schemas are visible; a bare name resolves along the connection's search_path, as it
would in SQL.
"""

from __future__ import annotations

from typing import Any

from cli.rest.query import Relation

_RELATIONS = """
SELECT n.nspname::text, c.relname::text,
       coalesce(array_agg(a.attname::text ORDER BY a.attnum)
                FILTER (WHERE a.attname IS NOT NULL), ARRAY[]::text[]),
       coalesce(array_agg(a.atttypid::regtype::text ORDER BY a.attnum)
                FILTER (WHERE a.attname IS NOT NULL), ARRAY[]::text[]),
       coalesce(array_agg(a.attname::text ORDER BY a.attnum)
                FILTER (WHERE a.attnotnull), ARRAY[]::text[])
FROM pg_catalog.pg_class c
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_attribute a
       ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
  AND {where}
GROUP BY n.nspname, c.relname
ORDER BY {order}
"""

_FIND = _RELATIONS.format(
    where="c.relname = $2 AND (n.nspname = $1 OR ($1 IS NULL "
    "AND n.nspname = ANY(pg_catalog.current_schemas(false))))",
    order="array_position(pg_catalog.current_schemas(false), n.nspname) NULLS LAST LIMIT 1",
)
_LIST = _RELATIONS.format(
    where="n.nspname = ANY(pg_catalog.current_schemas(false)) "
    "AND pg_catalog.has_any_column_privilege(c.oid, 'SELECT')",
    order="array_position(pg_catalog.current_schemas(false), n.nspname), c.relname",
)


def _relation(row: Any) -> Relation:
    return Relation(
        schema=row[0],
        name=row[1],
        columns=dict(zip(row[2], row[3], strict=True)),
        not_null=frozenset(row[4]),
    )


async def find_relation(conn: Any, schema: str | None, name: str) -> Relation | None:
    """The table `schema.name`, or the first `name` along the search_path."""
    row = await conn.fetchrow(_FIND, schema, name)
    return _relation(row) if row is not None else None


async def list_relations(conn: Any) -> list[Relation]:
    """The tables of the search_path's schemas the role may read (what `/` documents)."""
    return [_relation(row) for row in await conn.fetch(_LIST)]
