"""The PostgreSQL nodes this pageserver follows, persisted in its workdir.

Connection secrets arrive from the CLI over the authenticated proto connection and are kept in
a 0600 file; they are never returned by listing calls.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from durable_files import temp_path, write_file_durably
from proto.errors import InvalidArgument, NotFound


def slot_name(node_id: str) -> str:
    """The physical replication slot that keeps a node's WAL for the pageserver."""
    return f"neon_{node_id}".lower()


@dataclass(frozen=True, slots=True)
class FollowedNode:
    node_id: str
    host: str
    port: int
    user: str
    password: str
    system_id: str | None = None
    store_dir: str | None = None
    """Where the node's page history and WAL archive live (default: in the workdir)."""
    pgdata: str | None = None
    """The data directory name: snapshots are named PGDATA@TAG."""
    socket_dir: str | None = None
    """The node's unix socket directory, private to its OS user: when set the receiver connects
    there, where no other local user can listen in the node's place, instead of to host:port."""
    replication_slot: str | None = None
    """The slot to stream from, when not `neon_<node id>` (`neon pg attach --slot`)."""
    auth_methods: tuple[str, ...] | None = None
    """The authentication methods the connection answers (pg_hba.conf names); None: a managed
    node's policy (trust on its private socket, else SCRAM only: replication_auth)."""
    paused: bool = field(default=False, compare=False)
    """The CLI stopped the node: no connection is attempted until it registers it again (on
    `pg start`). Not part of the node's identity: registering the same node resumes it."""

    @property
    def slot(self) -> str:
        return self.replication_slot or slot_name(self.node_id)

    def public(self) -> dict[str, Any]:
        info = asdict(self)
        info.pop("password")
        if self.auth_methods is not None:
            info["auth_methods"] = list(self.auth_methods)
        return info


def followed_node(fields: dict[str, Any]) -> FollowedNode:
    """A FollowedNode from its fields as JSON or the wire has them (lists for tuples)."""
    methods = fields.get("auth_methods")
    if methods is not None:
        fields = {**fields, "auth_methods": tuple(methods)}
    return FollowedNode(**fields)


class FollowedNodes:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._nodes: dict[str, FollowedNode] = {}
        # A temporary a crash left holds passwords: gone (".tmp": written so before).
        for left in (path.with_name(path.name + ".tmp"), temp_path(path)):
            left.unlink(missing_ok=True)
        if path.exists():
            try:
                raw = json.loads(path.read_text())
                self._nodes = {n["node_id"]: followed_node(n) for n in raw}
            except (ValueError, TypeError, KeyError) as exc:
                raise InvalidArgument(f"{path} is corrupt ({exc}); fix or remove it") from None

    def _save(self) -> None:
        # Its rename made durable too (the directory fsynced): a node's `paused` mark lost to
        # a power cut would have a restarted pageserver connect to whoever took the stopped
        # node's port, with the node's password.
        records = [asdict(n) for n in self._nodes.values()]
        write_file_durably(self.path, json.dumps(records).encode())

    def add(self, node: FollowedNode) -> None:
        self._nodes[node.node_id] = node
        self._save()

    def remove(self, node_id: str) -> FollowedNode:
        try:
            node = self._nodes.pop(node_id)
        except KeyError:
            raise NotFound(f"the pageserver does not follow node {node_id!r}") from None
        self._save()
        return node

    def get(self, node_id: str) -> FollowedNode:
        try:
            return self._nodes[node_id]
        except KeyError:
            raise NotFound(f"the pageserver does not follow node {node_id!r}") from None

    def all(self) -> list[FollowedNode]:
        return list(self._nodes.values())
