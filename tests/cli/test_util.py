"""The plumbing every tool shares (composefs.cli._util): --version."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import composefs

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TOOLS = [
    "mkcomposefs", "composefs-info", "composefs-dump", "cfsctl", "mount.composefs",
    "composefs-setup-root",
]  # fmt: skip


def _project_version() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


@pytest.mark.parametrize("tool", TOOLS)
def test_version_is_the_package_version(tool: str) -> None:
    """One source of truth: pyproject's version, through the installed
    package's metadata, printed by every tool as `PROG VERSION`."""
    r = subprocess.run([str(BIN / tool), "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{tool} {_project_version()}\n"
    assert r.stderr == ""


def test_package_version_attribute() -> None:
    assert composefs.__version__ == _project_version()
