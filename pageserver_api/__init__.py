"""The pageserver's API as its clients see it: typed errors, request/response models, a client.

Like Neon's libs/pageserver_api: the CLI (and later the console) depend on this package, not on
the pageserver's internals.
"""
