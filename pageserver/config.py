"""Settings of one pageserver process, in one object built once at startup.

`config_from_args` reads the command line and the environment (`NEON_GC_INTERVAL`,
`NEON_STORE_<SETTING>`); nothing else in the pageserver reads either, so what a daemon runs
with is exactly its PageserverConfig.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pageserver.storage.settings import DEFAULT_SETTINGS, StoreSettings
from proto.errors import InvalidArgument

DEFAULT_PROTO_PORT = 6400
DEFAULT_HTTP_PORT = 9898
DEFAULT_GC_INTERVAL = 300.0
GC_INTERVAL_ENV = "NEON_GC_INTERVAL"
TLS_CERT_ENV, TLS_KEY_ENV = "NEON_TLS_CERT", "NEON_TLS_KEY"
"""A PEM certificate (chain) and its key: the proto port then speaks TLS only."""
STORE_SETTING_ENV_PREFIX = "NEON_STORE_"
"""NEON_STORE_CHECKPOINT_DISTANCE=8388608 sets StoreSettings.checkpoint_distance, etc."""


@dataclass(frozen=True, slots=True)
class PageserverConfig:
    workdir: Path
    listen_host: str = "127.0.0.1"
    proto_port: int = DEFAULT_PROTO_PORT
    http_port: int = DEFAULT_HTTP_PORT
    token: str | None = None
    gc_interval: float = DEFAULT_GC_INTERVAL
    """Seconds between background GC runs."""
    store_settings: StoreSettings = DEFAULT_SETTINGS
    """Tunables of every storage the daemon opens."""
    tls_cert: Path | None = None
    """With `tls_key`: the proto port speaks TLS with this certificate (the HTTP port, status
    and metrics, stays plain)."""
    tls_key: Path | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.gc_interval) and self.gc_interval > 0):
            raise InvalidArgument(
                f"the GC interval must be a positive number of seconds, not {self.gc_interval}"
            )

    @property
    def pid_file(self) -> Path:
        return self.workdir / "pageserver.pid"

    @property
    def log_file(self) -> Path:
        return self.workdir / "pageserver.log"

    @property
    def ports_file(self) -> Path:
        """Where the daemon says which ports it bound (port 0 means 'pick one')."""
        return self.workdir / "pageserver.ports.json"

    @property
    def nodes_file(self) -> Path:
        return self.workdir / "nodes.json"


def gc_interval_from(text: str | None, source: str) -> float:
    """Seconds from `--gc-interval` or the environment (None: the default)."""
    if text is None:
        return DEFAULT_GC_INTERVAL
    try:
        return float(text)
    except ValueError:
        raise InvalidArgument(f"{source} must be a number of seconds, not {text!r}") from None


def store_settings_from(
    assignments: Iterable[str], env: Mapping[str, str], base: StoreSettings = DEFAULT_SETTINGS
) -> StoreSettings:
    """`base` with NEON_STORE_<NAME> variables, then NAME=VALUE assignments, applied."""
    names = {f.name for f in dataclasses.fields(StoreSettings)}
    pairs = [
        (key[len(STORE_SETTING_ENV_PREFIX) :].lower(), value, key)
        for key, value in sorted(env.items())
        if key.startswith(STORE_SETTING_ENV_PREFIX)
    ]
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep:
            raise InvalidArgument(f"--store-setting {assignment!r}: expected NAME=VALUE")
        pairs.append((name.strip(), value, f"--store-setting {name.strip()}"))
    changes: dict[str, int] = {}
    for name, value, source in pairs:
        if name not in names:
            raise InvalidArgument(
                f"{source}: unknown storage setting {name!r}; use one of {', '.join(sorted(names))}"
            )
        try:
            changes[name] = int(value)
        except ValueError:
            raise InvalidArgument(f"{source} must be an integer, not {value!r}") from None
    return dataclasses.replace(base, **changes)
