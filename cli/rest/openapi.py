"""The OpenAPI 3 document served at `/`: one read-only path per table, its columns as a
schema. Sans-I/O: built from the catalog's relations."""

from __future__ import annotations

from typing import Any

from cli.rest.query import OPERATORS, Relation

_SCALARS: dict[str, dict[str, Any]] = {
    "smallint": {"type": "integer", "format": "int32"},
    "integer": {"type": "integer", "format": "int32"},
    "bigint": {"type": "integer", "format": "int64"},
    "real": {"type": "number", "format": "float"},
    "double precision": {"type": "number", "format": "double"},
    "numeric": {"type": "number"},
    "boolean": {"type": "boolean"},
    "json": {},
    "jsonb": {},
    "date": {"type": "string", "format": "date"},
    "timestamp without time zone": {"type": "string", "format": "date-time"},
    "timestamp with time zone": {"type": "string", "format": "date-time"},
    "uuid": {"type": "string", "format": "uuid"},
}


def column_schema(pg_type: str) -> dict[str, Any]:
    """JSON Schema of a column as json_agg renders it (numeric as a JSON number)."""
    if pg_type.endswith("[]"):
        return {"type": "array", "items": column_schema(pg_type[:-2]), "description": pg_type}
    return {**_SCALARS.get(pg_type, {"type": "string"}), "description": pg_type}


def document(relations: list[Relation], title: str) -> dict[str, Any]:
    """Tables in search_path order: `/TABLE` where a bare name finds it, else `/SCHEMA.TABLE`."""
    common = [
        _param("select", "Columns to return, comma separated (default: all)."),
        _param("order", "COLUMN[.asc|.desc][.nullsfirst|.nullslast], comma separated."),
        _param("limit", "At most this many rows.", {"type": "integer", "minimum": 0}),
        _param("offset", "Skip this many rows.", {"type": "integer", "minimum": 0}),
        {
            "name": "Prefer",
            "in": "header",
            "schema": {"type": "string", "enum": ["count=exact"]},
            "description": "count=exact: the exact count in Content-Range.",
        },
    ]
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    seen: set[str] = set()
    for relation in relations:
        name = relation.name if relation.name not in seen else None
        seen.add(relation.name)
        path_name = name or f"{relation.schema}.{relation.name}"
        key = f"{relation.schema}.{relation.name}"
        schemas[key] = {
            "type": "object",
            "properties": {c: column_schema(t) for c, t in relation.columns.items()},
            "required": sorted(relation.not_null & set(relation.columns)),
        }
        filters = [
            _param(c, f"Filter: OP.VALUE, OP one of {', '.join(OPERATORS)} (not.OP negates).")
            for c in relation.columns
        ]
        paths[f"/{path_name}"] = {
            "get": {
                "summary": f"Rows of {key}",
                "parameters": [*common, *filters],
                "responses": {
                    "200": {
                        "description": "The rows",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "array",
                                    "items": {"$ref": f"#/components/schemas/{key}"},
                                }
                            }
                        },
                    }
                },
            }
        }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": title,
            "version": "1",
            "description": (
                "Read-only. Prefix a path with /@SNAPSHOT or /@LSN (X/Y) for the table at that "
                "snapshot or LSN. Authorization: Bearer TOKEN."
            ),
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _param(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema or {"type": "string"},
        "description": description,
    }
