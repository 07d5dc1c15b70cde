"""What every command needs: the resolved home and its registry (opened on first use)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import click

from cli.home import NeonHome
from cli.registry import Registry
from cli.storages import DEFAULT_STORAGE, build_spec, materialize


@dataclass
class App:
    home: NeonHome
    registry: Registry

    @classmethod
    def open(cls, home_option: Path | None) -> App:
        home = NeonHome.resolve(home_option)
        home.ensure()
        app = cls(home, Registry(home.registry_path))
        app._ensure_default_storage()
        return app

    def _ensure_default_storage(self) -> None:
        if self.registry.find_storage(DEFAULT_STORAGE) is not None:
            return
        spec = build_spec(self.home, DEFAULT_STORAGE, "native", {})
        materialize(self.home, spec)
        with self.registry.transaction() as cur:
            self.registry.insert_storage(cur, spec.name, spec.type, spec.options, or_ignore=True)


def get_app(ctx: click.Context) -> App:
    """The App of this invocation, opened once and shared by nested commands."""
    root = ctx.find_root()
    root.ensure_object(dict)
    app = root.obj.get("app")
    if app is None:
        app = App.open(root.obj.get("home"))
        root.obj["app"] = app
        root.call_on_close(app.registry.close)
    assert isinstance(app, App)
    return app
