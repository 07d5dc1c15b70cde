"""Basebackup: a tar of a data directory at (timeline, LSN) that stock PostgreSQL starts from."""
