"""pg-neon: cli."""
