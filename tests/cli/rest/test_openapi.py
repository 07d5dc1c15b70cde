"""The OpenAPI document built from catalog relations (no server)."""

from __future__ import annotations

from cli.rest.openapi import column_schema, document
from cli.rest.query import OPERATORS, Relation


def test_columns_map_to_json_schema_as_rendered() -> None:
    assert column_schema("integer") == {
        "type": "integer",
        "format": "int32",
        "description": "integer",
    }
    assert column_schema("numeric")["type"] == "number"
    assert column_schema("timestamp with time zone")["format"] == "date-time"
    assert column_schema("jsonb") == {"description": "jsonb"}
    assert column_schema("my_enum") == {"type": "string", "description": "my_enum"}
    assert column_schema("text[][]")["items"]["items"]["type"] == "string"


def test_document_lists_tables_in_search_path_order() -> None:
    relations = [
        Relation("app", "t", {"id": "bigint", "v": "text"}, frozenset({"id"})),
        Relation("public", "t", {"x": "boolean"}),  # shadowed by app.t for a bare name
        Relation("public", "empty", {}),
    ]
    doc = document(relations, "title")
    assert doc["openapi"] == "3.0.3" and doc["info"]["title"] == "title"
    assert list(doc["paths"]) == ["/t", "/public.t", "/empty"]
    assert doc["components"]["schemas"]["app.t"]["required"] == ["id"]
    assert doc["components"]["schemas"]["public.t"]["properties"]["x"]["type"] == "boolean"
    get = doc["paths"]["/t"]["get"]
    names = [p["name"] for p in get["parameters"]]
    assert names == ["select", "order", "limit", "offset", "Prefer", "id", "v"]
    assert all(op in get["parameters"][-1]["description"] for op in OPERATORS)
    schema = get["responses"]["200"]["content"]["application/json"]["schema"]
    assert schema["items"] == {"$ref": "#/components/schemas/app.t"}
    assert doc["security"] == [{"bearer": []}]
