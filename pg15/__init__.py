"""PostgreSQL 15 format facts (as Neon's postgres_ffi): constants, LSNs, the WAL reader,
record and rmgr decoding, full-page images, pg_control.

Everything version-specific lives here, so PostgreSQL 16/17 can be added beside it.
"""
