"""pg-neon: pageserver/redo."""
