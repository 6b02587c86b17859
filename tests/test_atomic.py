"""composefs._atomic.replacing: all or nothing, never a temporary file left."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from composefs._atomic import replacing


def test_replaces_with_mode(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with replacing(str(target), mode=0o644, sync=True) as f:
        f.write(b"new")
        assert target.read_bytes() == b"old"  # not visible before the block ends
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert os.listdir(tmp_path) == ["f"]


def test_failure_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with replacing(str(target), mode=0o644) as f:
            f.write(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f"]
    with pytest.raises(RuntimeError):
        with replacing(str(tmp_path / "new")):
            raise RuntimeError
    assert os.listdir(tmp_path) == ["f"]
