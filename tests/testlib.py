"""Helpers shared by test modules: root and tool checks, free ports, where
the vectors live.

Test modules import these as ``from testlib import ...``, never from
``conftest``: pytest loads every directory's conftest.py under the one
module name ``conftest``, so ``from conftest import`` gets whichever
directory's was loaded last (``pytest tests/cli tests/http`` failed so).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VECTORS = (ROOT.parent / "shared" / "vectors").resolve()


def is_root() -> bool:
    return os.geteuid() == 0


needs_root = pytest.mark.skipif(not is_root(), reason="needs root for kernel mounts")


def need_tool(name: str) -> str:
    """Path of an external oracle tool, or skip the test naming the package."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (make system-deps installs it)")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for servers the tests start)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
