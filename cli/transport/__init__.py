"""Where snapshot files go and come from: one module per URL scheme, all behind the interface
of `cli.transport.base` (a store of named objects: atomic write, read from an offset, stat,
list, delete).

A new scheme is one module with a `parse_location(url) -> Location` function and one line in
SCHEMES. Modules are imported only when their scheme is used (aiohttp costs CLI start-up).
"""

from __future__ import annotations

import importlib
import re

from cli.storages import mask_url
from cli.transport.base import Location
from proto.errors import InvalidArgument

SCHEMES = {
    "file": "cli.transport.file",
    "ssh": "cli.transport.ssh",
    "http": "cli.transport.http",
    "https": "cli.transport.http",
    "s3": "cli.transport.s3",
    "neon": "cli.transport.neon",
}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def url_scheme(source: str) -> str | None:
    """The scheme of `source` written as `scheme://...` (lower case); None for a plain path."""
    found = _URL.match(source)
    return found.group(1).lower() if found else None


def is_transport_url(source: str) -> bool:
    """Whether `source` is a URL of a scheme this package reads (a plain path is not)."""
    return url_scheme(source) in SCHEMES


def parse_location(url: str) -> Location:
    """The store and object `url` names: a URL of a known scheme or a plain path. Errors
    are one line with the URL's password masked."""
    scheme = url_scheme(url)
    if scheme is None:
        scheme = "file"
    elif scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise InvalidArgument(
            f"unknown URL scheme {scheme!r} in {mask_url(url)}: use {known} or a path"
        )
    module = importlib.import_module(SCHEMES[scheme])
    location: Location = module.parse_location(url)
    return location
