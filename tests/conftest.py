"""Shared fixtures: where the known-answer vectors live, root/tool checks, and a
fresh repository (`repo`; test modules may define their own)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from composefs.repository import Repository

ROOT = Path(__file__).resolve().parent.parent
VECTORS = (ROOT.parent / "shared" / "vectors").resolve()


@pytest.fixture(scope="session")
def vectors() -> Path:
    """The shared known-answer vectors; skip clearly when they are absent."""
    if not VECTORS.is_dir():
        pytest.skip(f"known-answer vectors not found at {VECTORS}")
    return VECTORS


def is_root() -> bool:
    return os.geteuid() == 0


needs_root = pytest.mark.skipif(not is_root(), reason="needs root for kernel mounts")


def need_tool(name: str) -> str:
    """Path of an external oracle tool, or skip the test naming the package."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (make system-deps installs it)")
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    """A new insecure repository under tmp_path."""
    r, created = Repository.init(tmp_path / "repo", insecure=True)
    assert created
    return r
