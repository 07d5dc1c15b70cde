"""What every command needs: the resolved home and its registry (opened on first use)."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

import click

from cli.home import NeonHome, use_home
from cli.registry import Registry
from cli.storages import DEFAULT_STORAGE, build_spec, materialize
from proto.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class RemotePageserver:
    """`--pageserver neon://HOST:PORT[?token=T]`: the pageserver this invocation talks to
    instead of the home's own (one in a container, say); the token is never shown."""

    host: str
    port: int
    token: str | None

    @classmethod
    def parse(cls, url: str) -> RemotePageserver:
        from urllib.parse import urlsplit

        from cli.transport.neon import URL_FORM, NeonStore, parse_location

        if urlsplit(url).scheme != "neon":
            raise InvalidArgument(
                f"--pageserver {url.partition('?')[0]}: expected neon://HOST:PORT[?token=T]"
            )
        location = parse_location(url)
        if location.name is not None:
            raise InvalidArgument(
                f"--pageserver {url.partition('?')[0]}: a pageserver's address has no path "
                f"(expected {URL_FORM.replace('[NAME]', '')})"
            )
        store = location.store
        assert isinstance(store, NeonStore)
        return cls(*store.address)


@dataclass
class App:
    home: NeonHome
    registry: Registry
    remote: RemotePageserver | None = None
    """Set by --pageserver: every API call goes there (cli/pageserver_control.local_api)."""

    def require_own_pageserver(self, what: str) -> None:
        """Refuse `what` under --pageserver: it hands this machine's files (data directories,
        received or imported snapshots) to the pageserver, which must be the home's own."""
        if self.remote is not None:
            raise InvalidArgument(
                f"{what} works with this home's own pageserver (it hands it files of this "
                "machine); run it without --pageserver / NEON_PAGESERVER"
            )

    @classmethod
    def open(cls, home_option: Path | None) -> App:
        home = NeonHome.resolve(home_option)
        home.ensure()
        use_home(home)
        app = cls(home, Registry(home.registry_path))
        app._ensure_default_storage()
        return app

    def _ensure_default_storage(self) -> None:
        """Set up the default storage once, even when several first commands run together.

        Setting it up writes a marker into its directory (a temporary file, then a rename); a
        second command looking at the directory in between saw files but no marker and refused
        it as someone else's, so set-up holds an exclusive flock (blocking: it is short).
        """
        if self.registry.find_storage(DEFAULT_STORAGE) is not None:
            return
        self.home.locks_dir.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(
            self.home.locks_dir / "default-storage.lock",
            os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
            0o600,
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self.registry.find_storage(DEFAULT_STORAGE) is not None:
                return
            spec = build_spec(self.home, DEFAULT_STORAGE, "native", {})
            materialize(self.home, spec)
            with self.registry.transaction() as cur:
                self.registry.insert_storage(
                    cur, spec.name, spec.type, spec.options, or_ignore=True
                )
        finally:
            os.close(fd)


def get_app(ctx: click.Context) -> App:
    """The App of this invocation, opened once and shared by nested commands."""
    root = ctx.find_root()
    root.ensure_object(dict)
    app = root.obj.get("app")
    if app is None:
        app = App.open(root.obj.get("home"))
        url = root.obj.get("pageserver")
        if url:
            app.remote = RemotePageserver.parse(url)
        root.obj["app"] = app
        root.call_on_close(app.registry.close)
    assert isinstance(app, App)
    return app
