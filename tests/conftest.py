"""Shared fixtures: where the known-answer vectors live, root/tool checks, and a
fresh repository (`repo`; test modules may define their own)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from composefs.repository import Repository
from testlib import VECTORS

# A shell without job control starts background jobs with SIGINT ignored,
# and an ignored signal stays ignored across exec: the tools under test
# would never see the Ctrl-C the interruption tests send them. A handler
# is reset to the default on exec instead, so every child can be
# interrupted, however the test run itself was started.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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
