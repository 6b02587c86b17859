"""README.md is run, not just read: its library snippets work verbatim in a
fresh directory, and what it says about the tools matches them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_blocks() -> list[str]:
    """The python blocks of the README's "## Library" section."""
    section = README.split("\n## Library\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_library_snippet_runs_in_a_fresh_directory(tmp_path: Path) -> None:
    first = _python_blocks()[0]
    r = subprocess.run(
        [sys.executable, "-c", first], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "/usr/bin/hello" in r.stdout
    assert (tmp_path / "repo" / "meta.json").is_file()
    assert (tmp_path / "repo" / "images" / "refs" / "hello").is_symlink()


def test_oci_snippet_runs_on_a_layout(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests" / "oci"))
    try:
        import ocitestlib as L
    finally:
        sys.path.pop(0)
    blocks = _python_blocks()
    assert len(blocks) >= 2
    L.write_oci_layout(
        tmp_path / "layout",
        [L.ImageSpec([L.tar_layer([L.directory("usr"), L.file("usr/x", b"x" * 100)])])],
    )
    r = subprocess.run(
        [sys.executable, "-c", blocks[1]], cwd=tmp_path, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"[0-9a-f]{128}\n", r.stdout), r.stdout


@pytest.mark.parametrize(
    "claim",
    [
        "mount NAME",  # every form of an image name, documented
        "--no-propagate-usr-to-root",  # create-image of a tree without /usr
        "2½-3 minutes",  # how long the default benchmark run takes
        "--insecure",
    ],
)
def test_readme_mentions(claim: str) -> None:
    assert claim in README
