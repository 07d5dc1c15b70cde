"""The heads (first bytes: the manifest) of the `.neon` objects of an S3 prefix, remembered
in the home by object name, size and ETag, so that a push does not read them again.

Why: a push asks what the destination holds before it sends a delta (the manifest of each
`.neon` object: which snapshot, which parent), and on S3 that is a ranged GET of every such
object after the listing: a round trip after the listing's, and a request per object. The
listing gives each object's size and ETag; where both are those of a head this home read or
wrote, the object is the one whose head it holds (S3's ETag changes with the object's bytes:
MD5 of a PutObject's body, of its parts' MD5s for a multipart upload, an opaque value of the
write otherwise), so the remembered head is its head: no GET. As git remembers what it last
saw of a remote (its remote-tracking refs), and, like those, only ever a shortcut: an object
not remembered, or changed, is read as before, and what is read is remembered.

The heads are written by a push that commits an object (its first bytes, the ETag S3
answered) and by the probe that read them (`S3Store._stat`), one JSON file per store in the
home's `cache/` (0700; the file 0600, named and marked by a hash of the endpoint, bucket and
prefix, which are not written): the names and heads of snapshot files, no secret. The
objects a probe did not look at are forgotten, so a file holds at most the probe's `.neon`
objects and the one pushed since. The cache is only ever a shortcut: a file that cannot be
read (not this user's regular 0600 file, malformed, too big) is as none, one that cannot
be written is left, and no failure of it fails a push or a pull; two commands that save at
once keep one's heads (the other's are read again next time).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from cli.home import current_home, private_dir

CACHE_SUBDIR = "s3-heads"
FILE_MAX = 1 << 20  # bytes of a cache file read at most (64 heads: ~360 KiB)


class HeadCache:
    """The remembered heads of one store's objects: name -> (size, ETag, head)."""

    def __init__(self, path: Path | None, key: str, entries: dict[str, tuple[int, str, bytes]]):
        self._path = path
        self._key = key
        self._entries = entries
        self._changed = False

    @classmethod
    def of_store(cls, store: str) -> HeadCache:
        """The cache of `store` (its endpoint, bucket and prefix, as one string) in this
        command's home; outside a command (the library in-process), one that keeps nothing.
        Never raises: a cache that cannot be read is empty."""
        key = hashlib.sha256(store.encode()).hexdigest()
        home = current_home()
        if home is None:
            return cls(None, key, {})
        path = home.cache_dir / CACHE_SUBDIR / f"{key[:32]}.json"
        try:
            entries = _load(path, key)
        except Exception:
            entries = {}
        return cls(path, key, entries)

    def get(self, name: str, size: int, etag: str | None) -> bytes | None:
        """The head of `name` if it is remembered with this size and ETag."""
        entry = self._entries.get(name)
        if etag is None or entry is None or entry[:2] != (size, etag):
            return None
        return entry[2]

    def put(self, name: str, size: int, etag: str | None, head: bytes) -> None:
        if not etag:
            return
        if self._entries.get(name) != (size, etag, head):
            self._entries[name] = (size, etag, head)
            self._changed = True

    def keep_only(self, names: Iterable[str]) -> None:
        """Forget the objects not among `names` (those a probe looked at)."""
        kept = set(names)
        for name in [n for n in self._entries if n not in kept]:
            del self._entries[name]
            self._changed = True

    def save(self) -> None:
        """Write the cache if it changed; never raises (a cache that cannot be written is
        read again next time)."""
        if self._path is None or not self._changed:
            return
        self._changed = False
        with contextlib.suppress(Exception):
            _save(self._path, self._key, self._entries)


def _save(path: Path, key: str, entries: dict[str, tuple[int, str, bytes]]) -> None:
    if not (private_dir(path.parent.parent) and private_dir(path.parent)):
        return
    text = json.dumps(
        {
            "store": key,
            "objects": {
                name: {"size": size, "etag": etag, "head": base64.b64encode(head).decode()}
                for name, (size, etag, head) in sorted(entries.items())
            },
        }
    )
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # 0600
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _load(path: Path, key: str) -> dict[str, tuple[int, str, bytes]]:
    """The entries of the cache file at `path` for the store hashed to `key`; none where
    it is missing, not this user's regular 0600 file, another store's or malformed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return {}
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            return {}
        if info.st_mode & 0o077:
            return {}
        data = f.read(FILE_MAX + 1)
    if len(data) > FILE_MAX:
        return {}
    value = json.loads(data)
    if not isinstance(value, dict) or value.get("store") != key:
        return {}
    objects = value.get("objects")
    if not isinstance(objects, dict):
        return {}
    entries: dict[str, tuple[int, str, bytes]] = {}
    for name, entry in objects.items():
        if not isinstance(entry, dict):
            continue
        size, etag, head = entry.get("size"), entry.get("etag"), entry.get("head")
        if type(size) is not int or not isinstance(etag, str) or not isinstance(head, str):
            continue
        entries[name] = (size, etag, base64.b64decode(head, validate=True))
    return entries
