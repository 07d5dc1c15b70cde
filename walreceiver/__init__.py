"""pg-neon: walreceiver."""
