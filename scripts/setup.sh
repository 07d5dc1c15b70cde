#!/usr/bin/env bash
# Installs what pg-neon needs on Debian 12: postgresql-15 (when its binaries are missing)
# and a .venv with the package and its test extras. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_BIN="${NEON_PG_BIN:-/usr/lib/postgresql/15/bin}"
if [ ! -x "$PG_BIN/initdb" ] || [ ! -x "$PG_BIN/pg_waldump" ] || [ ! -x "$PG_BIN/pgbench" ]; then
    echo "setup: PostgreSQL 15 binaries missing in $PG_BIN; installing postgresql-15 with apt-get"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    $SUDO apt-get install -y -q postgresql-15 postgresql-contrib-15 || $SUDO apt-get install -y -q postgresql-15
    # Debian starts a default cluster; pg-neon runs its own, so stop that one if it was started.
    if command -v pg_ctlcluster >/dev/null 2>&1; then $SUDO pg_ctlcluster 15 main stop 2>/dev/null || true; fi
fi

# A .neon snapshot file opens with standard tools (docs/snapshot-format.md); its tests run
# the real tar, zstd, sha256sum and jq.
SNAP_TOOLS=""
for tool in zstd tar jq; do command -v "$tool" >/dev/null 2>&1 || SNAP_TOOLS="$SNAP_TOOLS $tool"; done
if [ -n "$SNAP_TOOLS" ]; then
    echo "setup:$SNAP_TOOLS missing; installing with apt-get"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -q
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -q $SNAP_TOOLS
fi

# `neon snapshot push/pull ssh://` runs the system ssh client; its tests start a real sshd on
# 127.0.0.1 with throwaway keys. The package's own service is neither started nor enabled:
# installing test tools must not open port 22.
if [ ! -x /usr/sbin/sshd ] || ! command -v ssh >/dev/null 2>&1 \
    || ! command -v ssh-keygen >/dev/null 2>&1; then
    echo "setup: ssh or sshd missing; installing openssh-client and openssh-server with apt-get"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    POLICY=/usr/sbin/policy-rc.d
    OWN_POLICY=""
    if [ ! -e "$POLICY" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
        $SUDO chmod 755 "$POLICY"
        OWN_POLICY=1
    fi
    SSH_OK=1
    { $SUDO apt-get update -q && $SUDO apt-get install -y -q openssh-client openssh-server; } \
        || SSH_OK=""
    [ -z "$OWN_POLICY" ] || $SUDO rm -f "$POLICY"
    [ -n "$SSH_OK" ] || { echo "setup: installing openssh failed" >&2; exit 1; }
    if command -v systemctl >/dev/null 2>&1; then $SUDO systemctl disable ssh >/dev/null 2>&1 || true; fi
fi

# `neon console`'s test drives Debian's Chromium through Playwright (executable_path
# /usr/bin/chromium: Playwright's own browser download cannot work offline).
if [ ! -x /usr/bin/chromium ]; then
    echo "setup: chromium missing; installing it with apt-get"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    { $SUDO apt-get update -q && $SUDO apt-get install -y -q chromium; } \
        || { echo "setup: installing chromium failed" >&2; exit 1; }
fi

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3

# The WAL reader/decoder has optional C fast paths (pg15/_walscan.c); pip builds them
# when a C compiler and the Python headers are there. Without them pg-neon still works, in
# pure Python, about four times slower at decoding WAL.
PY_INCLUDE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
if ! command -v cc >/dev/null 2>&1 || [ ! -f "$PY_INCLUDE/Python.h" ]; then
    echo "setup: no C compiler or Python headers; installing gcc and python3-dev with apt-get"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    { $SUDO apt-get update -q && $SUDO apt-get install -y -q gcc python3-dev; } \
        || echo "setup: could not install them; the pure-Python WAL decoder will be used"
fi
stamp=.venv/.installed
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
    || [ pg15/_walscan.c -nt "$stamp" ] || [ pageserver/redo/_redo.c -nt "$stamp" ] \
    || [ pageserver/ingest/_walingest.c -nt "$stamp" ] \
    || [ pageserver/storage/layers/_blockpack.c -nt "$stamp" ] \
    || [ pageserver/storage/layers/_inmem.c -nt "$stamp" ] \
    || [ pageserver/native_slots.h -nt "$stamp" ] || [ pg15/crc32c.h -nt "$stamp" ]; then
    echo "setup: installing pg-neon and its dependencies into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi

# `neon` itself as a native program (cli/neon_launcher.c): a command the home's warm server
# runs then starts without an interpreter (~11 ms of each). pip's Python launcher stays
# beside it as .venv/bin/neon-python, for everything else; without a C compiler it stays
# .venv/bin/neon. Rebuilt when pip wrote its script again or a source changed.
.venv/bin/python -m cli.native_launcher .venv/bin

# Byte-compile pg-neon's own modules (pip does it for the dependencies it installs, not for
# an editable install): Python then reads them instead of compiling every module at every
# `neon` command, even where PYTHONDONTWRITEBYTECODE keeps it from caching them itself
# (about 0.1 s of every command's start). Up-to-date files are skipped; an edited module's
# stale .pyc is never used (its source's mtime and size are checked).
.venv/bin/python -m compileall -q -j 0 cli pageserver pageserver_api pg15 proto snapfile \
    walreceiver datadir_files durable_files bench
