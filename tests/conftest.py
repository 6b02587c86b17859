"""Shared fixtures: where the known-answer vectors live, root/tool checks, and a
fresh repository (`repo`; test modules may define their own)."""

from __future__ import annotations

from pathlib import Path

import pytest

from composefs.repository import Repository
from testlib import VECTORS


@pytest.fixture(scope="session")
def vectors() -> Path:
    """The shared known-answer vectors; skip clearly when they are absent."""
    if not VECTORS.is_dir():
        pytest.skip(f"known-answer vectors not found at {VECTORS}")
    return VECTORS


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    """A new insecure repository under tmp_path."""
    r, created = Repository.init(tmp_path / "repo", insecure=True)
    assert created
    return r
