"""The plumbing every tool shares (composefs.cli._util): --version, the heap."""

from __future__ import annotations

import gc
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import composefs
from composefs.cli._util import run

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


_AS_PROGRAM = """
import atexit, gc, sys
from composefs.cli._util import run
seen = []
# registered before run() registers its own: runs after it
atexit.register(lambda: print("at exit frozen:", gc.get_freeze_count() > seen[0], flush=True))
kept = []
def body(argv):
    seen.append(gc.get_freeze_count())
    print("argv:", argv, "frozen at start:", seen[0] > 0)
    kept.extend([] for _ in range(100))  # what the command keeps until exit
sys.exit(run("t", body, None))
"""


def test_as_the_program_the_heap_is_frozen_at_start_and_exit() -> None:
    """A tool running as the program freezes what exists when the command
    starts and, after every other exit handler, what exists then: the
    collector's full passes skip memory the process keeps to the end."""
    r = subprocess.run(
        [sys.executable, "-c", _AS_PROGRAM, "a", "b"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "argv: ['a', 'b'] frozen at start: True",
        "at exit frozen: True",
    ]


def test_called_from_python_the_heap_is_left_alone() -> None:
    """`run` with explicit arguments (a test, a caller's program) leaves the
    collector as it was: freezing there would keep a caller's garbage."""
    before = gc.get_freeze_count()
    assert run("t", lambda argv: 0, ["x"]) == 0
    assert gc.get_freeze_count() == before
