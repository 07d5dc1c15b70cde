"""pg-neon: proto."""
