"""Hostile images: work and memory bounded by the image size (WORK_FACTOR),
readers that need no file data do not read it, deep paths are listed in
memory proportional to the deepest path."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest

import hostilelib as H
from composefs.erofs import reader
from composefs.errors import ImageError

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("version", [0, 2])
def test_shared_data_block_is_refused_or_not_read(version: int) -> None:
    img = H.shared_block_image(3000, version)  # ~200 KB claiming 12 MB of data
    with pytest.raises(ImageError, match="more data than it holds"):
        reader.read_image(img)
    tree = reader.read_image(img, inline_data=False)
    assert len(tree.entries) == 3000
    assert reader.collect_objects(img) == set()


def test_work_bound_admits_real_images() -> None:
    # every file stored once: the bound is never near
    img = H.shared_block_image(1, 0)
    assert len(reader.read_image(img).entries) == 1


def _run(args: list[str], mem_mb: int, cpu_s: int) -> subprocess.CompletedProcess[bytes]:
    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (mem_mb << 20, mem_mb << 20))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))

    return subprocess.run(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=limits, timeout=120
    )


def test_tools_on_shared_block_image(tmp_path: Path) -> None:
    img = tmp_path / "share.img"
    img.write_bytes(H.shared_block_image(20000))
    for cmd in ("ls", "objects"):
        r = _run([str(BIN / "composefs-info"), cmd, str(img)], 600, 30)
        assert r.returncode == 0, r.stderr
    r = _run([str(BIN / "composefs-info"), "dump", str(img)], 600, 30)
    assert r.returncode == 1 and b"more data than it holds" in r.stderr
    assert r.stderr.count(b"\n") == 1
    out = tmp_path / "out.img"
    r = _run([str(BIN / "composefs-dump"), str(img), str(out)], 600, 30)
    assert r.returncode == 1 and b"more data than it holds" in r.stderr
    assert not out.exists()


def test_ls_of_deep_long_names_is_bounded(tmp_path: Path) -> None:
    """2,040 nested 255-byte names: ~530 MB of listing, which used to take
    2.6 GB and 70 s; now memory is O(deepest path)."""
    img = tmp_path / "deep.img"
    img.write_bytes(H.deep_image(2040, 255, 0))
    for cmd in ("ls", "dump"):
        r = _run([str(BIN / "composefs-info"), cmd, str(img)], 400, 30)
        assert r.returncode == 0, (cmd, r.stderr[-300:])
