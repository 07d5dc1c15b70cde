"""pg-neon: pageserver."""
