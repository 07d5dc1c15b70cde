"""The console's actions: each is a `neon` command line built from a form, and the state of
what it acts on as the page showed it (so a node or snapshot that changed meanwhile is
refused with a message instead of acted on). Pure: the pages render the same command lines
the jobs run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cli.console.commands import command_line, lsn_argument


class BadForm(ValueError):
    """A form missing a field or carrying one the action cannot take."""


@dataclass(frozen=True, slots=True)
class Action:
    name: str
    args: tuple[str, ...]
    subject: str | None = None
    """What it acts on, in the form fingerprint() looks up: `node ID` or `snapshot NAME`."""
    confirm: str | None = None
    """The question a destructive action asks first."""

    @property
    def command(self) -> str:
        return command_line(self.args)


def _field(form: Mapping[str, str], key: str) -> str:
    value = (form.get(key) or "").strip()
    if not value:
        raise BadForm(f"{key} is missing")
    if value.startswith("-"):
        raise BadForm(f"{key} may not start with '-': {value!r}")
    return value


Builder = Callable[[Mapping[str, str]], Action]


def _on_one(name: str, key: str, *command: str) -> Builder:
    """An action whose command ends with one name from the form (a node or a snapshot)."""

    def build(form: Mapping[str, str]) -> Action:
        value = _field(form, key)
        return Action(name, (*command, value), f"{key} {value}")

    return build


def _snapshot_create(f: Mapping[str, str]) -> Action:
    pgdata, tag = _field(f, "pgdata"), _field(f, "tag")
    return Action("snapshot-create", ("snapshot", "create", f"{pgdata}@{tag}"), None)


def _pg_checkout(f: Mapping[str, str]) -> Action:
    snapshot = _field(f, "snapshot")
    pgdata, at, _tag = snapshot.rpartition("@")
    if not at:
        raise BadForm(f"{snapshot} is not a node's snapshot (PGDATA@TAG)")
    return Action("pg-checkout", ("pg", "checkout", snapshot), f"snapshot {pgdata}@CURRENT")


def _snapshot_destroy(f: Mapping[str, str]) -> Action:
    snapshot = _field(f, "snapshot")
    return Action(
        "snapshot-destroy",
        ("snapshot", "destroy", snapshot),
        f"snapshot {snapshot}",
        f"Destroy snapshot {snapshot}? The history only it keeps is removed by the next GC.",
    )


def _pitr_extract(f: Mapping[str, str]) -> Action:
    area = _field(f, "area")
    if (f.get("time") or "").strip():  # the time form: the last commit at or before it
        args = ["pitr", "extract-snapshot", area, "--time", _field(f, "time")]
    else:  # the slider's LSN
        args = ["pitr", "extract-snapshot", area, "--lsn", lsn_argument(_field(f, "lsn"))]
    if (f.get("tag") or "").strip():
        args += ["--as", _field(f, "tag")]
    return Action("pitr-extract", tuple(args), None)


def _optional(f: Mapping[str, str], key: str, flag: str) -> list[str]:
    """`flag VALUE` when the form has a value for `key`, else nothing."""
    return [flag, _field(f, key)] if (f.get(key) or "").strip() else []


def _snapshot_import(f: Mapping[str, str]) -> Action:
    args = ["snapshot", "import", "--from", _field(f, "source"), _field(f, "name")]
    return Action("snapshot-import", (*args, *_optional(f, "storage", "-s")), None)


def _snapshot_push(f: Mapping[str, str]) -> Action:
    snapshot = _field(f, "snapshot")
    args = ["snapshot", "push", "--to", _field(f, "to"), snapshot]
    if f.get("full") == "1":
        args.append("--full")
    return Action("snapshot-push", tuple(args), f"snapshot {snapshot}")


def _snapshot_pull(f: Mapping[str, str]) -> Action:
    args = ["snapshot", "pull", "--from", _field(f, "source")]
    if (f.get("name") or "").strip():
        args.append(_field(f, "name"))
    return Action("snapshot-pull", (*args, *_optional(f, "storage", "-s")), None)


BUILDERS: dict[str, Builder] = {
    "pg-start": _on_one("pg-start", "node", "pg", "start"),
    "pg-stop": _on_one("pg-stop", "node", "pg", "stop"),
    "snapshot-create": _snapshot_create,
    "pg-checkout": _pg_checkout,
    "snapshot-destroy": _snapshot_destroy,
    "snapshot-start": _on_one("snapshot-start", "snapshot", "snapshot", "start"),
    "snapshot-stop": _on_one("snapshot-stop", "snapshot", "snapshot", "stop"),
    "pitr-extract": _pitr_extract,
    "snapshot-import": _snapshot_import,
    "snapshot-push": _snapshot_push,
    "snapshot-pull": _snapshot_pull,
}


def build(name: str, form: Mapping[str, str]) -> Action:
    builder = BUILDERS.get(name)
    if builder is None:
        raise BadForm(f"no action {name!r}")
    return builder(form)


def node_fingerprints(nodes: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """`node ID` -> its state, from `neon pg list --json`."""
    return {f"node {n['id']}": str(n["state"]) for n in nodes}


def snapshot_fingerprints(snapshots: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """`snapshot NAME` -> where it is, from `neon snapshot list --json`: timeline and LSN
    (a node's CURRENT by its timeline only: its LSN moves with every write)."""
    out = {}
    for s in snapshots:
        where = str(s.get("timeline_id"))
        if not str(s["name"]).endswith("@CURRENT"):
            where += f"/{s['lsn']}"
        out[f"snapshot {s['name']}"] = where
    return out


def changed(action: Action, seen: str | None, now: Mapping[str, str]) -> str | None:
    """Why the action must not run because its subject changed since the page showed it
    (`seen`), or None."""
    if action.subject is None or seen is None:
        return None
    current = now.get(action.subject)
    what = action.subject
    if current is None:
        return f"{what} no longer exists; nothing was done."
    if current != seen:
        if what.startswith("node "):
            detail = f"it is {current} now, the page showed it {seen}"
        else:
            detail = "it is not where the page showed it (a checkout or a new snapshot?)"
        return f"{what} changed since the page was shown ({detail}); nothing was done."
    return None
