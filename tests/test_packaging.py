"""Every top-level package is installed, type-checked and shipped in the container image."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _packages() -> set[str]:
    return {
        p.name
        for p in REPO.iterdir()
        if (p / "__init__.py").is_file() and p.name not in ("tests", "bench")
    }


def test_packages_are_installed_checked_and_shipped() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = {p.rstrip("*") for p in config["tool"]["setuptools"]["packages"]["find"]["include"]}
    checked = set(config["tool"]["mypy"]["files"])
    copied = set(re.findall(r"^COPY (\w+) \1$", (REPO / "docker/Dockerfile").read_text(), re.M))
    packages = _packages()
    assert packages <= include, f"not installed by pip: {packages - include}"
    assert packages <= checked, f"not type-checked: {packages - checked}"
    assert packages <= copied, f"not in the container image: {packages - copied}"
