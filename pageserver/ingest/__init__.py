"""Ingest: decoded WAL records and imported data directories become versioned values;
the per-timeline LSN indexes."""
