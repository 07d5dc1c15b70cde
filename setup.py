"""The optional C extension; everything else is in pyproject.toml.

`optional=True`: without a C compiler the install still succeeds and the pure-Python reader
and decoder are used (walreceiver/native.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "walreceiver._walscan",
            ["walreceiver/_walscan.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wno-unused-parameter"],
        )
    ]
)
