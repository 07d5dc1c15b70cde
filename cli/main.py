"""Entry point of the `neon` command (placeholder, replaced by the CLI module)."""

from __future__ import annotations


def main() -> None:
    raise SystemExit("neon: not yet built")
