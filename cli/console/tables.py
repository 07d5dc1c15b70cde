"""The CLI's aligned text tables (cli/output.py print_table) read back into cells, so a page
shows exactly the table the command prints (`snapshot diff --stat` groups and sums rows its
--json lists one by one) as an HTML table."""

from __future__ import annotations

import re
from collections.abc import Sequence


def parse_table(lines: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of a table whose first line holds the headers: every column starts
    where its header does (print_table pads each column to its widest cell)."""
    if not lines:
        return [], []
    header = lines[0]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    headers = header.split()
    rows = []
    for line in lines[1:]:
        if not line.strip():
            continue
        bounds = [*starts[1:], None]
        rows.append([line[a:b].strip() for a, b in zip(starts, bounds, strict=True)])
    return headers, rows
