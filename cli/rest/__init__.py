"""`neon pg start-rest`: a read-only PostgREST-style API over a node and its snapshots."""
