"""The optional C extension; everything else is in pyproject.toml.

`optional=True`: without a C compiler the install still succeeds and the pure-Python reader
and decoder are used (pg15/native.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pg15._walscan",
            ["pg15/_walscan.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wno-unused-parameter"],
        )
    ]
)
