"""Fixtures for the tests that need kernel fs-verity (run inside the VM by tests/vm/run.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

SCRATCH_ENV = "COMPOSEFS_VERITY_SCRATCH"


@pytest.fixture
def verity_dir() -> Path:
    """A fresh directory on a filesystem with fs-verity (ext4 -O verity).

    Outside the VM there is none: skip, naming the way to run these tests.
    """
    scratch = os.environ.get(SCRATCH_ENV)
    if not scratch:
        pytest.skip(f"{SCRATCH_ENV} is unset: needs kernel fs-verity, run `make test-vm`")
    return Path(tempfile.mkdtemp(prefix="t-", dir=scratch))
