"""The CLI's aligned tables read back into cells (cli/console/tables.py)."""

from __future__ import annotations

import contextlib
import io

from cli.console.tables import parse_table
from cli.output import print_table


def test_a_printed_table_reads_back_cell_by_cell() -> None:
    headers = ("DATABASE", "TABLE", "RELATION", "KIND", "CHANGE", "PAGES", "CHANGED", "BYTES")
    rows = [
        ("postgres", "public.t", "public.t", "table", "created", "0->1", 1, "8.0K"),
        ("postgres", "(system catalogs)", "13 relations", "catalog", "modified", "163->163", 17,
         "136K"),
        ("db with a long name", "public.x", "public.x_pkey", "index", "dropped", "2->0", 2, None),
    ]  # fmt: skip
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_table(headers, rows)
    parsed_headers, parsed = parse_table(out.getvalue().splitlines())
    assert parsed_headers == list(headers)
    assert parsed == [[str(c) if c is not None else "-" for c in row] for row in rows]
    assert parse_table([]) == ([], [])
