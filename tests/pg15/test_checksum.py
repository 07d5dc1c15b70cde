"""pg15/checksum.py: the CRC-32C the CLI's modules use is the C module's when it is loaded
(the `crc32c` package's import costs a command's start 13-21 ms), the package's otherwise,
and both are PostgreSQL's CRC-32C."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import crc32c as package

from pg15 import checksum
from pg15.native import walscan


def test_check_value_and_continuation_equal_the_package() -> None:
    assert checksum.crc32c(b"123456789") == 0xE3069283  # CRC-32C's check value
    rng = random.Random(7)
    for size in (0, 1, 7, 8, 9, 20, 296, 8192, 65537):
        data = rng.randbytes(size)
        assert checksum.crc32c(data) == package.crc32c(data), size
        head, tail = data[: size // 3], data[size // 3 :]
        assert checksum.crc32c(tail, checksum.crc32c(head)) == package.crc32c(data), size
        assert checksum.crc32c(memoryview(data)) == package.crc32c(data), size


def test_the_c_module_computes_it_when_loaded() -> None:
    """The C module's function when it is loaded, else the package's (NEON_PURE_PYTHON=1,
    or not built: this test runs then too)."""
    expected = package.crc32c if walscan is None else walscan.crc32c
    assert checksum.crc32c is expected


def test_pure_python_mode_uses_the_package() -> None:
    code = "import pg15.checksum as c, crc32c; print(c.crc32c is crc32c.crc32c)"
    env = {**os.environ, "NEON_PURE_PYTHON": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr
