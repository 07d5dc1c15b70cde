"""The optional C extensions; everything else is in pyproject.toml.

`optional=True`: without a C compiler the install still succeeds and the pure-Python reader,
decoder and redo are used (pg15/native.py, pageserver/redo/native.py). The tests then fail
(tests/pg15/test_native_walscan.py, tests/pageserver/redo/test_native_redo.py),
so CI cannot pass without the fast path; NEON_ALLOW_PURE_PYTHON=1 (or NEON_PURE_PYTHON=1,
which also switches it off) lets a local run go on without it.
"""

from setuptools import Extension, setup

COMPILE_ARGS = ["-O2", "-std=c11", "-Wall", "-Wno-unused-parameter"]

setup(
    ext_modules=[
        Extension(
            "pg15._walscan",
            ["pg15/_walscan.c"],
            depends=["pg15/crc32c.h", "pg15/walrecord.h"],
            optional=True,
            extra_compile_args=COMPILE_ARGS,
        ),
        Extension(
            "pageserver.ingest._walingest",
            ["pageserver/ingest/_walingest.c"],
            include_dirs=["pageserver", "pageserver/storage/layers", "pg15"],
            depends=[
                "pageserver/native_slots.h",
                "pageserver/storage/layers/inmem_api.h",
                "pg15/walrecord.h",
            ],
            optional=True,
            extra_compile_args=COMPILE_ARGS,
        ),
        Extension(
            "pageserver.storage.layers._blockpack",
            ["pageserver/storage/layers/_blockpack.c"],
            include_dirs=["pageserver"],
            depends=["pageserver/native_slots.h"],
            optional=True,
            extra_compile_args=COMPILE_ARGS,
        ),
        Extension(
            "pageserver.storage.layers._inmem",
            ["pageserver/storage/layers/_inmem.c"],
            depends=["pageserver/storage/layers/inmem_api.h"],
            optional=True,
            extra_compile_args=COMPILE_ARGS,
        ),
        Extension(
            "pageserver.redo._redo",
            ["pageserver/redo/_redo.c"],
            include_dirs=["pg15"],
            depends=["pg15/crc32c.h", "pg15/walrecord.h"],
            optional=True,
            extra_compile_args=COMPILE_ARGS,
        ),
    ]
)
