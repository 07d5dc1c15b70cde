"""The pageserver process: proto and HTTP services on asyncio + uvloop until SIGTERM.

`python -m pageserver.daemon --workdir DIR` runs in the foreground (what `neon pageserver run`
and containers use); `neon pageserver start` runs the same thing detached.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import faulthandler
import json
import logging
import logging.handlers
import os
import signal
import ssl
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import uvloop

from durable_files import PRIVATE_UMASK
from pageserver.api.http_service import HttpService
from pageserver.api.local_files import LocalFilesServer, socket_path
from pageserver.api.proto_service import build_handlers, local_basebackup
from pageserver.api.service import VERSION, Pageserver
from pageserver.config import (
    DEFAULT_GC_INTERVAL,
    DEFAULT_HTTP_PORT,
    DEFAULT_PROTO_PORT,
    GC_INTERVAL_ENV,
    STORE_SETTING_ENV_PREFIX,
    TLS_CERT_ENV,
    TLS_KEY_ENV,
    PageserverConfig,
    gc_interval_from,
    store_settings_from,
)
from pageserver.malloc_tuning import tune_malloc
from pageserver.pid_file import acquire_pid_file
from pageserver.remote.object_service import OBJECTS_DIR, blob_handlers
from pageserver.task_stacks import format_task_stacks
from pageserver_api.models import resolve_all_hints
from proto.errors import InvalidArgument, NeonError
from proto.server import Handler, ProtoServer

log = logging.getLogger("pageserver")

Companion = Callable[[PageserverConfig], list[str] | None]
"""The command line of a process the daemon keeps beside it once it serves, or None (the
CLI's: its warm command server, cli/warm_server.py). Started in a session of its own,
restarted when it exits with COMPANION_RESTART, sent SIGTERM at shutdown."""
COMPANION_RESTART = 75
_COMPANION_STOP_WAIT = 1.0  # it may outlive the daemon: it reports its commands' ends first

ExtraHandlers = Callable[[PageserverConfig], Mapping[str, Handler]]
"""More proto methods on the same port (the CLI's entry point, cli/pageserver_daemon.py, adds
the `object.*` methods that serve the home's snapshots; the pageserver itself knows no home).
They are made before the daemon listens and must not call it until their first request."""


def _write_json_atomic(path: Path, value: object) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


async def _gc_loop(ps: Pageserver) -> None:
    """Remove, every config.gc_interval seconds, what no snapshot, PITR area, child or tip
    needs."""
    while True:
        await asyncio.sleep(ps.config.gc_interval)
        try:
            results = await ps.gc_all()
        except Exception:
            log.exception("GC failed")
            continue
        freed = sum(r["removed_bytes"] for r in results)
        if freed:
            log.info("GC freed %d bytes", freed)


async def _keep_companion(argv: list[str], stderr_path: Path) -> None:
    """Run `argv` (see Companion) until cancelled; SIGTERM to it then."""
    while True:
        with open(stderr_path, "ab") as stderr:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )
        try:
            code = await proc.wait()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_COMPANION_STOP_WAIT):
                    await proc.wait()
            raise
        if code != COMPANION_RESTART:
            log.warning("%s exited with %d", argv[-3:], code)
            return
        await asyncio.sleep(0.5)


async def serve(
    config: PageserverConfig,
    extra: ExtraHandlers | None = None,
    companion: Companion | None = None,
) -> None:
    config.workdir.mkdir(parents=True, exist_ok=True)
    acquire_pid_file(config.pid_file)
    proto: ProtoServer | None = None
    http: HttpService | None = None
    local: LocalFilesServer | None = None
    ps: Pageserver | None = None
    companion_task: asyncio.Task[None] | None = None
    try:
        ps = Pageserver(config)
        handlers = {
            **build_handlers(ps),
            **blob_handlers(config.workdir / OBJECTS_DIR),  # a remote storage's objects
            **(extra(config) if extra is not None else {}),
        }
        try:  # every model's types, before the first request (not in it)
            resolve_all_hints()
        except Exception:  # a model that cannot be resolved fails its own requests only
            log.exception("resolving the API models' field types")
        proto = ProtoServer(
            handlers, token=config.token, server_name=f"pg-neon pageserver {VERSION}"
        )
        await proto.start(config.listen_host, config.proto_port, ssl=server_tls(config))
        proto_port = proto.port
        http = HttpService(ps)
        http_port = await http.start(config.listen_host, config.http_port)
        local_path = socket_path(config.workdir)
        if local_path is not None:  # too long a path: its CLI streams
            local = LocalFilesServer(local_path, local_basebackup(ps))
            await local.start()
        ps.config = dataclasses.replace(config, proto_port=proto_port, http_port=http_port)
        _write_json_atomic(
            config.ports_file,
            {
                "pid": os.getpid(),
                "host": config.listen_host,
                "proto_port": proto_port,
                "http_port": http_port,
                "tls_cert": None if config.tls_cert is None else str(config.tls_cert),
            },
        )
        log.info(
            "pageserver %s serving proto on %s:%d and http on %s:%d (pid %d)",
            VERSION,
            config.listen_host,
            proto_port,
            config.listen_host,
            http_port,
            os.getpid(),
        )
        ps.start_following()
        gc_task = asyncio.create_task(_gc_loop(ps), name="gc")
        companion_argv = companion(config) if companion is not None else None
        if companion_argv is not None:
            kept = _keep_companion(companion_argv, config.workdir / "companion.stderr")
            companion_task = asyncio.create_task(kept, name="companion")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        _dump_tasks_on_usr1(loop)
        await stop.wait()
        log.info("shutting down")
        gc_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await gc_task
    finally:
        if companion_task is not None:
            companion_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await companion_task
        if local is not None:  # its writes stop (at their next MiB) before the stores close
            await local.close()
        if ps is not None:
            await ps.stop_following()
        if proto is not None:
            await proto.close()
        if http is not None:
            await http.close()
        config.ports_file.unlink(missing_ok=True)
        config.pid_file.unlink(missing_ok=True)
        log.info("stopped")


def _dump_tasks_on_usr1(loop: asyncio.AbstractEventLoop) -> None:
    """`kill -USR1` once serving: every thread's stack at once, as before (faulthandler,
    registered again after the loop's handler, chained to it: registering an enabled signal
    again would not reinstall it), then, from the loop, every task's chain of awaits
    (pageserver/task_stacks.py) to stderr: an idle loop's thread shows none of them. A
    loop that is stuck shows its thread in the first dump."""

    def dump() -> None:
        sys.stderr.write(format_task_stacks(loop))
        sys.stderr.flush()

    faulthandler.unregister(signal.SIGUSR1)  # else it would restore its predecessor later
    loop.add_signal_handler(signal.SIGUSR1, dump)
    faulthandler.register(signal.SIGUSR1, all_threads=True, chain=True)


def server_tls(config: PageserverConfig) -> ssl.SSLContext | None:
    """The proto port's TLS context (TLS 1.2 at least), or None without a certificate."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise InvalidArgument("TLS needs both --tls-cert and --tls-key (or neither)")
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise InvalidArgument(
            f"cannot load the TLS certificate {config.tls_cert} and key {config.tls_key}: {exc}"
        ) from None
    return context


def parse_args(
    argv: list[str] | None, env: Mapping[str, str] | None = None
) -> tuple[PageserverConfig, bool]:
    """The daemon's one PageserverConfig, from the command line and the environment `env`
    (default: os.environ), and whether to log to stderr."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(prog="pageserver", description="pg-neon pageserver")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--listen", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PROTO_PORT, help="proto port")
    parser.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT)
    parser.add_argument("--token-file", type=Path, default=None)
    parser.add_argument("--log-stderr", action="store_true", help="log to stderr, not a file")
    parser.add_argument(
        "--tls-cert", type=Path, default=env.get(TLS_CERT_ENV) or None, metavar="PEM",
        help=f"serve proto over TLS with this certificate chain (${TLS_CERT_ENV})",
    )  # fmt: skip
    parser.add_argument(
        "--tls-key", type=Path, default=env.get(TLS_KEY_ENV) or None, metavar="PEM",
        help=f"the certificate's private key (${TLS_KEY_ENV})",
    )  # fmt: skip
    parser.add_argument(
        "--gc-interval",
        default=None,
        metavar="SECONDS",
        help=f"seconds between GC runs (${GC_INTERVAL_ENV}, else {DEFAULT_GC_INTERVAL:g})",
    )
    parser.add_argument(
        "--store-setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help=f"a storage tunable (see StoreSettings; also ${STORE_SETTING_ENV_PREFIX}NAME)",
    )
    args = parser.parse_args(argv)
    token = args.token_file.read_text().strip() if args.token_file else None
    try:
        if args.gc_interval is not None:
            gc_interval = gc_interval_from(args.gc_interval, "--gc-interval")
        else:
            gc_interval = gc_interval_from(env.get(GC_INTERVAL_ENV), GC_INTERVAL_ENV)
        config = PageserverConfig(
            args.workdir.absolute(),
            args.listen,
            args.port,
            args.http_port,
            token,
            gc_interval=gc_interval,
            store_settings=store_settings_from(args.store_setting, env),
            tls_cert=None if args.tls_cert is None else Path(args.tls_cert).absolute(),
            tls_key=None if args.tls_key is None else Path(args.tls_key).absolute(),
        )
        server_tls(config)  # a bad certificate or key: refused before anything starts
    except NeonError as exc:
        parser.error(str(exc))
    return config, bool(args.log_stderr)


LOG_MAX_BYTES = 10 << 20
LOG_BACKUPS = 5
"""pageserver.log rotates at 10 MiB into .1 ... .5: at most 60 MiB of logs, ever."""


def setup_logging(config: PageserverConfig, to_stderr: bool) -> None:
    handler: logging.Handler
    if to_stderr:
        handler = logging.StreamHandler(sys.stderr)
    else:
        config.workdir.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            config.log_file, maxBytes=LOG_MAX_BYTES, backupCount=LOG_BACKUPS
        )
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def main(
    argv: list[str] | None = None,
    extra: ExtraHandlers | None = None,
    companion: Companion | None = None,
) -> int:
    tune_malloc()  # before any thread allocates (pageserver/malloc_tuning.py)
    os.umask(PRIVATE_UMASK)  # page history, WAL, registries, logs: readable by us only
    config, to_stderr = parse_args(argv)
    setup_logging(config, to_stderr)
    faulthandler.enable()  # a fatal signal leaves the threads' stacks in pageserver.stderr
    # `kill -USR1 PID` writes every thread's stack there too, the daemon going on: what a
    # request that never answers waits on.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        uvloop.run(serve(config, extra, companion))
    except NeonError as exc:
        log.error("%s", exc)
        print(f"pageserver: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        log.error("cannot serve: %s", exc)
        print(f"pageserver: error: {exc}", file=sys.stderr)
        return 1
    with contextlib.suppress(Exception):
        logging.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
