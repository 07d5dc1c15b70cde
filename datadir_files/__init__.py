"""Writing a PostgreSQL data directory from a tar: the checks, the unpacker, the account.

A basebackup's tar is unpacked by the CLI (an extraction streamed to it, a pull, an import,
a checkout's delta) and by the pageserver daemon, which writes a local extraction into the
directory the CLI hands it (pageserver/api/local_files.py). What arrives is untrusted bytes
on both sides, so the same member checks, modes and owner apply; they live here, imported by
both, part of neither: `tar_reader` (the archive read sans I/O), `untar` (the extractor) and
`pg_account` (PostgreSQL's OS account and the directories made for it).
"""
