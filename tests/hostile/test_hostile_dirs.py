"""Local directories deeper than the reader accepts: refused with one line
by `fs.read_directory`, `mkcomposefs` and `cfsctl create-image`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import hostilelib as H
from composefs import fs, limits
from composefs.erofs.reader import read_image
from composefs.erofs.writer import mkfs
from composefs.errors import SourceError


@pytest.fixture
def deep(tmp_path: Path) -> Iterator[list[Path]]:
    """Tops of deep chains; removed iteratively afterwards, even on failure
    (pytest's own cleanup would recurse once per level)."""
    tops: list[Path] = []
    yield tops
    for top in tops:
        H.remove_deep_dir(str(top))


def test_read_directory_depth_limit(tmp_path: Path, deep: list[Path]) -> None:
    ok = tmp_path / "ok"
    bad = tmp_path / "bad"
    for top, depth in ((ok, limits.MAX_DEPTH), (bad, limits.MAX_DEPTH + 1)):
        top.mkdir()
        deep.append(top)
        H.make_deep_dir(str(top), depth)
    read_image(mkfs(fs.read_directory(ok)))
    with pytest.raises(SourceError, match="deeper than 2048"):
        fs.read_directory(bad)


@pytest.mark.parametrize("tool", ["mkcomposefs", "create-image"])
def test_cli_refuses_deep_directory(tmp_path: Path, deep: list[Path], tool: str) -> None:
    src = tmp_path / "src"
    (src / "usr").mkdir(parents=True)
    deep.append(src / "usr")
    H.make_deep_dir(str(src / "usr"), 2100)
    bindir = Path(sys.executable).parent
    if tool == "mkcomposefs":
        cmd = [str(bindir / "mkcomposefs"), str(src), str(tmp_path / "img")]
    else:
        repo = tmp_path / "repo"
        subprocess.run(
            [str(bindir / "cfsctl"), "--repo", str(repo), "init", "--insecure"], check=True
        )
        cmd = [str(bindir / "cfsctl"), "--repo", str(repo), "create-image", str(src), "name"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "deeper than 2048" in r.stderr, r.stderr
    assert not (tmp_path / "img").exists()
